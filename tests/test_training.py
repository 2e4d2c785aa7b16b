"""The training loop in-process (backend: local): it learns, records to MLflow, and resumes exactly."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from common.recipe import validate_recipe
from orchestrator import runner
from storage import checkpoints
from tests.conftest import (
    copy_run,
    kill_group,
    mlflow_history,
    run_cli,
    slow_recipe,
    start_cli,
    status_json,
    tiny_recipe,
    wait_for_cursor,
    write_recipe,
)


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory, tiny_dataset: str) -> tuple[Path, dict, str]:
    """tiny_recipe trained in-process once for this module: (its folder, runner.run's result, the
    recipe's sha256). Read it in place (chdir to it), or copy_run it to change it."""
    d = tmp_path_factory.mktemp("tiny-run")
    recipe = validate_recipe(tiny_recipe(tiny_dataset))
    write_recipe(d / "r.yaml", tiny_recipe(tiny_dataset))
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(d)
        final = runner.run(recipe)
    return d, final, recipe.sha256()


def test_short_inprocess_run_lowers_the_loss_and_records_everything(tiny_run, monkeypatch):
    in_tmp, final, recipe_sha = tiny_run
    monkeypatch.chdir(in_tmp)
    st = status_json(in_tmp)
    assert st["state"] == "completed"
    assert all(c["times_trained"] == 1 for c in st["chunk_log"])
    assert [s["chunks_done"] for s in st["stages"]] == [s["chunks_total"] for s in st["stages"]] == [3, 3, 2]
    assert final["weights_sha256"] == st["final"]["weights_sha256"]

    loss = [v for _, v in mlflow_history(in_tmp, st["mlflow_run_id"], "train/loss")]
    spine = loss[:15]  # stage 1: 3 chunks x 5 steps
    assert np.mean(spine[-4:]) < 0.8 * np.mean(spine[:4]), f"stage-1 loss did not fall: {spine}"
    steps = [s for s, _ in mlflow_history(in_tmp, st["mlflow_run_id"], "train/loss")]
    assert steps == list(range(1, st["global_step"] + 1)), "one train/loss point per step, none missing"
    iou = mlflow_history(in_tmp, st["mlflow_run_id"], "eval/mask_iou")
    assert len(iou) == 8, "one eval point per chunk"
    m = st["final"]["metrics"]
    assert m["eval/depth_rmse"] < m["eval/depth_rmse_baseline"]

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri="sqlite:///mlflow.db")
    run = client.get_run(st["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.params["stages.head_tail.resolution"] == "64"
    assert run.data.tags["orchestrator.run_name"] == "tiny"
    assert run.data.tags["orchestrator.recipe_sha256"] == recipe_sha
    assert run.data.tags["orchestrator.checkpoint.latest"].startswith(str(in_tmp / "runs" / "tiny" / "ckpt-"))
    arts = {a.path for a in client.list_artifacts(run.info.run_id, "predictions")}
    assert arts == {"predictions/stage1-spine.png", "predictions/stage2-head_tail.png", "predictions/stage3-full.png"}
    assert {a.path for a in client.list_artifacts(run.info.run_id, "model")} == {"model/state_dict.pt"}


def test_a_completed_run_is_reported_not_retrained(tiny_run, in_tmp, tiny_dataset):
    first = tiny_run[1]
    copy_run(tiny_run[0], in_tmp)
    mtime = (in_tmp / "runs" / "tiny" / "final.json").stat().st_mtime_ns
    second = runner.run(validate_recipe(tiny_recipe(tiny_dataset)))
    assert second["weights_sha256"] == first["weights_sha256"]
    assert (in_tmp / "runs" / "tiny" / "final.json").stat().st_mtime_ns == mtime


def test_checkpoint_holds_model_optimizer_scheduler_rng_and_cursor(tiny_run):
    run_dir = tiny_run[0] / "runs" / "tiny"
    name = checkpoints.list_complete(str(run_dir))[-1]
    state, meta = checkpoints.read_local(str(run_dir / name))
    assert set(state) >= {"model", "optimizer", "scheduler", "rng", "cursor", "chunk_log"}
    assert state["cursor"]["done"] is True and meta["reason"] == "chunk_end"
    assert isinstance(state["rng"]["torch"], torch.Tensor)


def test_corrupt_checkpoint_is_refused_not_loaded(tiny_run, in_tmp):
    copy_run(tiny_run[0], in_tmp)
    d = in_tmp / "runs" / "tiny" / checkpoints.list_complete(str(in_tmp / "runs" / "tiny"))[-1]
    data = bytearray((d / "state.pt").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (d / "state.pt").write_bytes(bytes(data))
    with pytest.raises(checkpoints.CheckpointCorruptError, match="sha256"):
        checkpoints.read_local(str(d))


def test_resume_after_sigkill_continues_in_same_mlflow_run_with_identical_weights(tmp_path, tiny_dataset,
                                                                                  reference_final):
    """SIGKILL the real `orchestrator run` process mid-stage-2, run the same command again.

    It must resume from the last checkpoint (not the start), train no chunk twice, keep one
    MLflow run with one point per step, and end with the weights and metrics of an uninterrupted
    run (reference_final: the same recipe, trained once per session).
    """
    slow = slow_recipe(tiny_dataset)  # stage 2 long enough to be killed inside it
    path = write_recipe(tmp_path / "r.yaml", slow)
    proc = start_cli("run", path, cwd=tmp_path, log=tmp_path / "attempt1.log")
    try:
        cut = wait_for_cursor(tmp_path / "runs" / "tiny",
                              lambda c: c["stage"] == 1 and c["chunk"] >= 1 and c["batch"] > 0, proc)
    finally:
        kill_group(proc)
    mid = status_json(tmp_path)
    assert mid["state"] == "interrupted", "a run whose driver died must not show as running"
    assert mid["final"] is None

    again = run_cli("run", path, cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert "resuming" in again.stderr
    st = status_json(tmp_path)
    assert st["state"] == "completed"
    assert st["mlflow_run_id"] == mid["mlflow_run_id"]
    assert st["interruptions"] == 1
    assert all(c["times_trained"] == 1 for c in st["chunk_log"]), st["chunk_log"]
    assert st["final"]["weights_sha256"] == reference_final["weights_sha256"], \
        "deterministic resume must reproduce the uninterrupted weights"

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert len(client.search_runs([client.get_experiment_by_name("tests").experiment_id])) == 1
    record = json.loads(client.get_run(st["mlflow_run_id"]).data.tags["orchestrator.interruption.1"])
    assert record["cause"] == "driver lost"
    assert record["resumed_at_step"] >= cut["global_step"] > 0, "resumed from the start, not the last checkpoint"
    assert record["steps_lost"] <= slow["checkpoint"]["every_steps"], "lost more than one checkpoint interval"
    assert st["interruption_log"] == [record]
    steps = [s for s, _ in mlflow_history(tmp_path, st["mlflow_run_id"], "train/loss")]
    assert steps == list(range(1, st["global_step"] + 1)), "exactly one train/loss point per step"
    assert st["final"]["metrics"] == pytest.approx(reference_final["metrics"])
    assert Path(tmp_path / "runs" / "tiny" / "final.json").exists()
