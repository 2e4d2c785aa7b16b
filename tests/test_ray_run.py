"""The production path: real Ray Train (TorchTrainer on a local Ray cluster), real kills."""

from __future__ import annotations

import pytest

from tests.conftest import (
    kill_group,
    mlflow_history,
    run_cli,
    slow_recipe,
    start_cli,
    status_json,
    wait_for_cursor,
    write_recipe,
)

pytestmark = pytest.mark.ray


def _ray_recipe(data_uri: str) -> dict:
    return slow_recipe(data_uri, backend="ray")


def test_ray_train_run_completes_and_matches_the_inprocess_loop(tmp_path, tiny_dataset, reference_sha):
    """TorchTrainer runs the same loop: same plan, same batches, bit-identical weights on CPU."""
    res = run_cli("run", write_recipe(tmp_path / "r.yaml", _ray_recipe(tiny_dataset)), cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    st = status_json(tmp_path)
    assert st["state"] == "completed"
    assert all(c["times_trained"] == 1 and c["world_size"] == 1 for c in st["chunk_log"])
    assert st["final"]["weights_sha256"] == reference_sha
    # Ray Train persisted the checkpoints under RunConfig(storage_path, name) = the run directory.
    assert st["final"]["checkpoint"].startswith(str(tmp_path / "runs" / "tiny" / "ckpt-"))
    assert (tmp_path / "runs" / "tiny" / "checkpoint_manager_snapshot.json").exists() or any(
        p.name.startswith(".") or p.suffix == ".json" for p in (tmp_path / "runs" / "tiny").iterdir()
    )
    steps = [s for s, _ in mlflow_history(tmp_path, st["mlflow_run_id"], "train/loss")]
    assert steps == list(range(1, st["global_step"] + 1))


def test_ray_resume_after_driver_sigkill_mid_stage_two(tmp_path, tiny_dataset, reference_sha):
    """Colab expiry: the driver and its local Ray die; the same command resumes from storage."""
    path = write_recipe(tmp_path / "r.yaml", _ray_recipe(tiny_dataset))
    proc = start_cli("run", path, cwd=tmp_path, log=tmp_path / "attempt1.log")
    try:
        wait_for_cursor(tmp_path / "runs" / "tiny", lambda c: c["stage"] == 1 and c["chunk"] >= 1, proc)
    finally:
        kill_group(proc)  # SIGKILL to the driver's whole session, Ray's processes included
    mid = status_json(tmp_path)
    assert mid["final"] is None and any(c["times_trained"] == 1 for c in mid["chunk_log"])

    again = run_cli("run", path, cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resuming" in again.stderr
    st = status_json(tmp_path)
    assert st["state"] == "completed" and st["mlflow_run_id"] == mid["mlflow_run_id"]
    assert st["interruptions"] == 1
    assert all(c["times_trained"] == 1 for c in st["chunk_log"])
    assert st["final"]["weights_sha256"] == reference_sha
    steps = [s for s, _ in mlflow_history(tmp_path, st["mlflow_run_id"], "train/loss")]
    assert steps == list(range(1, st["global_step"] + 1))


def test_two_workers_split_each_chunk_and_commit_it_once(tmp_path, tiny_dataset):
    """Data-parallel on Ray Train: two ranks (DDP over gloo) share every chunk and agree on checkpoints."""
    recipe = slow_recipe(tiny_dataset, backend="ray")
    recipe["execution"].update({"num_workers": 2, "cpus_per_worker": 1})
    recipe["stages"][1]["epochs_per_chunk"] = 1
    res = run_cli("run", write_recipe(tmp_path / "r.yaml", recipe), cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    st = status_json(tmp_path)
    assert st["state"] == "completed"
    assert all(c["times_trained"] == 1 and c["world_size"] == 2 for c in st["chunk_log"]), st["chunk_log"]
    steps = [s for s, _ in mlflow_history(tmp_path, st["mlflow_run_id"], "train/loss")]
    assert steps == list(range(1, st["global_step"] + 1))
    m = st["final"]["metrics"]
    assert m["eval/depth_rmse"] < m["eval/depth_rmse_baseline"]
