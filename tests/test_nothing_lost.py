"""Nothing lost to everyday faults: a diverged run, unusable checkpoints, a Drive mount that drops,
a storage outage on one path, restarts that make no progress.

Each case goes through the real CLI with real files and processes: a real FUSE mount that answers
ENOTCONN as Colab's Drive mount does (tests/fuse_drop.py), real gcsfs against the GCS emulator
behind the fault proxy, real SIGKILLs. Wherever the run completes, its weights equal the
uninterrupted run's (reference_final) and MLflow holds one point per (metric, step).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from storage import checkpoints
from tests import gcs_emulator as _emulator
from tests.conftest import (
    REPO,
    assert_completed_exactly_once,
    cli_env,
    kill_group,
    run_cli,
    slow_recipe,
    start_cli,
    status_json,
    wait_for_cursor,
    write_recipe,
)
from tests.gcs_emulator import Gcs

gcs_emulator, gcs = _emulator.gcs_emulator, _emulator.gcs  # fixtures


# ----------------------------------------------------------------------------- checkpoint files

def _write_ckpt(run_dir: Path, step: int, finite: bool = True) -> str:
    name = checkpoints.checkpoint_name(step)
    checkpoints.write_local(str(run_dir / name), {"w": torch.ones(2)}, {"name": name, "losses_finite": finite})
    return name


def test_retention_never_deletes_the_newest_healthy_checkpoint(tmp_path):
    """Breaks if checkpoints saved after a non-finite loss push every finite one out of `keep`."""
    run_dir = tmp_path / "run"
    good = _write_ckpt(run_dir, 10)
    for step in (20, 30, 40):
        checkpoints.apply_retention(str(run_dir), _write_ckpt(run_dir, step, finite=False), keep=2)
    assert checkpoints.list_complete(str(run_dir)) == [good, "ckpt-000000030", "ckpt-000000040"]


def test_half_written_folders_go_once_a_newer_checkpoint_commits(tmp_path):
    """Breaks if a folder a kill left without its marker stays forever (or a newer one is touched)."""
    run_dir = tmp_path / "run"
    _write_ckpt(run_dir, 10)
    (run_dir / "ckpt-000000015").mkdir()
    (run_dir / "ckpt-000000015" / "state.pt").write_bytes(b"half")
    (run_dir / "ckpt-000000030").mkdir()  # newer than the commit below: may be under way, left alone
    checkpoints.apply_retention(str(run_dir), _write_ckpt(run_dir, 20), keep=3)
    assert sorted(p.name for p in run_dir.iterdir()) == ["ckpt-000000010", "ckpt-000000020", "ckpt-000000030"]


def test_checkpoints_are_listed_by_step_and_names_are_never_reused(tmp_path):
    run_dir = tmp_path / "run"
    for step in (9, 1000000000, 40):
        _write_ckpt(run_dir, step)
    assert [checkpoints.step_of(n) for n in checkpoints.list_complete(str(run_dir))] == [9, 40, 1000000000]
    taken = set(checkpoints.list_folders(str(run_dir)))
    assert checkpoints.fresh_name(40, taken) == "ckpt-000000040-r1"
    assert checkpoints.fresh_name(41, taken) == "ckpt-000000041"
    assert checkpoints.step_of("ckpt-000000040-r1") == 40


@pytest.mark.parametrize(("damage", "reason"), [
    (lambda d: (d / "meta.json").write_text(""), "meta.json is empty or torn"),
    (lambda d: (d / "state.pt").unlink(), "state.pt is missing"),
    (lambda d: (d / "state.pt").write_bytes((d / "state.pt").read_bytes()[:-7]), "does not match the sha256"),
])
def test_an_unusable_checkpoint_says_why(tmp_path, damage, reason):
    run_dir = tmp_path / "run"
    name = _write_ckpt(run_dir, 5)
    damage(run_dir / name)
    with pytest.raises(checkpoints.CheckpointCorruptError, match=reason):
        checkpoints.read_local(str(run_dir / name))


# ------------------------------------------------------------------------------ divergence

def test_a_diverged_run_stops_naming_the_lr_and_keeps_a_finite_checkpoint(tmp_path):
    """basenet with a dropped minus sign in its lr: NaN within a few steps. Breaks if the run
    "completes", runs on for long after the first NaN, or keeps a checkpoint holding NaN."""
    res = run_cli("run", str(REPO / "recipes" / "basenet.yaml"), "--set", "stages.0.lr=1.0e+6",
                  "--set", "data.synth.samples=600", "--set", "data.eval_samples=100", "--set",
                  "execution.backend=local",
                  cwd=tmp_path)
    assert res.returncode == 1, res.stderr[-2000:]
    assert "Traceback" not in res.stderr
    line = next(ln for ln in res.stderr.splitlines() if ln.startswith("error:"))
    assert "diverged" in line and "stages.train.lr = 1e+06" in line, line
    first, stopped = (int(x) for x in re.search(r"since step (\d+) .* stopped at step (\d+)", line).groups())
    assert stopped - first < 10
    st = status_json(tmp_path, "basenet")
    assert st["state"] == "failed" and "diverged" in st["error"]
    run_dir = tmp_path / "runs" / "basenet"
    kept = checkpoints.list_complete(str(run_dir))
    assert kept, "no checkpoint left"
    for name in kept:
        state, meta = checkpoints.read_local(str(run_dir / name))
        assert meta["losses_finite"] and checkpoints.step_of(name) < first
        assert all(torch.isfinite(t).all() for t in state["model"].values() if t.is_floating_point()), name


# --------------------------------------------------------------------- torn checkpoints, in-process

def test_torn_newer_checkpoints_are_skipped_and_the_run_resumes_bit_identical(tmp_path, tiny_dataset, reference_sha):
    """What a Drive sync or a threaded upload leaves: the newest checkpoint's meta.json empty, the
    one before it a state file that `weights_only` refuses. Breaks if either blocks the resume,
    is loaded, or is not named with its reason."""
    path = write_recipe(tmp_path / "r.yaml", slow_recipe(tiny_dataset))
    run_dir = tmp_path / "runs" / "tiny"
    proc = start_cli("run", path, cwd=tmp_path, log=tmp_path / "run.log")
    try:
        wait_for_cursor(run_dir, lambda c: c["stage"] == 1 and c["chunk"] >= 1 and c["batch"] > 0, proc)
    finally:
        kill_group(proc)
    names = checkpoints.list_complete(str(run_dir))
    assert len(names) == 3
    (run_dir / names[-1] / "meta.json").write_text("")
    refused = run_dir / names[-2]
    torch.save({"model": argparse_namespace()}, refused / "state.pt")  # a class weights_only will not load
    meta = json.loads((refused / "meta.json").read_text())
    meta["state_sha256"] = __import__("hashlib").sha256((refused / "state.pt").read_bytes()).hexdigest()
    (refused / "meta.json").write_text(json.dumps(meta))
    res = run_cli("run", path, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    warnings = [ln for ln in res.stderr.splitlines() if "is unusable" in ln]
    assert len(warnings) == 2
    assert names[-1] in warnings[0] and "meta.json is empty or torn" in warnings[0]
    assert names[-2] in warnings[1] and "weights_only" in warnings[1]
    st = assert_completed_exactly_once(tmp_path, reference_sha)
    assert st["interruption_log"][0]["resumed_at_step"] == checkpoints.step_of(names[-3])
    assert all((run_dir / n / "meta.json").exists() for n in checkpoints.list_folders(str(run_dir))), \
        "set-aside and half-written folders are removed once newer checkpoints commit"


def argparse_namespace():
    import argparse

    return argparse.Namespace(weights=1)


# ------------------------------------------------------------------------- a Drive mount drops

class DroppingMount:
    """tests/fuse_drop.py mounted at `mountpoint`: `drop()` makes every call answer ENOTCONN."""

    def __init__(self, tmp_path: Path, mountpoint: Path) -> None:
        self.backing = tmp_path / "backing"
        self.backing.mkdir()
        mountpoint.mkdir()
        self.mountpoint = mountpoint
        self.switch = tmp_path / "drop-switch"
        self.proc = subprocess.Popen([sys.executable, "-m", "tests.fuse_drop", str(self.backing), str(mountpoint),
                                      str(self.switch)], cwd=REPO, env=cli_env(), stderr=subprocess.PIPE)
        deadline = time.monotonic() + 20
        while not os.path.ismount(mountpoint):
            assert self.proc.poll() is None, self.proc.stderr.read().decode()
            assert time.monotonic() < deadline, "the FUSE mount did not come up"
            time.sleep(0.05)

    def drop(self) -> None:
        self.refused_marker.unlink(missing_ok=True)
        self.switch.touch()

    @property
    def refused_marker(self) -> Path:
        return self.switch.with_name(self.switch.name + ".refused")

    def refused(self) -> bool:
        """Whether a call met the drop since the last drop()."""
        return self.refused_marker.exists()

    def restore(self) -> None:
        self.switch.unlink()

    def close(self) -> None:
        self.switch.unlink(missing_ok=True)
        subprocess.run(["fusermount", "-u", str(self.mountpoint)], check=False)
        self.proc.kill()
        self.proc.wait(timeout=10)


def _ensure_fuse() -> None:
    """fusepy needs libfuse2 and fusermount (Debian's fuse and libfuse2). The README's test command
    is all the set-up there is, so on a machine without them (CI's, as root) they are installed
    here, once; elsewhere the failure says what to install."""
    import ctypes.util

    if ctypes.util.find_library("fuse") and shutil.which("fusermount"):
        return
    if os.geteuid() == 0 and shutil.which("apt-get"):
        subprocess.run(["apt-get", "update", "-qq"], check=False, capture_output=True, timeout=300)
        subprocess.run(["apt-get", "install", "-y", "-qq", "fuse", "libfuse2"], check=False, capture_output=True,
                       timeout=300)
    if not (ctypes.util.find_library("fuse") and shutil.which("fusermount")):
        pytest.fail("the dropping-mount test needs FUSE: install libfuse2 and fuse (apt-get install fuse libfuse2)")


@pytest.fixture
def drive(tmp_path):
    if not os.path.exists("/dev/fuse"):
        pytest.fail("the dropping-mount test needs /dev/fuse (a FUSE-capable kernel and container)")
    _ensure_fuse()
    mount = DroppingMount(tmp_path, tmp_path / "runs")  # run.storage "runs" is on the mount
    try:
        yield mount
    finally:
        mount.close()


def test_a_dropping_drive_mount_stops_cleanly_and_a_short_drop_is_ridden_out(tmp_path, tiny_dataset, reference_sha,
                                                                             drive):
    """Run storage on a mount that drops. A long drop (past the storage budget, shortened here)
    stops the run with one line naming the mount and the remount; the same command then resumes,
    rides out a 7 s drop (one that calls met), and ends bit-identical with one MLflow point per (metric, step)."""
    path = write_recipe(tmp_path / "r.yaml", slow_recipe(tiny_dataset))
    backing_run = drive.backing / "tiny"  # read by the test around the mount
    env = {"ORCHESTRATOR_STORAGE_RETRY_S": "2", "ORCHESTRATOR_DURABLE_RETRY_S": "4"}
    os.environ.update(env)
    try:
        proc = start_cli("run", path, cwd=tmp_path, log=tmp_path / "long.log")
    finally:
        for k in env:
            os.environ.pop(k)
    try:
        wait_for_cursor(backing_run, lambda c: c["stage"] == 1, proc, timeout=300)
        drive.drop()
        rc = proc.wait(timeout=300)
    finally:
        if proc.poll() is None:
            kill_group(proc)
    log = (tmp_path / "long.log").read_text()
    assert rc == 1, log[-3000:]
    assert "Traceback" not in log
    line = next(ln for ln in log.splitlines() if ln.startswith("error:"))
    assert str(tmp_path / "runs") in line and "force_remount=True" in line and "same command" in line, line
    drive.restore()

    proc = start_cli("run", path, cwd=tmp_path, log=tmp_path / "resumed.log")
    try:
        resumed_from = json.loads((backing_run / "cursor.json").read_text())["cursor"]["global_step"]
        wait_for_cursor(backing_run, lambda c: c["global_step"] > resumed_from + 5, proc, timeout=300)
        drive.drop()
        time.sleep(7)
        assert drive.refused(), "the run made no call to the mount while it was down"
        drive.restore()
        rc = proc.wait(timeout=400)
    finally:
        if proc.poll() is None:
            kill_group(proc)
    assert rc == 0, (tmp_path / "resumed.log").read_text()[-3000:]
    assert_completed_exactly_once(tmp_path, reference_sha)


# ------------------------------------------------------------- one path of a bucket goes down

def test_outages_on_checkpoint_writes_and_progress_json_are_ridden_out_on_gcs(gcs: Gcs, tmp_path, reference_sha):
    """7 s of 503s on every checkpoint write, then 7 s on progress.json, mid-run with run storage
    on the GCS emulator. Breaks if either ends the run (progress.json is advisory; checkpoint writes
    wait minutes) or changes what it trains."""
    from storage.synth import synthesize
    from tests.conftest import TINY_SAMPLES

    data = gcs.uri("tiny")
    synthesize(data, TINY_SAMPLES, seed=0, image_size=64, rows_per_group=32, rows_per_shard=128, workers=1)
    recipe = slow_recipe(data)
    recipe["run"]["storage"] = gcs.uri("runs")
    path = write_recipe(tmp_path / "r.yaml", recipe)
    proc = start_cli("run", path, cwd=tmp_path, log=tmp_path / "run.log")
    try:
        _wait_for_progress(gcs.uri("runs"), lambda p: p.get("global_step", 0) >= 20, proc)
        gcs.proxy.configure(outage_match="ckpt-")
        time.sleep(7)  # a checkpoint is due every 5 steps: the counter below says one met the outage
        failed_ckpt = gcs.proxy.counters.failed_503
        gcs.proxy.configure(outage_match="progress.json")
        time.sleep(7)
        gcs.proxy.configure()
        rc = proc.wait(timeout=400)
    finally:
        if proc.poll() is None:
            kill_group(proc)
    assert rc == 0, (tmp_path / "run.log").read_text()[-3000:]
    assert failed_ckpt > 0 and gcs.proxy.counters.failed_503 > failed_ckpt, "no outage reached the run"
    st = json.loads(run_cli("status", "tiny", "--json", "--storage", gcs.uri("runs"), cwd=tmp_path).stdout)
    assert st["state"] == "completed" and st["final"]["weights_sha256"] == reference_sha
    assert st["interruptions"] == 0 and all(c["times_trained"] == 1 for c in st["chunk_log"])


def test_a_403_on_checkpoint_writes_stops_the_run_naming_the_uri(gcs: Gcs, tmp_path, tiny_dataset):
    """The same path answering 403 is permanent: the run stops at once, naming the checkpoint's URI."""
    recipe = slow_recipe(tiny_dataset)
    recipe["run"]["storage"] = gcs.uri("runs")
    gcs.proxy.configure(forbid_match="ckpt-")
    res = run_cli("run", write_recipe(tmp_path / "r.yaml", recipe), cwd=tmp_path, timeout=120)  # the hang guard
    assert res.returncode == 1, res.stderr[-2000:]
    line = next(ln for ln in res.stderr.splitlines() if ln.startswith("error:"))
    assert gcs.uri("runs") + "/tiny/ckpt-" in line and "403" in line, res.stderr[-6000:]


def _wait_for_progress(storage: str, predicate, proc: subprocess.Popen, timeout: float = 300) -> None:
    """Poll the run's progress.json in run storage in-process (no `status` process per look)."""
    from storage import fs as sfs

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, "run exited early"
        try:
            progress = json.loads(sfs.read_bytes(f"{storage}/tiny/progress.json"))
        except (FileNotFoundError, json.JSONDecodeError):
            progress = {}
        if predicate(progress):
            return
        time.sleep(0.5)
    raise AssertionError("the run never got there")


# -------------------------------------------------------------- restarts without progress

@pytest.mark.ray
def test_restarts_without_progress_stop_the_run_whatever_max_failures_says(tmp_path, tiny_dataset):
    """A worker that dies at the same step every time (a chunk that OOMs) with max_failures -1:
    Ray Train would restart it forever. Breaks if the run does not stop, or does not say why."""
    recipe = slow_recipe(tiny_dataset, backend="ray")
    recipe["execution"].update(max_failures=-1, max_restarts_without_progress=2)
    recipe["stages"] = recipe["stages"][:1]
    path = write_recipe(tmp_path / "r.yaml", recipe)
    os.environ["ORCHESTRATOR_TEST_CRASH_AT_STEP"] = "3"  # before the first periodic checkpoint (5)
    try:
        res = run_cli("run", path, cwd=tmp_path, timeout=400)
    finally:
        os.environ.pop("ORCHESTRATOR_TEST_CRASH_AT_STEP")
    assert res.returncode == 1, res.stderr[-3000:]
    line = next(ln for ln in res.stderr.splitlines() if ln.startswith("error:"))
    assert "restarted 2 times in a row from step 0" in line and "max_restarts_without_progress" in line, line
    assert status_json(tmp_path)["state"] == "failed"



# ------------------------------------------------------------------- how faults are sorted

def test_storage_faults_are_sorted_into_dropped_mounts_outages_and_permanent_errors(monkeypatch, tmp_path):
    """Breaks if ENOTCONN on a local path is not a dropped mount, if transient faults past their
    budget become a permanent StorageError (that stopped runs for good), or if a 403 is retried."""
    import errno

    from storage import errors, fs, retry

    calls = {"n": 0}

    def failing(exc):
        def op(uri, *a, **k):
            calls["n"] += 1
            raise exc
        return op

    fast = retry._policy(0.3)
    with pytest.raises(errors.MountDropped) as dropped:
        fs._named(failing(OSError(errno.ENOTCONN, "Transport endpoint is not connected")), fast)(str(tmp_path / "x"))
    assert dropped.value.path == str(tmp_path / "x") and "force_remount=True" in fs.mount_advice(dropped.value)
    outage = ConnectionResetError(errno.ECONNRESET, "reset")
    with pytest.raises(errors.StorageUnavailable) as unavailable:
        fs._named(failing(outage), fast)("gs://bucket/runs/x")
    assert not isinstance(unavailable.value, errors.MountDropped) and "gs://bucket/runs/x" in str(unavailable.value)
    calls["n"] = 0
    with pytest.raises(errors.StorageError) as forbidden:
        fs._named(failing(PermissionError(errno.EACCES, "Forbidden")), fast)("gs://bucket/runs/x")
    assert not isinstance(forbidden.value, errors.StorageUnavailable) and calls["n"] == 1


def test_progress_json_that_cannot_be_written_costs_training_nothing(monkeypatch, tmp_path, caplog):
    """progress.json is advisory: a store failing its writes must not raise into, or block, training."""
    from storage import fs
    from storage.errors import StorageUnavailable
    from workers.progress import ProgressWriter
    from workers.state import Cursor

    def down(uri, data):
        raise StorageUnavailable(f"{uri}: still failing after retries")

    monkeypatch.setattr(fs, "write_bytes", down)
    writer = ProgressWriter(str(tmp_path), ["a"], [1], 10, None)
    for step in range(3):
        writer.write("train", Cursor(global_step=step), 0.5)  # returns at once whatever the store does
    writer.close()
    assert sum("progress.json cannot be written" in r.message for r in caplog.records) == 1  # one line, not one a write
