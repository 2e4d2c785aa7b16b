"""The plan: chunks are disjoint, cover the training split, keep eval apart, and are seeded."""

from __future__ import annotations

import numpy as np
import pytest

from common.errors import RecipeError
from common.plan import Plan, batches_for_rank, make_plan, num_steps
from common.recipe import validate_recipe
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
    p.save(str(tmp_path))
    q = Plan.load(str(tmp_path))
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
