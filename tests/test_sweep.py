"""Sweeps run concurrent Ray Tune trials, one orchestrator run each; `compare` tables them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from tests.conftest import run_cli, tiny_recipe, write_recipe

# Two runs: what is checked is the sweep (runs, params, compare, resume); each loss is trained in
# tests/test_losses.py. Four runs took 267 s of the suite on 2 cores.
PAIRS = [({"dice": 1}, {"berhu": 1}), ({"tversky": 1}, {"grad": 1})]


def _sweep_file(tmp_path: Path, data: str) -> str:
    # On Ray Train, as quickstart.yaml runs: each trial drives its own worker group. One short
    # stage: what is checked is the sweep (runs, params, compare, resume), not the stages.
    base = tiny_recipe(data, execution={"backend": "ray", "num_workers": 1, "cpus_per_worker": 1})
    base["stages"] = [{"name": "spine", "forward": "spine", "trainable": ["spine"], "resolution": 16, "batch_size": 16,
                       "chunk_size": 104, "lr": 0.01}]
    write_recipe(tmp_path / "base.yaml", base)
    spec = {"sweep": {"name": "ls", "base": "base.yaml", "max_concurrent": 2, "set": {"tracking.experiment": "ls"},
                      "runs": [{"loss.mask": m, "loss.depth": d} for m, d in PAIRS]}}
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    return str(tmp_path / "sweep.yaml")


@pytest.mark.ray
def test_a_sweep_of_two_loss_pairs_completes_as_two_runs_and_compare_tables_them(tmp_path: Path, tiny_dataset):
    from mlflow.tracking import MlflowClient

    sweep = _sweep_file(tmp_path, tiny_dataset)
    res = run_cli("sweep", sweep, cwd=tmp_path)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]

    names = ["ls-dice-berhu", "ls-tversky-grad"]
    steps = {}
    for name in names:
        st = json.loads(run_cli("status", name, "--json", cwd=tmp_path).stdout)
        assert st["state"] == "completed" and all(c["times_trained"] == 1 for c in st["chunk_log"]), st
        steps[name] = st["global_step"]

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("ls").experiment_id])
    assert sorted(r.data.tags["orchestrator.run_name"] for r in runs) == sorted(names)
    by_name = {r.data.tags["orchestrator.run_name"]: r for r in runs}
    assert by_name["ls-tversky-grad"].data.params["loss.mask.tversky"] == "1.0"
    assert by_name["ls-tversky-grad"].data.params["loss.depth.grad"] == "1.0"

    table = json.loads(run_cli("compare", "ls", "--json", cwd=tmp_path).stdout)
    rows = {r["run_name"]: r for r in table["runs"]}
    assert sorted(rows) == sorted(names)
    assert rows["ls-dice-berhu"]["mask_loss"] == "dice" and rows["ls-dice-berhu"]["depth_loss"] == "berhu"
    assert all(r["steps"] == steps[n] and r["eval/mask_iou"] is not None and r["interruptions"] == 0
               for n, r in rows.items())
    best_iou = max(r["eval/mask_iou"] for r in rows.values())
    assert table["best"]["eval/mask_iou"] == [n for n, r in rows.items() if r["eval/mask_iou"] == best_iou]
    best_rmse = min(r["eval/depth_rmse"] for r in rows.values())
    assert table["best"]["eval/depth_rmse"] == [n for n, r in rows.items() if r["eval/depth_rmse"] == best_rmse]
    text = run_cli("compare", "ls", cwd=tmp_path).stdout
    assert all(n in text for n in names) and "*" in text

    # The sweep as a whole resumes: run again, nothing is trained twice and no run is added.
    again = run_cli("sweep", sweep, cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "all 2 runs completed already" in again.stderr  # reported without starting Ray and Tune
    assert len(client.search_runs([client.get_experiment_by_name("ls").experiment_id])) == 2
    for name in names:
        st = json.loads(run_cli("status", name, "--json", cwd=tmp_path).stdout)
        assert st["global_step"] == steps[name] and st["interruptions"] == 0


def test_a_sweep_file_with_an_unknown_key_names_it(tmp_path: Path, tiny_dataset):
    sweep = _sweep_file(tmp_path, tiny_dataset)
    data = yaml.safe_load(Path(sweep).read_text())
    data["sweep"]["grdi"] = {}
    Path(sweep).write_text(yaml.safe_dump(data))
    res = run_cli("sweep", sweep, "--dry-run", cwd=tmp_path)
    assert res.returncode == 2 and "sweep.grdi" in res.stderr, res.stderr


def test_a_sweep_with_an_unknown_loss_fails_before_any_run_starts(tmp_path: Path, tiny_dataset):
    sweep = _sweep_file(tmp_path, tiny_dataset)
    data = yaml.safe_load(Path(sweep).read_text())
    data["sweep"]["runs"][1]["loss.depth"] = {"berhuu": 1}
    Path(sweep).write_text(yaml.safe_dump(data))
    res = run_cli("sweep", sweep, cwd=tmp_path)
    assert res.returncode == 2 and "berhuu" in res.stderr and "valid:" in res.stderr, res.stderr
    assert not (tmp_path / "runs").exists()
