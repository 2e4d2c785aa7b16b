"""`orchestrator study`: a layer-sensitivity study of approximate convolution on a trained depth model.

The driver resolves `model_from` to a finished depth run (its recipe, plan, data and final
weights) and plans the layer items; all model compute (the layer listing, the float model's
score, the calibration, one layer or a few at a time) runs in Ray tasks, or in-process through
workers/study.py when execution.backend is local; each result is committed as it comes back:

    <storage>/studies/<name>/
        study.json                       the record: spec, model identity, layer order, MLflow run id,
                                         state (orchestrator/engine/states.py), attempts
        reference/exact.json             the float model's metrics on the eval images
        reference/<scaling>.json         every studied layer at once through the approximate path with the
                                         exact product table: the quantization error alone
        calibration/<scaling>.json       per-layer input/weight scales (calibrated scalings)
        layers/<scaling>/<layer>.json    one layer's result, written whole (temp name + rename)
        table.csv, sensitivity.png       the table and the plot, once every layer is in

A re-run of the same command lists what is committed (a file that does not parse or does not
belong to this study is redone) and computes only the rest. A result reaches MLflow only after
its file is committed, and on resume the points MLflow already holds are not sent again, so the
study's one MLflow run holds exactly one point per (key, step) whatever the interruptions
(workers/mlflow_sink.py, any_order).

The package: source.py (model_from, layers, table), files.py (the folder, record, results),
compute.py (Ray tasks or in-process), plan.py (the items on the run engine), report.py (table,
plot, summary, progress).
"""

from __future__ import annotations

from typing import Any

from rich.console import Console

from common.errors import RecipeError, RunError
from common.study import StudySpec, layer_aliases
from orchestrator.engine.lease import DriverLease
from orchestrator.study.compute import Compute
from orchestrator.study.files import LAYER_KEYS, METRICS, SENSITIVITY_KEY, sensitivity, study_dir
from orchestrator.study.plan import StudyPlan
from orchestrator.study.source import resolve_model_from, select_layers
from storage import fs

__all__ = ["LAYER_KEYS", "METRICS", "SENSITIVITY_KEY", "list_layers", "run_study", "sensitivity"]


def run_study(spec: StudySpec, address: str | None = None, console: Console | None = None) -> dict[str, Any]:
    """Run the study to completion (or report it when complete); returns its summary."""
    console = console or Console(stderr=True)
    sdir = study_dir(spec)
    try:
        fs.probe_writable(sdir)
    except Exception as exc:  # noqa: BLE001 - one line naming the place
        raise RunError(f"storage {spec.storage}: cannot write the study folder {sdir} ({exc})") from None
    with DriverLease(sdir, spec.name, what="study"):
        return StudyPlan(spec, sdir, address, console).run()


def list_layers(spec: StudySpec, console: Console) -> list[dict[str, Any]]:
    """Every candidate layer: name, the updates' spelling, kind, part, weight shape, multiplies per
    image at the model's working resolution; * marks those the spec selects."""
    from rich.table import Table

    from workers.study import model_layers

    if not console.is_terminal:  # piped: 80 columns would cut the layer names
        console = Console(width=max(console.width, 150), soft_wrap=True)
    src = resolve_model_from(spec, load_weights=False)
    resolution = spec.eval.resolution or src.recipe.stages[-1].resolution
    infos = Compute(spec, None).call(model_layers, src.recipe.model_dump(mode="json"), resolution)
    try:
        chosen = {i["name"] for i in select_layers(spec, infos)}
    except RecipeError as exc:
        chosen = set()
        console.print(f"(the spec's layers do not resolve: {exc})", highlight=False, markup=False)
    variant = f"/{src.recipe.model.variant}" if src.recipe.model.variant else ""
    t = Table(title=f"{len(infos)} conv layers of run '{src.run_name}' ({src.recipe.model.name}{variant}) at "
                    f"{resolution} px; * = in this study")
    for col in ("", "#", "layer", "updates' name", "kind", "part", "weight shape", "multiplies"):
        t.add_column(col, justify="right" if col in ("#", "multiplies") else "left")
    rows = []
    for i, info in enumerate(infos):
        alias = _updates_name(info["name"])
        rows.append({"index": i, "layer": info["name"], "alias": alias, "kind": info["kind"], "part": info["part"],
                     "weight_shape": info["weight_shape"], "macs": info["macs"], "selected": info["name"] in chosen})
        t.add_row("*" if info["name"] in chosen else "", str(i), info["name"], alias, info["kind"], info["part"],
                  "x".join(map(str, info["weight_shape"])), f"{info['macs']:,}")
    console.print(t)
    console.print(f"total {sum(r['macs'] for r in rows):,} multiplies per image; in this study {len(chosen)} layers, "
                  f"{sum(r['macs'] for r in rows if r['selected']):,} multiplies", highlight=False)
    return rows


def _updates_name(name: str) -> str:
    alias = layer_aliases(name)[-1]
    head, _, rest = alias.partition(".")
    return f"{head.capitalize()}.{rest}" if rest else alias
