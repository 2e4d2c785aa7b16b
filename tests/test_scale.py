"""What stays flat at the source's scale (1.2M samples; figures in docs/PERFORMANCE.md, bench.scale):
the plan holds numpy arrays and no per-sample Python objects, what the driver and `status` read
does not grow with the dataset, the plans of existing runs do not change, a chunk is read in
pieces (memory holds its samples plus a few pieces, not every row group it touches), and the
preload pairs row groups with fetched ranges in one walk. Memory is asserted, never wall time."""

from __future__ import annotations

import hashlib
import json
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from common.plan import Plan, batches_for_rank, make_plan
from common.recipe import load_recipe, validate_recipe
from storage.plans import load_plan, save_plan
from tests.conftest import REPO, tiny_recipe

N = 1_200_000


def _digest(plan: Plan) -> str:
    h = hashlib.sha256()
    for a in (plan.eval_ids, plan.train_ids, *(s.permutation for s in plan.stages)):
        h.update(np.ascontiguousarray(a, dtype="<i8").tobytes())
    return h.hexdigest()


def _reference_plan(seed: int, n_eval: int, sample_ids: np.ndarray,
                    stages: int) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
    """The plan as common/plan.py has always made it, spelled out: eval split, then each stage's order."""
    ids = np.sort(np.asarray(sample_ids, dtype=np.int64))
    shuffled = np.random.default_rng([seed, 0]).permutation(ids)
    eval_ids, train_ids = np.sort(shuffled[:n_eval]), np.sort(shuffled[n_eval:])
    return eval_ids, train_ids, [np.random.default_rng([seed, 1, i]).permutation(train_ids) for i in range(stages)]


@pytest.fixture(scope="module")
def unet224():
    # Chunked by samples, the plan every run made before data.chunking existed (pinned below);
    # unet224.yaml itself chunks by row groups (test at the end).
    return load_recipe(str(REPO / "recipes" / "unet224.yaml"), ["data.uri=/unused", "data.chunking=samples"])


def test_planning_1_2m_samples_holds_no_per_sample_python_objects(unet224):
    """Breaks if make_plan builds per-sample lists, dicts or ints (a list of 1.2M ints alone is
    ~43 MB of Python objects) instead of numpy arrays."""
    ids = np.arange(N, dtype=np.int64)
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        plan = make_plan(unet224, ids)
        held, peak = (m - base for m in tracemalloc.get_traced_memory())
        python_objects = sum(s.size for s in tracemalloc.take_snapshot().filter_traces(
            [tracemalloc.DomainFilter(True, 0)]).statistics("filename"))
    finally:
        tracemalloc.stop()
    arrays = 8 * (len(plan.eval_ids) + len(plan.train_ids) + sum(len(s.permutation) for s in plan.stages))
    assert held <= arrays + 2**20  # the plan is its five arrays: 38 MB at 1.2M samples
    assert peak <= 64 * N  # 48 bytes a sample measured: the arrays and a few temporaries
    assert python_objects < 2**20  # Python's own allocations while the plan is held: not per sample
    assert [s.num_chunks for s in plan.stages] == [24, 24, 12]


def test_a_big_plan_is_the_plan_the_old_code_makes_and_reference_plans_do_not_change(unet224):
    """Breaks if any change to planning moves a sample to another chunk or reorders one: a resumed
    run would train other samples than it planned, and the reference recipes' weights would move."""
    ids = np.random.default_rng(7).permutation(np.arange(N, dtype=np.int64) * 3 + 11)  # any order, any ids
    plan = make_plan(unet224, ids)
    eval_ids, train_ids, perms = _reference_plan(unet224.run.seed, unet224.data.eval_samples, ids, len(unet224.stages))
    assert np.array_equal(plan.eval_ids, eval_ids) and np.array_equal(plan.train_ids, train_ids)
    assert all(np.array_equal(s.permutation, p) for s, p in zip(plan.stages, perms, strict=True))
    # Pinned: unet224 over ids 0..1.2M-1, and quickstart over its 3,000 synthesized samples.
    assert _digest(make_plan(unet224, np.arange(N))) == (
        "12f57d4e486bc5fdddde7f4a87749a4e1be3813550e9c21103297e7c60f9fb7c")
    quickstart = load_recipe(str(REPO / "recipes" / "quickstart.yaml"))
    assert _digest(make_plan(quickstart, np.arange(3000))) == (
        "6f9c94d1e915aa2bcc0e7633535dc323e6692729716840428006594ddcd2e072")


def test_what_the_driver_and_status_read_does_not_grow_with_the_dataset(unet224, tmp_path):
    """Breaks if plan.json (read by `status` and every resume) carries per-sample data, or if the
    plan stored in run storage stops round-tripping exactly."""
    sizes = {}
    for n in (120_000, N):
        d = tmp_path / str(n)
        plan = make_plan(unet224, np.arange(n))
        save_plan(plan, str(d))
        sizes[n] = (d / "plan.json").stat().st_size, sum(s.num_chunks for s in plan.stages)
        back = load_plan(str(d))
        assert _digest(back) == _digest(plan)
        assert back.stages[2].chunk_ids(1).dtype == np.int64
    for size, chunks in sizes.values():
        assert size < 1024 + 32 * chunks  # one entry per chunk (60 at 1.2M: 1.4 KB), nothing per sample
    summary = json.loads((tmp_path / str(N) / "plan.json").read_text())
    assert summary["train_samples"] == N - 10_000 and len(summary["stages"][2]["chunk_samples"]) == 12


def test_a_ranks_slice_of_a_100k_chunk_is_numpy_throughout(unet224):
    plan = make_plan(unet224, np.arange(N))
    ids = plan.chunk_ids(2, 0)
    tracemalloc.start()
    try:
        batches = batches_for_rank(ids, 64, 1, 0, [0, 3, 2, 0, 0])
        held = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    assert len(batches) == 1563 and sum(len(b) for b in batches) == 100_000
    assert held <= 8 * 100_000 + 200 * len(batches)  # the ids once, and a view object per batch


# -- reading a chunk in pieces ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_dataset(tmp_path_factory) -> str:
    from storage.synth import synthesize

    uri = str(tmp_path_factory.mktemp("scale") / "ds")
    synthesize(uri, 512, seed=5, image_size=32, rows_per_shard=96, rows_per_group=8, workers=1)
    return uri


def _same_rows(a: dict, b: dict) -> None:
    assert set(a) == set(b)
    for k in a:
        if isinstance(a[k], np.ndarray):
            assert isinstance(b[k], np.ndarray) and a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k]), k
        else:
            assert isinstance(b[k], list) and a[k] == b[k], k


def test_a_chunk_read_in_pieces_is_the_chunk_read_at_once(small_dataset, monkeypatch):
    """Breaks if reading in pieces loses, repeats or reorders a sample, or changes a value's type."""
    from storage.shards import open_dataset
    from workers.data import ChunkPrefetcher, chunk_pieces, read_chunk

    monkeypatch.setenv("ORCHESTRATOR_CACHE", "off")
    ds = open_dataset(small_dataset)
    ids = np.random.default_rng(1).permutation(ds.sample_ids)[:300]
    pieces = chunk_pieces(ds, ids, piece_bytes=4096)
    assert len(pieces) > 10
    assert sorted(np.concatenate(pieces).tolist()) == list(range(len(ids)))  # each id in one piece
    # A piece holds whole row groups: no row group is read by two pieces.
    groups = [set(zip(ds.index_values("shard", ids[p]).tolist(), ds.index_values("row_group", ids[p]).tolist(),
                      strict=True)) for p in pieces]
    assert sum(len(g) for g in groups) == len(set().union(*groups))
    whole = open_dataset(small_dataset).read_samples(ids)
    _same_rows(whole, read_chunk(open_dataset(small_dataset), ids, piece_bytes=4096, in_flight=3))
    _same_rows(whole, ChunkPrefetcher(open_dataset(small_dataset)).get((0, 0), ids))
    assert len(chunk_pieces(ds, ids)) == 1  # a small chunk is one read_samples call, as before


def test_a_chunk_read_in_pieces_holds_its_samples_not_every_row_group_it_touches(small_dataset, monkeypatch):
    """Breaks if a chunk's read holds all its row groups' bytes at once again: a 100K chunk of a
    1.2M-sample dataset touches 97 % of the row groups, ~30 GB at the source's sample size."""
    from storage.shards import open_dataset
    from workers.data import read_chunk

    monkeypatch.setenv("ORCHESTRATOR_CACHE", "off")
    # a quarter: every row group
    ids = np.random.default_rng(2).permutation(open_dataset(small_dataset).sample_ids)[:128]

    def peak(read) -> tuple[int, int]:
        ds = open_dataset(small_dataset)
        ds.reader.footers(list(range(len(ds.manifest["shards"]))))
        tracemalloc.start()
        try:
            rows = read(ds)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        return peak, sum(len(v) for c, col in rows.items() if isinstance(col, list) for v in col)

    at_once, wanted = peak(lambda ds: ds.read_samples(ids))
    in_pieces, wanted_too = peak(lambda ds: read_chunk(ds, ids, piece_bytes=16 * 1024, in_flight=2))
    assert wanted == wanted_too
    dataset_bytes = sum(s["bytes"] for s in open_dataset(small_dataset).manifest["shards"])
    # the old way: every row group fetched and parsed at once (3.9 MB while fetched ranges were
    # copied into their row groups, 2.7 MB since a row group is a view of its range, 1.7 MB since
    # only the wanted rows become bytes objects: storage/shards/groups.py)
    assert at_once > dataset_bytes
    assert in_pieces < min(wanted + dataset_bytes, at_once)  # measured: 1.1 MB < min(1.9, 1.7) MB


def test_fetched_ranges_are_cut_into_row_groups_in_one_walk(small_dataset, monkeypatch):
    """Breaks if a row group gets another one's bytes when many merged ranges span many shards."""
    from storage.shards import fetch, open_dataset

    monkeypatch.setenv("ORCHESTRATOR_CACHE", "off")
    monkeypatch.setattr(fetch, "MERGE_MAX_BYTES", 70_000)  # row groups of ~22 KB: many merged ranges of a few each
    ds = open_dataset(small_dataset)
    reader = ds.reader
    shards = len(ds.manifest["shards"])
    reader.footers(list(range(shards)))
    footers = reader.stats.requests
    groups = [(s, g) for s in range(shards)[::-1] for g in range(ds.manifest["shards"][s]["row_groups"]) if (s + g) % 4]
    got = reader.fetch_groups(groups)
    ranges = reader.stats.requests - footers
    assert 2 * shards < ranges < len(groups)  # merged, yet many ranges per shard
    for s, g in groups:
        start, blob = got[(s, g)]
        data = Path(small_dataset, ds.manifest["shards"][s]["file"]).read_bytes()
        assert blob == data[start : start + len(blob)]
        assert (start, start + len(blob)) == fetch.group_range(reader.footers([s])[s], g)


def test_tiny_recipe_plans_are_unchanged():
    """The test recipes' plans, pinned as the reference recipes' are (test_plan.py checks their shape)."""
    plan = make_plan(validate_recipe(tiny_recipe("x")), np.arange(240))
    assert [s.num_chunks for s in plan.stages] == [3, 3, 2]
    eval_ids, train_ids, perms = _reference_plan(0, 32, np.arange(240), 3)
    assert np.array_equal(plan.eval_ids, eval_ids)
    assert all(np.array_equal(s.permutation, p) for s, p in zip(plan.stages, perms, strict=True))


def test_planning_1_2m_samples_by_row_groups_stays_numpy_and_flat():
    """unet224.yaml's own chunking: whole row groups move together. Breaks if grouping the ids
    goes through per-sample or per-group Python objects."""
    recipe = load_recipe(str(REPO / "recipes" / "unet224.yaml"), ["data.uri=/unused"])
    assert recipe.data.chunking == "row_groups"
    ids = np.arange(N, dtype=np.int64)
    groups = ids // 41  # data pack's row groups for the source's ~25 KB samples
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        plan = make_plan(recipe, ids, groups)
        peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()
    assert peak <= 128 * N, peak
    assert [s.num_chunks for s in plan.stages] == [24, 24, 12]
    first = plan.chunk_ids(0, 0)
    assert len(np.unique(first // 41)) <= 50_000 // 41 + 2  # the first 50K chunk: ~1,220 row groups, not all 29K
