"""`orchestrator study`: one conv layer at a time approximate on a finished depth run, each layer's
result committed once (a file, then MLflow), a SIGKILLed study resumed computing only what is
missing, and bad specs refused in one line with exit 2.

One tiny depth run (mobilenetv2_depth/cpu at 32 px on 120 synthetic rooms) is trained once for the
module; the studies score its layers on 5 held-out images.
"""

from __future__ import annotations

import copy
import csv
import json
import os
import shutil
import signal
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from tests.conftest import cli_in_process, kill_group, run_cli, start_cli, write_recipe

RUN = "tinydepth"
# A few layers of every kind, given in both spellings: the model's own and the updates' (Encoder.0.0).
FEW_LAYERS = ["Encoder.0.0", "encoder.features.1.conv.0.0", "encoder.features.2.conv.0.0", "Encoder.2.2",
              "Decoder.up0.convB", "decoder.conv3"]
FEW_CANONICAL = ["encoder.features.0.0", "encoder.features.1.conv.0.0", "encoder.features.2.conv.0.0",
                 "encoder.features.2.conv.2", "decoder.up0.convB", "decoder.conv3"]


@pytest.fixture(scope="module")
def depth_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with a completed depth run `tinydepth` under runs/ and its MLflow store."""
    from storage.synth_tasks import synthesize_task

    root = tmp_path_factory.mktemp("study")
    synthesize_task("depth", str(root / "data"), 120, image_size=32)
    recipe = {
        "task": "depth",
        "run": {"name": RUN, "storage": "runs", "seed": 0, "deterministic": True},
        "data": {"uri": str(root / "data"), "eval_samples": 20},
        "model": {"name": "mobilenetv2_depth", "variant": "cpu"},
        "loss": {"depth": {"l1": 0.1, "ssim": 1.0}},
        "stages": [{"name": "train", "resolution": 32, "batch_size": 16, "chunk_size": 100, "epochs_per_chunk": 2,
                    "lr": 0.003}],
        "checkpoint": {"every_steps": 50, "every_seconds": 3600, "keep": 2},
        "tracking": {"uri": "sqlite:///mlflow.db", "experiment": "tests"},
        "execution": {"backend": "local", "num_workers": 1, "cpus_per_worker": 1},
    }
    res = run_cli("run", write_recipe(root / "recipe.yaml", recipe), cwd=root)
    assert res.returncode == 0, res.stderr
    return root


def study_spec(root: Path, name: str, **over: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "name": name,
        "storage": str(root / "runs"),
        "model_from": RUN,
        "layers": FEW_LAYERS,
        "multiplier": "truncated8",
        "scalings": [{"kind": "fixed", "input": 10, "weight": 100},
                     {"kind": "calibrated", "method": "percentile", "percentile": 99.99, "calibration_samples": 8}],
        "eval": {"samples": 5},
        "tracking": {"uri": f"sqlite:///{root / 'mlflow.db'}", "experiment": "tests"},
        "execution": {"backend": "local"},
    }
    spec.update(copy.deepcopy(over))
    return spec


def write_spec(root: Path, spec: dict[str, Any]) -> str:
    path = root / f"{spec['name']}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return str(path)


def layer_files(root: Path, name: str) -> dict[str, tuple[float, bytes]]:
    base = root / "runs" / "studies" / name / "layers"
    return {str(p.relative_to(base)): (p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(base.rglob("*.json"))}


def table(root: Path, name: str) -> list[dict[str, str]]:
    """The study's CSV without the timing column, which no two studies share."""
    with open(root / "runs" / "studies" / name / "table.csv") as f:
        return [{k: v for k, v in row.items() if k != "seconds"} for row in csv.DictReader(f)]


def assert_one_point_per_layer_and_key(root: Path, run_id: str, scalings: list[str], layers: int) -> None:
    from mlflow.tracking import MlflowClient

    from orchestrator.study import LAYER_KEYS

    client = MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
    for s in scalings:
        for key in LAYER_KEYS:
            steps = sorted(m.step for m in client.get_metric_history(run_id, f"study/{s}/{key}"))
            assert steps == list(range(layers)), f"study/{s}/{key}: steps {steps}"


def test_a_study_commits_every_layer_once_and_logs_one_mlflow_run_with_table_and_plot(depth_run: Path, capsys):
    """Each (scaling, layer) is one file and one MLflow point per key at step = its index; the run
    carries the CSV and the plot; compare lists the study; a re-run computes nothing."""
    from mlflow.tracking import MlflowClient

    root = depth_run
    path = write_spec(root, study_spec(root, "few"))
    code, stderr = cli_in_process(capsys, "study", path)
    assert code == 0, stderr
    assert "most sensitive" in stderr and "least sensitive" in stderr
    record = json.loads((root / "runs" / "studies" / "few" / "study.json").read_text())
    assert [x["layer"] for x in record["layers"]] == FEW_CANONICAL
    assert record["state"] == "completed" and record["attempts"][-1]["computed"] == 2 * (len(FEW_LAYERS) + 1)
    files = layer_files(root, "few")
    assert sorted(files) == sorted(f"{s}/{n}.json" for s in ("fixed_10x100", "calibrated_p99.99")
                                   for n in FEW_CANONICAL)
    first = json.loads(files["fixed_10x100/decoder.conv3.json"][1])
    assert first["index"] == 5 and first["kind"] == "dense" and first["part"] == "decoder"
    assert {"a1", "rms", "delta_rms", "saturation_inputs", "saturation_weights", "seconds"} <= set(first)

    client = MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
    run = client.get_run(record["mlflow_run_id"])
    assert run.info.run_name == "few" and run.info.status == "FINISHED"
    assert run.data.tags["orchestrator.kind"] == "study" and "orchestrator.run_name" not in run.data.tags
    assert_one_point_per_layer_and_key(root, run.info.run_id, ["fixed_10x100", "calibrated_p99.99"], len(FEW_LAYERS))
    arts = {a.path for a in client.list_artifacts(run.info.run_id, "study")}
    assert {"study/layers.csv", "study/sensitivity.png", "study/layers.json"} <= arts
    csv_rows = table(root, "few")
    assert len(csv_rows) == 1 + 2 * (1 + len(FEW_LAYERS))  # float, then per scaling: exact-table reference + layers
    assert (root / "runs" / "studies" / "few" / "sensitivity.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # compare: training runs in their table, studies in their own.
    capsys.readouterr()
    code, stderr = cli_in_process(capsys, "compare", "tests", "--json", "--tracking-uri",
                                  f"sqlite:///{root / 'mlflow.db'}")
    assert code == 0, stderr
    cmp = json.loads(capsys.readouterr().out)
    assert [r["run_name"] for r in cmp["runs"]] == [RUN]
    few = [r for r in cmp["studies"] if r["study"] == "few"]
    assert {r["scaling"] for r in few} == {"fixed_10x100", "calibrated_p99.99"}
    assert all(r["layers_done"] == f"{len(FEW_LAYERS)}/{len(FEW_LAYERS)}" and r["most_sensitive"] for r in few)

    # The same command again: reported, nothing recomputed, nothing re-sent.
    code, stderr = cli_in_process(capsys, "study", path)
    assert code == 0, stderr
    assert "already completed" in stderr
    assert layer_files(root, "few") == files
    assert_one_point_per_layer_and_key(root, run.info.run_id, ["fixed_10x100", "calibrated_p99.99"], len(FEW_LAYERS))

    # A torn result file (a store without atomic rename, cut mid-write) is computed again, alone.
    key = "calibrated_p99.99/decoder.up0.convB.json"
    (root / "runs" / "studies" / "few" / "layers" / key).write_bytes(files[key][1][:40])
    code, stderr = cli_in_process(capsys, "study", path)
    assert code == 0, stderr
    record = json.loads((root / "runs" / "studies" / "few" / "study.json").read_text())
    assert record["attempts"][-1]["computed"] == 1
    again = layer_files(root, "few")
    assert {k: v for k, v in again.items() if k != key} == {k: v for k, v in files.items() if k != key}
    volatile = ("seconds", "attempt", "committed_at", "worker")
    redone, first_time = json.loads(again[key][1]), json.loads(files[key][1])
    assert {k: v for k, v in redone.items() if k not in volatile} == {k: v
                                                                      for k, v in first_time.items() if k
                                                                      not in volatile}
    assert_one_point_per_layer_and_key(root, run.info.run_id, ["fixed_10x100", "calibrated_p99.99"], len(FEW_LAYERS))


def test_with_the_exact_table_every_layer_scores_as_the_float_model_within_the_quantization_error(depth_run: Path,
                                                                                                  capsys):
    """The approximate path with exact products and each layer's own calibrated range differs from
    the float model only by rounding: every layer's metrics stay next to the float model's."""
    root = depth_run
    spec = study_spec(root, "exact", layers="all", multiplier="exact",
                      scalings=[{"kind": "calibrated", "method": "minmax", "calibration_samples": 8}])
    code, stderr = cli_in_process(capsys, "study", write_spec(root, spec))
    assert code == 0, stderr
    rows = [r for r in table(root, "exact") if r["kind"] != "reference"]
    float_rms = float(table(root, "exact")[0]["rms"])
    assert len(rows) == 66  # MobileNetV2's 52 encoder convs + the decoder's 14
    for r in rows:
        assert abs(float(r["delta_rms"])) < 0.01 * float_rms, r
        assert abs(float(r["delta_a1"])) < 0.02, r
        # minmax on training images: an eval image may reach a little past a layer's calibrated range
        assert float(r["saturation"]) < 0.01, r


def test_a_sigkilled_study_on_ray_resumes_computing_only_the_missing_layers(depth_run: Path, capsys):
    """SIGKILL the study (driver and its local Ray) mid-way, run the same command: committed layers
    are kept as they are (same bytes, same mtime), only the rest is computed, MLflow holds one
    point per (key, layer), and the table equals an uninterrupted study's. Each Ray worker
    process loaded the model once, whatever number of layers it scored."""
    root = depth_run
    layers, n = "decoder", 14
    spec = study_spec(root, "cut", layers=layers, scalings=[{"kind": "fixed", "input": 10, "weight": 100}],
                      execution={"backend": "ray", "num_workers": 2})
    path = write_spec(root, spec)
    env_before = os.environ.get("ORCHESTRATOR_TEST_STUDY_DELAY_S")
    os.environ["ORCHESTRATOR_TEST_STUDY_DELAY_S"] = "1"  # the CLI below inherits it: ~2 layers a second
    try:
        proc = start_cli("study", path, cwd=root, log=root / "cut-first.log")
        layer_dir = root / "runs" / "studies" / "cut" / "layers"
        try:
            deadline = time.monotonic() + 240
            while len(list(layer_dir.rglob("*.json"))) < 4:
                assert proc.poll() is None, (root / "cut-first.log").read_text()
                assert time.monotonic() < deadline, "the study never got going"
                time.sleep(0.05)
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
        finally:
            kill_group(proc)
    finally:
        if env_before is None:
            os.environ.pop("ORCHESTRATOR_TEST_STUDY_DELAY_S", None)
        else:
            os.environ["ORCHESTRATOR_TEST_STUDY_DELAY_S"] = env_before
    before = layer_files(root, "cut")
    assert 4 <= len(before) < n, f"the kill did not land mid-way: {len(before)} of {n} layers committed"

    # The resume runs in-process (execution may change between attempts; the Ray path is the cut one).
    res = run_cli("study", path, "--set", "execution.backend=local", cwd=root)
    assert res.returncode == 0, res.stderr + (root / "cut-first.log").read_text()
    assert "results committed, computing" in res.stderr, res.stderr
    after = layer_files(root, "cut")
    assert len(after) == n
    assert {k: after[k] for k in before} == before, "a committed layer was computed again"
    record = json.loads((root / "runs" / "studies" / "cut" / "study.json").read_text())
    last = record["attempts"][-1]
    assert last["attempt"] == 2 and last["done_before"] >= len(before) and last["computed"] == last["to_compute"]
    assert last["done_before"] + last["computed"] == n + 1  # layers + the exact-table reference
    recomputed = {k for k, (_, data) in after.items() if json.loads(data)["attempt"] == 2}
    assert recomputed == set(after) - set(before)
    pids = {json.loads(data)["worker"]["pid"]: json.loads(data)["worker"]["context_loads"]
            for _, data in before.values()}
    assert set(pids.values()) == {1}, f"a Ray worker process loaded the model more than once: {pids}"
    assert_one_point_per_layer_and_key(root, record["mlflow_run_id"], ["fixed_10x100"], n)

    # An uninterrupted study of the same layers, in-process: the same table.
    reference = study_spec(root, "uncut", layers=layers, scalings=spec["scalings"])
    code, stderr = cli_in_process(capsys, "study", write_spec(root, reference))
    assert code == 0, stderr
    assert table(root, "cut") == table(root, "uncut")


def _one_error_line(code: int, stderr: str) -> str:
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert code == 2, stderr
    assert len(lines) == 1 and lines[0].startswith("error:") and "Traceback" not in stderr, stderr
    return lines[0]


def _copy_run(root: Path, name: str, edit: Any) -> None:
    src, dest = root / "runs" / RUN, root / "runs" / name
    if not dest.exists():
        shutil.copytree(src, dest, ignore=shutil.ignore_patterns("lease.json"))
        rec = json.loads((dest / "run.json").read_text())
        edit(rec)
        (dest / "run.json").write_text(json.dumps(rec))


def test_an_unknown_layer_exits_2_listing_close_matches(depth_run: Path, capsys):
    root = depth_run
    code, stderr = cli_in_process(capsys, "study",
                                  write_spec(root, study_spec(root, "bad-layer", layers=["decoder.up0.convC"])))
    line = _one_error_line(code, stderr)
    assert "'layers'" in line and "close matches" in line
    assert "decoder.up0.convC" in line and "decoder.up0.convB" in line
    assert not (root / "runs" / "studies" / "bad-layer" / "study.json").exists()


def test_a_product_table_of_the_wrong_shape_exits_2_naming_the_field(depth_run: Path, capsys):
    root = depth_run
    np.save(root / "wrong.npy", np.zeros((3, 5), dtype=np.int64))
    spec = study_spec(root, "bad-table", multiplier=str(root / "wrong.npy"))
    line = _one_error_line(*cli_in_process(capsys, "study", write_spec(root, spec)))
    assert "'multiplier'" in line and "wrong.npy" in line


def test_a_run_that_is_not_completed_exits_2(depth_run: Path, capsys):
    root = depth_run
    _copy_run(root, "unfinished", lambda rec: rec.update(state="interrupted"))
    spec = study_spec(root, "bad-unfinished", model_from="unfinished")
    line = _one_error_line(*cli_in_process(capsys, "study", write_spec(root, spec)))
    assert "'model_from'" in line and "unfinished" in line and "not completed" in line


def test_a_run_of_another_task_exits_2(depth_run: Path, capsys):
    root = depth_run
    _copy_run(root, "segmenter", lambda rec: rec["recipe"].update(task="segmentation"))
    spec = study_spec(root, "bad-task", model_from="segmenter")
    line = _one_error_line(*cli_in_process(capsys, "study", write_spec(root, spec)))
    assert "'model_from'" in line and "segmentation" in line and "depth" in line


def test_a_misspelled_spec_field_exits_2_naming_it(depth_run: Path, capsys):
    root = depth_run
    spec = study_spec(root, "bad-field", scalings=[{"kind": "fixed", "inptu": 10}])
    line = _one_error_line(*cli_in_process(capsys, "study", write_spec(root, spec)))
    assert "scalings.0.inptu" in line and "unknown field" in line
    line = _one_error_line(*cli_in_process(capsys, "study", write_spec(root, study_spec(root, "bad-set")),
                                           "--set", "scalings.0.kind=rounded"))
    assert "scalings.0" in line and "rounded" in line


def test_list_layers_prints_every_conv_layer_with_kind_shape_and_multiplies(depth_run: Path, capsys):
    """--list-layers also takes model_from as a checkpoint folder of the run."""
    root = depth_run
    ckpt = sorted((root / "runs" / RUN).glob("ckpt-*"))[-1]  # the newest (checkpoint.keep is at least 2)
    capsys.readouterr()
    code, stderr = cli_in_process(capsys, "study", write_spec(root, study_spec(root, "listing", model_from=str(ckpt))),
                                  "--list-layers")
    out = capsys.readouterr().out
    assert code == 0, stderr
    assert "66 conv layers" in out and "decoder.up0.convB" in out and "Encoder.0.0" in out
    assert "depthwise" in out and "16x3x3x3" in out and "110,592" in out  # the first conv: 16x16 outputs x 27 x 16
    assert not (root / "runs" / "studies" / "listing").exists()


def test_replaying_the_float_prefix_gives_the_same_metrics_as_a_full_forward():
    """A swap re-runs only what follows the swapped layer (workers/study.py PrefixCache); scored
    in an order that goes back and forth between encoder and decoder, every layer's metrics equal
    those of a full forward, to the last bit."""
    import torch

    from workers.approx.multipliers import table_by_name
    from workers.models.registry import build_model
    from workers.study import StudyContext

    torch.manual_seed(0)
    model = build_model("mobilenetv2_depth", "cpu")
    recipe = {"task": "depth", "run": {"name": "x"}, "model": {"name": "mobilenetv2_depth", "variant": "cpu"},
              "loss": {"depth": {"l1": 1.0}},
              "stages": [{"name": "s", "resolution": 32, "batch_size": 2, "chunk_size": 8, "lr": 0.1}]}
    payload = {"key": "k", "recipe": recipe, "state_dict": model.state_dict(), "batch_size": 2, "torch_threads": 1,
               "task_info": {"depth_scale": 1000, "min_depth_m": 0.1, "max_depth_m": 10.0, "baseline_depth_m": 3.0},
               "images": torch.randn(5, 3, 32, 32), "targets": torch.rand(5, 1, 32, 32) * 9 + 0.5}
    replaying, full = StudyContext(payload), StudyContext({**payload, "prefix_cache": False})
    table = table_by_name("mitchell")
    # The first swap is the first layer: a prefix recorded with any swap in place would taint all that follows.
    for name in ("encoder.features.0.0", "decoder.up3.convB", "encoder.features.3.conv.1.0",
                 "encoder.features.16.conv.2",
                 "decoder.conv2", "decoder.conv3"):
        a = replaying.evaluate([name], table, {name: 20.0}, {name: 200.0})
        b = full.evaluate([name], table, {name: 20.0}, {name: 200.0})
        assert a["metrics"] == b["metrics"] and a["saturation"] == b["saturation"], name
    assert replaying.prefix is not None and full.prefix is None
