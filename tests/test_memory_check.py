"""A chunk too big for a worker's memory is refused at plan time, naming the field (exit 2); a
streamed one (window shuffle) is held to its spool's disk instead, not to memory."""

from __future__ import annotations

import json
import re

import pytest

from common.errors import RecipeError
from common.plan import plan_for_dataset
from common.recipe import validate_recipe
from orchestrator import memory_check
from storage.shards import open_dataset
from tests.conftest import run_cli, tiny_recipe, write_recipe


def test_a_chunk_that_cannot_fit_is_refused_by_the_cli_naming_its_chunk_size(tmp_path, tiny_dataset, monkeypatch):
    ds = open_dataset(tiny_dataset)
    per_sample = memory_check.stored_bytes_per_sample(ds)
    assert per_sample > 0
    # Room for stage spine's chunks (70 samples) but not for stage full's (104).
    monkeypatch.setenv(memory_check.ENV, str(int(per_sample * 90 * 2 * memory_check.DECODE_MARGIN)))
    # Chunks read whole: a plan that shuffles them whole.
    path = write_recipe(tmp_path / "r.yaml", tiny_recipe(tiny_dataset, data={"shuffle": "chunk"}))
    res = run_cli("run", path, cwd=tmp_path)
    assert res.returncode == 2, res.stderr[-3000:]
    assert "stages.full.chunk_size=104: " in res.stderr, res.stderr[-3000:]
    assert int(re.search(r"use a chunk_size of at most (\d+)", res.stderr)[1]) in (89, 90), res.stderr
    assert "Traceback" not in res.stderr
    assert not (tmp_path / "runs" / "tiny" / "run.json").exists()


def test_chunks_that_fit_pass_and_an_unknown_budget_skips(tiny_dataset, monkeypatch):
    recipe = validate_recipe(tiny_recipe(tiny_dataset, data={"shuffle": "chunk"}))
    ds = open_dataset(tiny_dataset)
    plan = plan_for_dataset(recipe, ds)
    monkeypatch.setenv(memory_check.ENV, str(10**12))
    memory_check.check_chunks_fit(recipe, plan, ds)
    monkeypatch.setenv(memory_check.ENV, "1000")
    with pytest.raises(RecipeError, match=r"^stages\.spine\.chunk_size=70: "):
        memory_check.check_chunks_fit(recipe, plan, ds)
    monkeypatch.delenv(memory_check.ENV)
    ray = validate_recipe(tiny_recipe(tiny_dataset, execution={"backend": "ray", "num_workers": 2}))
    assert memory_check.available_bytes(ray) is None  # a cluster: skipped
    assert memory_check.available_bytes(recipe) > 0  # this machine's available memory
    assert json.loads(json.dumps(plan.summary())) == plan.summary()  # the plan's record is plain JSON


def test_a_streamed_chunk_is_held_to_its_spool_disk_not_to_memory(tiny_dataset, tmp_path, monkeypatch):
    from workers import spool

    recipe = validate_recipe(tiny_recipe(tiny_dataset))  # data.shuffle: window, the default: streamed
    ds = open_dataset(tiny_dataset)
    plan = plan_for_dataset(recipe, ds)
    assert plan.shuffle == "window"
    per_sample = memory_check.stored_bytes_per_sample(ds)
    both = per_sample * 104 * 2  # stage full's chunk and the next one
    monkeypatch.setenv(spool.SPOOL_DIR_ENV, str(tmp_path / "spool"))
    monkeypatch.setenv(spool.CHUNK_MEMORY_ENV, str(int(both / 4)))  # a quarter in memory, the rest spooled
    monkeypatch.setenv(memory_check.ENV, str(int(both)))  # memory that would refuse a chunk read whole
    memory_check.check_chunks_fit(recipe, plan, ds)  # streamed: it fits, through the spool
    # A spool disk without room for what is beyond the budget: refused, naming the field and the spool.
    monkeypatch.setattr(memory_check, "spool_free_bytes", lambda root: int(both / 2))
    with pytest.raises(RecipeError, match=r"^stages\.full\.chunk_size=104: a worker would spool") as err:
        memory_check.check_chunks_fit(recipe, plan, ds)
    assert str(tmp_path / "spool") in str(err.value) and spool.SPOOL_DIR_ENV in str(err.value)
    fits = int(re.search(r"chunk_size of at most (\d+)", str(err.value))[1])
    assert 70 <= fits < 104  # stage spine's 70 fit: (half + a quarter of both) / 2 chunks
    # A budget set above the worker's memory is named as such.
    monkeypatch.setenv(spool.CHUNK_MEMORY_ENV, str(int(both * 2)))
    with pytest.raises(RecipeError, match=spool.CHUNK_MEMORY_ENV):
        memory_check.check_chunks_fit(recipe, plan, ds)
