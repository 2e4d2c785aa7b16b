"""The window shuffle (data.shuffle: window): a rank's slice of a chunk is taken window by window
(runs of consecutive stored row groups), so the first batch needs one window's row groups; every
sample still trains once per pass in equal step counts; a slice within one window trains exactly
the batches of the whole-chunk shuffle; the mode is the plan's, and an old plan means chunk; a
killed window-mode run resumes to bit-identical weights."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest

from common.plan import batches_for_rank, make_plan, num_steps, plan_for_dataset, rank_slice, window_permutation
from common.recipe import validate_recipe
from storage.plans import load_plan, save_plan
from storage.shards import open_dataset
from tests.conftest import (
    cli_in_process,
    kill_group,
    run_cli,
    slow_recipe,
    start_cli,
    status_json,
    tiny_recipe,
    wait_for_cursor,
    write_recipe,
)
from workers.windows import Windows, window_keys

# The tiny dataset (conftest): 240 samples of 64 px in 8 row groups of 32, ~190 KB each, ~1.4 MB in all.
SMALL_WINDOW = 400_000  # bytes: windows of 2-3 row groups


def _groups(ds, ids) -> list[tuple[int, int]]:
    return list(zip(ds.index_values("shard", ids).tolist(), ds.index_values("row_group", ids).tolist(), strict=True))


def _chunk(ds, n: int = 150, seed: int = 3) -> np.ndarray:
    return np.sort(np.random.default_rng(seed).choice(ds.sample_ids, size=n, replace=False)).astype(np.int64)


def _rank_batches(ds, ids, batch, world, rank, seed=(0, 3, 0, 0, 0), contiguous=False, window=SMALL_WINDOW):
    mine = rank_slice(ids, world, rank, contiguous)
    steps = num_steps(len(ids), batch, world)
    keys = window_keys(ds, mine, window, min_rows=-(-len(mine) // steps))
    return mine, keys, batches_for_rank(ids, batch, world, rank, list(seed), contiguous, windows=keys)


@pytest.mark.parametrize("batch,world,contiguous", [(16, 1, False), (16, 2, False), (8, 3, False), (12, 2, True),
                                                    (5, 2, True)])
def test_every_sample_trains_once_per_pass_in_equal_step_counts(tiny_dataset, batch, world, contiguous):
    ds = open_dataset(tiny_dataset)
    ids = _chunk(ds)
    seen, steps, windows = [], set(), 0
    for rank in range(world):
        _, keys, batches = _rank_batches(ds, ids, batch, world, rank, contiguous=contiguous)
        windows = max(windows, int(keys.max()) + 1)
        steps.add(len(batches))
        assert all(len(b) for b in batches), "an empty batch on some rank"
        seen += np.concatenate(batches).tolist()
    assert windows > 1, "the case must cut more than one window to test anything"
    assert sorted(seen) == ids.tolist(), "a sample trained twice, or never, in one pass"
    assert steps == {num_steps(len(ids), batch, world)}, "DDP ranks would wait on a missing step"


def test_a_window_is_a_run_of_consecutive_stored_row_groups_trained_together(tiny_dataset):
    ds = open_dataset(tiny_dataset)
    ids = _chunk(ds)
    mine, keys, batches = _rank_batches(ds, ids, 16, 1, 0)
    order = np.concatenate(batches)
    key_of = dict(zip(mine.tolist(), keys.tolist(), strict=True))
    in_order = [key_of[int(i)] for i in order]
    # Windows follow one another: each window's samples are one block of the pass.
    blocks = [k for i, k in enumerate(in_order) if i == 0 or k != in_order[i - 1]]
    assert sorted(blocks) == list(range(int(keys.max()) + 1)), "a window's samples were split across the pass"
    # A window holds whole row groups, and window k's row groups all come before window k+1's in the file.
    groups_of = [sorted(set(_groups(ds, mine[keys == w]))) for w in range(int(keys.max()) + 1)]
    flat = [g for gs in groups_of for g in gs]
    assert flat == sorted(set(_groups(ds, mine))), "windows overlap or are not in stored order"


def test_the_first_batch_touches_only_the_first_windows_row_groups(tiny_dataset):
    ds = open_dataset(tiny_dataset)
    ids = _chunk(ds)
    mine, keys, batches = _rank_batches(ds, ids, 16, 1, 0)
    assert int(keys.max()) >= 2
    first_window = keys[np.searchsorted(mine, batches[0][0])]
    window_groups = set(_groups(ds, mine[keys == first_window]))
    first_groups = set(_groups(ds, batches[0]))
    assert first_groups <= window_groups, "the first batch needs row groups outside its window"
    assert len(window_groups) < len(set(_groups(ds, mine))), "the first window is the whole chunk"
    # The whole-chunk shuffle's first batch, by contrast, needs nearly every row group of the chunk.
    whole = batches_for_rank(ids, 16, 1, 0, [0, 3, 0, 0, 0])
    assert len(set(_groups(ds, whole[0]))) > len(window_groups)


def test_a_streamed_window_chunk_lands_its_windows_in_the_order_training_takes_them(tiny_dataset):
    """The pieces after the first follow the windows' seeded order, not file order: the window
    trained second lands second, so training does not wait on the rest of the file for it."""
    from workers.chunks import stream_order, stream_pieces

    ds = open_dataset(tiny_dataset)
    ids = _chunk(ds)
    mine, keys, batches = _rank_batches(ds, ids, 16, 1, 0)
    order, batch = stream_order(mine, batches)
    trained = [int(k) for k in keys[order]]
    window_order = [k for i, k in enumerate(trained) if i == 0 or k != trained[i - 1]]
    assert window_order != sorted(window_order), "the seed must put the windows out of file order to test this"
    pieces = stream_pieces(ds, mine, order, batch, piece_bytes=SMALL_WINDOW)
    piece_of = np.empty(len(mine), dtype=np.int64)
    for k, sel in enumerate(pieces):
        piece_of[sel] = k
    # The piece after which each window has wholly landed: never later for a window trained earlier.
    complete = [int(piece_of[keys == w].max()) for w in window_order]
    assert complete == sorted(complete), f"windows trained in order {window_order} complete at pieces {complete}"
    assert sorted(np.concatenate(pieces).tolist()) == list(range(len(mine))), "a position read twice or never"


def test_the_first_window_trains_its_head_first_so_the_first_batch_needs_only_the_head(tiny_dataset):
    """Breaks if the first batch draws from the whole first window again (it would wait on all of
    its row groups), if a window other than the first is split, or if a sample trains twice."""
    from common.plan import WindowOrder
    from workers.windows import window_heads

    ds = open_dataset(tiny_dataset)
    ids = _chunk(ds)
    mine = rank_slice(ids, 1, 0)
    steps = num_steps(len(ids), 16, 1)
    keys = window_keys(ds, mine, SMALL_WINDOW, min_rows=-(-len(mine) // steps))
    tiers = window_heads(ds, mine, keys, 150_000, min_rows=16)
    head = tiers == 0  # tier 0: one ~190 KB row group a head
    assert int(keys.max()) >= 2 and 0 < head.sum() < len(mine)
    batches = batches_for_rank(ids, 16, 1, 0, [0, 3, 0, 0, 0], windows=WindowOrder(keys, tiers))
    order = np.concatenate(batches)
    assert sorted(order.tolist()) == sorted(mine.tolist())
    where = np.searchsorted(mine, order)
    first_window = keys[where[0]]
    in_first = keys[where] == first_window
    n_head = int((head & (keys == first_window)).sum())
    assert in_first[: int(in_first.sum())].all(), "the first window is not one block"
    assert head[where[:n_head]].all(), "the first window's head is not trained before the rest of it"
    head_groups = set(_groups(ds, mine[head & (keys == first_window)]))
    assert set(_groups(ds, batches[0])) <= head_groups
    assert len(head_groups) < len(set(_groups(ds, mine[keys == first_window]))), "the head is the whole window"
    # The same draws without heads: only the order inside the first window differs.
    plain = np.concatenate(batches_for_rank(ids, 16, 1, 0, [0, 3, 0, 0, 0], windows=keys))
    assert plain[int(in_first.sum()):].tolist() == order[int(in_first.sum()):].tolist()


def test_a_slice_within_one_window_trains_exactly_the_whole_chunk_shuffles_batches(tiny_dataset):
    ds = open_dataset(tiny_dataset)
    ids = _chunk(ds)
    for world, rank in ((1, 0), (2, 1), (3, 2)):
        mine, keys, batches = _rank_batches(ds, ids, 8, world, rank, seed=(7, 3, 1, 2, 0), window=48 * 2**20)
        assert not keys.any(), "the tiny dataset is one 48 MB window"
        old = batches_for_rank(ids, 8, world, rank, [7, 3, 1, 2, 0])
        assert [b.tolist() for b in batches] == [b.tolist() for b in old]
    # And the pure function: one window is rng.permutation, the same draws.
    x = np.arange(100) * 3
    assert np.array_equal(window_permutation(x, np.full(100, 4), np.random.default_rng([1, 2])),
                          np.random.default_rng([1, 2]).permutation(x))


def test_window_batches_are_deterministic_and_seeded(tiny_dataset):
    ds = open_dataset(tiny_dataset)
    ids = _chunk(ds)
    a = _rank_batches(ds, ids, 16, 2, 1)[2]
    b = _rank_batches(open_dataset(tiny_dataset), ids, 16, 2, 1)[2]
    assert [x.tolist() for x in a] == [x.tolist() for x in b]
    other_epoch = _rank_batches(ds, ids, 16, 2, 1, seed=(0, 3, 0, 0, 1))[2]
    assert [x.tolist() for x in a] != [x.tolist() for x in other_epoch], "every epoch took the same order"


def test_a_short_tail_window_joins_the_one_before(tiny_dataset):
    ds = open_dataset(tiny_dataset)
    ids = _chunk(ds)
    keys = window_keys(ds, ids, SMALL_WINDOW, min_rows=40)
    counts = np.bincount(keys)
    assert len(counts) > 1 and counts.min() >= 40, counts
    assert not window_keys(ds, ids, SMALL_WINDOW, min_rows=len(ids)).any(), "a slice of one batch is one window"


def _plan(tiny_dataset: str, **data):
    recipe = validate_recipe(tiny_recipe(tiny_dataset, data={"eval_samples": 32, **data}))
    return recipe, plan_for_dataset(recipe, open_dataset(tiny_dataset))


def test_a_new_plan_records_the_window_mode_and_an_old_plan_means_chunk(tiny_dataset, tmp_path):
    recipe, plan = _plan(tiny_dataset)
    assert (plan.shuffle, plan.shuffle_window_bytes) == ("window", 48 * 2**20)  # the default for new runs
    save_plan(plan, str(tmp_path))
    meta = json.loads((tmp_path / "plan.json").read_text())
    assert (meta["shuffle"], meta["shuffle_window_bytes"], meta["shuffle_head_bytes"]) == ("window", 48 * 2**20,
                                                                                            2**20)
    assert (load_plan(str(tmp_path)).shuffle, load_plan(str(tmp_path)).shuffle_head_bytes) == ("window", 2**20)
    # A plan written before the mode existed: no key, so the whole-chunk shuffle, whatever the recipe says.
    for key in ("shuffle", "shuffle_window_bytes", "shuffle_head_bytes"):
        del meta[key]
    (tmp_path / "plan.json").write_text(json.dumps(meta))
    old = load_plan(str(tmp_path))
    assert old.shuffle == "chunk"
    ds = open_dataset(tiny_dataset)
    mine = old.chunk_ids(1, 1)
    assert Windows(ds, old, recipe).of(mine, len(mine), 8, 1) is None
    _, small = _plan(tiny_dataset, shuffle_window_mb=1)
    assert np.array_equal(small.chunk_ids(1, 1), mine), "the mode changes the batch order, not the chunks"
    assert int(Windows(ds, small).of(mine, len(mine), 8, 1).max()) >= 1


def test_a_recipe_that_differs_from_the_plan_is_warned_about_and_the_plan_wins(tiny_dataset, caplog):
    ds = open_dataset(tiny_dataset)
    _, chunk_plan = _plan(tiny_dataset, shuffle="chunk")
    window_recipe, window_plan = _plan(tiny_dataset, shuffle_window_mb=1)
    with caplog.at_level(logging.WARNING, logger="workers.windows"):
        w = Windows(ds, chunk_plan, window_recipe)
    assert "data.shuffle:" in caplog.text
    mine = chunk_plan.chunk_ids(1, 1)
    assert w.of(mine, len(mine), 8, 1) is None
    caplog.clear()
    other_mb = validate_recipe(tiny_recipe(tiny_dataset, data={"eval_samples": 32, "shuffle_window_mb": 2}))
    with caplog.at_level(logging.WARNING, logger="workers.windows"):
        w = Windows(ds, window_plan, other_mb)
    assert "data.shuffle_window_mb:" in caplog.text and w.window_bytes == 2**20
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="workers.windows"):
        Windows(ds, window_plan, window_recipe)
    assert not caplog.text, "a recipe that matches its plan is warned about"


def test_a_plan_of_an_unknown_mode_is_refused(tiny_dataset):
    _, plan = _plan(tiny_dataset)
    from dataclasses import replace

    with pytest.raises(ValueError, match="'diagonal'"):
        Windows(open_dataset(tiny_dataset), replace(plan, shuffle="diagonal"))


def test_existing_recipes_keep_their_identity():
    """Both fields sit in _LATER_DEFAULTS: the tiny recipe's sha256 is the one it had before they existed,
    and setting either away from its default makes another recipe."""
    base = tiny_recipe("data/x")
    assert validate_recipe(base).sha256() == "4dc9a1745d153fcc70e0f402bf88434872d00b92d45d02bd85a326f048d9e8c7"
    for data in ({"shuffle": "window"}, {"shuffle_window_mb": 48}):
        assert validate_recipe(tiny_recipe("data/x", data={**base["data"], **data})).sha256() == \
            validate_recipe(base).sha256()
    for data in ({"shuffle": "chunk"}, {"shuffle_window_mb": 8}):
        assert validate_recipe(tiny_recipe("data/x", data={**base["data"], **data})).sha256() != \
            validate_recipe(base).sha256()


def test_make_plan_without_a_dataset_records_chunk_when_asked():
    d = tiny_recipe("x", data={"eval_samples": 100, "shuffle": "chunk"})
    plan = make_plan(validate_recipe(d), np.arange(1000))
    assert (plan.shuffle, plan.shuffle_window_bytes) == ("chunk", 0)


def _window_recipe(tiny_dataset: str) -> dict:
    """slow_recipe with 1 MB windows: most chunks of the tiny dataset span two windows."""
    recipe = slow_recipe(tiny_dataset)
    recipe["data"]["shuffle_window_mb"] = 1
    return recipe


@pytest.fixture(scope="module")
def window_reference(tmp_path_factory, tiny_dataset) -> str:
    """weights_sha256 of _window_recipe trained once without a stop."""
    d = tmp_path_factory.mktemp("window-reference")
    res = run_cli("run", write_recipe(d / "r.yaml", _window_recipe(tiny_dataset)), cwd=d)
    assert res.returncode == 0, res.stderr
    plan = load_plan(str(d / "runs" / "tiny"))
    assert (plan.shuffle, plan.shuffle_window_bytes) == ("window", 2**20)
    return status_json(d)["final"]["weights_sha256"]


def test_a_killed_window_mode_run_resumes_to_the_uninterrupted_weights(tmp_path, tiny_dataset, window_reference):
    """SIGKILL the real `orchestrator run` mid-chunk in stage 2, in a chunk of two windows, and run
    it again: the weights must be those of the same recipe trained without a stop."""
    path = write_recipe(tmp_path / "r.yaml", _window_recipe(tiny_dataset))
    proc = start_cli("run", path, cwd=tmp_path, log=tmp_path / "attempt1.log")
    try:
        wait_for_cursor(tmp_path / "runs" / "tiny", lambda c: c["stage"] == 1 and c["chunk"] >= 1 and c["batch"] > 0,
                        proc)
    finally:
        kill_group(proc)
    plan = load_plan(str(tmp_path / "runs" / "tiny"))
    ids = plan.chunk_ids(1, 1)  # where the run is cut (or the chunk before the one it is cut in)
    assert int(Windows(open_dataset(tiny_dataset), plan).of(ids, len(ids), 8, 1).max()) >= 1
    again = run_cli("run", path, cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    st = status_json(tmp_path)
    assert st["state"] == "completed" and st["interruptions"] == 1
    assert all(c["times_trained"] == 1 for c in st["chunk_log"]), st["chunk_log"]
    assert st["final"]["weights_sha256"] == window_reference, "a resumed window-mode run trained other batches"


def test_a_run_planned_before_windows_resumes_in_whole_chunk_order(tmp_path, tiny_dataset, window_reference,
                                                                   reference_sha, monkeypatch):
    """A run whose plan.json has no shuffle key (written by the code before windows) is resumed by
    today's code with a recipe whose default would cut windows: it must go on in whole-chunk order
    and end with the weights of the whole-chunk run (conftest's reference), not the window run's."""
    assert window_reference != reference_sha, "1 MB windows must change the batches for this test to mean anything"
    path = write_recipe(tmp_path / "r.yaml", _window_recipe(tiny_dataset))
    # The worker dies at step 8, in stage 1's second chunk; steps 1-5 (chunk 0, one window: the same
    # batches in both modes) are checkpointed, so what the resume trains is in the plan's order.
    monkeypatch.setenv("ORCHESTRATOR_TEST_CRASH_AT_STEP", "8")
    first = run_cli("run", path, cwd=tmp_path)
    monkeypatch.delenv("ORCHESTRATOR_TEST_CRASH_AT_STEP")
    assert first.returncode != 0
    plan_json = tmp_path / "runs" / "tiny" / "plan.json"
    meta = json.loads(plan_json.read_text())
    assert meta.pop("shuffle") == "window" and meta.pop("shuffle_window_bytes") == 2**20
    plan_json.write_text(json.dumps(meta))  # as the code before windows wrote it
    again = run_cli("run", path, cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    st = status_json(tmp_path)
    assert st["state"] == "completed" and st["interruptions"] == 1
    assert st["final"]["weights_sha256"] == reference_sha, "an old run changed its batch order on resume"


def test_a_one_head_plan_keeps_the_order_it_was_planned_with(tiny_dataset):
    """A plan from before tiers (shuffle_head_growth absent: 1) must train the batches the code that
    planned it trained: the first window's head, then the rest of it, the other windows whole."""
    from common.plan import WindowOrder
    from workers.windows import window_heads

    ds = open_dataset(tiny_dataset)
    ids = _chunk(ds)
    mine = rank_slice(ids, 1, 0)
    keys = window_keys(ds, mine, SMALL_WINDOW, min_rows=16)
    tiers = window_heads(ds, mine, keys, 150_000, min_rows=16)  # growth 1: tier 0 (the head) or 1
    assert set(np.unique(tiers).tolist()) == {0, 1}
    got = np.concatenate(batches_for_rank(ids, 16, 1, 0, [0, 3, 0, 0, 0], windows=WindowOrder(keys, tiers)))
    # The one-head order as the code before tiers wrote it, from the same draws.
    rng = np.random.default_rng([0, 3, 0, 0, 0, 0])
    uniq, inverse = np.unique(keys, return_inverse=True)
    place = np.argsort(rng.permutation(len(uniq)))[inverse]
    within = rng.permutation(len(mine))
    before = mine[np.lexsort((within, (place == 0) & (tiers != 0), place))]
    assert got.tolist() == before.tolist()


def test_tiers_grow_in_each_window_and_the_leading_windows_train_them_in_order(tiny_dataset):
    """Breaks if tiers stop growing (head, twice the head, four times...), if a leading window trains
    a later tier before an earlier one, or if a window past the span is split at all."""
    from workers.windows import window_heads

    ds = open_dataset(tiny_dataset)
    mine = np.sort(ds.sample_ids).astype(np.int64)
    keys = window_keys(ds, mine, 800_000, min_rows=16)  # windows of ~4 row groups of ~190 KB
    tiers = window_heads(ds, mine, keys, 150_000, min_rows=16, growth=2)
    of = _groups(ds, mine)
    for w in np.unique(keys).tolist():
        by_group = {of[i]: int(tiers[i]) for i in np.flatnonzero(keys == w).tolist()}  # a group's ids share a tier
        per_group = [by_group[g] for g in sorted(by_group)]
        assert per_group == sorted(per_group) and per_group[0] == 0  # file order: head first, tiers after
        if len(per_group) >= 4:  # 0-150 KB head, 150-450 KB tier 1, 450-1050 KB tier 2
            assert per_group[:4] == [0, 1, 1, 2]
    # window_permutation on made-up windows: a tiny first window (5 ids), then two of 50.
    ids = np.arange(105)
    win = np.r_[np.zeros(5, int), np.ones(50, int), np.full(50, 2)]
    tier = np.r_[np.zeros(5, int), np.repeat([0, 1, 2], [10, 15, 25]), np.repeat([0, 1, 2], [10, 15, 25])]
    for seed in range(200):  # a seed that puts the tiny window first and window 1 second
        place = np.argsort(np.random.default_rng(seed).permutation(3))
        if place[0] == 0 and place[1] == 1:
            break
    order = window_permutation(ids, win, np.random.default_rng(seed), head=tier, span=50)
    plain = window_permutation(ids, win, np.random.default_rng(seed))
    assert sorted(order.tolist()) == ids.tolist()
    assert order[:5].tolist() == plain[:5].tolist()
    second = order[5:55]
    assert (win[second] == 1).all() and np.all(np.diff(tier[second]) >= 0), "window 1 is within the span: tiered"
    assert order[55:].tolist() == plain[55:].tolist(), "window 2 starts past the span: it mixes whole"
    # Without a span only the first window is tiered (the one-head rule).
    assert window_permutation(ids, win, np.random.default_rng(seed), head=tier)[5:].tolist() == plain[5:].tolist()


def test_a_new_plan_records_tiers_and_an_old_plan_reads_as_one_head(tiny_dataset, tmp_path):
    from common.plan import HEAD_BYTES, HEAD_GROWTH

    _, plan = _plan(tiny_dataset)
    assert (plan.shuffle_head_bytes, plan.shuffle_head_growth) == (HEAD_BYTES, HEAD_GROWTH) == (2**20, 2)
    save_plan(plan, str(tmp_path))
    meta = json.loads((tmp_path / "plan.json").read_text())
    assert meta["shuffle_head_growth"] == 2 and load_plan(str(tmp_path)).shuffle_head_growth == 2
    del meta["shuffle_head_growth"]  # as the code before tiers wrote it
    (tmp_path / "plan.json").write_text(json.dumps(meta))
    assert load_plan(str(tmp_path)).shuffle_head_growth == 1


# -- data stored in its source's order -------------------------------------------------------------


@pytest.fixture(scope="module")
def class_sorted(tmp_path_factory) -> str:
    """An ImageFolder of 1,200 96-px samples (~4 MB) packed in its source's order, class by class
    (`data pack --order source`, and every pack before storage/pack/order.py), and as `data pack`
    stores it by default (shuffled; shards of 320 in row groups of 16, so that 20 blocks of 16
    consecutive samples are dealt to each of 4 shards: at the default sizes, ~128 blocks a shard);
    and the same samples synthesized (stored in no order)."""
    from storage.pack import pack
    from storage.synth_tasks import synthesize_task, synthesize_task_seed_layout

    root = tmp_path_factory.mktemp("sorted")
    synthesize_task_seed_layout("classification", str(root / "raw"), 1200, seed=5, image_size=96, workers=1)
    pack(str(root / "raw"), str(root / "ds"), task="classification", workers=1, rows_per_group=64, order="source")
    pack(str(root / "raw"), str(root / "shuffled"), task="classification", workers=1, rows_per_group=16,
         rows_per_shard=320)
    synthesize_task("classification", str(root / "synth"), 1200, seed=5, image_size=96, rows_per_group=64, workers=1)
    return str(root)


def _window_plan(uri: str, shuffle: str, window_mb: int) -> tuple:
    ds = open_dataset(uri)
    stage = {"name": "train", "resolution": 96, "batch_size": 64, "chunk_size": 1000, "lr": 0.003}
    recipe = validate_recipe(tiny_recipe(uri, task="classification", model={"name": "basenet", "width": 1.0},
                                         loss={"labels": {"cross_entropy": 1.0}}, stages=[stage],
                                         data={"shuffle": shuffle, "shuffle_window_mb": window_mb}))
    return ds, plan_for_dataset(recipe, ds)


def test_windows_over_class_sorted_storage_hold_few_classes_a_batch_and_a_new_run_is_told(class_sorted):
    """Breaks if the note about data stored in order goes, or fires where it does not apply (a chunk
    that fits one window, the whole-chunk shuffle, a synthesized set stored in no order); and shows
    why it is there: in small windows a batch of the class-sorted set holds a few classes, the
    whole-chunk shuffle's holds nearly all."""
    from workers.windows import stored_order_note

    ds, plan = _window_plan(f"{class_sorted}/ds", "window", 1)
    ids = plan.stages[0].chunk_ids(0)
    labels = dict(zip(ids.tolist(), np.asarray(ds.index_values("label", ids)).tolist(), strict=True))

    def classes_a_batch(p) -> float:
        order = Windows(ds, p).order(ids, len(ids), 64, 1)
        return float(np.median([len({labels[i] for i in b.tolist()})
                                for b in batches_for_rank(ids, 64, 1, 0, [0, 3, 0, 0, 0], windows=order)]))

    _, whole = _window_plan(f"{class_sorted}/ds", "chunk", 1)
    assert classes_a_batch(plan) <= 4 < 8 <= classes_a_batch(whole)
    note = stored_order_note(ds, plan, 64)
    assert note is not None and "imagefolder" in note and "data.shuffle: chunk" in note and "--order source" in note
    assert stored_order_note(ds, whole, 64) is None
    assert stored_order_note(ds, _window_plan(f"{class_sorted}/ds", "window", 48)[1], 64) is None
    synth, synth_plan = _window_plan(f"{class_sorted}/synth", "window", 1)
    assert stored_order_note(synth, synth_plan, 64) is None


def test_a_default_pack_stores_class_sorted_samples_so_that_small_windows_mix_the_classes(class_sorted):
    """Breaks if `data pack` goes back to storing the source's order (or shuffles only within a
    shard: the 4 shards here would then hold 2 to 4 classes each), or if a new run is told about
    the stored order of a dataset stored shuffled. The sample ids and labels stay the source's.
    Stored in the source's order, the same windows hold at most 4 classes a batch (the test above)."""
    from workers.windows import stored_order_note

    ds, plan = _window_plan(f"{class_sorted}/shuffled", "window", 1)
    assert ds.manifest["stored_order"] == {"order": "shuffled", "seed": 0, "block_rows": 16}
    assert len(ds.manifest["shards"]) == 4
    ids = plan.stages[0].chunk_ids(0)
    labels = dict(zip(ids.tolist(), np.asarray(ds.index_values("label", ids)).tolist(), strict=True))
    order = Windows(ds, plan).order(ids, len(ids), 64, 1)
    assert len(np.unique(order.keys)) >= 3, "the 1 MB windows must cut this chunk for the test to mean anything"
    per_batch = [len({labels[i] for i in b.tolist()}) for b in batches_for_rank(ids, 64, 1, 0, [0, 3, 0, 0, 0],
                                                                                windows=order)]
    assert np.median(per_batch) >= 7, per_batch
    assert stored_order_note(ds, plan, 64) is None
    sorted_ds = open_dataset(f"{class_sorted}/ds")
    assert sorted_ds.manifest["stored_order"] == {"order": "source"}
    # The same samples under the same ids, with the same labels, stored in another order.
    assert sorted(ds.sample_ids.tolist()) == sorted(sorted_ds.sample_ids.tolist())
    assert ds.sample_ids.tolist() != sorted_ds.sample_ids.tolist()
    every = np.sort(ds.sample_ids)
    assert np.asarray(ds.index_values("label", every)).tolist() == np.asarray(
        sorted_ds.index_values("label", every)).tolist()
    # Each shard holds most classes (shuffled within a shard only, each would hold 3 or 4).
    shard_of = ds.index.column("shard").to_numpy()
    label_of = np.asarray(ds.index.column("label").to_numpy())
    assert min(len(set(label_of[shard_of == s].tolist())) for s in range(4)) >= 8


def test_the_stored_order_deals_runs_of_a_row_group_across_shards_and_is_fixed():
    """Breaks if the stored order stops being a permutation, stops being the same for the same
    sizes (a killed pack's re-run cuts its parts by it), stops reading the source in runs of a
    row group (a remote zip would be read member by member), or keeps a shard's runs together."""
    from storage.pack.order import stored_order

    o = stored_order(1000, 200, 10)
    assert sorted(o.tolist()) == list(range(1000)) and o.tolist() == stored_order(1000, 200, 10).tolist()
    assert o.tolist() != stored_order(1000, 200, 20).tolist()
    for s in range(0, 1000, 200):
        part = np.sort(o[s : s + 200])
        runs = np.split(part, np.flatnonzero(np.diff(part) != 1) + 1)
        assert all(len(r) % 10 == 0 for r in runs), "a part reads whole blocks of 10 consecutive samples"
        assert len(runs) >= 10, "a part's blocks come from all over the source"
        assert o[s : s + 10].tolist() != sorted(o[s : s + 10].tolist()), "a row group holds one block"
    assert stored_order(1000, 200, 10, "source").tolist() == list(range(1000))


def test_data_pack_of_more_than_a_window_notes_the_stored_order(class_sorted, tmp_path, capsys, monkeypatch):
    """Breaks if `data pack --order source` stops noting that a dataset larger than one default window
    is stored in its source's order, or notes it for one that fits a window (the default window
    scaled down here: packing 48 MB takes a minute) or for a default (shuffled) pack."""
    import common.recipe

    code, err = cli_in_process(capsys, "data", "pack", f"{class_sorted}/raw", str(tmp_path / "a"), "--task",
                               "classification", "--workers", "1", "--order", "source")
    assert code == 0 and "packed 1200 samples" in err and "stored in the source's order" not in err
    monkeypatch.setattr(common.recipe, "SHUFFLE_WINDOW_MB", 1)  # data pack reads it when it runs
    code, err = cli_in_process(capsys, "data", "pack", f"{class_sorted}/raw", str(tmp_path / "b"), "--task",
                               "classification", "--workers", "1", "--order", "source")
    assert code == 0 and "stored in the source's order (imagefolder)" in err and "data.shuffle: chunk" in err
    code, err = cli_in_process(capsys, "data", "pack", f"{class_sorted}/raw", str(tmp_path / "c"), "--task",
                               "classification", "--workers", "1")
    assert code == 0 and "packed 1200 samples" in err and "stored in the source's order" not in err
    code, err = cli_in_process(capsys, "data", "pack", f"{class_sorted}/raw", str(tmp_path / "d"), "--order", "random")
    assert code == 2 and "--order 'random'" in err and "shuffled, source" in err
