"""Preemption-proof runs: real kills on a real two-node Ray cluster on loopback, and in-process.

Every test ends with the same invariants (assert_completed_exactly_once): the run completes,
each chunk is trained and committed once, the weights equal an uninterrupted run's, and MLflow
holds one run with one point per step.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import (
    assert_completed_exactly_once,
    kill_group,
    run_cli,
    slow_recipe,
    start_cli,
    status_json,
    tiny_recipe,
    wait_for_cursor,
    write_recipe,
)
from tests.loopback_cluster import LoopbackCluster, ray_cli
from workers.preemption import FATAL


@pytest.fixture(scope="module")
def cluster():
    """A head with no CPUs and one worker node: training lands on the worker node."""
    c = LoopbackCluster()
    c.add_node()
    try:
        yield c
    finally:
        c.stop()


def _ray_run(tmp_path: Path, data: str, address: str, **checkpoint) -> tuple[str, subprocess.Popen]:
    recipe = slow_recipe(data, backend="ray")
    recipe["checkpoint"].update(checkpoint)
    path = write_recipe(tmp_path / "r.yaml", recipe)
    return path, start_cli("run", path, "--address", address, cwd=tmp_path, log=tmp_path / "run.log")


def _finish(proc: subprocess.Popen, tmp_path: Path, timeout: float = 400) -> None:
    try:
        rc = proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:
            kill_group(proc)
    assert rc == 0, (tmp_path / "run.log").read_text()[-3000:]


def _interruption(st: dict) -> dict:
    (record,) = st["interruption_log"]
    return record


def _in_stage_two(c: dict) -> bool:
    return c["stage"] == 1 and c["chunk"] >= 1 and c["batch"] > 0


@pytest.mark.ray
def test_worker_sigkill_mid_chunk_resumes_from_last_checkpoint(tmp_path, tiny_dataset, reference_sha, cluster):
    """A lost worker process: Ray Train restarts the group; at most one checkpoint interval is lost."""
    _, proc = _ray_run(tmp_path, tiny_dataset, cluster.address)
    wait_for_cursor(tmp_path / "runs" / "tiny", _in_stage_two, proc)
    os.kill(cluster.train_worker_pid(), signal.SIGKILL)
    _finish(proc, tmp_path)
    st = assert_completed_exactly_once(tmp_path, reference_sha)
    rec = _interruption(st)
    assert rec["cause"] == "worker lost"
    assert rec["steps_lost"] <= 5 and rec["resumed_at_step"] > 0


@pytest.mark.ray
def test_sigterm_to_worker_checkpoints_just_in_time_and_loses_no_step(tmp_path, tiny_dataset, reference_sha, cluster):
    """GCE's preemption notice is a SIGTERM: the worker saves a checkpoint at once, so nothing is lost."""
    _, proc = _ray_run(tmp_path, tiny_dataset, cluster.address, every_steps=1000)
    wait_for_cursor(tmp_path / "runs" / "tiny", lambda c: c["stage"] == 1 and c["chunk"] >= 1, proc)
    os.kill(cluster.train_worker_pid(), signal.SIGTERM)
    _finish(proc, tmp_path)
    st = assert_completed_exactly_once(tmp_path, reference_sha)
    rec = _interruption(st)
    assert rec["cause"] == "preemption notice"
    assert rec["steps_lost"] == 0


@pytest.mark.ray
def test_drain_node_for_preemption_moves_training_without_losing_steps(tmp_path, tiny_dataset, reference_sha, cluster):
    """`ray drain-node --reason DRAIN_NODE_REASON_PREEMPTION` is what the autoscaler does on GCP spot."""
    cluster.add_node()  # somewhere for the replacement worker to go (before the run: starting a node takes a while)
    _, proc = _ray_run(tmp_path, tiny_dataset, cluster.address, every_steps=1000)
    # At stage 2's start: the notice must land while steps remain (Ray polls for it every second).
    wait_for_cursor(tmp_path / "runs" / "tiny", lambda c: c["stage"] == 1, proc)
    node = json.loads((tmp_path / "runs" / "tiny" / "progress.json").read_text())["node_id"]
    ray_cli("drain-node", f"--address={cluster.address}", f"--node-id={node}", "--reason=DRAIN_NODE_REASON_PREEMPTION",
         "--reason-message=spot reclaim (test)", "--deadline-remaining-seconds=120")
    _finish(proc, tmp_path)
    st = assert_completed_exactly_once(tmp_path, reference_sha)
    rec = _interruption(st)
    assert rec["cause"] == "preemption notice" and rec["steps_lost"] == 0
    final_node = json.loads((tmp_path / "runs" / "tiny" / "progress.json").read_text())["node_id"]
    assert final_node != node, "training stayed on the drained node"


def test_sigterm_in_process_checkpoints_then_resumes_with_no_step_lost(tmp_path, tiny_dataset, reference_sha):
    """Without Ray (a notebook's own GPU), SIGTERM to `orchestrator run` still saves before it stops."""
    recipe = slow_recipe(tiny_dataset)
    recipe["checkpoint"]["every_steps"] = 1000
    path = write_recipe(tmp_path / "r.yaml", recipe)
    proc = start_cli("run", path, cwd=tmp_path, log=tmp_path / "run.log")
    wait_for_cursor(tmp_path / "runs" / "tiny", lambda c: c["stage"] == 1, proc)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 1
    assert "preemption notice (sigterm)" in (tmp_path / "run.log").read_text()
    assert run_cli("run", path, cwd=tmp_path).returncode == 0
    st = assert_completed_exactly_once(tmp_path, reference_sha)
    assert _interruption(st)["steps_lost"] == 0 and _interruption(st)["cause"] == "preemption notice"


@pytest.mark.parametrize(("notice", "cause", "error"), [
    ("sigterm", "preemption notice", "preemption notice [(]sigterm[)] at step 10"),
    (FATAL, "stopped on an error", "x.parquet failed its checksum twice"),
])
def test_a_stop_on_a_chunks_last_step_is_recorded_with_its_cause(tmp_path, tiny_dataset, reference_sha, monkeypatch,
                                                                 notice, cause, error):
    """A notice, or a next-chunk fetch that failed for good, can come on the very step that ends a
    chunk: the chunk-end checkpoint is then the stop's, and the resume must name the stop's cause
    (CI once saw "worker lost" after a drain here)."""
    from common.errors import OrchestratorError
    from common.recipe import validate_recipe
    from orchestrator import runner
    from workers.data import ChunkPrefetcher, DataError
    from workers.preemption import PreemptionMonitor

    monkeypatch.chdir(tmp_path)
    recipe = validate_recipe(slow_recipe(tiny_dataset))
    # Stage 1 trains 5 steps per chunk: step 10 ends its second chunk.
    monkeypatch.setattr(PreemptionMonitor, "notice", lambda self, step, fatal=False: notice if step == 10 else None)
    if notice == FATAL:
        # The next chunk's background fetch failed for good; the notice above says so at step 10.
        monkeypatch.setattr(ChunkPrefetcher, "failure",
                            lambda self: DataError("shard x.parquet failed its checksum twice (test)"))
    with pytest.raises(OrchestratorError, match=error):
        runner.run(recipe)
    monkeypatch.undo()
    monkeypatch.chdir(tmp_path)
    runner.run(recipe)
    st = assert_completed_exactly_once(tmp_path, reference_sha)
    rec = _interruption(st)
    assert (rec["cause"], rec["resumed_at_step"], rec["steps_lost"]) == (cause, 10, 0)


def _kill_during_checkpoint_write(tmp_path: Path, recipe: dict, reference_sha: str, settle_s: float, reach_s: float,
                                  lose_newest: bool = False) -> None:
    """Hold one checkpoint's write after its state file and before its completion marker, SIGKILL
    the driver's session there, and check that the same command resumes from the checkpoint before.
    lose_newest: also delete the newest complete checkpoint's folder, which Ray Train's own record
    still names (a VM lost while Drive synced that record but not the folder)."""
    path = write_recipe(tmp_path / "r.yaml", recipe)
    run_dir = tmp_path / "runs" / "tiny"
    partial = "ckpt-000000040"
    # Read where the checkpoint is written: storage/checkpoints.py (commit, or Ray's upload).
    env = {"ORCHESTRATOR_TEST_PAUSE_CHECKPOINT": partial, "ORCHESTRATOR_TEST_PAUSE_S": "120"}
    os.environ.update(env)
    try:
        proc = start_cli("run", path, cwd=tmp_path, log=tmp_path / "run.log")
    finally:
        for k in env:
            os.environ.pop(k)
    deadline = time.monotonic() + reach_s
    while not (run_dir / partial / "state.pt").exists():
        assert time.monotonic() < deadline and proc.poll() is None, "never reached the paused checkpoint"
        time.sleep(0.05)
    time.sleep(settle_s)  # let the state file's write finish: the marker is what is held back
    kill_group(proc)  # SIGKILL to the driver's session (a local Ray and its upload included)
    assert not (run_dir / partial / "meta.json").exists()
    mid = status_json(tmp_path)
    assert mid["final"] is None and any(c["times_trained"] == 1 for c in mid["chunk_log"])
    if lose_newest:
        newest = sorted(p.name for p in run_dir.glob("ckpt-*") if (p / "meta.json").exists())[-1]
        assert newest in (run_dir / "checkpoint_manager_snapshot.json").read_text()
        shutil.rmtree(run_dir / newest)
    again = run_cli("run", path, cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resuming" in again.stderr
    if lose_newest:
        assert "checkpoint record" in again.stderr and (run_dir / "checkpoint_manager_snapshot.json.stale").exists()
    assert not (run_dir / partial).exists(), "a half-written folder stays after newer checkpoints commit"
    st = assert_completed_exactly_once(tmp_path, reference_sha)
    assert st["mlflow_run_id"] == mid["mlflow_run_id"]
    assert all(c["world_size"] == 1 for c in st["chunk_log"])
    assert _interruption(st)["resumed_at_step"] < 40
    # On Ray, Ray Train persists checkpoints under RunConfig(storage_path, name): the run directory.
    assert st["final"]["checkpoint"].startswith(str(run_dir / "ckpt-"))


@pytest.mark.ray
def test_driver_sigkill_mid_checkpoint_resumes_from_the_previous_one(tmp_path, tiny_dataset, reference_sha):
    """Colab expiry on the production path: the driver and its local Ray die mid-stage-2, while Ray
    Train uploads a checkpoint (after its state file, before its completion marker). The same
    command resumes from the checkpoint before, in the same MLflow run, and TorchTrainer runs the
    same loop as the in-process backend (same plan, same batches): the weights equal the
    uninterrupted in-process run's."""
    _kill_during_checkpoint_write(tmp_path, slow_recipe(tiny_dataset, backend="ray"), reference_sha, settle_s=1,
                                  reach_s=180,
                                  lose_newest=True)


def test_driver_sigkill_mid_checkpoint_in_process_resumes_from_the_previous_one(tmp_path, tiny_dataset, reference_sha):
    """Without Ray our own code commits checkpoints (storage/checkpoints.commit): the same rule holds there."""
    _kill_during_checkpoint_write(tmp_path, slow_recipe(tiny_dataset), reference_sha, settle_s=0, reach_s=120)


@pytest.mark.ray
def test_two_drivers_racing_train_the_run_once(tmp_path, tiny_dataset):
    """Two `orchestrator run` at once: one trains on Ray, the other refuses, naming the lease holder."""
    recipe = tiny_recipe(tiny_dataset, execution={"backend": "ray", "num_workers": 1, "cpus_per_worker": 1})
    recipe["checkpoint"]["every_steps"] = 1000  # chunk-end checkpoints only: the race is over before training starts
    recipe["stages"] = recipe["stages"][:1]  # what is checked is the race, not the stages
    path = write_recipe(tmp_path / "r.yaml", recipe)
    procs = [start_cli("run", path, cwd=tmp_path, log=tmp_path / f"driver{i}.log") for i in range(2)]
    codes = [p.wait(timeout=300) for p in procs]
    assert sorted(codes) == [0, 1], codes
    loser = (tmp_path / f"driver{codes.index(1)}.log").read_text()
    assert "is being driven by" in loser and "since" in loser
    # Not the reference recipe (chunk-end checkpoints only), so no weights to compare.
    assert_completed_exactly_once(tmp_path, None, interruptions=0)


def test_a_driver_that_loses_its_lease_mid_run_stops_and_writes_nothing_more(tmp_path, tiny_dataset, monkeypatch):
    """Another driver takes the lease over while this one trains (a Drive folder on two VMs, a stall
    past the TTL): at its next heartbeat the driver stops at once, says who holds the lease, and
    leaves the run's record to the new holder (no 'failed', no 'interrupted', no final)."""
    from storage import lease as slease

    monkeypatch.setenv("ORCHESTRATOR_LEASE_HEARTBEAT_S", "0.5")
    path = write_recipe(tmp_path / "r.yaml", slow_recipe(tiny_dataset))
    run_dir = tmp_path / "runs" / "tiny"
    proc = start_cli("run", path, cwd=tmp_path, log=tmp_path / "run.log")
    try:
        wait_for_cursor(run_dir, lambda c: True, proc)  # the first checkpoint committed: training is under way
        now = time.time()
        other = slease.Lease("elsewhere:4242", "f" * 32, now, now)  # live for a minute: the test needs seconds
        (run_dir / "lease.tmp").write_bytes(other.encode())
        os.replace(run_dir / "lease.tmp", run_dir / "lease.json")
        code = proc.wait(timeout=120)
    finally:
        kill_group(proc)
    log = (tmp_path / "run.log").read_text()
    assert code == 1, log[-3000:]
    assert "lost its lease to elsewhere:4242" in log and "stopped without committing" in log, log[-3000:]
    assert json.loads((run_dir / "lease.json").read_text())["token"] == other.token
    assert json.loads((run_dir / "run.json").read_text())["state"] == "running"
    assert not (run_dir / "final.json").exists()
    # Fenced: nothing this driver snapshotted after the takeover was committed.
    from storage import checkpoints

    assert all(json.loads((run_dir / n / "meta.json").read_text())["saved_at"] < now
               for n in checkpoints.list_complete(str(run_dir)))
