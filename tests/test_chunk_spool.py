"""A chunk's memory budget and its spool (workers/spool.py, workers/streaming.py): pieces beyond
the budget go to local disk and read back as the whole-chunk read's values; DataLoader decode
processes decode the first batches while later pieces have not landed; a piece's error reaches
them; the spool is gone after close, and a dead process's spool at the next start."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from common.plan import batches_for_rank
from storage.errors import DatasetError, MountDropped
from storage.shards import open_dataset
from storage.synth import synthesize
from workers.data import ChunkPrefetcher, StreamingRows, _collate, make_loader, read_chunk, stream_order
from workers.spool import CHUNK_MEMORY_ENV, SPOOL_DIR_ENV, Spool, SpoolError, default_budget, read_error, write_error
from workers.tasks.mask_depth import ChunkSamples

N = 480
ROWS_PER_GROUP = 8
BATCH = 8
PIECE = 6 * 1024  # a few row groups a piece: a chunk of many pieces


@pytest.fixture(scope="module")
def ds_uri(tmp_path_factory) -> str:
    uri = str(tmp_path_factory.mktemp("spool") / "ds")
    synthesize(uri, N, seed=7, image_size=32, rows_per_shard=96, rows_per_group=ROWS_PER_GROUP, workers=1)
    return uri


@pytest.fixture(autouse=True)
def _env(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("ORCHESTRATOR_CACHE", "off")
    spool = tmp_path / "spool"
    monkeypatch.setenv(SPOOL_DIR_ENV, str(spool))
    return spool


def _chunk(seed: int = 1, n: int = 320) -> tuple[np.ndarray, list[np.ndarray]]:
    ids = np.sort(np.random.default_rng(seed).choice(N, size=n, replace=False)).astype(np.int64)
    return ids, batches_for_rank(ids, BATCH, 1, 0, [seed, 3, 0, 0, 0])


def _same(got: dict[str, Any], whole: dict[str, Any]) -> None:
    assert set(got) == set(whole)
    for c, v in whole.items():
        assert (np.array_equal(got[c], v) if isinstance(v, np.ndarray) else got[c] == v), c


def _files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file()] if root.exists() else []


def _describe(sid: int) -> str:
    return f"sample {sid}"


def _samples(rows: Any) -> ChunkSamples:
    return ChunkSamples(rows, 32, _describe, hflip=0.5, flip_key=(0, 1))


class _Gated:
    """A dataset whose reads of pieces without `free` ids wait for `gate` (and raise `error`, if
    set, once let through): later pieces land only when the test says so."""

    def __init__(self, ds: Any, free: np.ndarray, error: BaseException | None = None) -> None:
        self._ds, self._free = ds, set(np.asarray(free).tolist())
        self.gate, self.error, self.gated = threading.Event(), error, 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._ds, name)

    def read_samples(self, ids: Any, columns: Any = None, **kw: Any) -> dict[str, Any]:
        if not self._free.intersection(np.asarray(ids).tolist()):
            self.gated += 1
            assert self.gate.wait(120), "the test never opened the gate"
            if self.error is not None:
                raise self.error
        return self._ds.read_samples(ids, columns, **kw)


def test_the_budget_defaults_to_a_share_of_available_memory_or_the_environment(monkeypatch):
    monkeypatch.delenv(CHUNK_MEMORY_ENV, raising=False)
    assert 256 * 2**20 <= default_budget() <= 8 * 2**30
    monkeypatch.setenv(CHUNK_MEMORY_ENV, "64M")
    assert default_budget() == 64 * 2**20
    monkeypatch.setenv(CHUNK_MEMORY_ENV, "lots")
    with pytest.raises(ValueError, match=rf"^{CHUNK_MEMORY_ENV}='lots' is not a size: .*512M"):
        default_budget()
    monkeypatch.setenv(CHUNK_MEMORY_ENV, "64M")
    assert ChunkPrefetcher(_Nothing()).budget_bytes == 64 * 2**20


class _Nothing:
    """A dataset without an index: the prefetcher reads whole chunks of it."""


def test_pieces_beyond_a_tiny_budget_go_to_disk_and_read_back_as_the_whole_chunk(ds_uri, _env):
    """Breaks if spilling changes a value or its order, or holds more than the budget in RAM."""
    ids, batches = _chunk()
    whole = read_chunk(open_dataset(ds_uri), ids)
    budget = 2 * PIECE
    pre = ChunkPrefetcher(open_dataset(ds_uri), budget_bytes=budget, piece_bytes=PIECE)
    try:
        rows = pre.get((0, 0), ids, *stream_order(ids, batches))
        assert isinstance(rows, StreamingRows)
        order, _ = stream_order(ids, batches)
        for p in order[:60].tolist():  # position by position, as a batch reads them
            for c in ("fg_bg", "bg", "mask", "depth"):
                assert rows[c][p] == whole[c][p]
        _same(rows.materialize(), whole)
        mem = pre.memory()
        assert mem["budget_bytes"] == budget
        assert 0 < mem["peak_ram_bytes"] <= budget  # the object's own count, not RSS
        assert rows.held_bytes <= budget
        assert mem["spilled_bytes"] > budget  # most of the chunk went to disk
        assert any(p.name.startswith("piece-") for p in _files(_env))
    finally:
        pre.close()


def test_with_no_budget_every_piece_is_on_disk_and_the_batches_are_the_same(ds_uri, _env):
    ids, batches = _chunk(seed=3)
    whole = read_chunk(open_dataset(ds_uri), ids)
    order, batch = stream_order(ids, batches)
    todo = [order[i : i + batch].tolist() for i in range(0, 64, batch)]
    expected = list(make_loader(_samples(whole), batch_sampler=todo))
    pre = ChunkPrefetcher(open_dataset(ds_uri), budget_bytes=0, piece_bytes=PIECE)
    try:
        rows = pre.get((0, 0), ids, order, batch)
        got = list(make_loader(_samples(rows), batch_sampler=todo))
        assert pre.memory()["peak_ram_bytes"] == 0 and rows.held_bytes == 0
    finally:
        pre.close()
    for a, b in zip(expected, got, strict=True):
        assert all(torch.equal(p, q) for p, q in zip(a, b, strict=True))


@pytest.mark.timeout(180)
@pytest.mark.parametrize("budget", [None, 0])
def test_decode_workers_get_their_first_batch_while_later_pieces_have_not_landed(ds_uri, budget):
    """Breaks if make_loader waits for the whole chunk before forking its decode processes, or if
    a batch decoded there differs from the whole-chunk read's."""
    ids, batches = _chunk(seed=4)
    whole = read_chunk(open_dataset(ds_uri), ids)
    order, batch = stream_order(ids, batches)
    todo = [order[i : i + batch].tolist() for i in range(0, len(order), batch)]
    expected = list(make_loader(_samples(whole), batch_sampler=todo))
    ds = _Gated(open_dataset(ds_uri), batches[0])
    pre = ChunkPrefetcher(ds, budget_bytes=budget, piece_bytes=PIECE)
    try:
        rows = pre.get((0, 0), ids, order, batch)
        batches_left = iter(make_loader(_samples(rows), batch_sampler=todo, num_workers=2))
        first = next(batches_left)
        assert not ds.gate.is_set()  # later pieces had not landed when it came (held back by the gate or the lander)
        assert all(torch.equal(p, q) for p, q in zip(first, expected[0], strict=True))
        ds.gate.set()
        rest = list(batches_left)
    finally:
        ds.gate.set()
        pre.close()
    assert len(rest) == len(expected) - 1
    for a, b in zip(expected[1:], rest, strict=True):
        assert all(torch.equal(p, q) for p, q in zip(a, b, strict=True))


@pytest.mark.timeout(180)
def test_a_piece_that_fails_after_the_fork_raises_its_error_in_the_decode_process(ds_uri):
    """Breaks if a decode process waits forever on a failed piece, or gets another error than the
    one the piece failed with."""
    ids, batches = _chunk(seed=5)
    order, batch = stream_order(ids, batches)
    todo = [order[i : i + batch].tolist() for i in range(0, len(order), batch)]
    boom = DatasetError("gs://b/ds shard-00003.parquet fails its checksum twice (test)")
    ds = _Gated(open_dataset(ds_uri), batches[0], error=boom)
    pre = ChunkPrefetcher(ds, piece_bytes=PIECE)
    try:
        rows = pre.get((0, 0), ids, order, batch)
        batches_left = iter(make_loader(_samples(rows), batch_sampler=todo, num_workers=2))
        next(batches_left)
        ds.gate.set()  # the later pieces fail now, after the decode processes were forked
        with pytest.raises(DatasetError, match="shard-00003.parquet fails its checksum") as got:
            list(batches_left)
        assert "DataLoader worker process" in str(got.value)  # raised there, from the error file
    finally:
        ds.gate.set()
        pre.close()


def test_an_error_that_cannot_be_pickled_crosses_as_its_type_and_message(tmp_path):
    path = str(tmp_path / "piece-3.err")
    write_error(path, DatasetError("shard-1 is damaged"))
    err = read_error(path)
    assert type(err) is DatasetError and str(err) == "shard-1 is damaged"
    write_error(path, MountDropped("the Drive mount dropped", "/content/drive"))  # two-argument constructor
    err = read_error(path)
    assert isinstance(err, SpoolError) and "MountDropped: the Drive mount dropped" in str(err)


@pytest.mark.timeout(300)
def test_rows_pickled_for_a_spawned_decode_process_read_the_spool(ds_uri):
    """Breaks if a spawn-started decode process (litdata's optimize sets spawn for the whole
    process) gets other batches, or a chunk with its RAM pieces missing."""
    ids, batches = _chunk(seed=6)
    whole = read_chunk(open_dataset(ds_uri), ids)
    order, batch = stream_order(ids, batches)
    todo = [order[i : i + batch].tolist() for i in range(0, 48, batch)]
    expected = list(make_loader(_samples(whole), batch_sampler=todo))
    pre = ChunkPrefetcher(open_dataset(ds_uri), budget_bytes=3 * PIECE, piece_bytes=PIECE)
    try:
        rows = pre.get((0, 0), ids, order, batch)
        rows.wait(order[:batch])
        assert rows.share()
        loader = torch.utils.data.DataLoader(_samples(rows), batch_sampler=todo, collate_fn=_collate,
                                             num_workers=1, multiprocessing_context="spawn")
        got = list(loader)
        assert pickle.loads(pickle.dumps(rows))["fg_bg"][int(order[0])] == whole["fg_bg"][int(order[0])]
    finally:
        pre.close()
    for a, b in zip(expected, got, strict=True):
        assert all(torch.equal(p, q) for p, q in zip(a, b, strict=True))


def test_the_spool_is_removed_when_the_next_chunk_comes_and_on_close(ds_uri, _env):
    """Breaks if a chunk's spool files outlive the chunk, or the prefetcher's directory outlives it."""
    ids, batches = _chunk(seed=8)
    pre = ChunkPrefetcher(open_dataset(ds_uri), budget_bytes=0, piece_bytes=PIECE)
    try:
        first = pre.get((0, 0), ids, *stream_order(ids, batches))
        first.wait()
        on_disk = {p.parent for p in _files(_env)}
        assert len(on_disk) == 1
        pre.prefetch((0, 1), ids, *stream_order(ids, batches))
        second = pre.get((0, 1), ids, *stream_order(ids, batches))
        second.wait()
        assert not any(d.exists() for d in on_disk)  # the first chunk's pieces went with it
        with pytest.raises(RuntimeError, match="closed"):
            first["fg_bg"][0]
        assert _files(_env)
    finally:
        pre.close()
    assert _files(_env) == [] and (not _env.exists() or list(_env.iterdir()) == [])


def test_a_spool_left_by_a_process_that_is_gone_is_removed_at_the_next_start(tmp_path):
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(gone.stdout)
    spool = Spool(str(tmp_path))
    host = spool._host
    left = tmp_path / f"{host}-{pid}-0badf00d" / "chunk-1"
    left.mkdir(parents=True)
    (left / "piece-0").write_bytes(b"x" * 1024)
    mine = tmp_path / f"{host}-{os.getpid()}-0badf00d"
    mine.mkdir()
    other_host = tmp_path / f"elsewhere-{pid}-0badf00d"
    other_host.mkdir()
    Spool(str(tmp_path))
    assert not left.parent.exists()
    assert mine.exists() and other_host.exists()  # alive, or another machine's: not ours to judge


@pytest.mark.timeout(600)
def test_training_with_decode_workers_from_the_spool_gives_the_same_weights(tiny_dataset, tmp_path, monkeypatch):
    """Breaks if training through the spool (every piece on disk, 2 decode processes reading it
    while it lands) trains other batches than training from RAM in process."""
    from common.recipe import validate_recipe
    from orchestrator import runner
    from tests.conftest import mlflow_history, tiny_recipe

    made: list[str | None] = []
    chunk_dir = Spool.chunk_dir
    monkeypatch.setattr(Spool, "chunk_dir", lambda self: made.append(chunk_dir(self)) or made[-1])
    finals, spooled, run_ids = {}, {}, {}
    for workers, memory in ((0, None), (2, "0")):
        if memory is None:
            monkeypatch.delenv(CHUNK_MEMORY_ENV, raising=False)
        else:
            monkeypatch.setenv(CHUNK_MEMORY_ENV, memory)
        raw = tiny_recipe(tiny_dataset, data={"uri": tiny_dataset, "eval_samples": 32, "decode_workers": workers})
        raw["stages"] = raw["stages"][:1]
        d = tmp_path / f"w{workers}"
        d.mkdir()
        monkeypatch.chdir(d)
        result = runner.run(validate_recipe(raw))
        finals[workers] = result["weights_sha256"]
        run_ids[workers] = json.loads((d / "runs" / "tiny" / "run.json").read_text())["mlflow_run_id"]
        spooled[workers], made[:] = len([m for m in made if m]), []
    assert finals[0] == finals[2]
    assert spooled == {0: 0, 2: 3}  # each of stage 1's 3 chunks went through the spool, none in process
    # Each chunk reports the budget and what it cost to MLflow: the spooled run held nothing in RAM.
    budget = mlflow_history(tmp_path / "w2", run_ids[2], "perf/chunk_budget_mb")
    spilled = mlflow_history(tmp_path / "w2", run_ids[2], "perf/chunk_spilled_mb")
    ram = mlflow_history(tmp_path / "w2", run_ids[2], "perf/chunk_ram_mb")
    assert len(budget) == 3 and {v for _, v in budget} == {0.0} and {v for _, v in ram} == {0.0}
    assert all(v > 0 for _, v in spilled), spilled
    in_ram = mlflow_history(tmp_path / "w0", run_ids[0], "perf/chunk_ram_mb")
    assert len(in_ram) == 3 and all(v > 0 for _, v in in_ram), in_ram
    assert _files(tmp_path / "spool") == []


def test_a_spool_that_cannot_be_written_keeps_the_pieces_in_memory(ds_uri, monkeypatch):
    """Breaks if a full disk under the spool stops training instead of costing memory."""
    import errno

    import workers.streaming

    def full(path: str, values: Any) -> Any:
        raise OSError(errno.ENOSPC, "No space left on device", path)

    monkeypatch.setattr(workers.streaming, "write_piece", full)
    ids, batches = _chunk(seed=9)
    whole = read_chunk(open_dataset(ds_uri), ids)
    pre = ChunkPrefetcher(open_dataset(ds_uri), budget_bytes=0, piece_bytes=PIECE)
    try:
        rows = pre.get((0, 0), ids, *stream_order(ids, batches))
        _same(rows.materialize(), whole)
        assert rows.held_bytes == pre.memory()["ram_bytes"] > 0 and pre.memory()["spilled_bytes"] == 0
    finally:
        pre.close()
    assert pre.memory()["ram_bytes"] == 0  # given back on close


def test_each_landed_piece_hands_its_freed_heap_back(ds_uri, monkeypatch):
    """Breaks if the pieces' transient bytes (fetched ranges, parsed row groups) stay in glibc's
    arenas after they land: bench figures showed ~200 MB of PSS above what a 207 MB chunk held."""
    import workers.streaming

    trims: list[int] = []
    monkeypatch.setattr(workers.streaming, "trim_memory", lambda: trims.append(1))
    ids, batches = _chunk(seed=10)
    pre = ChunkPrefetcher(open_dataset(ds_uri), budget_bytes=0, piece_bytes=PIECE)
    try:
        rows = pre.get((0, 0), ids, *stream_order(ids, batches))
        rows.wait()
        pieces = len(rows._pieces)
        deadline = time.monotonic() + 60  # a piece's event is set before the landing thread trims
        while len(trims) < pieces and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        pre.close()
    assert pieces > 2 and len(trims) == pieces


class _FirstHeld:
    """A dataset that records which reads start (is it the first batch's piece?) and holds the
    first batch's piece until `gate` is set."""

    def __init__(self, ds: Any, first: np.ndarray) -> None:
        self._ds, self._first = ds, set(np.asarray(first).tolist())
        self.gate, self.started = threading.Event(), []
        self._started_lock = threading.Lock()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._ds, name)

    def read_samples(self, ids: Any, columns: Any = None, **kw: Any) -> dict[str, Any]:
        first = bool(self._first.intersection(np.asarray(ids).tolist()))
        with self._started_lock:
            self.started.append(first)
        if first:
            assert self.gate.wait(120), "the test never let the first piece land"
        return self._ds.read_samples(ids, columns, **kw)


def test_the_first_piece_is_read_alone_and_the_rest_start_once_it_has_landed(ds_uri):
    """Breaks if the second piece is fetched beside the first batch's (it took the disk and the
    cores the first batch waits on: bench.peer's first batch)."""
    from workers.chunks import stream_pieces

    ids, batches = _chunk(seed=4)
    ds = _FirstHeld(open_dataset(ds_uri), batches[0])
    order, batch = stream_order(ids, batches)
    pieces = stream_pieces(ds, ids, order, batch, PIECE)
    assert len(pieces) > 2
    pre = ChunkPrefetcher(ds, budget_bytes=2**30, piece_bytes=PIECE)
    try:
        rows = pre.get((0, 0), ids, order, batch)
        # Two threads are free for pieces: a second piece started with the first would be there by now.
        threading.Event().wait(1.0)
        assert ds.started == [True], ds.started
        ds.gate.set()
        _same(rows.materialize(), read_chunk(open_dataset(ds_uri), ids))
        assert ds.started[0] is True and len(ds.started) == len(pieces)
    finally:
        pre.close()


def test_pieces_by_need_keep_each_window_or_tier_whole_and_ramp_up():
    """Breaks if a unit (row groups first needed together: a window, or a tier of one) is split
    among pieces while it fits one (its row groups would be scattered requests), if the pieces stop
    growing from the first, or if a unit larger than a piece is split other than in file order."""
    from workers.chunks import _pieces_by_need

    mb = 2**20
    # 12 row groups of 1 MB, 4 positions each; units by first need: groups 0-1 at batch 1, 2-5 at
    # batches 3-4, 6-11 at batch 9 (in reverse file order, as a shuffle may need them).
    group = np.repeat(np.arange(12), 4)
    first = {0: 1, 1: 1, 2: 3, 3: 4, 4: 3, 5: 4, **{g: 9 for g in range(6, 12)}}
    need = np.array([first[g] for g in group]) + np.tile([0, 1, 2, 3], 12)  # later rows needed later
    size = np.full(len(group), float(mb))
    pieces = _pieces_by_need(group, need, size, np.arange(len(group)), piece_bytes=5 * mb, ramp_from=0.5 * mb)
    got = [sorted(set(group[p].tolist())) for p in pieces]
    assert got == [[0, 1], [2, 3, 4, 5], [6, 7, 8, 9, 10], [11]]
    # Small units merge up to the ramp's size: the second piece may take 2 MB, the third 4 MB...
    pieces = _pieces_by_need(group, need, size, np.arange(len(group)), piece_bytes=64 * mb, ramp_from=3 * mb)
    assert [sorted(set(group[p].tolist())) for p in pieces] == [list(range(6)), list(range(6, 12))]
    assert sorted(np.concatenate(pieces).tolist()) == list(range(len(group)))
