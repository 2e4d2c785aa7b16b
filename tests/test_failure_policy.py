"""Failures a restart cannot fix stop the run at once instead of cycling through Ray's restarts."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from orchestrator.failure_policy import retry_can_fix
from tests.conftest import (
    assert_completed_exactly_once,
    kill_group,
    run_cli,
    slow_recipe,
    start_cli,
    status_json,
    wait_for_cursor,
    write_recipe,
)


def test_lost_workers_are_retried_but_bad_data_and_storage_errors_are_not():
    assert retry_can_fix(None) and retry_can_fix("worker")
    assert not retry_can_fix("data") and not retry_can_fix("storage")


@pytest.mark.ray
def test_a_shard_corrupted_mid_run_stops_a_ray_run_after_a_checkpoint_and_a_fixed_rerun_loses_nothing(
        tmp_path: Path, tiny_dataset, reference_sha):
    """The next chunk's background fetch fails its checksum twice: no restart can fix that, so the
    run saves a checkpoint at the next step and stops, naming the shard, instead of training to
    the chunk's end or letting Ray restart into the same failure. Fixed, it resumes there."""
    data = tmp_path / "data"
    shutil.copytree(tiny_dataset, data)
    recipe = slow_recipe(str(data), backend="ray")
    # Unlimited restarts: were the failure retried, this run would never end.
    recipe["execution"]["max_failures"] = -1
    path = write_recipe(tmp_path / "r.yaml", recipe)
    proc = start_cli("run", path, cwd=tmp_path, log=tmp_path / "run.log")
    try:
        wait_for_cursor(tmp_path / "runs" / "tiny", lambda c: c["stage"] == 1, proc)
        shard = next((data / "shards").glob("*.parquet"))
        good = shard.read_bytes()
        raw = bytearray(good)
        mid = len(raw) // 2
        raw[mid : mid + 4096] = bytes(4096)  # same size, wrong bytes: the checksums catch it
        shard.write_bytes(bytes(raw))
        rc = proc.wait(timeout=300)
    finally:
        if proc.poll() is None:
            kill_group(proc)
    log = (tmp_path / "run.log").read_text()
    assert rc == 1, log[-3000:]
    assert shard.name in log and "failed" in log, log[-3000:]
    st = status_json(tmp_path)
    assert st["state"] == "failed" and shard.name in st["error"]

    # Fix the data and run the same command (in-process this time: execution.* may change).
    shard.write_bytes(good)
    again = run_cli("run", path, "--set", "execution.backend=local", cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    st = assert_completed_exactly_once(tmp_path, reference_sha)
    (rec,) = st["interruption_log"]
    assert rec["cause"] == "stopped on an error" and rec["steps_lost"] == 0, rec
