"""LR range test: exponential LR sweep, curve and plot in MLflow, a max_lr suggestion."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from tests.conftest import run_cli, tiny_recipe, write_recipe
from workers.lr_range import LRCurve


def test_suggestion_is_the_steepest_fall_of_the_loss_before_its_minimum():
    lrs = list(np.logspace(-5, 0, 101))
    x = np.log10(lrs)
    # A smooth drop centred at lr 1e-3 (steepest there), minimum near 1e-2, then divergence.
    losses = list(1.0 - 0.8 / (1 + np.exp(-(x + 3) * 4)) + np.where(x > -2, (x + 2) ** 2 * 2, 0))
    s = LRCurve(lrs=lrs, losses=losses, raw=losses).suggestion()
    assert abs(np.log10(s["max_lr"]) - (-3)) <= 0.1
    assert s["max_lr"] < s["lr_at_min_loss"]


def test_lr_find_logs_the_curve_and_plot_to_mlflow_and_suggests_a_max_lr(tmp_path: Path, tiny_dataset):
    from mlflow.tracking import MlflowClient

    path = write_recipe(tmp_path / "r.yaml", tiny_recipe(tiny_dataset))
    res = run_cli("lr-find", path, "--stage", "head_tail", "--steps", "30", "--min-lr", "1e-5", "--max-lr", "1",
                  "--json", cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout)
    assert out["stage"] == "head_tail" and 1e-5 <= out["suggested_max_lr"] <= 1

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    run = client.get_run(out["mlflow_run_id"])
    assert run.data.tags["orchestrator.kind"] == "lr-find" and run.info.status == "FINISHED"
    lrs = [m.value for m in sorted(client.get_metric_history(run.info.run_id, "lr_find/lr"), key=lambda m: m.step)]
    assert len(lrs) == out["steps_run"] and all(b > a for a, b in zip(lrs, lrs[1:], strict=False))
    assert abs(lrs[0] - 1e-5) < 1e-12
    assert [a.path for a in client.list_artifacts(run.info.run_id)] == ["lr_find_head_tail.png"]
    # A side run: compare leaves it out of the experiment's table.
    res = run_cli("compare", "tests", "--json", cwd=tmp_path)
    assert json.loads(res.stdout)["runs"] == []


def test_lr_find_names_an_unknown_stage(tmp_path: Path, tiny_dataset):
    path = write_recipe(tmp_path / "r.yaml", tiny_recipe(tiny_dataset))
    res = run_cli("lr-find", path, "--stage", "nope", cwd=tmp_path)
    assert res.returncode == 2 and "--stage 'nope'" in res.stderr and "head_tail" in res.stderr
