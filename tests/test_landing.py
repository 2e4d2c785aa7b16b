"""Which streamed piece lands when (workers/landing.py): a chunk needed at once lands only what its
first batches need until the loader's first batch is out, then the rest; a prefetched chunk lands
after the training chunk has landed whole; a read in the fetching process, or MAX_HOLD_S, ends a
hold, so nothing waits on it forever. Every batch stays the whole-chunk read's."""

from __future__ import annotations

import threading
import time
from typing import Any

import numpy as np
import pytest
import torch

from common.plan import batches_for_rank
from storage.shards import open_dataset
from storage.synth import synthesize
from workers import streaming
from workers.chunks import first_needs
from workers.data import ChunkPrefetcher, make_loader, read_chunk, stream_order, stream_pieces
from workers.tasks.mask_depth import ChunkSamples

N = 480
BATCH = 8
PIECE = 6 * 1024  # a few row groups a piece: a chunk of many pieces


@pytest.fixture(scope="module")
def ds_uri(tmp_path_factory) -> str:
    uri = str(tmp_path_factory.mktemp("landing") / "ds")
    synthesize(uri, N, seed=3, image_size=32, rows_per_shard=96, rows_per_group=8, workers=1)
    return uri


@pytest.fixture(autouse=True)
def _env(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("ORCHESTRATOR_CACHE", "off")
    monkeypatch.setenv("ORCHESTRATOR_SPOOL_DIR", str(tmp_path / "spool"))
    monkeypatch.setattr(streaming, "MAX_HOLD_S", 600.0)  # a hold ends by what the test does, not by time


def _chunk(seed: int, lo: int = 0, hi: int = N, n: int = 160) -> tuple[np.ndarray, np.ndarray, int]:
    ids = np.sort(np.random.default_rng(seed).choice(np.arange(lo, hi), size=n, replace=False)).astype(np.int64)
    order, batch = stream_order(ids, batches_for_rank(ids, BATCH, 1, 0, [seed, 3, 0, 0, 0]))
    return ids, order, batch


class _Logged:
    """A dataset that logs each piece it is asked for, as (chunk name, piece), in `log`; a read of a
    piece in `slow` waits up to `slow_s` for `gate` first."""

    def __init__(self, ds: Any, log: list, chunks: dict[str, tuple[np.ndarray, list[np.ndarray]]]) -> None:
        self._ds, self.log, self._chunks = ds, log, chunks
        self.read = threading.Event()  # set at a read of a piece beyond the first batch's

    def __getattr__(self, name: str) -> Any:
        return getattr(self._ds, name)

    def read_samples(self, ids: Any, columns: Any = None, **kw: Any) -> dict[str, Any]:
        first = int(np.asarray(ids)[0])
        for name, (chunk_ids, pieces) in self._chunks.items():
            where = np.searchsorted(chunk_ids, first)
            if where < len(chunk_ids) and chunk_ids[where] == first:
                k = next(k for k, p in enumerate(pieces) if where in set(p.tolist()))
                self.log.append((name, k))
                if k > 0:
                    self.read.set()
        return self._ds.read_samples(ids, columns, **kw)


def _pieces(ds: Any, ids: np.ndarray, order: np.ndarray, batch: int) -> list[np.ndarray]:
    return stream_pieces(ds, ids, order, batch, PIECE)


def _todo(order: np.ndarray, batch: int) -> list[list[int]]:
    return [order[i : i + batch].tolist() for i in range(0, len(order), batch)]


class _FirstBatchWaits(ChunkSamples):
    """Decodes in this process; its first batch first gives the landing `wait_s` to read a piece it
    should not (sets `saw` if one was read meanwhile)."""

    wait_s = 0.5

    def __init__(self, rows: Any, logged: _Logged) -> None:
        super().__init__(rows, 32, str)
        self._logged, self.saw, self._calls = logged, None, 0

    def __getitems__(self, idx: list[int]) -> Any:
        self._calls += 1
        if self._calls == 1:
            self.saw = self._logged.read.wait(self.wait_s)
        return super().__getitems__(idx)


def _same_batches(got: list, ds_uri: str, ids: np.ndarray, todo: list[list[int]]) -> None:
    expected = list(make_loader(ChunkSamples(read_chunk(open_dataset(ds_uri), ids), 32, str), batch_sampler=todo))
    assert len(got) == len(expected)
    for a, b in zip(got, expected, strict=True):
        assert all(torch.equal(p, q) for p, q in zip(a, b, strict=True))


@pytest.mark.timeout(120)
def test_a_chunk_needed_at_once_lands_its_rest_only_after_the_first_batch(ds_uri):
    """Breaks if the rest of the chunk lands beside its first batch's decode, or never lands."""
    ds = open_dataset(ds_uri)
    ids, order, batch = _chunk(seed=1)
    pieces = _pieces(ds, ids, order, batch)
    assert len(pieces) >= 4
    log: list = []
    logged = _Logged(ds, log, {"a": (ids, pieces)})
    pre = ChunkPrefetcher(logged, piece_bytes=PIECE)
    try:
        rows = pre.get((0, 0), ids, order, batch)
        samples = _FirstBatchWaits(rows, logged)
        batches = iter(make_loader(samples, batch_sampler=_todo(order, batch)))
        got = [next(batches)]
        assert samples.saw is False  # for 0.5 s of the first batch nothing beyond its piece was read
        assert log == [("a", 0)]
        got += list(batches)
    finally:
        pre.close()
    assert log == [("a", k) for k in range(len(pieces))]  # then every piece, once, in the order needed
    _same_batches(got, ds_uri, ids, _todo(order, batch))


@pytest.mark.timeout(120)
def test_with_decode_processes_the_pieces_their_first_batches_need_land_before_the_first_batch(ds_uri):
    """Breaks if the second decode process waits for the first batch to get its piece (a core idle
    at every start), if later pieces land beside the first batch, or if a batch changes."""
    ds = open_dataset(ds_uri)
    ids, order, batch = _chunk(seed=2)
    pieces = _pieces(ds, ids, order, batch)
    needs = first_needs(pieces, len(ids), order, batch)
    early = [k for k in range(len(pieces)) if needs[k] < 2]
    assert len(early) >= 2 and len(early) < len(pieces)  # the second batch needs a piece of its own
    log: list = []
    pre = ChunkPrefetcher(_Logged(ds, log, {"a": (ids, pieces)}), piece_bytes=PIECE)
    try:
        rows = pre.get((0, 0), ids, order, batch)
        batches = iter(make_loader(ChunkSamples(rows, 32, str), batch_sampler=_todo(order, batch), num_workers=2))
        got = [next(batches)]
        before = list(log)
        got += list(batches)
    finally:
        pre.close()
    assert set(before) <= {("a", k) for k in early}
    assert log == [("a", k) for k in range(len(pieces))]
    _same_batches(got, ds_uri, ids, _todo(order, batch))


@pytest.mark.timeout(120)
def test_a_prefetched_chunk_lands_after_the_training_chunk_has_landed_whole(ds_uri):
    """Breaks if the next chunk's pieces land ahead of (or between) the training chunk's."""
    ds = open_dataset(ds_uri)
    a, order_a, batch = _chunk(seed=3, hi=N // 2)
    b, order_b, _ = _chunk(seed=4, lo=N // 2)
    pieces_a, pieces_b = _pieces(ds, a, order_a, batch), _pieces(ds, b, order_b, batch)
    log: list = []
    pre = ChunkPrefetcher(_Logged(ds, log, {"a": (a, pieces_a), "b": (b, pieces_b)}), piece_bytes=PIECE)
    try:
        rows = pre.get((0, 0), a, order_a, batch)
        pre.prefetch((0, 1), b, order_b, batch)  # as the trainer does, before the first batch
        list(make_loader(ChunkSamples(rows, 32, str), batch_sampler=_todo(order_a, batch)))
        rows_b = pre.get((0, 1), b, order_b, batch)
        got_b = list(make_loader(ChunkSamples(rows_b, 32, str), batch_sampler=_todo(order_b, batch)))
    finally:
        pre.close()
    assert log == [("a", k) for k in range(len(pieces_a))] + [("b", k) for k in range(len(pieces_b))]
    _same_batches(got_b, ds_uri, b, _todo(order_b, batch))


@pytest.mark.timeout(120)
def test_a_read_here_of_a_held_piece_ends_the_hold(ds_uri):
    """Breaks if reading the whole chunk in the fetching process (no loader) waits for a first
    batch that never comes."""
    ds = open_dataset(ds_uri)
    ids, order, batch = _chunk(seed=5)
    pre = ChunkPrefetcher(ds, piece_bytes=PIECE)
    try:
        rows = pre.get((0, 0), ids, order, batch)
        assert rows.held
        got = rows.materialize()
    finally:
        pre.close()
    whole = read_chunk(open_dataset(ds_uri), ids)
    assert set(got) == set(whole)
    for c, v in whole.items():
        assert (np.array_equal(got[c], v) if isinstance(v, np.ndarray) else list(got[c]) == list(v)), c


@pytest.mark.timeout(120)
def test_a_hold_nobody_ends_ends_after_max_hold_s(ds_uri, monkeypatch):
    """Breaks if a chunk whose first batch is never reported keeps its rest from landing."""
    monkeypatch.setattr(streaming, "MAX_HOLD_S", 0.2)
    ds = open_dataset(ds_uri)
    ids, order, batch = _chunk(seed=6)
    pieces = _pieces(ds, ids, order, batch)
    log: list = []
    pre = ChunkPrefetcher(_Logged(ds, log, {"a": (ids, pieces)}), piece_bytes=PIECE)
    try:
        rows = pre.get((0, 0), ids, order, batch)
        deadline = time.monotonic() + 60
        while len(log) < len(pieces) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert log == [("a", k) for k in range(len(pieces))]
        assert rows.held is False
    finally:
        pre.close()
