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


def test_ray_resume_after_driver_sigkill_mid_stage_two(tmp_path, tiny_dataset, reference_sha):
    """Colab expiry: the driver and its local Ray die; the same command resumes from storage.

    TorchTrainer runs the same loop as the in-process backend: same plan, same batches, so even
    across the kill the weights are bit-identical to the uninterrupted in-process run's."""
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
    assert all(c["times_trained"] == 1 and c["world_size"] == 1 for c in st["chunk_log"])
    assert st["final"]["weights_sha256"] == reference_sha
    # Ray Train persisted the checkpoints under RunConfig(storage_path, name) = the run directory.
    assert st["final"]["checkpoint"].startswith(str(tmp_path / "runs" / "tiny" / "ckpt-"))
    steps = [s for s, _ in mlflow_history(tmp_path, st["mlflow_run_id"], "train/loss")]
    assert steps == list(range(1, st["global_step"] + 1))
