"""What bench.peer measures every arm with, the same for ours and litdata's: the decode, the pass over a
loader (first batch, steady samples/s, the ids in order), peak PSS, and a cold page cache."""

from __future__ import annotations

import os
import threading
import time
from typing import Any

import numpy as np

BATCH = 64
WORKERS = 2
SEED = 0


class PssPeak:
    """Peak PSS (MB) of this process and its children (DataLoader workers), sampled in a thread.
    PSS, not RSS: pages a forked worker shares with its parent are counted once, split between them."""

    def __init__(self, every_s: float = 0.02) -> None:
        import psutil

        self._me = psutil.Process()
        self.peak = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(every_s,), daemon=True)

    def _sample(self) -> float:
        total = 0
        for p in [self._me, *self._me.children(recursive=True)]:
            try:
                total += p.memory_full_info().pss
            except Exception:  # noqa: BLE001 - a worker that just exited
                pass
        return total / 2**20

    def _run(self, every_s: float) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._sample())
            self._stop.wait(every_s)

    def __enter__(self) -> PssPeak:
        self.peak = self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


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


def decode_pair(img: bytes, mask: bytes, res: int) -> tuple[np.ndarray, np.ndarray]:
    """The input JPEG decoded to res x res (DCT-scaled, as the trainer's), the mask nearest-resized."""
    from storage.codec import decode_mask
    from workers.data import _nearest_index, decode_rgb_into

    out = np.empty((res, res, 3), dtype=np.uint8)
    decode_rgb_into(img, out)
    m = decode_mask(mask)
    m = m[np.ix_(_nearest_index(m.shape[0], res), _nearest_index(m.shape[1], res))]
    return out, m
