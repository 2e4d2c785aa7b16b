"""A notebook's VM is lost, or its user presses the interrupt button: the run and its MLflow
history go on from run storage.

Local mode keeps MLflow's sqlite file on the machine's own disk and a copy of the run's records
in run storage at every checkpoint (workers/tracking_store.py); a fresh machine restores it.
Ctrl-C (SIGINT) saves a checkpoint and stops; the same command resumes (orchestrator/interrupt.py).
"""

from __future__ import annotations

import json
import os
import re
import signal
from pathlib import Path

import pytest

from tests.conftest import (
    assert_completed_exactly_once,
    kill_group,
    run_cli,
    slow_recipe,
    start_cli,
    wait_for_cursor,
    wait_for_json,
    write_recipe,
)


def _mid_stage_two(c: dict) -> bool:
    return c["stage"] == 1 and c["chunk"] >= 1 and c["batch"] > 0


def _client(cwd: Path):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=f"sqlite:///{cwd / 'mlflow.db'}")


def test_a_lost_vm_resumes_in_the_same_mlflow_run_with_its_whole_history(tmp_path, tiny_dataset, reference_sha):
    """SIGKILL mid-run, then the local MLflow store is deleted (a fresh VM; run storage kept):
    before this, the re-run stopped with `MlflowException: Run with id=... not found`."""
    path = write_recipe(tmp_path / "r.yaml", slow_recipe(tiny_dataset))
    proc = start_cli("run", path, cwd=tmp_path, log=tmp_path / "run.log")
    run_dir = tmp_path / "runs" / "tiny"
    wait_for_cursor(run_dir, _mid_stage_two, proc)
    kill_group(proc)
    run_id = json.loads((run_dir / "run.json").read_text())["mlflow_run_id"]
    assert (run_dir / "mlflow-store.db.gz").exists() and (run_dir / "mlflow-store.json").exists()
    (tmp_path / "mlflow.db").unlink()

    res = run_cli("run", path, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"MLflow: restored run {run_id}" in res.stderr, res.stderr[-3000:]
    st = assert_completed_exactly_once(tmp_path, reference_sha)
    assert st["mlflow_run_id"] == run_id
    assert st["interruption_log"][0]["cause"] == "driver lost"

    client = _client(tmp_path)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    chunk_ends = sorted(m.step for m in client.get_metric_history(run_id, "eval/mask_iou"))
    assert len(chunk_ends) == len(st["chunk_log"]) == len(set(chunk_ends)), "one eval point per chunk"
    for key in run.data.metrics:
        steps = [m.step for m in client.get_metric_history(run_id, key)]
        assert len(steps) == len(set(steps)), f"{key}: a step logged twice"
        if key.startswith("train/"):
            assert sorted(steps) == list(range(1, st["global_step"] + 1)), key
        else:
            assert sorted(steps) == chunk_ends, key
    # Artifacts were written under run storage from the start, so they outlived the VM too.
    assert run.info.artifact_uri == f"file://{tmp_path / 'runs' / 'mlartifacts' / 'tests' / run_id / 'artifacts'}"
    top = {a.path for a in client.list_artifacts(run_id)}
    assert {"model", "predictions", "final.json"} <= top
    assert len(client.list_artifacts(run_id, "predictions")) == 3  # one grid per stage


def test_a_store_without_the_run_or_an_older_one_gets_the_runs_records(tmp_path, monkeypatch):
    """The merge path: the local store exists (another run started on the new VM first, or it is a
    stale file from an earlier session); the run's rows come from the copy, the others stay."""
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    from workers import tracking_store

    run_dir = str(tmp_path / "runs" / "r")
    first = f"sqlite:///{tmp_path / 'first.db'}"
    c1 = MlflowClient(tracking_uri=first)
    exp = c1.create_experiment("tests")
    run_id = c1.create_run(exp).info.run_id
    c1.log_batch(run_id, metrics=[Metric("train/loss", 1.0 / s, 0, s) for s in range(1, 6)])
    c1.set_tag(run_id, "orchestrator.checkpoint.latest", "ckpt-5")
    tracking_store.save_copy(first, run_id, run_dir)
    old = tmp_path / "old.db"
    old.write_bytes((tmp_path / "first.db").read_bytes())  # a store left at step 5
    c1.log_batch(run_id, metrics=[Metric("train/loss", 1.0 / s, 0, s) for s in range(6, 11)])
    info = tracking_store.save_copy(first, run_id, run_dir)
    assert info["metrics"] == 10 and info["runs"] == 1

    # A new VM's store where another experiment took the run's experiment id.
    other = f"sqlite:///{tmp_path / 'other.db'}"
    c2 = MlflowClient(tracking_uri=other)
    taken = c2.create_experiment("someone-else")
    assert taken == exp
    keep = c2.create_run(taken).info.run_id
    c2.log_metric(keep, "x", 1.0, step=1)
    done = tracking_store.restore(other, run_id, run_dir)
    assert done is not None and done.how == "merged" and done.metric_points == 10
    assert done.experiment_id != exp
    c2 = MlflowClient(tracking_uri=other)
    assert [m.step for m in c2.get_metric_history(run_id, "train/loss")] == list(range(1, 11))
    assert c2.get_run(run_id).info.experiment_id == done.experiment_id
    assert c2.get_experiment(done.experiment_id).name == "tests"
    assert c2.get_run(run_id).data.tags["orchestrator.checkpoint.latest"] == "ckpt-5"
    assert [m.step for m in c2.get_metric_history(keep, "x")] == [1]
    assert tracking_store.restore(other, run_id, run_dir) is None  # now as new as the copy

    # An older store of the same lineage: the run's rows are brought up to the copy's.
    done = tracking_store.restore(f"sqlite:///{old}", run_id, run_dir)
    assert done is not None and done.how == "merged" and done.experiment_id == exp
    c3 = MlflowClient(tracking_uri=f"sqlite:///{old}")
    assert [m.step for m in c3.get_metric_history(run_id, "train/loss")] == list(range(1, 11))

    # No local store at all: the copy becomes it.
    fresh = tmp_path / "fresh" / "mlflow.db"
    done = tracking_store.restore(f"sqlite:///{fresh}", run_id, run_dir)
    assert done is not None and done.how == "copied" and done.experiment_id == exp
    assert len(MlflowClient(tracking_uri=f"sqlite:///{fresh}").get_metric_history(run_id, "train/loss")) == 10

    # A tracking server keeps its own history: nothing to copy or restore.
    assert tracking_store.save_copy("http://127.0.0.1:5000", run_id, run_dir) is None
    assert tracking_store.restore("http://127.0.0.1:5000", run_id, run_dir) is None


def _interrupt(tmp_path: Path, path: str) -> tuple[int, str]:
    """Start `orchestrator run`, send SIGINT (what Colab's stop button sends first) to that process
    alone, mid-chunk in stage 2; the exit code and the output."""
    # Each step takes 0.1 s longer: the tiny model trains a chunk's 18 steps in under a second,
    # about the time a stop request takes to reach a Ray worker (polled every 0.5 s), and a stop
    # that lands on a chunk's last step has the chunk-end checkpoint stand in for its own.
    proc = start_cli("run", path, cwd=tmp_path, log=tmp_path / "run.log",
                     env={"ORCHESTRATOR_TEST_STEP_DELAY_S": "0.1"})
    try:
        # progress.json names stage 2 as its first chunk starts (preload), before any of its 18 steps;
        # cursor.json only after the stage-1 checkpoint has committed.
        wait_for_json(tmp_path / "runs" / "tiny" / "progress.json", lambda p: p.get("stage_index") == 1, proc,
                      timeout=400)
        proc.send_signal(signal.SIGINT)
        rc = proc.wait(timeout=180)
    finally:
        if proc.poll() is None:
            kill_group(proc)
    return rc, (tmp_path / "run.log").read_text()


def _stopped_at(log: str, path: str) -> int:
    (line,) = [ln for ln in log.splitlines() if ln.startswith("interrupted:")]
    assert line.endswith(f"orchestrator run {path}"), line  # the command that resumes it
    m = re.search(r"stopped at step (\d+) on your interrupt, checkpoint saved", line)
    assert m, line
    return int(m.group(1))


def test_ctrl_c_saves_a_checkpoint_names_the_step_and_the_same_command_resumes(tmp_path, tiny_dataset, reference_sha):
    recipe = slow_recipe(tiny_dataset)
    recipe["checkpoint"]["every_steps"] = 1000  # only chunk ends: the stop's checkpoint is its own
    path = write_recipe(tmp_path / "r.yaml", recipe)
    rc, log = _interrupt(tmp_path, path)
    assert rc == 130, log[-3000:]
    step = _stopped_at(log, path)
    cursor = json.loads((tmp_path / "runs" / "tiny" / "cursor.json").read_text())["cursor"]
    assert cursor["global_step"] == step and cursor["batch"] > 0, cursor  # mid-chunk
    assert json.loads((tmp_path / "runs" / "tiny" / "run.json").read_text())["state"] == "interrupted"

    res = run_cli("run", path, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    st = assert_completed_exactly_once(tmp_path, reference_sha)
    (rec,) = st["interruption_log"]
    assert (rec["cause"], rec["resumed_at_step"], rec["steps_lost"]) == ("interrupted by the user", step, 0)


@pytest.mark.ray
def test_ctrl_c_on_ray_stops_the_workers_after_their_checkpoint_instead_of_aborting(tmp_path, tiny_dataset,
                                                                                    reference_sha):
    """On Ray the workers are other processes: the driver's first SIGINT reaches them as a stop
    request in run storage (Ray Train's own handler, which aborts at once, is the second press)."""
    recipe = slow_recipe(tiny_dataset, backend="ray")
    recipe["checkpoint"]["every_steps"] = 1000
    path = write_recipe(tmp_path / "r.yaml", recipe)
    rc, log = _interrupt(tmp_path, path)
    assert rc == 130, log[-3000:]
    step = _stopped_at(log, path)
    cursor = json.loads((tmp_path / "runs" / "tiny" / "cursor.json").read_text())["cursor"]
    assert cursor["global_step"] == step and cursor["batch"] > 0, cursor
    # execution.* may change between attempts: resume in-process, which is quicker here.
    res = run_cli("run", path, "--set", "execution.backend=local", cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    st = assert_completed_exactly_once(tmp_path, reference_sha)
    (rec,) = st["interruption_log"]
    assert (rec["cause"], rec["resumed_at_step"], rec["steps_lost"]) == ("interrupted by the user", step, 0)
    assert not os.path.exists(tmp_path / "runs" / "tiny" / "stop.json")  # a later attempt removes it
