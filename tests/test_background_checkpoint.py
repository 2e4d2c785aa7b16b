"""Background checkpoints (checkpoint.background, the default): training goes on while a checkpoint
uploads, at most one upload is in flight, a stop waits for its checkpoint, and a kill in the middle
of an upload resumes from the previous complete checkpoint with the uninterrupted run's weights.

The upload is held with the fault injection the kill-mid-checkpoint tests use
(storage/checkpoints.py: ORCHESTRATOR_TEST_PAUSE_CHECKPOINT, between the state file and meta.json).
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest

from tests.conftest import (
    assert_completed_exactly_once,
    kill_group,
    mlflow_history,
    run_cli,
    start_cli,
    status_json,
    tiny_recipe,
    write_recipe,
)
from workers.checkpoint_writer import CheckpointWriter, snapshot


def spine_recipe(data_uri: str) -> dict:
    """The tiny recipe's first stage alone (15 steps, 3 chunks of 5), a checkpoint every 3 steps:
    mid-chunk ones (3, 6, 9, 12) and chunk-end ones (5, 10, 15)."""
    r = tiny_recipe(data_uri, checkpoint={"every_steps": 3, "every_seconds": 3600, "keep": 3})
    r["stages"] = r["stages"][:1]
    return r


@pytest.fixture(scope="module")
def spine_reference(tmp_path_factory: pytest.TempPathFactory, tiny_dataset: str) -> str:
    """weights_sha256 of spine_recipe trained without interruption."""
    d = tmp_path_factory.mktemp("spine-reference")
    res = run_cli("run", write_recipe(d / "r.yaml", spine_recipe(tiny_dataset)), cwd=d)
    assert res.returncode == 0, res.stderr
    return status_json(d)["final"]["weights_sha256"]


def _progress(run_dir: Path) -> dict:
    try:
        return json.loads((run_dir / "progress.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def _wait_until(predicate, timeout: float, what: str, proc=None) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert proc is None or proc.poll() is None, f"the run exited before {what}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def test_writer_runs_one_job_at_a_time_and_completes_on_the_callers_thread():
    """The writer alone: a second submit waits for the first job and runs its completion first,
    completions run on the thread that polls or waits, and a job's error is raised there."""
    w = CheckpointWriter(background=True)
    release, order, threads = threading.Event(), [], []

    def held() -> str:
        release.wait(10)
        order.append("work1")
        return "uri1"

    w.submit(held, lambda r: (order.append(f"done:{r}"), threads.append(threading.current_thread())), name="one")
    assert w.in_flight == "one" and not w.poll()
    t = threading.Timer(0.3, release.set)
    t.start()
    w.submit(lambda: order.append("work2") or "uri2", lambda r: order.append(f"done:{r}"), name="two")
    assert order[:2] == ["work1", "done:uri1"], f"the second job started while the first was in flight: {order}"
    w.wait()
    assert order == ["work1", "done:uri1", "work2", "done:uri2"]
    assert threads == [threading.main_thread()]
    w.submit(lambda: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        w.wait()
    assert w.in_flight is None
    # A snapshot is a copy: the live tensors can change under it. The writer's snapshots reuse
    # buffers, but only those of a job that has landed.
    import torch

    live = {"w": torch.zeros(3), "opt": {"state": {0: {"step": torch.tensor(1.0)}}, "param_groups": [{"lr": 0.1}]}}
    snap = snapshot(live)
    live["w"].add_(1)
    live["opt"]["state"][0]["step"].add_(1)
    live["opt"]["param_groups"][0]["lr"] = 0.2
    assert snap["w"].sum() == 0 and snap["opt"]["state"][0]["step"] == 1 and snap["opt"]["param_groups"][0]["lr"] == 0.1
    first = w.snapshot(live)
    w.submit(lambda: None)
    live["w"].add_(1)
    second = w.snapshot(live)  # waits for the first job, then reuses its buffers
    assert second["w"].data_ptr() == first["w"].data_ptr() and second["w"].tolist() == [2.0, 2.0, 2.0]
    w.submit(lambda: None)
    third = w.snapshot(live)
    assert third["w"].tolist() == [2.0, 2.0, 2.0]
    w.wait()


def test_training_goes_on_while_a_checkpoint_uploads_and_only_one_is_in_flight(tmp_path, tiny_dataset, spine_reference,
                                                                               monkeypatch):
    """Hold ckpt-9's upload (wrapping the public `checkpoints.commit`) before its marker: training goes
    past step 9, reaches the next checkpoint (10, a chunk end) and waits there for ckpt-9 rather than
    start a second upload.
    ckpt-9 holds the state of step 9 bit for bit (its snapshot), not that of the step trained
    while it uploaded, and the run ends with the uninterrupted weights, one MLflow point per step."""
    from common.recipe import validate_recipe
    from orchestrator import runner
    from storage import checkpoints
    from workers.train.trainer import Trainer

    monkeypatch.chdir(tmp_path)
    run_dir = tmp_path / "runs" / "tiny"
    held, seen, at_save, loaded = "ckpt-000000009", {}, {}, {}
    in_flight, most = [0], [0]
    commit = checkpoints.commit

    def counting_commit(local_dir, run_dir_, name, *a, **kw):
        in_flight[0] += 1
        most[0] = max(most[0], in_flight[0])
        try:
            hold(name)
            return commit(local_dir, run_dir_, name, *a, **kw)
        finally:
            in_flight[0] -= 1

    def hold(name: str) -> None:  # on the writer's thread, before the upload's first write
        if name != held:
            return
        _wait_until(lambda: _progress(run_dir).get("global_step", 0) >= 10 and _progress(run_dir).get("phase")
                    == "checkpoint",
                    60, "training to reach the next checkpoint")
        time.sleep(0.5)  # ...and stay there: the next checkpoint waits for this one
        seen.update(step=_progress(run_dir)["global_step"], marker=(run_dir / held / "meta.json").exists(),
                    second=(run_dir / "ckpt-000000010").exists())

    real_checkpoint = Trainer.checkpoint

    def recording_checkpoint(self, reason):
        step = self.state.cursor.global_step
        if step == 9:
            at_save["model"] = checkpoints.weights_sha256(self.state.model.state_dict())
            at_save["exp_avg"] = [v["exp_avg"].clone() for v in self.state.optimizer.state_dict()["state"].values()]
        real_checkpoint(self, reason)
        if step == 10:  # ckpt-9 has landed: this one waited for it
            sd, meta = checkpoints.read_local(str(run_dir / held))
            loaded.update(model=checkpoints.weights_sha256(sd["model"]), step=meta["cursor"]["global_step"],
                          exp_avg=[v["exp_avg"] for v in sd["optimizer"]["state"].values()])

    monkeypatch.setattr(checkpoints, "commit", counting_commit)
    monkeypatch.setattr(Trainer, "checkpoint", recording_checkpoint)
    runner.run(validate_recipe(spine_recipe(tiny_dataset)))

    assert seen == {"step": 10, "marker": False, "second": False}, seen
    assert most[0] == 1, "two uploads were in flight at once"
    assert loaded["step"] == 9 and loaded["model"] == at_save["model"]
    assert len(loaded["exp_avg"]) == len(at_save["exp_avg"]) > 0
    assert all(bool((a == b).all()) for a, b in zip(loaded["exp_avg"], at_save["exp_avg"], strict=True))
    assert_completed_exactly_once(tmp_path, spine_reference, interruptions=0)


@pytest.mark.parametrize(("notice", "error"), [("interrupt", "on your interrupt"), ("sigterm", "preemption notice")])
def test_a_stop_waits_for_its_checkpoint_to_land(tmp_path, tiny_dataset, monkeypatch, notice, error):
    """A stop's checkpoint is uploaded in the background like any other, but the run does not end
    before it has landed: its marker, cursor.json and its metrics in MLflow are all there."""
    from common.errors import OrchestratorError
    from common.recipe import validate_recipe
    from orchestrator import runner
    from workers.preemption import PreemptionMonitor

    monkeypatch.chdir(tmp_path)
    run_dir = tmp_path / "runs" / "tiny"
    monkeypatch.setenv("ORCHESTRATOR_TEST_PAUSE_CHECKPOINT", "ckpt-000000007")
    monkeypatch.setenv("ORCHESTRATOR_TEST_PAUSE_S", "1.5")
    monkeypatch.setattr(PreemptionMonitor, "notice", lambda self, step, fatal=False: notice if step == 7 else None)
    with pytest.raises(OrchestratorError, match=error):
        runner.run(validate_recipe(spine_recipe(tiny_dataset)))
    # Had the run ended before the held upload landed, its marker would still be missing here.
    assert (run_dir / "ckpt-000000007" / "meta.json").exists()
    assert json.loads((run_dir / "cursor.json").read_text())["cursor"]["global_step"] == 7
    st = status_json(tmp_path)
    assert [s for s, _ in mlflow_history(tmp_path, st["mlflow_run_id"], "train/loss")] == list(range(1, 8))


def test_sigkill_mid_background_upload_resumes_from_the_previous_checkpoint(tmp_path, tiny_dataset, spine_reference,
                                                                            monkeypatch):
    """A real `orchestrator run`, SIGKILLed while ckpt-9 uploads in the background: training went
    on past step 9 and waits at step 10 for ckpt-9 (one upload in flight). The same command
    resumes from ckpt-6, the last complete one (mid-chunk), and ends with the uninterrupted run's
    weights and one MLflow point per step."""
    path = write_recipe(tmp_path / "r.yaml", spine_recipe(tiny_dataset))
    run_dir = tmp_path / "runs" / "tiny"
    partial = run_dir / "ckpt-000000009"
    monkeypatch.setenv("ORCHESTRATOR_TEST_PAUSE_CHECKPOINT", partial.name)
    monkeypatch.setenv("ORCHESTRATOR_TEST_PAUSE_S", "120")
    proc = start_cli("run", path, cwd=tmp_path, log=tmp_path / "run.log")
    monkeypatch.delenv("ORCHESTRATOR_TEST_PAUSE_CHECKPOINT")
    try:
        _wait_until(lambda: (partial / "state.pt").exists(), 120, "the held checkpoint", proc)
        _wait_until(lambda: _progress(run_dir).get("global_step", 0) >= 10, 60, "training to go on past step 9", proc)
        time.sleep(1.0)
        p = _progress(run_dir)
        assert (p["global_step"], p["phase"]) == (10, "checkpoint"), p  # waits there: one upload at a time
        assert not (partial / "meta.json").exists() and not (run_dir / "ckpt-000000010").exists()
    finally:
        kill_group(proc)
    again = run_cli("run", path, cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    st = assert_completed_exactly_once(tmp_path, spine_reference)
    (rec,) = st["interruption_log"]
    assert rec["resumed_at_step"] == 6 and rec["steps_lost"] == 4
