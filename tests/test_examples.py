"""examples/: a task, model and loss section from outside the package train through the real CLI.

examples/keypoints/ holds a TaskSpec, its worker half, a synthetic generator and a model, each in its
own module outside the package, and a recipe naming them by import path. The run is SIGKILLed
mid-stage and re-run with the same command: the final weights equal an uninterrupted run's, as for
the built-in tasks (tests/test_fault_tolerance.py).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO, kill_group, wait_for_cursor

EXAMPLE = REPO / "examples" / "keypoints"


def _env() -> dict[str, str]:
    env = dict(os.environ)
    # The example's modules import by their own names ("keypoints_spec:KEYPOINTS"): its folder on the path.
    env["PYTHONPATH"] = os.pathsep.join([str(EXAMPLE), str(REPO), env.get("PYTHONPATH", "")])
    env.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    return env


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "orchestrator.cli", *args], cwd=cwd, env=_env(),
                          capture_output=True, text=True, timeout=600)


def _status(cwd: Path) -> dict:
    res = _cli("status", "keypoints", "--json", cwd=cwd)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)


def _recipe(cwd: Path) -> str:
    shutil.copy(EXAMPLE / "recipe.yaml", cwd / "recipe.yaml")
    return str(cwd / "recipe.yaml")


def test_keypoints_example_trains_and_resumes_bit_identically_after_sigkill(tmp_path):
    ref, cut = tmp_path / "reference", tmp_path / "killed"
    ref.mkdir()
    cut.mkdir()
    res = _cli("run", _recipe(ref), cwd=ref)
    assert res.returncode == 0, res.stderr
    reference = _status(ref)["final"]
    assert reference["metrics"]["eval/px_error"] < reference["metrics"]["eval/px_error_baseline"]

    path = _recipe(cut)
    log = (cut / "run.log").open("w")
    proc = subprocess.Popen([sys.executable, "-m", "orchestrator.cli", "run", path], cwd=cut, env=_env(),
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    # Past the first checkpoint of stage 1's second chunk, before the stage ends: SIGKILL, no warning.
    wait_for_cursor(cut / "runs" / "keypoints", lambda c: c["stage"] == 0 and c["chunk"] == 1, proc)
    kill_group(proc)
    res = _cli("run", path, cwd=cut)
    assert res.returncode == 0, (cut / "run.log").read_text() + res.stderr
    st = _status(cut)
    assert st["state"] == "completed" and st["interruptions"] == 1, st
    assert all(c["times_trained"] == 1 for c in st["chunk_log"]), st["chunk_log"]
    assert st["final"]["weights_sha256"] == reference["weights_sha256"], "weights differ from the uninterrupted run"
