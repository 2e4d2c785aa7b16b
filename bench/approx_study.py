"""Wall time of the whole layer-sensitivity study `recipes/approx_mobilenetv2.yaml` (every encoder
and decoder conv layer of the full-width MobileNetV2 depth model at 224 px, one at a time, two
scalings, 5 images), through the real CLI: Ray start-up, model loads, calibration, MLflow and the
table and plot included. `bench.approx` reports it as `study_seconds`.

Same-run baseline: the seconds the study's float-model pass took, times the number of results:
what the study would cost if approximating a layer were free and nothing were replayed.

    python -m bench.approx_study [--workdir DIR] [--model-from RUN_OR_CHECKPOINT]

Without --model-from it first trains a short full-width run on 120 synthetic rooms (7 steps: the
weights only need to exist; timing does not depend on how well they predict).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "recipes" / "mobilenetv2_depth.yaml"
STUDY = REPO / "recipes" / "approx_mobilenetv2.yaml"
# A finished mobilenetv2_depth run in minutes: the full-width model, 224 px, 120 synthetic images.
SHORT_TRAINING = ("data.synth.samples=120", "data.eval_samples=20", "stages.train.chunk_size=100",
                  "stages.train.epochs_per_chunk=1", "execution.backend=local", "execution.cpus_per_worker=2")


def _cli(args: list[str], cwd: Path) -> None:
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    res = subprocess.run([sys.executable, "-m", "orchestrator.cli", *args], cwd=cwd, env=env, capture_output=True,
                         text=True)
    if res.returncode != 0:
        raise RuntimeError(f"orchestrator {' '.join(args)} exited {res.returncode}: {res.stderr[-2000:]}")


def study_seconds(workdir: str | None = None, model_from: str | None = None, study: str = str(STUDY),
                  extra_sets: tuple[str, ...] = ()) -> dict[str, Any]:
    """Run the study from scratch (a fresh study name) and time it; returns the figures as a dict."""
    wd = Path(workdir or tempfile.mkdtemp(prefix="bench-approx-study-"))
    wd.mkdir(parents=True, exist_ok=True)
    trained_s = None
    if model_from is None:
        if not (wd / "runs" / "mobilenetv2_depth" / "final.json").exists():
            started = time.perf_counter()
            _cli(["run", str(RECIPE), *[a for s in SHORT_TRAINING for a in ("--set", s)]], wd)
            trained_s = round(time.perf_counter() - started, 1)
        model_from = "mobilenetv2_depth"
    name = f"approx_bench_{int(time.time())}"
    sets = [f"name={name}", f"model_from={model_from}", *extra_sets]
    started = time.perf_counter()
    _cli(["study", study, *[a for s in sets for a in ("--set", s)]], wd)
    wall = time.perf_counter() - started
    sdir = wd / "runs" / "studies" / name
    record = json.loads((sdir / "study.json").read_text())
    exact = json.loads((sdir / "reference" / "exact.json").read_text())
    with open(sdir / "table.csv") as f:
        rows = [r for r in csv.DictReader(f) if r["kind"] != "reference"]
    results = record["attempts"][-1]["computed"]
    return {
        "study_seconds": round(wall, 1),
        "results": results,
        "layers": len(record["layers"]),
        "scalings": record["scalings"],
        "resolution_px": record["resolution"],
        "images": len(record["eval_ids"]),
        "layer_task_seconds_sum": round(sum(float(r["seconds"]) for r in rows), 1),
        "baseline_float_passes_seconds": round(float(exact["seconds"]) * results, 1),
        "model_from": model_from,
        "training_seconds": trained_s,
        "cpus": os.cpu_count(),
        "workdir": str(wd),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", default=None)
    p.add_argument("--model-from", default=None)
    a = p.parse_args()
    print(json.dumps(study_seconds(a.workdir, a.model_from), indent=2))


if __name__ == "__main__":
    main()
