"""Our chunk loader beside litdata's on the same samples, in one run.

Usage: python -m bench.peer --json [--samples 2000] [--sizes 56,224] [--skip gcs,litdata]

One dataset is synthesized (storage.synth: 224-px JPEG inputs, raw masks, the mask_depth
columns) and, for litdata, the same encoded bytes (the input JPEG and the raw mask of every
sample) are written with litdata.optimize (64 MB chunks, its recommended size). Every arm decodes
with the same functions (workers.data.decode_rgb_into for the JPEG, DCT-scaled to the size asked
for; storage.codec.decode_mask and a nearest resize for the mask), batch 64, and reads the whole
dataset once as one chunk:

  ours_stream   ChunkPrefetcher streaming the chunk (the first batch's row groups first), decode in
                the loading process (decode_workers 0: rows still streaming in cannot be forked into
                DataLoader workers; with workers the chunk is read whole first, see ours_whole)
  ours_whole    the chunk read whole (read_chunk), then 2 DataLoader workers decode, as before
  litdata       litdata.StreamingDataset (shuffle) + StreamingDataLoader, 2 workers, over its own
                chunks of the same bytes (skipped when litdata is not installed: pip install
                '.[bench]')

Per arm: time to first batch (loader made to first batch in hand), steady samples/s (after the
first batch), peak PSS of the loading processes (psutil, sampled every 20 ms, the process and its
children), read requests (ours: the shard reader's ranged reads plus manifest, index and shared
index; litdata: the chunk files it opens). Local reads are cold: every file of the dataset is
dropped from the page cache first (posix_fadvise DONTNEED; no root needed). On the GCS emulator
(gcp-storage-emulator behind tests/fault_proxy.py adding --latency-ms per request) only our arms
run: litdata's GCS path needs google-cloud-storage against a real endpoint, so its figures there
are not measured here. Where an arm is handicapped, its key says so (`*_note`).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench import machine

BATCH = 64
WORKERS = 2
SEED = 0


# -- measuring --------------------------------------------------------------------------------------


class PssPeak:
    """Peak PSS (MB) of this process and its children, sampled in a thread."""

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


def _iterate(loader: Any, t0: float) -> dict[str, float]:
    first = None
    n = n_first = 0
    for batch in loader:
        k = len(batch[0])
        if first is None:
            first, n_first = time.perf_counter(), k
        n += k
    end = time.perf_counter()
    assert first is not None
    return {"first_batch_s": round(first - t0, 3), "samples": n,
            "steady_samples_per_s": round((n - n_first) / max(end - first, 1e-9), 1)}


# -- decoding (the same for every arm) --------------------------------------------------------------


def decode_pair(img: bytes, mask: bytes, res: int) -> tuple[np.ndarray, np.ndarray]:
    from storage.codec import decode_mask
    from workers.data import _nearest_index, decode_rgb_into

    out = np.empty((res, res, 3), dtype=np.uint8)
    decode_rgb_into(img, out)
    m = decode_mask(mask)
    m = m[np.ix_(_nearest_index(m.shape[0], res), _nearest_index(m.shape[1], res))]
    return out, m


class _OurSamples:
    """A DataLoader dataset over a chunk's rows (dict or StreamingRows): whole batches per call."""

    def __init__(self, rows: Any, res: int) -> None:
        self.rows, self.res = rows, res

    def __len__(self) -> int:
        return len(self.rows["sample_id"])

    def __getitems__(self, idx: list[int]) -> tuple[np.ndarray, np.ndarray]:
        pairs = [decode_pair(self.rows["fg_bg"][i], self.rows["mask"][i], self.res) for i in idx]
        return np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs])


# -- arms -------------------------------------------------------------------------------------------


def ours(uri: str, res: int, stream: bool) -> dict[str, Any]:
    from common.plan import batches_for_rank
    from storage.shards import open_dataset
    from workers.data import ChunkPrefetcher, make_loader, stream_order

    with PssPeak() as pss:
        t0 = time.perf_counter()
        ds = open_dataset(uri)
        ids = np.sort(ds.sample_ids)
        batches = batches_for_rank(ids, BATCH, 1, 0, [SEED, 3, 0, 0, 0])
        pre = ChunkPrefetcher(ds, stream=stream)
        try:
            order, batch = stream_order(ids, batches)
            rows = pre.get((0, 0), ids, order, batch) if stream else pre.get((0, 0), ids)
            position = np.searchsorted(ids, np.concatenate(batches))
            todo = np.split(position, np.cumsum([len(b) for b in batches])[:-1])
            loader = make_loader(_OurSamples(rows, res), batch_sampler=[t.tolist() for t in todo],
                                 num_workers=0 if stream else WORKERS)
            out = _iterate(loader, t0)
        finally:
            pre.close()
    reads = ds.reader.stats.requests + 2 + len(ds.shared)  # + manifest, index, shared indexes
    shared_reads = sum(t.reader.stats.requests for t in ds.shared.values()) if ds.shared else 0
    return {**out, "pss_mb": round(pss.peak, 1), "requests": reads + shared_reads}


@functools.lru_cache(maxsize=1)
def _opened(src: str) -> Any:
    from storage.shards import open_dataset

    return open_dataset(src)


def _lit_item(i: int, src: str) -> dict[str, Any]:
    rows = _opened(src).read_samples([i], columns=("fg_bg", "mask"))
    return {"img": rows["fg_bg"][0], "mask": rows["mask"][0]}


def litdata_write(src_uri: str, out_dir: str, n: int) -> None:
    """The same encoded bytes as litdata chunks (litdata.optimize, 64 MB chunks)."""
    import litdata

    litdata.optimize(fn=functools.partial(_lit_item, src=src_uri), inputs=list(range(n)), output_dir=out_dir,
                     chunk_bytes="64MB", num_workers=1, verbose=False)


def litdata_write_apart(src_uri: str, out_dir: str, n: int) -> None:
    """litdata_write in a child process: optimize sets the start method of the whole process
    (spawn), which would make the other arms' DataLoader workers pickle their chunk."""
    import subprocess
    import sys

    code = f"import bench.peer as p; p.litdata_write({src_uri!r}, {out_dir!r}, {int(n)})"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if done.returncode:
        if "No module named 'litdata'" in done.stderr:
            raise ImportError("litdata")
        raise RuntimeError(done.stderr[-2000:])


def _collate_pairs(items: list) -> tuple[np.ndarray, np.ndarray]:
    return np.stack([a for a, _ in items]), np.stack([b for _, b in items])


def _decoded_dataset(lit_dir: str, res: int) -> Any:
    import litdata

    global _Decoded
    if _Decoded is None:
        # Module level, so that litdata's worker processes (spawned, if optimize set that) find it.
        class Decoded(litdata.StreamingDataset):
            res = 56

            def __getitem__(self, index: Any) -> Any:
                item = super().__getitem__(index)
                return decode_pair(item["img"], item["mask"], self.res)

        Decoded.__qualname__ = "_Decoded"
        _Decoded = Decoded
    ds = _Decoded(lit_dir, shuffle=True, seed=SEED, cache_dir=tempfile.mkdtemp(prefix="lit-cache-"))
    ds.res = res
    return ds


_Decoded: Any = None


def litdata_arm(lit_dir: str, res: int) -> dict[str, Any]:
    import litdata

    with PssPeak() as pss:
        t0 = time.perf_counter()
        ds = _decoded_dataset(lit_dir, res)
        loader = litdata.StreamingDataLoader(ds, batch_size=BATCH, num_workers=WORKERS, collate_fn=_collate_pairs)
        out = _iterate(loader, t0)
    chunks = len([f for f in os.listdir(lit_dir) if f.endswith(".bin")])
    return {**out, "pss_mb": round(pss.peak, 1), "requests": chunks + 1}  # + index.json


# -- main -------------------------------------------------------------------------------------------


def _ratios(out: dict[str, Any], where: str, res: int, peer: str) -> None:
    o, p = out.get(f"{where}_{res}_ours_stream"), out.get(f"{where}_{res}_{peer}")
    if not o or not p:
        return
    out[f"{where}_{res}_ratio_vs_{peer}"] = {
        "steady_samples_per_s": round(o["steady_samples_per_s"] / p["steady_samples_per_s"], 2),
        "first_batch_s": round(o["first_batch_s"] / max(p["first_batch_s"], 1e-9), 2),
        "pss": round(o["pss_mb"] / max(p["pss_mb"], 1e-9), 2),
        "requests": round(o["requests"] / max(p["requests"], 1), 2),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--samples", type=int, default=2000)
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--sizes", default="56,224", help="decode resolutions")
    ap.add_argument("--rows-per-group", type=int, default=64)
    ap.add_argument("--latency-ms", type=float, default=20.0)
    ap.add_argument("--skip", default="", help="comma list of: gcs, litdata")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    skip = set(filter(None, args.skip.split(",")))
    os.environ["ORCHESTRATOR_CACHE"] = "off"
    os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
    import logging

    logging.getLogger("storage").setLevel(logging.ERROR)
    from storage.synth import synthesize

    sizes = [int(s) for s in args.sizes.split(",")]
    work = tempfile.mkdtemp(prefix="bench-peer-")
    out: dict[str, Any] = {"bench": "peer", "machine": machine(), "samples": args.samples, "batch": BATCH,
                           "image_size": args.image_size, "rows_per_group": args.rows_per_group,
                           "cold_cache": "posix_fadvise(DONTNEED) on every dataset file before each local arm"}
    t_all = time.perf_counter()
    try:
        src = os.path.join(work, "ours")
        synthesize(src, args.samples, seed=1, image_size=args.image_size, rows_per_group=args.rows_per_group,
                   workers=1)
        lit = os.path.join(work, "lit")
        have_lit = "litdata" not in skip
        if have_lit:
            try:
                litdata_write_apart(src, lit, args.samples)
            except ImportError:
                have_lit = False
                out["litdata_note"] = "litdata not installed (pip install '.[bench]'): its arms skipped"
        for res in sizes:
            for stream in (True, False):
                drop_page_cache(src)
                out[f"local_{res}_ours_{'stream' if stream else 'whole'}"] = ours(src, res, stream)
            if have_lit:
                drop_page_cache(lit)
                out[f"local_{res}_litdata"] = litdata_arm(lit, res)
                _ratios(out, "local", res, "litdata")
            _ratios(out, "local", res, "ours_whole")
        out["local_ours_stream_note"] = "decodes in the loading process (no DataLoader workers); the others use 2"
        if "gcs" not in skip:
            out.update(_gcs(src, sizes, args.latency_ms))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    out["bench_seconds"] = round(time.perf_counter() - t_all, 1)
    print(json.dumps(out) if args.json else json.dumps(out, indent=2))
    return out


def _gcs(src: str, sizes: list[int], latency_ms: float) -> dict[str, Any]:
    from storage import fs as sfs
    from tests.fault_proxy import FaultProxy
    from tests.gcs_emulator import make_bucket, point_gcsfs_at, start_emulator, stop_emulator

    out: dict[str, Any] = {"gcs_latency_ms_per_request": latency_ms}
    proc, url = start_emulator()
    try:
        with FaultProxy(url) as proxy:
            point_gcsfs_at(proxy.url)
            make_bucket("peer")
            uri = "gs://peer/ds"
            for p in sorted(Path(src).rglob("*")):
                if p.is_file():
                    sfs.write_bytes(sfs.join(uri, str(p.relative_to(src))), p.read_bytes())
            proxy.configure(latency_s=latency_ms / 1000)
            for res in sizes:
                for stream in (True, False):
                    proxy.reset_counters()
                    got = ours(uri, res, stream)
                    got["requests_at_emulator"] = len(proxy.counters.paths)
                    out[f"gcs_{res}_ours_{'stream' if stream else 'whole'}"] = got
                _ratios(out, "gcs", res, "ours_whole")
    finally:
        stop_emulator(proc)
    out["gcs_litdata_note"] = "litdata not run on the emulator (its GCS path needs google-cloud-storage)"
    return out


if __name__ == "__main__":
    main()
