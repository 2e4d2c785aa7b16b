"""bench.peer's litdata side: the same bytes in litdata's own format, litdata's ParquetLoader over our
shard files, and one loader arm that reads either (locally or from GCS).

litdata is an optional dependency (the `bench` extra); nothing here is imported unless an arm asks for
it, and nothing outside bench/ imports this module.
"""

from __future__ import annotations

import functools
import os
import tempfile
import time
from typing import Any

import numpy as np

from bench.peer_measure import BATCH, SEED, WORKERS, PssPeak, decode_pair, import_decoders, iterate

# The columns every arm decodes: the input JPEG, the raw mask, and the id that checks the order.
LIT_KEYS = {"native": ("img", "mask", "sample_id"), "parquet": ("fg_bg", "mask", "sample_id")}


def sdk_client_on_the_emulator() -> None:
    """litdata 0.2.76 downloads chunks through obstore's GCSStore (Rust) whenever obstore is installed,
    and that client cannot be pointed at an emulator: it ignores STORAGE_EMULATOR_HOST and asks real
    Google for a token. On the emulator litdata therefore takes its other GCS path, the
    google-cloud-storage client it uses when obstore is absent or unusable (its own fallback).
    Called at import, so spawned DataLoader workers (which import this module to unpickle the
    dataset) take the same path."""
    if not os.environ.get("STORAGE_EMULATOR_HOST"):
        return
    try:
        from litdata.streaming import async_prefetch, downloader
    except ImportError:
        return
    downloader.obstore_usable = async_prefetch.obstore_usable = lambda: False


sdk_client_on_the_emulator()


def have_litdata() -> bool:
    try:
        import litdata  # noqa: F401
    except ImportError:
        return False
    return True


@functools.lru_cache(maxsize=1)
def _opened(src: str) -> Any:
    from storage.shards import open_dataset

    return open_dataset(src)


def _lit_item(i: int, src: str) -> dict[str, Any]:
    """Sample i as a litdata item: every value our shard row holds (the shared background as its
    id, as our row holds it), the input JPEG under `img`."""
    ds = _opened(src)
    names = [c.name for c in ds.stored_columns]
    rows = ds.read_samples([i], columns=names)
    item = {("img" if c == "fg_bg" else c): (int(rows[c][0]) if isinstance(rows[c], np.ndarray) else rows[c][0])
            for c in names}
    return {**item, "sample_id": int(i)}


def litdata_write(src_uri: str, out_dir: str, n: int) -> None:
    """The same encoded bytes as litdata chunks (litdata.optimize, 64 MB chunks, its recommended size):
    each sample's stored values, the columns our dataset at src_uri holds."""
    import litdata

    litdata.optimize(fn=functools.partial(_lit_item, src=src_uri), inputs=list(range(n)), output_dir=out_dir,
                     chunk_bytes="64MB", num_workers=1, verbose=False)


def parquet_view(src: str, out_dir: str) -> None:
    """Our shard files, unchanged (hard links), beside the index.json litdata's ParquetLoader needs
    (litdata.index_parquet_dataset: file names, rows and sizes from each footer)."""
    from litdata import index_parquet_dataset

    os.makedirs(out_dir, exist_ok=True)
    shards = os.path.join(src, "shards")
    for f in sorted(os.listdir(shards)):
        if f.endswith(".parquet"):
            os.link(os.path.join(shards, f), os.path.join(out_dir, f))
    index_parquet_dataset(out_dir, num_workers=1)


def _storage_options(uri: str) -> dict[str, Any] | None:
    """google-cloud-storage reaches the emulator by STORAGE_EMULATOR_HOST, and then takes anonymous
    credentials by itself; it only needs a project name."""
    if not uri.startswith("gs://") or not os.environ.get("STORAGE_EMULATOR_HOST"):
        return None
    return {"project": "bench-peer"}


def _decoded_class() -> type:
    """litdata.StreamingDataset whose items come back decoded like ours, with their id."""
    import litdata

    class Decoded(litdata.StreamingDataset):
        res = 56
        keys = LIT_KEYS["native"]

        def __getitem__(self, index: Any) -> Any:
            item = super().__getitem__(index)
            img, mask, sid = self.keys
            return (*decode_pair(item[img], item[mask], self.res), int(item[sid]))

        def __getstate__(self) -> dict[str, Any]:
            # After load_state_dict on a gs:// dataset, litdata leaves its cache (whose downloader holds a
            # lock) on the dataset, and a spawned worker cannot take it: 0.2.76 fails to resume there.
            # Each worker makes its own cache and shuffler in __iter__ anyway, so none is sent.
            return {**self.__dict__, "cache": None, "shuffler": None}

    Decoded.__module__, Decoded.__qualname__ = __name__, "Decoded"
    return Decoded


def __getattr__(name: str) -> Any:
    # The class is made on first use (litdata is optional), and found by name when a spawned DataLoader
    # worker unpickles the dataset (ParquetLoader refuses forked workers: Polars' thread pool).
    if name == "Decoded":
        globals()["Decoded"] = cls = _decoded_class()
        return cls
    raise AttributeError(name)


def _dataset(uri: str, kind: str, res: int, cache_dir: str) -> Any:
    """litdata.StreamingDataset (shuffled, seeded) over its format or, with ParquetLoader, our shards."""
    loader = None
    if kind == "parquet":
        from litdata.streaming.item_loader import ParquetLoader

        loader = ParquetLoader(columns=list(LIT_KEYS["parquet"]))
    ds = __getattr__("Decoded")(uri, shuffle=True, seed=SEED, cache_dir=cache_dir, item_loader=loader,
                  storage_options=_storage_options(uri))
    ds.res, ds.keys = res, LIT_KEYS[kind]
    return ds


def _collate(items: list) -> tuple[Any, Any, Any]:
    import numpy as np

    return np.stack([a for a, _, _ in items]), np.stack([b for _, b, _ in items]), np.array([i for *_, i in items])


def _loader(uri: str, kind: str, res: int, cache_dir: str) -> Any:
    import litdata

    ds = _dataset(uri, kind, res, cache_dir)
    # litdata refuses fork with ParquetLoader (Polars' thread pool would deadlock): spawn, as it asks.
    context = "spawn" if kind == "parquet" else None
    return litdata.StreamingDataLoader(ds, batch_size=BATCH, num_workers=WORKERS, collate_fn=_collate,
                                       multiprocessing_context=context)


def lit_arm(uri: str, kind: str, res: int) -> dict[str, Any]:
    """One pass: first batch, steady samples/s, peak PSS, the ids in the order they came."""
    import litdata  # noqa: F401 - imported before the clock starts, as ours imports its modules

    import_decoders()

    cache = tempfile.mkdtemp(prefix="lit-cache-")  # a fresh cache: nothing downloaded before
    with PssPeak() as pss:
        t0 = time.perf_counter()
        out = iterate(_loader(uri, kind, res, cache), t0)
    return {**out, "pss_mb": round(pss.peak, 1)}


def lit_resume(uri: str, kind: str, res: int, k: int) -> dict[str, Any]:
    """Stop after k batches, keep StreamingDataLoader.state_dict(), then a new dataset and loader resume
    from it with load_state_dict: the ids before the stop and after. litdata's state names its cache
    folder and refuses another, so the resumed loader gets the same path, emptied (nothing downloaded)."""
    import shutil

    cache = tempfile.mkdtemp(prefix="lit-cache-")
    loader = _loader(uri, kind, res, cache)
    before: list[int] = []
    for i, batch in enumerate(loader):
        before += batch[2].tolist()
        if i + 1 == k:
            break
    state = loader.state_dict()
    del loader
    shutil.rmtree(cache)
    os.makedirs(cache)
    again = _loader(uri, kind, res, cache)
    again.load_state_dict(state)
    after = [int(x) for batch in again for x in batch[2]]
    return {"before": before, "after": after}
