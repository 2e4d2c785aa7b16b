"""A streamed chunk (workers/data.py StreamingRows): training starts when the first batch's row
groups have landed, the rest arriving in the order the batches need them; the values are the
whole-chunk read's, sample for sample, a resumed epoch streams from its next batch, and a piece
that fails names its shard when a batch needs it. Requests counted through the GCS emulator."""

from __future__ import annotations

import numpy as np
import pytest

from common.plan import batches_for_rank
from storage.errors import DatasetError
from storage.shards import open_dataset
from storage.synth import synthesize
from tests import gcs_emulator as _emulator
from tests.gcs_emulator import Gcs
from workers.data import ChunkPrefetcher, StreamingRows, read_chunk, stream_order, stream_pieces

gcs_emulator, gcs = _emulator.gcs_emulator, _emulator.gcs  # fixtures

N = 480
ROWS_PER_GROUP = 8
BATCH = 8


@pytest.fixture(scope="module")
def local_ds(tmp_path_factory) -> str:
    uri = str(tmp_path_factory.mktemp("stream") / "ds")
    synthesize(uri, N, seed=5, image_size=32, rows_per_shard=96, rows_per_group=ROWS_PER_GROUP, workers=1)
    return uri


def _chunk(seed: int = 1, n: int = 320) -> tuple[np.ndarray, list[np.ndarray]]:
    ids = np.sort(np.random.default_rng(seed).choice(N, size=n, replace=False)).astype(np.int64)
    return ids, batches_for_rank(ids, BATCH, 1, 0, [seed, 3, 0, 0, 0])


def _groups(ds, ids) -> set[tuple[int, int]]:
    return set(zip(ds.index_values("shard", ids).tolist(), ds.index_values("row_group", ids).tolist(), strict=True))


# A budget of None holds every piece in RAM; 0 spills every piece to the spool on local disk.
BUDGETS = pytest.mark.parametrize("budget", [None, 0], ids=["ram", "spilled"])


@pytest.fixture(autouse=True)
def _spool_here(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("ORCHESTRATOR_SPOOL_DIR", str(tmp_path / "spool"))


@BUDGETS
def test_a_streamed_chunk_holds_the_whole_chunk_reads_values_sample_for_sample(local_ds, monkeypatch, budget):
    """Breaks if streaming changes a value, the order of the rows, or loses a sample."""
    monkeypatch.setenv("ORCHESTRATOR_CACHE", "off")
    ids, batches = _chunk()
    whole = read_chunk(open_dataset(local_ds), ids)
    pre = ChunkPrefetcher(open_dataset(local_ds), budget_bytes=budget, piece_bytes=4096)
    try:
        rows = pre.get((0, 0), ids, *stream_order(ids, batches))
        assert isinstance(rows, StreamingRows)
        assert rows["sample_id"].tolist() == whole["sample_id"].tolist()
        # Read position by position in the batches' order (as the DataLoader does), then all at once.
        order, _ = stream_order(ids, batches)
        for p in order[:40].tolist():
            for c in ("fg_bg", "bg", "mask", "depth"):
                assert rows[c][p] == whole[c][p]
        got = rows.materialize()
        assert set(got) == set(whole)
        for c, v in whole.items():
            assert (np.array_equal(got[c], v) if isinstance(v, np.ndarray) else got[c] == v), c
    finally:
        pre.close()


def test_the_first_piece_holds_only_the_first_batchs_row_groups(local_ds):
    """Breaks if the first batch waits on row groups only later batches need."""
    ds = open_dataset(local_ds)
    ids, batches = _chunk()
    order, batch = stream_order(ids, batches)
    pieces = stream_pieces(ds, ids, order, batch)
    assert _groups(ds, ids[pieces[0]]) == _groups(ds, batches[0])
    assert len(_groups(ds, ids[pieces[0]])) < len(_groups(ds, ids)) / 2
    together = np.sort(np.concatenate(pieces))
    assert together.tolist() == list(range(len(ids)))  # every position in exactly one piece
    # each later piece brings only row groups the first did not
    assert not any(_groups(ds, ids[pieces[0]]) & _groups(ds, ids[sel]) for sel in pieces[1:])


def test_a_chunk_whose_first_batch_needs_most_of_it_is_read_in_file_order(local_ds):
    """Breaks if streaming scatters requests where the first batch would wait on most bytes anyway."""
    ds = open_dataset(local_ds)
    ids, _ = _chunk(n=40)
    batches = batches_for_rank(ids, 32, 1, 0, [1, 3, 0, 0, 0])
    pieces = stream_pieces(ds, ids, *stream_order(ids, batches))
    assert len(pieces) == 1 and pieces[0].tolist() == list(range(len(ids)))


@BUDGETS
def test_a_resumed_epoch_streams_from_its_next_batch_and_still_reads_every_sample(local_ds, monkeypatch, budget):
    """Breaks if resuming mid-chunk (cursor at batch k) drops the samples of the batches before k."""
    monkeypatch.setenv("ORCHESTRATOR_CACHE", "off")
    ds = open_dataset(local_ds)
    ids, batches = _chunk(seed=2)
    k = 7
    order, batch = stream_order(ids, batches[k:])
    pieces = stream_pieces(ds, ids, order, batch)
    assert _groups(ds, ids[pieces[0]]) == _groups(ds, batches[k])
    pre = ChunkPrefetcher(ds, budget_bytes=budget)
    try:
        rows = pre.get((0, 0), ids, order, batch)
        whole = read_chunk(open_dataset(local_ds), ids)
        got = rows.materialize()
        assert got["fg_bg"] == whole["fg_bg"] and np.array_equal(got["sample_id"], ids)
    finally:
        pre.close()


def test_without_an_order_the_chunk_is_read_whole_as_before(local_ds, monkeypatch):
    monkeypatch.setenv("ORCHESTRATOR_CACHE", "off")
    ids, _ = _chunk()
    pre = ChunkPrefetcher(open_dataset(local_ds))
    try:
        rows = pre.get((0, 0), ids)
        assert isinstance(rows, dict) and rows["fg_bg"] == read_chunk(open_dataset(local_ds), ids)["fg_bg"]
    finally:
        pre.close()


def test_a_piece_that_cannot_be_read_names_its_shard_when_a_batch_needs_it(local_ds, tmp_path, monkeypatch):
    """Breaks if a damaged shard is trained on, or its error is lost in the background thread."""
    import shutil

    monkeypatch.setenv("ORCHESTRATOR_CACHE", "off")
    copy = tmp_path / "ds"
    shutil.copytree(local_ds, copy)
    ds = open_dataset(str(copy))
    ids, batches = _chunk()
    order, batch = stream_order(ids, batches)
    late = stream_pieces(ds, ids, order, batch)[-1]
    shard = int(ds.index_values("shard", ids[late[:1]])[0])
    path = copy / ds.manifest["shards"][shard]["file"]
    data = bytearray(path.read_bytes())
    for i in range(64, len(data) - 4096, 97):  # damage the values, not the footer
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))
    pre = ChunkPrefetcher(ds)
    try:
        rows = pre.get((0, 0), ids, order, batch)
        with pytest.raises(DatasetError, match="shard-"):
            rows.materialize()
        assert pre.failure() is None  # a chunk in training is not a pending prefetch: its reader raises
    finally:
        pre.close()


def test_streaming_costs_few_more_requests_than_the_whole_chunk_read(gcs: Gcs, monkeypatch):
    """Counted at the emulator: the pieces coalesce adjacent row groups as the whole read does."""
    monkeypatch.setenv("ORCHESTRATOR_CACHE", "off")
    uri = gcs.uri("ds")
    synthesize(uri, N, seed=5, image_size=32, rows_per_shard=96, rows_per_group=ROWS_PER_GROUP, workers=1)
    ids, batches = _chunk()

    def shard_reads() -> int:
        return len([p for p in gcs.proxy.counters.paths if "shards%2Fshard-" in p])

    ds = open_dataset(uri)
    ds.reader.footers(list(range(len(ds.manifest["shards"]))))
    gcs.proxy.reset_counters()
    read_chunk(ds, ids)
    whole = shard_reads()
    ds = open_dataset(uri)
    ds.reader.footers(list(range(len(ds.manifest["shards"]))))
    gcs.proxy.reset_counters()
    pre = ChunkPrefetcher(ds)
    try:
        pre.get((0, 0), ids, *stream_order(ids, batches)).materialize()
    finally:
        pre.close()
    streamed = shard_reads()
    first = len(_groups(ds, batches[0]))
    assert whole < streamed <= whole + 2 * first, (whole, streamed, first)


@BUDGETS
def test_streamed_rows_make_the_same_batches_in_process_and_in_decode_workers(local_ds, monkeypatch, budget):
    """Breaks if a streamed chunk decodes to other batches, or hangs when DataLoader workers fork
    (with 2 workers the rows are shared through the spool while pieces still land)."""
    import torch

    from workers.data import make_loader
    from workers.tasks.mask_depth import ChunkSamples

    monkeypatch.setenv("ORCHESTRATOR_CACHE", "off")
    ids, batches = _chunk()
    whole = read_chunk(open_dataset(local_ds), ids)
    order, batch = stream_order(ids, batches)
    todo = [order[i : i + batch].tolist() for i in range(0, 48, batch)]

    def describe(sid: int) -> str:
        return f"sample {sid}"

    expected = list(make_loader(ChunkSamples(whole, 32, describe, hflip=0.5, flip_key=(0, 1)), batch_sampler=todo))
    for workers in (0, 2):
        pre = ChunkPrefetcher(open_dataset(local_ds), budget_bytes=budget, piece_bytes=4096)
        try:
            rows = pre.get((0, 0), ids, order, batch)
            got = list(make_loader(ChunkSamples(rows, 32, describe, hflip=0.5, flip_key=(0, 1)), batch_sampler=todo,
                                   num_workers=workers))
        finally:
            pre.close()
        for a, b in zip(expected, got, strict=True):
            assert all(torch.equal(p, q) for p, q in zip(a, b, strict=True)), workers
