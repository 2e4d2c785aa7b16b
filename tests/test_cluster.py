"""Cluster use: a multi-node loopback cluster (one node with fake GPUs), runs submitted as Ray Jobs
whose driver outlives the submitting process, and re-running `run` attaching to the live job."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest

from tests.conftest import (
    assert_completed_exactly_once,
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
from tests.loopback_cluster import LoopbackCluster, ray_cli

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def cluster():
    """Head (no CPUs) + a CPU node + a node advertising one fake GPU, like a spot GPU worker."""
    c = LoopbackCluster()
    c.add_node(num_cpus=1)
    c.add_node(num_cpus=1, num_gpus=1)
    try:
        yield c
    finally:
        c.stop()


def _jobs_for(cluster: LoopbackCluster, run_dir: Path) -> list:
    return [j for j in cluster.jobs() if (j.metadata or {}).get("orchestrator.run_dir") == str(run_dir)]


def test_a_run_spreads_its_workers_over_the_nodes_of_a_multi_node_cluster(tmp_path: Path, tiny_dataset, cluster):
    """Data-parallel across nodes: two ranks (DDP over gloo), one per node, share every chunk,
    agree on checkpoints, and commit each chunk once."""
    from ray.util.state import list_actors, list_nodes

    recipe = tiny_recipe(tiny_dataset, execution={"backend": "ray", "num_workers": 2, "cpus_per_worker": 1})
    path = write_recipe(tmp_path / "r.yaml", recipe)
    res = run_cli("run", path, "--address", cluster.address, cwd=tmp_path)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "submitted as Ray job" in res.stderr

    st = status_json(tmp_path)
    assert st["state"] == "completed" and st["final"] is not None
    assert all(c["times_trained"] == 1 and c["world_size"] == 2 for c in st["chunk_log"]), st["chunk_log"]
    steps = [s for s, _ in mlflow_history(tmp_path, st["mlflow_run_id"], "train/loss")]
    assert steps == list(range(1, st["global_step"] + 1))
    m = st["final"]["metrics"]
    assert m["eval/depth_rmse"] < m["eval/depth_rmse_baseline"]
    (job,) = _jobs_for(cluster, tmp_path / "runs" / "tiny")
    assert str(job.status.value) == "SUCCEEDED"

    # Each of the two workers had a node of its own: the CPU node and the fake-GPU node.
    workers = list_actors(address=cluster.address, filters=[("class_name", "=", "RayTrainWorker")], detail=True,
                          limit=100)
    worker_nodes = {a.node_id for a in workers}
    gpu_nodes = {n.node_id for n in list_nodes(address=cluster.address, detail=True) if n.resources_total.get("GPU")}
    assert len(worker_nodes) == 2 and gpu_nodes & worker_nodes, (worker_nodes, gpu_nodes)


def test_killing_the_submitting_process_leaves_the_run_training_and_rerun_attaches(tmp_path: Path, tiny_dataset,
                                                                                   reference_sha, cluster):
    """The notebook that submitted a run can die: the driver is a Ray Job on the head."""
    path = write_recipe(tmp_path / "r.yaml", slow_recipe(tiny_dataset, backend="ray"))
    submitter = start_cli("run", path, "--address", cluster.address, cwd=tmp_path, log=tmp_path / "submit.log")
    wait_for_cursor(tmp_path / "runs" / "tiny", lambda c: c["stage"] >= 1, submitter)
    kill_group(submitter)  # SIGKILL: the notebook kernel is gone
    assert submitter.returncode == -signal.SIGKILL
    (job,) = _jobs_for(cluster, tmp_path / "runs" / "tiny")
    assert str(job.status.value) == "RUNNING", "the run stopped with its submitter"

    # Running the same command again attaches to the live job instead of starting a second driver.
    res = run_cli("run", path, "--address", cluster.address, cwd=tmp_path)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "attaching (no second driver)" in res.stderr
    assert len(_jobs_for(cluster, tmp_path / "runs" / "tiny")) == 1

    # Nothing was interrupted, so the weights are the uninterrupted run's.
    assert_completed_exactly_once(tmp_path, reference_sha, interruptions=0)

    logs = run_cli("logs", "tiny", "--address", cluster.address, cwd=tmp_path)
    assert logs.returncode == 0 and "resuming" not in logs.stdout and "run 'tiny': new" in logs.stdout, logs.stdout[
        -2000:]
    st = json.loads(run_cli("status", "tiny", "--address", cluster.address, "--json", cwd=tmp_path).stdout)
    assert st["ray_job"]["status"] == "SUCCEEDED" and st["state"] == "completed"


def test_an_unreachable_cluster_address_is_one_clear_error(tmp_path: Path, tiny_dataset):
    path = write_recipe(tmp_path / "r.yaml", tiny_recipe(tiny_dataset, execution={"backend": "ray"}))
    res = run_cli("run", path, "--address", "http://127.0.0.1:9", cwd=tmp_path)
    assert res.returncode == 1
    assert "--address http://127.0.0.1:9: cannot reach the Ray cluster's job server" in res.stderr
    assert "Traceback" not in res.stderr


def test_an_elastic_run_shrinks_to_the_nodes_left_when_one_is_preempted(tmp_path: Path, tiny_dataset, cluster):
    """execution.min_workers: a spot node drained for good does not stall the run waiting for a
    replacement; Ray Train restarts the worker group with fewer ranks, from the just-in-time
    checkpoint, and each chunk records the world size that trained it.

    Last in this module: the drained node stays unusable for the module's cluster."""
    from ray.util.state import list_actors

    recipe = slow_recipe(tiny_dataset, backend="ray")
    # Ray sees the drained node as free until a two-worker start times out; shorter than the default 60 s.
    recipe["execution"].update(num_workers=2, min_workers=1, worker_start_timeout_s=20)
    recipe["checkpoint"]["every_steps"] = 1000  # so only the notice's checkpoint can save the stage-2 steps
    path = write_recipe(tmp_path / "r.yaml", recipe)
    proc = start_cli("run", path, "--address", cluster.address, cwd=tmp_path, log=tmp_path / "run.log")
    run_dir = tmp_path / "runs" / "tiny"
    try:
        wait_for_cursor(run_dir, lambda c: c["stage"] == 1, proc)  # stage 1's three chunks trained on two workers
        workers = list_actors(address=cluster.address,
                              filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")], limit=100)
        assert len({a.node_id for a in workers}) == 2, "the run should start on both nodes"
        node = json.loads((run_dir / "progress.json").read_text())["node_id"]
        ray_cli("drain-node", f"--address={cluster.address}", f"--node-id={node}",
                "--reason=DRAIN_NODE_REASON_PREEMPTION",
                "--reason-message=spot reclaim, no replacement (test)", "--deadline-remaining-seconds=300")
        rc = proc.wait(timeout=400)
    finally:
        if proc.poll() is None:
            kill_group(proc)
    assert rc == 0, (tmp_path / "run.log").read_text()[-3000:]

    # The world size changed, so the weights cannot match a one-worker reference run's.
    st = assert_completed_exactly_once(tmp_path, None)
    sizes = [c["world_size"] for c in st["chunk_log"]]
    assert sizes[0] == 2 and sizes[-1] == 1, sizes
    (rec,) = st["interruption_log"]
    assert rec["cause"] == "preemption notice" and rec["steps_lost"] == 0, rec
    assert json.loads((run_dir / "progress.json").read_text())["node_id"] != node
