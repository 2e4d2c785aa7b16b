"""The plan: chunks are disjoint, cover the training split, keep eval apart, and are seeded."""

from __future__ import annotations

import numpy as np
import pytest

from common.errors import RecipeError
from common.plan import batches_for_rank, make_plan, num_steps
from common.recipe import validate_recipe
from storage.plans import load_plan, save_plan
from tests.conftest import tiny_recipe


def _plan(n=1000, seed=0, eval_samples=100, chunks=(300, 300, 450)):
    d = tiny_recipe("x", run={"seed": seed}, data={"eval_samples": eval_samples})
    for st, size in zip(d["stages"], chunks, strict=True):
        st["chunk_size"] = size
    return make_plan(validate_recipe(d), np.arange(n) * 7 + 3)  # ids need not be 0..n-1


def test_each_stage_covers_the_training_split_with_disjoint_chunks():
    p = _plan()
    for sp in p.stages:
        chunks = [sp.chunk_ids(c) for c in range(sp.num_chunks)]
        allids = np.concatenate(chunks)
        assert len(allids) == len(set(allids.tolist())), "a sample in two chunks would train twice per stage"
        assert set(allids.tolist()) == set(p.train_ids.tolist()), "a sample in no chunk would never train"


def test_eval_split_is_held_out_of_every_chunk():
    p = _plan()
    assert len(p.eval_ids) == 100
    assert not set(p.eval_ids.tolist()) & set(p.train_ids.tolist())
    assert len(p.eval_ids) + len(p.train_ids) == 1000


def test_chunk_sizes_follow_the_stage_setting():
    p = _plan(chunks=(300, 300, 450))
    assert [s.num_chunks for s in p.stages] == [3, 3, 2]
    assert [len(p.chunk_ids(2, c)) for c in range(2)] == [450, 450]


def test_plan_is_deterministic_per_seed_and_differs_across_seeds():
    a, b, c = _plan(seed=5), _plan(seed=5), _plan(seed=6)
    assert np.array_equal(a.eval_ids, b.eval_ids)
    assert all(np.array_equal(x.permutation, y.permutation) for x, y in zip(a.stages, b.stages, strict=True))
    assert not np.array_equal(a.stages[0].permutation, c.stages[0].permutation)


def test_stages_shuffle_independently():
    p = _plan()
    assert not np.array_equal(p.stages[0].permutation, p.stages[1].permutation)


def test_plan_round_trips_through_run_storage(tmp_path):
    p = _plan()
    save_plan(p, str(tmp_path))
    q = load_plan(str(tmp_path))
    assert np.array_equal(p.eval_ids, q.eval_ids)
    assert all(np.array_equal(x.permutation, y.permutation) for x, y in zip(p.stages, q.stages, strict=True))


def test_eval_larger_than_dataset_is_a_recipe_error():
    with pytest.raises(RecipeError, match="data.eval_samples"):
        _plan(n=50, eval_samples=50)


@pytest.mark.parametrize("n,batch,world", [(70, 16, 1), (70, 16, 2), (68, 8, 3), (5, 4, 4), (104, 8, 1)])
def test_rank_batches_train_every_sample_once_in_equal_step_counts(n, batch, world):
    """DDP ranks with different step counts hang; a sample left out or repeated breaks exactly-once."""
    ids = np.arange(100, 100 + n)
    per_rank = [batches_for_rank(ids, batch, world, r, [0, 1]) for r in range(world)]
    assert {len(b) for b in per_rank} == {num_steps(n, batch, world)}
    assert all(len(x) > 0 for b in per_rank for x in b)
    seen = np.concatenate([x for b in per_rank for x in b])
    assert sorted(seen.tolist()) == ids.tolist()


def _grouped_plan(chunking: str, n: int = 12_000, per_group: int = 40, seed: int = 0):
    d = tiny_recipe("x", run={"seed": seed}, data={"eval_samples": 400, "chunking": chunking})
    for st, size in zip(d["stages"], (1000, 1000, 2000), strict=True):
        st["chunk_size"] = size
    ids = np.arange(n) * 3 + 1
    groups = np.arange(n) // per_group  # as stored: consecutive rows share a row group
    rng = np.random.default_rng(5)
    shuffle = rng.permutation(n)  # the index's row order need not be the ids' order
    return make_plan(validate_recipe(d), ids[shuffle],
                     groups[shuffle]), dict(zip(ids.tolist(), groups.tolist(), strict=True))


def test_row_group_chunking_reads_about_a_chunk_not_the_whole_dataset():
    """With data.chunking row_groups a 1,000-sample chunk touches ~25 row groups of 40; cut by
    samples it touches nearly all 300, i.e. the whole dataset is read for every chunk."""
    for chunking, most in (("row_groups", 1000 // 40 + 2), ("samples", None)):
        p, group_of = _grouped_plan(chunking)
        touched = [len({group_of[i] for i in p.chunk_ids(0, c).tolist()}) for c in range(p.stages[0].num_chunks)]
        if most is None:
            assert min(touched) > 250
        else:
            assert max(touched) <= most, touched


def test_row_group_chunking_still_covers_the_split_once_keeps_eval_apart_and_is_seeded():
    p, _ = _grouped_plan("row_groups")
    assert len(p.eval_ids) == 400 and not set(p.eval_ids.tolist()) & set(p.train_ids.tolist())
    for sp in p.stages:
        allids = np.concatenate([sp.chunk_ids(c) for c in range(sp.num_chunks)])
        assert sorted(allids.tolist()) == sorted(p.train_ids.tolist())
    again, _ = _grouped_plan("row_groups")
    other, _ = _grouped_plan("row_groups", seed=1)
    assert all(np.array_equal(a.permutation, b.permutation) for a, b in zip(p.stages, again.stages, strict=True))
    assert not np.array_equal(p.stages[0].permutation, other.stages[0].permutation)
    # Stages differ in their group order, as they differ in their sample order by default.
    assert not np.array_equal(p.stages[0].permutation, p.stages[1].permutation)


def test_row_group_chunking_without_the_groups_is_refused():
    d = tiny_recipe("x", data={"eval_samples": 10, "chunking": "row_groups"})
    with pytest.raises(ValueError, match="row group"):
        make_plan(validate_recipe(d), np.arange(500))


def test_a_real_dataset_is_chunked_along_its_stored_row_groups(tiny_dataset):
    from common.plan import plan_for_dataset
    from storage.shards import open_dataset

    ds = open_dataset(tiny_dataset)  # 240 samples, row groups of 32
    recipe = validate_recipe(tiny_recipe(tiny_dataset, data={"eval_samples": 32, "chunking": "row_groups"}))
    plan = plan_for_dataset(recipe, ds)
    key = {int(s): (int(sh), int(g)) for s, sh, g in zip(ds.sample_ids, ds.index.column("shard").to_numpy(),
                                                            ds.index.column("row_group").to_numpy(), strict=True)}
    chunk = plan.chunk_ids(0, 0)  # 70 samples
    assert len({key[int(i)] for i in chunk}) <= 70 // 32 + 2


def test_contiguous_rank_slices_have_the_strided_sizes_and_cover_the_chunk_once():
    from common.plan import rank_slice

    ids = np.arange(1003) * 2
    for world in (1, 2, 3, 4, 7):
        strided = [rank_slice(ids, world, r) for r in range(world)]
        blocks = [rank_slice(ids, world, r, contiguous=True) for r in range(world)]
        assert [len(b) for b in blocks] == [len(s) for s in strided]
        assert np.array_equal(np.concatenate(blocks), ids)  # each id once, each rank a run of neighbours
        steps = {len(batches_for_rank(ids, 16, world, r, [0], contiguous=True)) for r in range(world)}
        assert steps == {num_steps(len(ids), 16, world)}  # DDP ranks take the same number of steps


def test_a_run_chunked_by_row_groups_trains_every_planned_sample_once(tmp_path, monkeypatch, tiny_dataset):
    """The loop fetches and trains the plan's chunks of whole row groups: each chunk once, each
    of its samples in exactly one batch (the loop checks that every planned sample arrived)."""
    from orchestrator import runner
    from tests.conftest import status_json

    monkeypatch.chdir(tmp_path)
    d = tiny_recipe(tiny_dataset, data={"eval_samples": 32, "chunking": "row_groups"})
    d["stages"] = [{"name": "spine", "forward": "spine", "trainable": ["spine"], "resolution": 16, "batch_size": 16,
                    "chunk_size": 104, "lr": 0.01}]
    runner.run(validate_recipe(d))
    st = status_json(tmp_path)
    assert st["state"] == "completed" and [c["times_trained"] for c in st["chunk_log"]] == [1, 1]
    assert sum(c["samples"] for c in st["chunk_log"]) == 240 - 32
