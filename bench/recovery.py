"""Recovery: time from a worker SIGKILL to the next training step, and steps lost per interruption
with and without a preemption notice, on a local Ray cluster. Baseline in the same run: a cold
start (driver launch to first training step). Usage: python -m bench.recovery --json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import yaml

POLL_S = 0.05


def _recipe(data: str, every_steps: int) -> dict:
    return {
        "run": {"name": "bench", "storage": "runs", "seed": 0},
        "data": {"uri": data, "eval_samples": 32},
        "model": {"name": "unet224", "width": 0.125},
        "stages": [
            {"name": "spine", "forward": "spine", "trainable": ["spine"], "resolution": 32, "batch_size": 8,
             "chunk_size": 400, "epochs_per_chunk": 2, "lr": 0.01},
            {"name": "full", "forward": "full", "trainable": ["all"], "resolution": 64, "batch_size": 8,
             "chunk_size": 400, "epochs_per_chunk": 2, "lr": 0.002},
        ],
        "checkpoint": {"every_steps": every_steps, "every_seconds": 3600},
        "tracking": {"uri": "sqlite:///mlflow.db", "experiment": "bench"},
        "execution": {"backend": "ray", "num_workers": 1, "cpus_per_worker": 1},
    }


def _progress(run_dir: Path) -> dict | None:
    try:
        return json.loads((run_dir / "progress.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def _worker_pid() -> int:
    for p in psutil.process_iter(["pid", "cmdline"]):
        if " ".join(p.info["cmdline"] or []).startswith("ray::RayTrainWorker"):
            return p.info["pid"]
    raise RuntimeError("no RayTrainWorker found")


def _wait(pred, proc: subprocess.Popen, timeout: float = 300):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"run exited with {proc.returncode}")
        got = pred()
        if got:
            return got
        time.sleep(POLL_S)
    raise TimeoutError


def _one(workdir: Path, data: str, sig: int, every_steps: int) -> dict:
    workdir.mkdir()
    (workdir / "r.yaml").write_text(yaml.safe_dump(_recipe(data, every_steps)))
    run_dir = workdir / "runs" / "bench"
    t_launch = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "orchestrator.cli", "run", "r.yaml"], cwd=workdir,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        first = _wait(lambda: (p := _progress(run_dir)) and p["phase"] == "train" and p["global_step"] > 0 and p, proc)
        cold_start_s = time.monotonic() - t_launch
        # Cut in the middle of a checkpoint interval, where a crash loses the most.
        target = first["global_step"] + every_steps + every_steps // 2
        _wait(lambda: (p := _progress(run_dir)) and p["global_step"] >= target, proc)
        old_pid = _worker_pid()
        t_kill = time.monotonic()
        os.kill(old_pid, sig)
        _wait(lambda: (p := _progress(run_dir)) and p["pid"] != old_pid and p["phase"] == "train" and p, proc)
        recovery_s = time.monotonic() - t_kill
        proc.wait(timeout=600)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    status = json.loads(subprocess.run([sys.executable, "-m", "orchestrator.cli", "status", "bench", "--json"],
                                       cwd=workdir,
                                       capture_output=True, text=True, check=True).stdout)
    (rec,) = status["interruption_log"]
    return {"cold_start_s": round(cold_start_s, 2), "recovery_s": round(recovery_s, 2), "steps_lost": rec["steps_lost"],
            "cause": rec["cause"], "state": status["state"]}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--every-steps", type=int, default=20)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    from storage.synth import synthesize

    with tempfile.TemporaryDirectory() as tmp:
        data = os.path.join(tmp, "data")
        synthesize(data, 432, seed=0, image_size=64)
        kill = _one(Path(tmp) / "kill", data, signal.SIGKILL, args.every_steps)
        term = _one(Path(tmp) / "term", data, signal.SIGTERM, args.every_steps)
    result = {
        "bench": "recovery",
        "machine": f"{platform.machine()} {os.cpu_count()} cores",
        "checkpoint_every_steps": args.every_steps,
        "cold_start_to_first_step_s": kill["cold_start_s"],
        "worker_kill_to_next_step_s": kill["recovery_s"],
        "steps_lost_without_notice": kill["steps_lost"],
        "notice_to_next_step_s": term["recovery_s"],
        "steps_lost_with_notice": term["steps_lost"],
        "runs_completed": kill["state"] == term["state"] == "completed",
    }
    print(json.dumps(result) if args.json else json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
