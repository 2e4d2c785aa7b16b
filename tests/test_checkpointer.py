"""The checkpointer's decisions in isolation, on real files in a temporary run directory: when to
save, the finite-loss gate, fallback past an unusable checkpoint, retention, names ordered by step
number, and the count of restarts without progress."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from common.recipe import validate_recipe
from storage import checkpoints
from tests.conftest import tiny_recipe
from workers.checkpoint_policy import CheckpointPolicy
from workers.preemption import FATAL, INTERRUPT
from workers.session import LocalSession
from workers.state import TrainState
from workers.train.checkpointer import Checkpointer
from workers.train.divergence import LossWatch
from workers.train.errors import DivergedError, NoProgressError
from workers.train.sink import NullSink
from workers.train.stops import Stop


def _checkpointer(run_dir: Path, keep: int = 3, every_steps: int = 5, **execution) -> Checkpointer:
    recipe = validate_recipe(tiny_recipe("unused", checkpoint={"every_steps": every_steps, "keep": keep},
                                         execution={"backend": "local", **execution}))
    torch.manual_seed(0)
    state = TrainState(model=torch.nn.Linear(3, 2))
    losses = LossWatch(recipe, state, ["train/loss"])
    return Checkpointer(recipe, {"run_dir": str(run_dir)}, LocalSession(str(run_dir), keep), state, losses, NullSink())


def _save_at(ck: Checkpointer, step: int, reason: str = "steps") -> None:
    ck.state.cursor.global_step = step
    ck.save(reason)
    ck.wait()  # the background upload has landed


def _loss(ck: Checkpointer, step: int, value: float) -> None:
    ck.losses.add(step, [torch.tensor(value)])
    ck.losses.drain()


def test_should_save_every_n_steps_every_t_seconds_at_a_stop_and_a_chunk_end(tmp_path: Path) -> None:
    ck = _checkpointer(tmp_path)
    now = [100.0]
    ck.policy = CheckpointPolicy(5, 60.0, clock=lambda: now[0])
    assert [s for s in range(1, 16) if ck.should_save(s)] == [5, 10, 15]
    assert ck.should_save(5) == "steps"
    now[0] += 60.0
    assert ck.should_save(7) == "time"
    ck.policy.saved()  # the interval counts from the end of the last save
    assert ck.should_save(8) is None
    assert ck.should_save(3, chunk_end=True) == "chunk_end"
    assert ck.should_save(3, Stop("sigterm")) == "preemption"
    assert ck.should_save(3, Stop(INTERRUPT), chunk_end=True) == "interrupt"
    assert ck.should_save(3, Stop(FATAL, ValueError("x"))) == "error"


def test_a_save_resets_the_time_interval(tmp_path: Path) -> None:
    ck = _checkpointer(tmp_path, every_steps=1000)
    now = [0.0]
    ck.policy = CheckpointPolicy(1000, 10.0, clock=lambda: now[0])
    now[0] = 10.0
    assert ck.should_save(1) == "time"
    _save_at(ck, 1)
    assert ck.should_save(2) is None
    now[0] = 20.0
    assert ck.should_save(3) == "time"


def test_restore_falls_back_past_a_torn_checkpoint_and_never_reuses_its_name(tmp_path: Path) -> None:
    ck = _checkpointer(tmp_path)
    _save_at(ck, 3)
    saved = {k: v.clone() for k, v in ck.state.model.state_dict().items()}
    with torch.no_grad():
        ck.state.model.weight.add_(1.0)
    _save_at(ck, 7)
    state = tmp_path / "ckpt-000000007" / checkpoints.STATE_FILE
    state.write_bytes(state.read_bytes()[:100])  # torn: no longer matches meta.json's sha256

    again = _checkpointer(tmp_path)
    assert again.scan()
    sd, meta = again.load()
    assert meta["name"] == "ckpt-000000003" and sd["cursor"]["global_step"] == 3
    assert all(torch.equal(sd["model"][k], v) for k, v in saved.items())
    # Set aside (the local backend's chief): its marker is gone, so no later resume tries it again.
    assert not (tmp_path / "ckpt-000000007" / checkpoints.META_FILE).exists()
    _save_at(again, 7)
    assert (tmp_path / "ckpt-000000007-r1" / checkpoints.META_FILE).exists()
    assert checkpoints.list_complete(str(tmp_path)) == ["ckpt-000000003", "ckpt-000000007-r1"]


def test_no_usable_checkpoint_at_all_is_an_error_and_none_is_a_fresh_start(tmp_path: Path) -> None:
    assert not _checkpointer(tmp_path).scan()
    assert _checkpointer(tmp_path).load() is None
    ck = _checkpointer(tmp_path)
    _save_at(ck, 2)
    (tmp_path / "ckpt-000000002" / checkpoints.META_FILE).write_text("{")  # torn marker
    with pytest.raises(checkpoints.CheckpointCorruptError, match="none of its checkpoints"):
        _checkpointer(tmp_path).load()


def test_retention_keeps_the_newest_checkpoint_of_finite_losses(tmp_path: Path) -> None:
    ck = _checkpointer(tmp_path, keep=2)
    _save_at(ck, 1)
    for step in (2, 3, 4):
        _loss(ck, step, math.nan)  # a non-finite loss, then finite ones: the streak ends, the flag stays
        _loss(ck, step, 1.0)
        _save_at(ck, step)
    run_dir = str(tmp_path)
    metas = {n: checkpoints.read_meta(run_dir, n)["losses_finite"] for n in checkpoints.list_complete(run_dir)}
    # The newest two, and past them the newest of finite losses (a diverged run resumes from it).
    assert metas == {"ckpt-000000001": True, "ckpt-000000003": False, "ckpt-000000004": False}


def test_no_checkpoint_is_saved_after_a_non_finite_loss(tmp_path: Path) -> None:
    ck = _checkpointer(tmp_path)
    _save_at(ck, 1)
    _loss(ck, 2, math.inf)
    with pytest.raises(DivergedError, match="not finite since step 2"):
        _save_at(ck, 2)
    assert checkpoints.list_folders(str(tmp_path)) == ["ckpt-000000001"]


def test_folders_are_ordered_by_step_number_not_by_name(tmp_path: Path) -> None:
    """ckpt-10 is newer than ckpt-9 although it sorts before it as text."""
    model = torch.nn.Linear(3, 2)
    for step in (9, 10, 100):
        sd = TrainState(model=model).state_dict()
        sd["cursor"]["global_step"] = step
        checkpoints.write_local(str(tmp_path / f"ckpt-{step}"), sd, {"name": f"ckpt-{step}"})
    (tmp_path / "ckpt-100" / checkpoints.META_FILE).unlink()  # half-written: listed, never loaded
    assert checkpoints.list_folders(str(tmp_path)) == ["ckpt-9", "ckpt-10", "ckpt-100"]
    ck = _checkpointer(tmp_path)
    assert ck.scan()
    sd, meta = ck.load()
    assert meta["name"] == "ckpt-10" and sd["cursor"]["global_step"] == 10


def test_restarts_from_the_same_step_end_in_no_progress(tmp_path: Path) -> None:
    ck = _checkpointer(tmp_path, max_restarts_without_progress=2)
    ck.count_start(5)
    ck.count_start(5)  # one restart
    ck.count_start(8)  # progress: the count starts again
    ck.count_start(8)
    with pytest.raises(NoProgressError, match="restarted 2 times in a row from step 8"):
        ck.count_start(8)


def test_the_null_sink_has_every_public_method_of_the_mlflow_sink() -> None:
    """The trainer and the checkpointer call the sink without asking which one it is."""
    import inspect

    from workers.mlflow_sink import MlflowSink

    def public(cls: type) -> dict[str, list[str]]:
        return {n: list(inspect.signature(f).parameters) for n, f in inspect.getmembers(cls, inspect.isfunction)
                if not n.startswith("_")}

    assert public(NullSink) == public(MlflowSink)
    assert NullSink().undelivered() == []
