"""Shared fixtures: a tiny synthetic dataset, tiny recipes, and a CLI runner on real subprocesses."""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]

# Ray 2.60 authenticates every RPC when asked to, and its client libraries read the token once
# per process. Every Ray this test session starts (local ones, loopback clusters, the CLI's)
# therefore shares one token, set before anything imports Ray.
os.environ.setdefault("RAY_AUTH_MODE", "token")
os.environ.setdefault("RAY_AUTH_TOKEN", secrets.token_hex(32))
# Ray Train's controller registers a reported checkpoint at its next poll of the workers, and the
# loop waits for that commit (workers/session.py). orchestrator/launcher.py sets 0.5 s for users;
# the test recipes checkpoint every 5 steps of a few tens of milliseconds, so here the poll is
# 0.1 s: about 3 s less per Ray run, the same code path.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.1")
TINY_SAMPLES = 240
TINY_EVAL = 32


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory: pytest.TempPathFactory) -> str:
    from storage.synth import synthesize

    uri = str(tmp_path_factory.mktemp("data") / "tiny")
    synthesize(uri, TINY_SAMPLES, seed=0, image_size=64, rows_per_group=32, rows_per_shard=128)
    return uri


def tiny_recipe(data_uri: str, **sections: Any) -> dict[str, Any]:
    """Three stages like the source's, small enough to train in seconds on one core."""
    recipe: dict[str, Any] = {
        "run": {"name": "tiny", "storage": "runs", "seed": 0, "deterministic": True},
        "data": {"uri": data_uri, "eval_samples": TINY_EVAL},
        "model": {"name": "unet224", "width": 0.125},
        "stages": [
            {"name": "spine", "forward": "spine", "trainable": ["spine"], "resolution": 16, "batch_size": 16,
             "chunk_size": 70, "lr": 0.01},
            {"name": "head_tail", "forward": "full", "trainable": ["head", "tail"], "resolution": 64, "batch_size": 8,
             "chunk_size": 70, "lr": 0.005},
            {"name": "full", "forward": "full", "trainable": ["all"], "resolution": 64, "batch_size": 8,
             "chunk_size": 104, "lr": 0.002},
        ],
        "checkpoint": {"every_steps": 5, "every_seconds": 3600, "keep": 3},
        "tracking": {"uri": "sqlite:///mlflow.db", "experiment": "tests"},
        "execution": {"backend": "local", "num_workers": 1, "cpus_per_worker": 1},
    }
    for key, value in sections.items():
        if isinstance(value, dict):
            recipe.setdefault(key, {}).update(value)
        else:
            recipe[key] = value
    return recipe


def write_recipe(path: Path, recipe: dict[str, Any]) -> str:
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return str(path)


def cli_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    # This interpreter first on PATH: a loopback cluster's Ray Jobs run `python -m orchestrator.cli`.
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    env.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    return env


def run_cli(*args: str, cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", *args], cwd=cwd, env=cli_env(),
        capture_output=True, text=True, timeout=timeout,
    )


# What the zygote imports before forking: the CLI, and the libraries its commands import lazily that cost
# the most to import (torch alone about 2 s on 2 cores). A module missing here costs time, never a result.
CLI_PRELOAD = ("orchestrator.cli", "torch", "yaml", "pydantic.main", "pydantic.type_adapter", "fsspec",
               "pyarrow.parquet", "PIL.Image", "sqlite3", "rich.progress", "zoneinfo", "cloudpickle")


def cli_in_process(capsys: pytest.CaptureFixture, *args: str) -> tuple[int, str]:
    """`orchestrator ARGS` through the CLI's own main() in this process (no interpreter start-up):
    (exit code, stderr); stdout stays in capsys."""
    from orchestrator import cli

    argv = sys.argv
    handler = signal.getsignal(signal.SIGTERM)
    sys.argv = ["orchestrator", *args]
    try:
        cli.main()
        code = 0
    except SystemExit as exc:
        code = int(exc.code or 0)
    finally:
        sys.argv = argv
        signal.signal(signal.SIGTERM, handler)
    captured = capsys.readouterr()
    sys.stdout.write(captured.out)
    return code, captured.err


def run_cli_many(calls: list[tuple[list[str], Path]], timeout: float = 120,
                 parallel: int = 2) -> list[subprocess.CompletedProcess]:
    """run_cli for each (args, cwd), each its own process, forked from one interpreter that has imported
    the CLI and torch once (tests/cli_batch.py): a table of quick CLI cases in seconds instead of minutes.
    For calls that end by themselves quickly (bad input, refusals); a call that outlives `timeout` fails the test."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="cli-batch-") as tmp:
        work = Path(tmp)
        spec = {
            "calls": [{"args": list(args), "cwd": str(cwd), "stdout": str(work / f"{i}.out"),
                       "stderr": str(work / f"{i}.err")}
                      for i, (args, cwd) in enumerate(calls)],
            "parallel": parallel, "timeout": timeout, "preload": list(CLI_PRELOAD),
            "results": str(work / "results.json"),
        }
        (work / "spec.json").write_text(json.dumps(spec))
        zygote = subprocess.run([sys.executable, "-m", "tests.cli_batch", str(work / "spec.json")],
                                cwd=REPO, env=cli_env(), capture_output=True, text=True,
                                timeout=timeout * len(calls) + 120)
        assert zygote.returncode == 0, f"tests/cli_batch.py failed:\n{zygote.stdout}\n{zygote.stderr}"
        # Whatever the preloaded imports print (a warning) would reach each call's stderr in a process of its
        # own, but stays with the zygote here: it must print nothing, or the calls' output would look cleaner.
        assert not zygote.stdout + zygote.stderr, f"the preloaded imports printed:\n{zygote.stdout}\n{zygote.stderr}"
        results = json.loads((work / "results.json").read_text())
        out = []
        for (args, _), call, result in zip(calls, spec["calls"], results, strict=True):
            assert not result["timed_out"], f"orchestrator {' '.join(args)} still running after {timeout} s"
            out.append(subprocess.CompletedProcess(
                [sys.executable, "-m", "orchestrator.cli", *args], result["returncode"],
                Path(call["stdout"]).read_text(), Path(call["stderr"]).read_text()))
        return out


def start_cli(*args: str, cwd: Path, log: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    """A real `orchestrator` process in its own session, so a test can SIGKILL it (and sweep up after);
    `env` adds variables (a fault injection) to its environment."""
    return subprocess.Popen(
        [sys.executable, "-m", "orchestrator.cli", *args], cwd=cwd, env={**cli_env(), **(env or {})},
        stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True,
    )


def kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=30)


def wait_for_cursor(run_dir: Path, predicate, proc: subprocess.Popen, timeout: float = 300) -> dict[str, Any]:
    """Poll cursor.json (rewritten at every checkpoint) until predicate(cursor) holds."""
    return wait_for_json(run_dir / "cursor.json", lambda d: predicate(d["cursor"]), proc, timeout)["cursor"]


def wait_for_json(path: Path, predicate, proc: subprocess.Popen, timeout: float = 300) -> dict[str, Any]:
    """Poll a JSON file the run rewrites (cursor.json, progress.json) until predicate(its content) holds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"run exited early with {proc.returncode}")
        try:
            content = json.loads(path.read_text())
            if predicate(content):
                return content
        except (FileNotFoundError, json.JSONDecodeError):
            pass
        time.sleep(0.02)
    raise AssertionError("timed out waiting for the run to reach the kill point")


def status_json(cwd: Path, name: str = "tiny") -> dict[str, Any]:
    res = run_cli("status", name, "--json", cwd=cwd)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)


def mlflow_history(cwd: Path, run_id: str, key: str) -> list[tuple[int, float]]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{cwd / 'mlflow.db'}")
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def slow_recipe(data_uri: str, backend: str = "local") -> dict[str, Any]:
    """The tiny recipe with a longer stage 2 (18 steps a chunk, steps 16 to 69 of 95), so a test can
    cut it there; one CPU thread everywhere."""
    r = tiny_recipe(data_uri, execution={"backend": backend, "num_workers": 1, "cpus_per_worker": 1})
    r["stages"][1]["epochs_per_chunk"] = 2
    return r


@pytest.fixture(scope="session")
def reference_run(tmp_path_factory: pytest.TempPathFactory, tiny_dataset: str) -> Path:
    """The folder (r.yaml, runs/, mlflow.db) of slow_recipe trained in-process without interruption, once
    per session. Read it, or copy it (copy_run) to work on: never change it in place."""
    d = tmp_path_factory.mktemp("reference")
    res = run_cli("run", write_recipe(d / "r.yaml", slow_recipe(tiny_dataset)), cwd=d)
    assert res.returncode == 0, res.stderr
    return d


def copy_run(reference: Path, dest: Path) -> Path:
    """A private copy of a finished run's folder (its recipe, run storage and MLflow store) at dest."""
    import shutil

    for name in ("r.yaml", "mlflow.db"):
        shutil.copy2(reference / name, dest / name)
    shutil.copytree(reference / "runs", dest / "runs")
    return dest


@pytest.fixture(scope="session")
def reference_final(reference_run: Path) -> dict[str, Any]:
    """status's `final` (weights_sha256, metrics) of slow_recipe trained in-process without interruption."""
    return status_json(reference_run)["final"]


@pytest.fixture(scope="session")
def reference_sha(reference_final: dict[str, Any]) -> str:
    return reference_final["weights_sha256"]


def assert_completed_exactly_once(cwd: Path, reference: str | None, interruptions: int = 1) -> dict[str, Any]:
    """The invariants every interrupted run must end with; `reference` None where the weights
    cannot match the reference run's (another recipe, or a world size that changed)."""
    from mlflow.tracking import MlflowClient

    st = status_json(cwd)
    assert st["state"] == "completed", st
    assert st["interruptions"] == interruptions, st["interruption_log"]
    assert all(c["times_trained"] == 1 for c in st["chunk_log"]), st["chunk_log"]
    if reference is not None:
        assert st["final"]["weights_sha256"] == reference, "weights differ from the uninterrupted run"
    client = MlflowClient(tracking_uri=f"sqlite:///{cwd / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("tests").experiment_id])
    assert len(runs) == 1, "a restart forked a second MLflow run"
    steps = [s for s, _ in mlflow_history(cwd, st["mlflow_run_id"], "train/loss")]
    assert steps == list(range(1, st["global_step"] + 1)), "not exactly one train/loss point per step"
    return st


@pytest.fixture(autouse=True)
def _signal_handlers_restored() -> Any:
    """A test that runs the CLI or the runner in-process may leave its SIGINT/SIGTERM handler installed; the
    next test would then see a Ctrl-C (or the lease heartbeat's interrupt_main) handled by a run long gone."""
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    yield
    for sig, handler in saved.items():
        if handler is not None and signal.getsignal(sig) is not handler:
            signal.signal(sig, handler)


# The core kept green on the oldest declared torch (2.11) and numpy, and on Colab's Python 3.13, besides CI's
# full suite on 3.11 and torch 2.13: training, kill-and-resume, checkpoints, precision, the models and losses,
# and what installing promises. `python -m pytest -m core` (README "Python and torch versions").
CORE_MODULES = {
    "test_training.py", "test_fault_tolerance.py", "test_background_checkpoint.py", "test_tracking_survives.py",
    "test_precision.py", "test_models.py", "test_losses.py", "test_recipe.py", "test_packaging.py",
    "test_colab_install.py",
}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if item.path.name in CORE_MODULES:
            item.add_marker(pytest.mark.core)
