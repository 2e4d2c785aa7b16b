"""What bench.peer measures every arm with, the same for ours and litdata's: the decode, the pass over a
loader (first batch, steady samples/s, the ids in order), peak PSS, and a cold page cache."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from typing import Any

import numpy as np

BATCH = 64
WORKERS = 2
SEED = 0


class PssPeak:
    """Peak PSS (MB) of this process and its children (DataLoader workers), sampled by a separate
    watcher process. PSS, not RSS: pages a forked worker shares with its parent are counted once,
    split between them.

    Not a thread in the measured process: psutil parses /proc/PID/smaps_rollup in Python, holding
    the GIL, and a kernel walk of a torch process's mappings is not cheap. A sampling thread at
    20 ms took 0.9 s of main-process CPU per 6,000-sample pass of ours (py-spy: 38 % of its
    samples) and 0.4 s of litdata's, contending with the loader's own threads for the GIL
    (bench.peer, 56 px, 2-core machine). The watcher costs CPU still, the same for every arm, but
    no arm's GIL. Every 0.1 s, not 20 ms: a sample of three torch processes takes the watcher ~8 ms
    of a core, so at 20 ms it took ~1 s of CPU per pass of ours (0.6 s of litdata's) from the two
    cores the arms share; a chunk's pieces are held for 0.2 s and more, so 0.1 s still sees them."""

    def __init__(self, every_s: float = 0.1) -> None:
        self.every_s = every_s
        self.peak = 0.0
        self._proc: subprocess.Popen | None = None

    def __enter__(self) -> PssPeak:
        self._proc = subprocess.Popen([sys.executable, "-c", _WATCHER, str(os.getpid()), str(self.every_s)],
                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self._proc.stdout is not None
        self._proc.stdout.readline()  # "ready": its first sample is taken, the clock may start
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._proc is not None
        out, _ = self._proc.communicate("stop\n", timeout=60)
        self.peak = float(out.strip().splitlines()[-1])


# The watcher: samples PSS of a pid and its descendants until a line on stdin, prints the peak (MB).
_WATCHER = """
import select, sys, psutil
root, every = psutil.Process(int(sys.argv[1])), float(sys.argv[2])
def sample():
    total = 0
    for p in [root, *root.children(recursive=True)]:
        try:
            total += p.memory_full_info().pss
        except Exception:  # a worker that just exited
            pass
    return total / 2**20
peak = sample()
print("ready", flush=True)
while not select.select([sys.stdin], [], [], every)[0]:
    peak = max(peak, sample())
print(max(peak, sample()), flush=True)
"""


def drop_page_cache(root: str) -> None:
    """Evict every file under root from the page cache (posix_fadvise: no root needed)."""
    for dirpath, _, files in os.walk(root):
        for f in files:
            fd = os.open(os.path.join(dirpath, f), os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def iterate(loader: Any, t0: float) -> dict[str, Any]:
    """One pass over a loader of (images, masks, sample ids) batches."""
    first = None
    n = n_first = 0
    ids: list[int] = []
    arrived: list[tuple[float, int]] = []  # (time, samples so far) after each batch
    for batch in loader:
        k = len(batch[0])
        if first is None:
            first, n_first = time.perf_counter(), k
        n += k
        arrived.append((time.perf_counter(), n))
        ids += np.asarray(batch[2]).tolist()
    end = time.perf_counter()
    assert first is not None, "the loader gave no batch"
    # The second half alone as well: a loader whose workers start one after another (spawned, on a loaded
    # machine) is still warming up after its first batch, which a short pass would count as its speed.
    t_half, n_half = next((t, m) for t, m in arrived if m >= n / 2)
    return {"first_batch_s": round(first - t0, 3), "samples": n,
            "steady_samples_per_s": round((n - n_first) / max(end - first, 1e-9), 1),
            "second_half_samples_per_s": round((n - n_half) / max(end - t_half, 1e-9), 1) if n > n_half else None,
            "ids": ids}


def import_decoders() -> None:
    """Import what decode_pair uses, before an arm's clock starts. Ours imports it with its loader
    (workers.data); without this, litdata's forked workers imported it on their first item, and
    its first batch counted ~0.2 s of imports ours did not."""
    import storage.codec  # noqa: F401
    import workers.data  # noqa: F401


def decode_pair(img: bytes, mask: bytes, res: int) -> tuple[np.ndarray, np.ndarray]:
    """The input JPEG decoded to res x res (DCT-scaled, as the trainer's), the mask nearest-resized."""
    from storage.codec import decode_mask
    from workers.data import _nearest_index, decode_rgb_into

    out = np.empty((res, res, 3), dtype=np.uint8)
    decode_rgb_into(img, out)
    m = decode_mask(mask)
    m = m[np.ix_(_nearest_index(m.shape[0], res), _nearest_index(m.shape[1], res))]
    return out, m
