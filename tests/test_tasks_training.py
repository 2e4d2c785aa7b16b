"""Every task trains with the same guarantees as mask_depth: a real SIGKILL mid-run, then the
same command, ends with weights bit-identical to an uninterrupted run's, every chunk trained
once, and exactly one MLflow point per (metric, step). Plus the acceptance on real data:
scikit-learn's handwritten digits (1,797 real images) through `data pack --task classification`
and recipes/basenet.yaml reach a held-out accuracy of 0.95.

One uninterrupted and one killed run per task, in-process backend (the Ray path of the same
loop is covered for mask_depth by test_fault_tolerance/test_cluster).
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import (
    assert_completed_exactly_once,
    kill_group,
    run_cli,
    start_cli,
    status_json,
    wait_for_cursor,
    write_recipe,
)

SAMPLES, EVAL = 120, 24
# (model section, resolution, dataset image size) per task: the smallest member of each family.
TASK_SETUPS: dict[str, dict[str, Any]] = {
    "classification": {"model": {"name": "basenet", "variant": "bn"}, "resolution": 28, "image_size": 28},
    "segmentation": {"model": {"name": "resnet18_seg", "variant": "baseline"}, "resolution": 32, "image_size": 48},
    "depth": {"model": {"name": "mobilenetv2_depth", "variant": "cpu"}, "resolution": 32, "image_size": 48},
}


@pytest.fixture(scope="module")
def task_datasets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    from storage.synth_tasks import synthesize_task

    root = tmp_path_factory.mktemp("task-data")
    out = {}
    for task, setup in TASK_SETUPS.items():
        uri = str(root / task)
        synthesize_task(task, uri, SAMPLES, seed=0, image_size=setup["image_size"], rows_per_group=16,
                        rows_per_shard=64)
        out[task] = uri
    return out


def task_recipe(task: str, data_uri: str) -> dict[str, Any]:
    setup = TASK_SETUPS[task]
    return {
        "task": task,
        "run": {"name": "tiny", "storage": "runs", "seed": 0, "deterministic": True},
        "data": {"uri": data_uri, "eval_samples": EVAL, "hflip": 0.5},
        "model": setup["model"],
        "loss": {"depth": {"l1": 0.1, "ssim": 1.0}} if task == "depth" else {},
        # Two stages, the second re-using the first's weights: a resume must rebuild the right optimizer.
        "stages": [
            {"name": "first", "resolution": setup["resolution"], "batch_size": 16, "chunk_size": 48,
             "epochs_per_chunk": 2, "lr": 0.003},
            {"name": "second", "resolution": setup["resolution"], "batch_size": 16, "chunk_size": 96, "lr": 0.001},
        ],
        "checkpoint": {"every_steps": 4, "every_seconds": 3600, "keep": 2},
        "tracking": {"uri": "sqlite:///mlflow.db", "experiment": "tests", "grid_samples": 2},
        "execution": {"backend": "local", "num_workers": 1, "cpus_per_worker": 1},
    }


def _every_metric_once_per_step(cwd: Path, run_id: str) -> set[str]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{cwd / 'mlflow.db'}")
    keys = set(client.get_run(run_id).data.metrics)
    for key in keys:
        steps = [m.step for m in client.get_metric_history(run_id, key)]
        assert len(steps) == len(set(steps)), f"{key}: more than one point at a step ({sorted(steps)})"
    return keys


# The task's metric keys, each with its trivial baseline, as the contract names them.
EXPECTED_METRICS = {
    "classification": {"eval/accuracy", "eval/accuracy_baseline"},
    "segmentation": {"eval/miou", "eval/map", "eval/miou_baseline", "eval/iou/background", "eval/ap/background"},
    "depth": {"eval/a1", "eval/a2", "eval/a3", "eval/rel", "eval/rms", "eval/log10", "eval/rms_baseline"},
}


@pytest.mark.parametrize("task", list(TASK_SETUPS))
def test_a_sigkilled_run_of_every_task_resumes_to_the_uninterrupted_weights(task: str, task_datasets, tmp_path: Path):
    data = task_datasets[task]
    ref_dir, cut_dir = tmp_path / "reference", tmp_path / "cut"
    ref_dir.mkdir()
    cut_dir.mkdir()
    res = run_cli("run", write_recipe(ref_dir / "r.yaml", task_recipe(task, data)), cwd=ref_dir)
    assert res.returncode == 0, res.stderr
    reference = status_json(ref_dir)
    assert EXPECTED_METRICS[task] <= set(reference["final"]["metrics"]), reference["final"]["metrics"]
    # compare tables the run under its task's columns.
    table = json.loads(run_cli("compare", "tests", "--json", cwd=ref_dir).stdout)
    keys = {c["key"] for c in table["columns"]}
    assert {k for k in keys if k.startswith("eval/")} <= EXPECTED_METRICS[task], keys
    assert table["runs"][0]["task"] == task and all(table["runs"][0].get(k) is not None
                                                    for k in keys if k.startswith("eval/"))

    recipe = write_recipe(cut_dir / "r.yaml", task_recipe(task, data))
    proc = start_cli("run", recipe, cwd=cut_dir, log=cut_dir / "first.log")
    try:
        # Past the first stage's first checkpoint and mid-chunk: the kill loses steps that the resume retrains.
        wait_for_cursor(cut_dir / "runs" / "tiny", lambda c: c["global_step"] >= 8 and c["batch"] > 0, proc)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        kill_group(proc)
    res = run_cli("run", recipe, cwd=cut_dir)
    assert res.returncode == 0, res.stderr + (cut_dir / "first.log").read_text()
    st = assert_completed_exactly_once(cut_dir, reference["final"]["weights_sha256"])
    assert st["final"]["metrics"] == reference["final"]["metrics"]
    assert EXPECTED_METRICS[task] <= _every_metric_once_per_step(cut_dir, st["mlflow_run_id"])
    # The prediction picture of each stage reached MLflow.
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{cut_dir / 'mlflow.db'}")
    pictures = [a.path for a in client.list_artifacts(st["mlflow_run_id"], "predictions")]
    assert pictures == ["predictions/stage1-first.png", "predictions/stage2-second.png"], pictures


def test_real_digits_packed_as_an_imagefolder_train_past_095_with_basenet_recipe(tmp_path: Path):
    """Acceptance on real data: sklearn's 1,797 handwritten digits, written as an ImageFolder tree
    (28x28), packed with --task classification and trained with recipes/basenet.yaml unchanged
    but for where the data and the run live."""
    pytest.importorskip("sklearn")
    from storage.layouts.digits import write_digits_imagefolder

    write_digits_imagefolder(str(tmp_path / "digits"), size=28)
    res = run_cli("data", "pack", str(tmp_path / "digits"), str(tmp_path / "packed"), "--task", "classification",
                  cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    recipe = str(Path(__file__).resolve().parents[1] / "recipes" / "basenet.yaml")
    res = run_cli("run", recipe, "--set", f"data.uri={tmp_path / 'packed'}", "--set", "execution.backend=local",
                  "--set", "tracking.experiment=tests", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    st = status_json(tmp_path, "basenet")
    metrics = st["final"]["metrics"]
    assert metrics["eval/accuracy"] >= 0.95, metrics
    assert metrics["eval/accuracy_baseline"] < 0.2, metrics  # ten balanced classes: the baseline is ~0.1
    assert len([k for k in metrics if k.startswith("eval/accuracy/")]) == 10
    print(json.dumps({"digits_accuracy": metrics["eval/accuracy"], "steps": st["global_step"]}))
