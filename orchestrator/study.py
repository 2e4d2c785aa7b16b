"""`orchestrator study`: a layer-sensitivity study of approximate convolution on a trained depth model.

The driver resolves `model_from` to a finished depth run (its recipe, plan, data and final
weights), plans the layers, scores the float model and the calibration, then hands one layer
(or a few) at a time to Ray tasks (workers/study.py) and commits each result as it comes back:

    <storage>/studies/<name>/
        study.json                       the record: spec, model identity, layer order, MLflow run id, attempts
        reference/exact.json             the float model's metrics on the eval images
        reference/<scaling>.json         every studied layer at once through the approximate path with the
                                         exact product table: the quantization error alone
        calibration/<scaling>.json       per-layer input/weight scales (calibrated scalings)
        layers/<scaling>/<layer>.json    one layer's result, written whole (temp name + rename)
        table.csv, sensitivity.png       the table and the plot, once every layer is in

A re-run of the same command lists what is committed (a file that does not parse or does not
belong to this study is redone) and computes only the rest. A result reaches MLflow only after
its file is committed, and on resume the points MLflow already holds are not sent again, so the
study's one MLflow run holds exactly one point per (key, step) whatever the interruptions.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

from rich.console import Console

from common.errors import RecipeError, RunError
from common.study import StudySpec, close_layer_names, layer_aliases, resolve_layer_name
from orchestrator import run_store, tracking
from orchestrator.lease import DriverLease
from storage import checkpoints, fs
from storage.layout import FINAL_JSON, RUN_JSON

log = logging.getLogger(__name__)

STUDY_JSON = "study.json"
METRICS = ("a1", "a2", "a3", "rel", "rms", "log10")
# What one layer's record holds besides its metrics, and the MLflow keys it becomes.
LAYER_KEYS = (*METRICS, *(f"delta_{m}" for m in METRICS), "saturation_inputs", "saturation_weights", "saturation", "seconds")
# The layer ranking: how far the rms (metres) moves from the float model's when that layer alone is
# approximate, either way (on a few images a small change can go either way by chance).
SENSITIVITY_KEY = "delta_rms"


def sensitivity(rec: dict[str, Any]) -> float:
    return abs(rec[SENSITIVITY_KEY])
# Tests only: a pause per layer inside the task, so a study can be cut mid-way.
TEST_DELAY_ENV = "ORCHESTRATOR_TEST_STUDY_DELAY_S"
CALIBRATION_SEED = 7  # which training images calibrate: fixed, so a re-made study calibrates alike
PLAIN_EVERY_S = 15.0


# ----------------------------------------------------------------------------------- model_from
@dataclass
class ModelSource:
    """A trained depth model and everything a study needs from its run."""

    run_name: str
    run_dir: str
    recipe: Any  # common.recipe.Recipe
    checkpoint: str
    data_uri: str
    state_dict: dict[str, Any] | None = None
    weights_sha256: str | None = None


def _bad_model_from(msg: str) -> RecipeError:
    return RecipeError(f"field 'model_from': {msg}")


def resolve_model_from(spec: StudySpec, load_weights: bool = True) -> ModelSource:
    """A run name under spec.storage, a run folder, or one of its checkpoint folders."""
    from orchestrator.recipes import validate_recipe

    root = fs.normalize(spec.storage)
    given = spec.model_from
    ckpt: str | None = None
    if "/" not in given and "://" not in given:
        run_dir = run_store.run_dir(root, given)
        if not fs.exists(fs.join(run_dir, RUN_JSON)):
            runs = [n for n in fs.listdir(root) if fs.exists(fs.join(root, n, RUN_JSON))]
            raise _bad_model_from(f"no run {given!r} under {root}; runs there: {', '.join(runs) or 'none'}")
    else:
        uri = fs.normalize(given)
        if fs.exists(fs.join(uri, RUN_JSON)):
            run_dir = uri
        elif fs.exists(fs.join(uri, checkpoints.META_FILE)):
            ckpt, run_dir = uri, fs.normalize(uri.rstrip("/").rsplit("/", 1)[0])
        else:
            raise _bad_model_from(f"{given} is neither a run folder (with {RUN_JSON}) nor a checkpoint folder (with {checkpoints.META_FILE})")
    rec = run_store.load(run_dir)
    if rec is None:
        raise _bad_model_from(f"{run_dir} holds no run record ({RUN_JSON}); name a run folder")
    task = rec.recipe.get("task", "mask_depth") if isinstance(rec.recipe, dict) else None
    if task != "depth":
        raise _bad_model_from(f"run {given!r} is a {task} run; a study needs a depth model (a run with task: depth)")
    if ckpt is None:
        if rec.state != "completed":
            raise _bad_model_from(f"run {given!r} is {rec.state}, not completed; finish it first (re-run its "
                                  "`orchestrator run` command), or name one of its checkpoint folders (model_from: RUN_DIR/ckpt-...)")
        final = run_store.read_optional(run_dir, FINAL_JSON) or {}
        ckpt = final.get("checkpoint")
        if not ckpt:
            raise RunError(f"{fs.join(run_dir, FINAL_JSON)}: names no checkpoint; the run's files are incomplete")
    recipe = validate_recipe(rec.recipe, source=fs.join(run_dir, RUN_JSON))
    src = ModelSource(rec.run_name, run_dir, recipe, ckpt, rec.data_uri)
    if load_weights:
        with tempfile.TemporaryDirectory(prefix="orch-study-") as tmp:
            try:
                state, _ = checkpoints.read_local(checkpoints.download(ckpt, tmp))
            except (checkpoints.CheckpointCorruptError, FileNotFoundError, RuntimeError) as exc:
                raise RunError(f"{ckpt}: cannot load the model ({exc})") from None
        src.state_dict = state["model"]
        src.weights_sha256 = checkpoints.weights_sha256(src.state_dict)
    return src


def build_model(src: ModelSource, task: Any) -> Any:
    from workers.models.registry import build_from_recipe

    model = build_from_recipe(src.recipe.model.model_copy(update={"init_from": None}), **task.model_kwargs())
    if src.state_dict is not None:
        model.load_state_dict(src.state_dict)
    return model.eval()


# ----------------------------------------------------------------------------------- layers
def select_layers(spec: StudySpec, infos: list[Any]) -> list[Any]:
    """The study's layers in study order: the model's order for a group, the given order for a list."""
    names = [i.name for i in infos]
    if isinstance(spec.layers, str):
        group = spec.layers
        chosen = [i for i in infos if group == "all" or i.part == group or i.kind == group]
        if not chosen:
            raise RecipeError(f"field 'layers': the model has no {group} conv layers; kinds here: "
                              f"{', '.join(sorted({i.kind for i in infos}))}, parts: {', '.join(sorted({i.part for i in infos}))}")
        return chosen
    by_name = {i.name: i for i in infos}
    out = []
    for given in spec.layers:
        name = resolve_layer_name(given, names)
        if name is None:
            close = close_layer_names(given, names)
            hint = f"close matches: {', '.join(close)}" if close else "no close match"
            raise RecipeError(f"field 'layers': unknown layer {given!r}; {hint} (`--list-layers` lists all {len(names)})")
        if by_name[name] not in out:
            out.append(by_name[name])
    return out


def load_table(spec: StudySpec) -> Any:
    from workers.approx.multipliers import table_by_name

    try:
        return table_by_name(spec.multiplier)
    except Exception as exc:  # noqa: BLE001 - a missing file, a wrong shape, an unknown name: all the spec's
        text = " ".join(str(exc).split())
        raise RecipeError(f"field 'multiplier': {spec.multiplier!r}: {text or type(exc).__name__}") from None


# ----------------------------------------------------------------------------------- the study's files
def study_dir(spec: StudySpec) -> str:
    return fs.join(fs.normalize(spec.storage), "studies", spec.name)


def layer_file(sdir: str, scaling: str, layer: str) -> str:
    return fs.join(sdir, "layers", scaling, f"{layer}.json")


def _read_valid(uri: str, sha: str, required: tuple[str, ...]) -> dict[str, Any] | None:
    """A committed result, or None when absent, torn or not this study's (it is then redone)."""
    try:
        data = fs.read_json(uri)
    except FileNotFoundError:
        return None
    except ValueError:
        log.warning("%s: not valid JSON; computing it again", uri)
        return None
    if not isinstance(data, dict) or data.get("spec_sha256") != sha or any(k not in data for k in required):
        log.warning("%s: not a result of this study; computing it again", uri)
        return None
    return data


def _finite(v: float) -> float | None:
    return v if isinstance(v, (int, float)) and math.isfinite(v) else None


@dataclass
class Item:
    """One unit of work: a scaling and the layers approximate in it (one, or all for a reference)."""

    id: str
    scaling: str
    layers: list[str]
    table: str  # "approx" or "exact"
    uri: str
    index: int | None = None  # the layer's step in the study order; None for a reference
    input_scale: dict[str, float] = field(default_factory=dict)
    weight_scale: dict[str, float] = field(default_factory=dict)

    def task_item(self) -> dict[str, Any]:
        return {"id": self.id, "layers": self.layers, "table": self.table,
                "input_scale": self.input_scale, "weight_scale": self.weight_scale}


class _StudyLease(DriverLease):
    def _refuse(self, other: Any) -> RunError:
        return RunError(f"study '{self.run_name}' is being run by {other.describe()}; if that driver is gone, its lease "
                        "lapses a minute after its last heartbeat; then re-run this command")


# ----------------------------------------------------------------------------------- MLflow
class StudyTracker:
    """The study's one MLflow run: points go out once each, whatever the restarts.

    Points are queued once their result is committed and sent together every FLUSH_EVERY_S
    (one sqlite write costs ~40 ms; a small model's layer takes less); a cut loses only the
    queue, and the next attempt sends those results' points from their committed files."""

    FLUSH_EVERY_S = 5.0

    def __init__(self, tracking_uri: str, run_id: str) -> None:
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=tracking_uri)
        self.run_id = run_id
        self.held: set[tuple[str, int]] = set()
        self.queue: list[tuple[str, float, int]] = []
        self.pending_tags: dict[str, str] = {}
        self.flushed_at = time.monotonic()

    def load_held(self, keys: list[str]) -> None:
        """What MLflow already holds (a resumed study: points sent before the cut)."""
        for key in keys:
            self.held.update((key, m.step) for m in self.client.get_metric_history(self.run_id, key))

    def log(self, points: list[tuple[str, float, int]]) -> None:
        self.queue += points
        self.maybe_flush()

    def tags(self, tags: dict[str, Any]) -> None:
        self.pending_tags.update({k: str(v)[:5000] for k, v in tags.items()})
        self.maybe_flush()

    def maybe_flush(self) -> None:
        if time.monotonic() - self.flushed_at >= self.FLUSH_EVERY_S:
            self.flush()

    def flush(self) -> None:
        from mlflow.entities import Metric, RunTag

        now = int(time.time() * 1000)
        fresh, seen = [], set()
        for k, v, s in self.queue:
            if (k, s) not in self.held and (k, s) not in seen and _finite(v) is not None:
                fresh.append(Metric(k, float(v), now, s))
                seen.add((k, s))
        tags = [RunTag(k, v) for k, v in self.pending_tags.items()]
        for i in range(0, max(len(fresh), 1), 1000):
            if fresh[i : i + 1000] or (i == 0 and tags):
                self.client.log_batch(self.run_id, metrics=fresh[i : i + 1000], tags=tags if i == 0 else [])
        self.held |= seen
        self.queue.clear()
        self.pending_tags.clear()
        self.flushed_at = time.monotonic()


def _layer_points(rec: dict[str, Any]) -> list[tuple[str, float, int]]:
    return [(f"study/{rec['scaling']}/{k}", rec[k], rec["index"]) for k in LAYER_KEYS if rec.get(k) is not None]


def _reference_points(rec: dict[str, Any]) -> list[tuple[str, float, int]]:
    prefix = "reference/exact" if rec["scaling"] is None else f"reference/{rec['scaling']}"
    keys = METRICS if rec["scaling"] is None else LAYER_KEYS
    return [(f"{prefix}/{k}", rec[k], 0) for k in keys if rec.get(k) is not None]


def _metric_keys(scalings: list[str]) -> list[str]:
    keys = [f"reference/exact/{m}" for m in METRICS]
    for s in scalings:
        keys += [f"study/{s}/{k}" for k in LAYER_KEYS] + [f"reference/{s}/{k}" for k in LAYER_KEYS]
    return keys


# ----------------------------------------------------------------------------------- the driver
def list_layers(spec: StudySpec, console: Console) -> list[dict[str, Any]]:
    """Every candidate layer: name, the updates' spelling, kind, part, weight shape, multiplies per
    image at the model's working resolution; * marks those the spec selects."""
    from rich.table import Table

    from workers.approx.conv import conv_layers, trace_macs
    from workers.tasks.depth import DepthTask

    if not console.is_terminal:  # piped: 80 columns would cut the layer names
        console = Console(width=max(console.width, 150), soft_wrap=True)
    src = resolve_model_from(spec, load_weights=False)
    task = DepthTask(src.recipe, {"depth_scale": 1000, "min_depth_m": 0.1, "max_depth_m": 10.0, "baseline_depth_m": 1.0})
    model = build_model(src, task)
    infos = conv_layers(model)
    resolution = spec.eval.resolution or src.recipe.stages[-1].resolution
    macs = trace_macs(model, (1, 3, resolution, resolution))
    try:
        chosen = {i.name for i in select_layers(spec, infos)}
    except RecipeError as exc:
        chosen = set()
        console.print(f"(the spec's layers do not resolve: {exc})", highlight=False, markup=False)
    t = Table(title=f"{len(infos)} conv layers of run '{src.run_name}' ({src.recipe.model.name}"
                    f"{'/' + src.recipe.model.variant if src.recipe.model.variant else ''}) at {resolution} px; * = in this study")
    for col in ("", "#", "layer", "updates' name", "kind", "part", "weight shape", "multiplies"):
        t.add_column(col, justify="right" if col in ("#", "multiplies") else "left")
    rows = []
    for i, info in enumerate(infos):
        alias = _updates_name(info.name)
        rows.append({"index": i, "layer": info.name, "alias": alias, "kind": info.kind, "part": info.part,
                     "weight_shape": list(info.weight_shape), "macs": int(macs.get(info.name, 0)), "selected": info.name in chosen})
        t.add_row("*" if info.name in chosen else "", str(i), info.name, alias, info.kind, info.part,
                  "x".join(map(str, info.weight_shape)), f"{int(macs.get(info.name, 0)):,}")
    console.print(t)
    console.print(f"total {sum(r['macs'] for r in rows):,} multiplies per image; in this study {len(chosen)} layers, "
                  f"{sum(r['macs'] for r in rows if r['selected']):,} multiplies", highlight=False)
    return rows


def _updates_name(name: str) -> str:
    alias = layer_aliases(name)[-1]
    head, _, rest = alias.partition(".")
    return f"{head.capitalize()}.{rest}" if rest else alias


def run_study(spec: StudySpec, address: str | None = None, console: Console | None = None) -> dict[str, Any]:
    """Run the study to completion (or report it when complete); returns its summary."""
    console = console or Console(stderr=True)
    sdir = study_dir(spec)
    try:
        fs.probe_writable(sdir)
    except Exception as exc:  # noqa: BLE001 - one line naming the place
        raise RunError(f"storage {spec.storage}: cannot write the study folder {sdir} ({exc})") from None
    with _StudyLease(sdir, spec.name):
        return _Study(spec, sdir, address, console).run()


class _Study:
    def __init__(self, spec: StudySpec, sdir: str, address: str | None, console: Console) -> None:
        self.spec, self.sdir, self.address, self.console = spec, sdir, address, console
        self.sha = spec.sha256()
        self.scalings = spec.scaling_names()

    # ------------------------------------------------------------------ set-up
    def run(self) -> dict[str, Any]:
        import torch

        from storage.plans import load_plan
        from storage.shards import open_dataset
        from workers.approx.conv import conv_layers, trace_macs
        from workers.study import StudyContext, exact_table_like
        from workers.tasks.depth import DepthTask

        spec = self.spec
        table = load_table(spec)
        src = resolve_model_from(spec)
        record = fs.read_json(fs.join(self.sdir, STUDY_JSON)) if fs.exists(fs.join(self.sdir, STUDY_JSON)) else None
        if record is not None and record.get("spec_sha256") != self.sha:
            raise RecipeError(f"study '{spec.name}' already exists in {self.sdir} with a different spec; re-run it with the spec "
                              "it started with, or pick a new name (--set name=...)")
        if record is not None and record["model"]["weights_sha256"] != src.weights_sha256:
            raise RecipeError(f"study '{spec.name}' was started on other weights (sha256 {record['model']['weights_sha256'][:12]}), "
                              f"{src.checkpoint} holds {src.weights_sha256[:12]}; pick a new name (--set name=...)")

        plan = load_plan(src.run_dir)
        ds = open_dataset(src.data_uri)
        info = DepthTask.data_info(ds, plan.train_ids)
        task = DepthTask(src.recipe, info)
        resolution = spec.eval.resolution or src.recipe.stages[-1].resolution
        if len(plan.eval_ids) < spec.eval.samples:
            raise RecipeError(f"field 'eval.samples': run '{src.run_name}' holds {len(plan.eval_ids)} held-out images, "
                              f"fewer than {spec.eval.samples}")
        eval_ids = plan.eval_ids[: spec.eval.samples]
        images, targets = self._images(task, ds, eval_ids, resolution)
        payload = {
            "key": f"{self.sha}-{src.weights_sha256}", "recipe": src.recipe.model_dump(mode="json"), "task_info": info,
            "state_dict": src.state_dict, "images": images, "targets": targets, "batch_size": spec.eval.batch_size,
            "torch_threads": spec.execution.torch_threads, "tables": {"approx": table, "exact": exact_table_like(table)},
        }
        torch.set_num_threads(spec.execution.torch_threads)
        ctx = StudyContext(payload)
        infos = conv_layers(ctx.model)
        if not infos:
            raise RecipeError(f"field 'model_from': {src.recipe.model.name} has no conv layers to study")
        layers = select_layers(spec, infos)
        macs = trace_macs(ctx.model, (1, 3, resolution, resolution))
        self.layers = [{"index": i, "layer": x.name, "kind": x.kind, "part": x.part, "weight_shape": list(x.weight_shape),
                        "macs": int(macs.get(x.name, 0))} for i, x in enumerate(layers)]
        self.by_name = {x["layer"]: x for x in self.layers}

        if record is None:
            record = self._create(src, resolution, eval_ids, table)
            self.record = record
            self._save()
        self.record = record
        self.attempt = len(record["attempts"]) + 1
        self.calibration_source = (src.run_dir, src.data_uri, resolution)
        exact = self._reference_exact(ctx)
        scales = self._scales(ctx, table)
        todo, done = self._plan(scales)
        if record["state"] == "completed" and not todo:
            self.console.print(f"study '{spec.name}' already completed; nothing to compute (its table: "
                               f"{fs.join(self.sdir, 'table.csv')}).", highlight=False)
            print_summary(spec.name, record["summary"], self.sdir, record, self.console)
            return {"study_dir": self.sdir, "mlflow_run_id": record["mlflow_run_id"], "computed": 0,
                    "done_before": len(done), "summary": record["summary"]}
        if record["attempts"]:
            tracking.mark_running(record["tracking_uri"], record["mlflow_run_id"])
        attempt = {"attempt": self.attempt, "started_at": time.time(), "host": os.uname().nodename,
                   "done_before": len(done), "to_compute": len(todo), "computed": 0}
        record["attempts"].append(attempt)
        record["state"] = "running"
        self._save()
        self.tracker = StudyTracker(record["tracking_uri"], record["mlflow_run_id"])
        self.tracker.load_held(_metric_keys(self.scalings))
        try:
            return self._run_leased(ctx, payload, exact, todo, done, attempt)
        except BaseException as exc:
            interrupted = isinstance(exc, KeyboardInterrupt)
            try:
                self.tracker.flush()  # what is committed goes out now rather than at the next attempt
            except Exception:  # noqa: BLE001 - the next attempt sends it
                log.warning("could not send the study's last points to MLflow", exc_info=True)
            record["state"] = "interrupted" if interrupted else "failed"
            attempt["finished_at"] = time.time()
            self._save()
            tracking.end_run(record["tracking_uri"], record["mlflow_run_id"], "KILLED" if interrupted else "FAILED")
            raise

    def _images(self, task: Any, ds: Any, ids: Any, resolution: int) -> tuple[Any, Any]:
        from workers.data import make_loader

        rows = ds.read_samples(ids)
        samples = task.samples(rows, resolution, ds.describe, train=False)
        batch = task.to_device(next(iter(make_loader(samples, batch_size=len(ids)))), "cpu")
        return batch.x.contiguous(), batch.targets[0].contiguous()

    def _create(self, src: ModelSource, resolution: int, eval_ids: Any, table: Any) -> dict[str, Any]:
        spec = self.spec
        uri = tracking.resolve_tracking_uri(spec.tracking.uri)
        exp_id = tracking.ensure_experiment(uri, spec.tracking.experiment)
        client = tracking._client(uri)
        tags = {"orchestrator.kind": "study", "orchestrator.study_name": spec.name, "orchestrator.study.model_from": src.run_name,
                "orchestrator.study.multiplier": spec.multiplier, "orchestrator.study.scalings": ",".join(self.scalings),
                "orchestrator.study.layers": str(len(self.layers)), "orchestrator.study.spec_sha256": self.sha}
        run = client.create_run(exp_id, run_name=spec.name, tags=tags)
        from mlflow.entities import Param

        params = spec.flat_params() | {
            "model.run": src.run_name, "model.checkpoint": src.checkpoint, "model.weights_sha256": src.weights_sha256 or "",
            "model.name": src.recipe.model.name, "model.variant": str(src.recipe.model.variant), "eval.resolution_px": str(resolution),
            "eval.ids": ",".join(map(str, eval_ids.tolist()))[:6000], "table.lo": str(table.lo), "table.hi": str(table.hi),
            "layers.count": str(len(self.layers)),
        }
        plist = [Param(k, str(v)[:6000]) for k, v in sorted(params.items())]
        for i in range(0, len(plist), 100):
            client.log_batch(run.info.run_id, params=plist[i : i + 100])
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "layers.json")
            with open(path, "w") as f:
                json.dump(self.layers, f, indent=1)
            client.log_artifact(run.info.run_id, path, "study")
        record = {
            "name": spec.name, "spec": spec.model_dump(mode="json"), "spec_sha256": self.sha,
            "model": {"run": src.run_name, "run_dir": src.run_dir, "checkpoint": src.checkpoint, "weights_sha256": src.weights_sha256},
            "resolution": resolution, "eval_ids": eval_ids.tolist(), "layers": self.layers, "scalings": self.scalings,
            "mlflow_run_id": run.info.run_id, "mlflow_experiment_id": exp_id, "tracking_uri": uri,
            "state": "pending", "attempts": [], "created_at": time.time(),
        }
        self.console.print(f"study '{spec.name}': new, {len(self.layers)} layers x {len(self.scalings)} scalings "
                           f"({', '.join(self.scalings)}) on {len(eval_ids)} images at {resolution} px of run '{src.run_name}'; "
                           f"study folder {self.sdir}; MLflow run {run.info.run_id}", highlight=False)
        return record

    def _save(self) -> None:
        self.record["updated_at"] = time.time()
        fs.write_json(fs.join(self.sdir, STUDY_JSON), self.record)

    # ------------------------------------------------------------------ references and scales
    def _reference_exact(self, ctx: Any) -> dict[str, Any]:
        uri = fs.join(self.sdir, "reference", "exact.json")
        rec = _read_valid(uri, self.sha, METRICS)
        if rec is None:
            started = time.perf_counter()
            metrics = ctx.metrics(ctx.predict())
            rec = {"scaling": None, "layer": None, **metrics, "seconds": time.perf_counter() - started,
                   "spec_sha256": self.sha, "attempt": self.attempt, "committed_at": time.time()}
            fs.write_json(uri, rec)
        return rec

    def _scales(self, ctx: Any, table: Any) -> dict[str, tuple[dict[str, float], dict[str, float]]]:
        """Per scaling: (input scale, weight scale) per layer. Calibrated ones are computed once and
        kept in the study folder, so a resumed study uses the very same scales."""
        from common.study import CalibratedScaling
        from workers.study import calibrate

        names = [x["layer"] for x in self.layers]
        out = {}
        for label in self.scalings:
            sc = self.spec.scaling(label)
            if not isinstance(sc, CalibratedScaling):
                out[label] = ({n: sc.input for n in names}, {n: sc.weight for n in names})
                continue
            uri = fs.join(self.sdir, "calibration", f"{label}.json")
            cal = _read_valid(uri, self.sha, ("layers",))
            if cal is None:
                images = self._calibration_images(ctx, sc.calibration_samples)
                layers = calibrate(ctx, images, names, table, sc.method, sc.percentile)
                cal = {"spec_sha256": self.sha, "scaling": label, "samples": len(images), "layers": layers}
                fs.write_json(uri, cal)
            out[label] = ({n: cal["layers"][n]["input_scale"] for n in names}, {n: cal["layers"][n]["weight_scale"] for n in names})
        return out

    def _calibration_images(self, ctx: Any, n: int) -> Any:
        """n training-split images (a seeded choice): never the eval images the layers are scored on."""
        import numpy as np

        from storage.plans import load_plan
        from storage.shards import open_dataset

        run_dir, data_uri, resolution = self.calibration_source
        plan = load_plan(run_dir)
        rng = np.random.default_rng(CALIBRATION_SEED)
        ids = np.sort(rng.choice(plan.train_ids, size=min(n, len(plan.train_ids)), replace=False))
        images, _ = self._images(ctx.task, open_dataset(data_uri), ids, resolution)
        return images

    # ------------------------------------------------------------------ the work
    def _plan(self, scales: dict[str, tuple[dict[str, float], dict[str, float]]]) -> tuple[list[Item], list[dict[str, Any]]]:
        """Every item of the study, and the results already committed."""
        items, done = [], []
        names = [x["layer"] for x in self.layers]
        for label in self.scalings:
            ins, ws = scales[label]
            ref = Item(f"{label}/<all layers, exact table>", label, names, "exact", fs.join(self.sdir, "reference", f"{label}.json"),
                       None, ins, ws)
            for it in [ref] + [Item(f"{label}/{n}", label, [n], "approx", layer_file(self.sdir, label, n), self.by_name[n]["index"],
                                    {n: ins[n]}, {n: ws[n]}) for n in names]:
                rec = _read_valid(it.uri, self.sha, LAYER_KEYS)
                if rec is None:
                    items.append(it)
                else:
                    done.append(rec)
        return items, done

    def _commit(self, item: Item, result: dict[str, Any], exact: dict[str, Any]) -> dict[str, Any]:
        m = result["metrics"]
        rec: dict[str, Any] = {
            "scaling": item.scaling, "spec_sha256": self.sha, "attempt": self.attempt, "committed_at": time.time(),
            **{k: m[k] for k in METRICS}, **{f"delta_{k}": m[k] - exact[k] for k in METRICS},
            "saturation_inputs": result["saturation"]["inputs"], "saturation_weights": result["saturation"]["weights"],
            "saturation": result["saturation"]["all"], "seconds": result["seconds"], "worker": result.get("worker"),
        }
        if item.index is None:
            rec.update({"layer": None, "layers": len(item.layers), "table": "exact"})
        else:
            layer = item.layers[0]
            rec = {**self.by_name[layer], "input_scale": item.input_scale[layer], "weight_scale": item.weight_scale[layer], **rec}
        fs.write_json(item.uri, rec)  # whole, under a temp name then renamed: a cut leaves the old state or the new
        self.tracker.log(_layer_points(rec) if item.index is not None else _reference_points(rec))
        return rec

    def _run_leased(self, ctx: Any, payload: dict[str, Any], exact: dict[str, Any], todo: list[Item],
                    done: list[dict[str, Any]], attempt: dict[str, Any]) -> dict[str, Any]:
        self.tracker.log(_reference_points(exact))
        for rec in done:  # committed before a cut, perhaps not yet in MLflow
            self.tracker.log(_layer_points(rec) if rec.get("layer") else _reference_points(rec))
        total = len(todo) + len(done)
        if done:
            self.console.print(f"study '{self.spec.name}': resuming in MLflow run {self.record['mlflow_run_id']}; "
                               f"{len(done)} of {total} results committed, computing {len(todo)}", highlight=False)
        else:
            self.console.print(f"study '{self.spec.name}': computing {len(todo)} results "
                               f"(float model rms {exact['rms']:.4f}, a1 {exact['a1']:.4f})", highlight=False)
        results = {r["scaling"] + "/" + (r["layer"] or "<all layers, exact table>"): r for r in done}
        self._update_tags(results, exact)
        if todo:
            delay = float(os.environ.get(TEST_DELAY_ENV, "0") or 0)
            with _LayerProgress(self.console, total, len(done)) as progress:
                def on_result(item: Item, result: dict[str, Any]) -> None:
                    rec = self._commit(item, result, exact)
                    results[item.id] = rec
                    attempt["computed"] += 1
                    self._update_tags(results, exact)
                    progress.advance(item, rec)

                if self.spec.execution.backend == "local":
                    self._run_local(ctx, payload, todo, delay, on_result)
                else:
                    self._run_ray(payload, todo, delay, on_result)
        return self._finish(results, exact, attempt)

    def _batches(self, todo: list[Item]) -> list[list[Item]]:
        # References (every layer at once) go alone; layers in groups of layers_per_task.
        k = self.spec.execution.layers_per_task
        refs = [[it] for it in todo if it.index is None]
        layers = [it for it in todo if it.index is not None]
        return refs + [layers[i : i + k] for i in range(0, len(layers), k)]

    def _run_local(self, ctx: Any, payload: dict[str, Any], todo: list[Item], delay: float, on_result: Any) -> None:
        from workers import study as worker

        worker._CONTEXTS.clear()
        worker._CONTEXTS[payload["key"]] = ctx
        for batch in self._batches(todo):
            for item, res in zip(batch, worker.evaluate_items([payload], [it.task_item() for it in batch], delay), strict=True):
                on_result(item, res)

    def _run_ray(self, payload: dict[str, Any], todo: list[Item], delay: float, on_result: Any) -> None:
        import ray

        from orchestrator.launcher import init_ray
        from workers.study import evaluate_items

        init_ray(self.address)
        ex = self.spec.execution
        slots = ex.num_workers or max(1, int(ray.cluster_resources().get("CPU", 1) // ex.cpus_per_task))
        task = ray.remote(num_cpus=ex.cpus_per_task, max_retries=3)(evaluate_items)
        ref = ray.put(payload)
        pending: dict[Any, list[Item]] = {}
        queue = self._batches(todo)
        # A few more tasks than slots are in flight: workers never wait on the driver, and a cut
        # loses at most that many layers' work.
        while queue or pending:
            while queue and len(pending) < 2 * slots:
                batch = queue.pop(0)
                pending[task.remote([ref], [it.task_item() for it in batch], delay)] = batch
            ready, _ = ray.wait(list(pending), num_returns=1)
            for r in ready:
                batch = pending.pop(r)
                try:
                    results = ray.get(r)
                except Exception as exc:  # noqa: BLE001 - RayTaskError wraps the worker's own
                    from orchestrator.runner import _root_cause

                    raise RunError(f"study '{self.spec.name}': evaluating {batch[0].id} failed: {_root_cause(exc)}; "
                                   "re-run the same command to retry the missing layers") from exc
                for item, res in zip(batch, results, strict=True):
                    on_result(item, res)

    # ------------------------------------------------------------------ the end
    def _artifacts_logged(self) -> bool:
        try:
            names = {a.path for a in self.tracker.client.list_artifacts(self.record["mlflow_run_id"], "study")}
        except Exception:  # noqa: BLE001 - an unreadable artifact store: log them again
            return False
        return {"study/layers.csv", "study/sensitivity.png"} <= names

    def _update_tags(self, results: dict[str, dict[str, Any]], exact: dict[str, Any]) -> None:
        n = len(self.layers)
        tags: dict[str, Any] = {}
        for label in self.scalings:
            rows = [r for r in results.values() if r["scaling"] == label and r.get("layer")]
            tags[f"orchestrator.study.{label}.layers_done"] = f"{len(rows)}/{n}"
            ranked = sorted(rows, key=lambda r: (sensitivity(r), -r["index"]))
            if ranked:
                tags[f"orchestrator.study.{label}.most_sensitive"] = _describe(ranked[-1])
                tags[f"orchestrator.study.{label}.least_sensitive"] = _describe(ranked[0])
        tags["orchestrator.study.float_rms"] = f"{exact['rms']:.4f}"
        self.tracker.tags(tags)

    def _finish(self, results: dict[str, dict[str, Any]], exact: dict[str, Any], attempt: dict[str, Any]) -> dict[str, Any]:
        rows = table_rows(exact, results, self.scalings)
        csv_text = to_csv(rows)
        png = plot(rows, self.scalings, exact, f"{self.spec.name}: rms change when one layer is approximate ({self.spec.multiplier})")
        fs.write_bytes(fs.join(self.sdir, "table.csv"), csv_text.encode())
        fs.write_bytes(fs.join(self.sdir, "sensitivity.png"), png)
        if not self._artifacts_logged() or attempt["computed"]:
            with tempfile.TemporaryDirectory() as tmp:
                for name, data in (("layers.csv", csv_text.encode()), ("sensitivity.png", png)):
                    with open(os.path.join(tmp, name), "wb") as f:
                        f.write(data)
                    self.tracker.client.log_artifact(self.record["mlflow_run_id"], os.path.join(tmp, name), "study")
        summary = summarize(rows, self.scalings, exact)
        self.tracker.tags({"orchestrator.study.state": "completed"})
        self.tracker.flush()
        attempt["finished_at"] = time.time()
        self.record["state"] = "completed"
        self.record["summary"] = summary
        self._save()
        tracking.end_run(self.record["tracking_uri"], self.record["mlflow_run_id"], "FINISHED")
        print_summary(self.spec.name, summary, self.sdir, self.record, self.console)
        return {"study_dir": self.sdir, "mlflow_run_id": self.record["mlflow_run_id"], "computed": attempt["computed"],
                "done_before": attempt.get("done_before", 0), "summary": summary}


def _describe(rec: dict[str, Any]) -> str:
    return f"{rec['layer']} (delta rms {rec[SENSITIVITY_KEY]:+.4f})"


# ----------------------------------------------------------------------------------- table, plot, summary
CSV_COLUMNS = ("scaling", "index", "layer", "kind", "part", "weight_shape", "macs", "input_scale", "weight_scale",
               *LAYER_KEYS)


def table_rows(exact: dict[str, Any], results: dict[str, dict[str, Any]], scalings: list[str]) -> list[dict[str, Any]]:
    """The study's table: the float model, then per scaling its exact-table reference and its layers in study order."""
    rows = [{"scaling": "float", "index": "", "layer": "<float model>", "kind": "reference", **{k: exact[k] for k in METRICS}}]
    for label in scalings:
        ref = results.get(f"{label}/<all layers, exact table>")
        if ref:
            rows.append({**ref, "scaling": label, "index": "", "layer": "<all layers, exact table>", "kind": "reference"})
        layer_rows = sorted((r for r in results.values() if r["scaling"] == label and r.get("layer")), key=lambda r: r["index"])
        rows += layer_rows
    return [{k: r.get(k, "") for k in CSV_COLUMNS} for r in rows]


def to_csv(rows: list[dict[str, Any]]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: ("x".join(map(str, v)) if isinstance(v, list) else (f"{v:.6g}" if isinstance(v, float) else v)) for k, v in r.items()})
    return buf.getvalue()


KIND_COLOURS = {"pointwise": "tab:blue", "depthwise": "tab:orange", "dense": "tab:green"}


def plot(rows: list[dict[str, Any]], scalings: list[str], exact: dict[str, Any], title: str) -> bytes:
    """One panel per scaling: the rms change (metres, symlog) of each layer, bars coloured by kind;
    the dashed line is every layer at once with the exact table (the quantization error)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    layer_rows = [r for r in rows if r["kind"] != "reference"]
    n = max((len([r for r in layer_rows if r["scaling"] == s]) for s in scalings), default=1)
    fig, axes = plt.subplots(len(scalings), 1, figsize=(max(8.0, 0.18 * n + 2), 3.2 * len(scalings) + 0.8), squeeze=False)
    for ax, label in zip(axes[:, 0], scalings, strict=True):
        mine = [r for r in layer_rows if r["scaling"] == label]
        xs = list(range(len(mine)))
        ax.bar(xs, [r[SENSITIVITY_KEY] for r in mine], color=[KIND_COLOURS.get(r["kind"], "tab:gray") for r in mine])
        ref = next((r for r in rows if r["scaling"] == label and r["kind"] == "reference"), None)
        if ref and ref.get(SENSITIVITY_KEY) not in ("", None):
            ax.axhline(ref[SENSITIVITY_KEY], color="black", linestyle="--", linewidth=0.8)
        biggest = max((abs(r[SENSITIVITY_KEY]) for r in mine), default=0.0)
        if biggest > 0:  # symlog: a collapsed layer (metres) and a harmless one (micrometres) on one axis
            ax.set_yscale("symlog", linthresh=max(biggest * 1e-3, 1e-9))
        ax.set_ylabel("delta rms (m)")
        ax.set_title(f"{label} (float model rms {exact['rms']:.3f} m)", fontsize=9)
        ax.set_xticks(xs)
        ax.set_xticklabels([r["layer"].replace("encoder.features.", "e.").replace("decoder.", "d.") for r in mine],
                           rotation=90, fontsize=5)
        ax.axhline(0, color="gray", linewidth=0.5)
    handles = [Patch(color=c, label=k) for k, c in KIND_COLOURS.items()]
    handles.append(plt.Line2D([], [], color="black", linestyle="--", label="all layers, exact table"))
    fig.legend(handles=handles, loc="upper right", fontsize=7, ncol=4)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.96))
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def summarize(rows: list[dict[str, Any]], scalings: list[str], exact: dict[str, Any], top: int = 3) -> dict[str, Any]:
    out: dict[str, Any] = {"float": {k: exact[k] for k in METRICS}, "scalings": {}}
    for label in scalings:
        mine = [r for r in rows if r["scaling"] == label and r["kind"] != "reference"]
        ref = next((r for r in rows if r["scaling"] == label and r["kind"] == "reference"), None)
        ranked = sorted(mine, key=lambda r: (-sensitivity(r), r["index"]))
        pick = lambda rs: [{"layer": r["layer"], "kind": r["kind"], "delta_rms": r["delta_rms"], "delta_a1": r["delta_a1"],  # noqa: E731
                            "rms": r["rms"], "saturation": r["saturation"]} for r in rs]
        out["scalings"][label] = {
            "layers": len(mine),
            "most_sensitive": pick(ranked[:top]),
            "least_sensitive": pick(list(reversed(ranked[-top:]))),
            "all_layers_exact_table": {k: ref[k] for k in (*METRICS, "delta_rms")} if ref else None,
            "seconds": sum(r["seconds"] for r in mine),
        }
    return out


def print_summary(name: str, summary: dict[str, Any], sdir: str, record: dict[str, Any], console: Console) -> None:
    f = summary["float"]
    console.print(f"study '{name}': float model rms {f['rms']:.4f} a1 {f['a1']:.4f} rel {f['rel']:.4f}", highlight=False)
    for label, s in summary["scalings"].items():
        q = s["all_layers_exact_table"]
        qtext = f"; all layers at once with the exact table: rms {q['rms']:.4f} (quantization error)" if q else ""
        console.print(f"  {label}: {s['layers']} layers{qtext}", highlight=False)
        for title, key in (("most sensitive", "most_sensitive"), ("least sensitive", "least_sensitive")):
            items = ", ".join(f"{r['layer']} ({r['kind']}, rms {r['rms']:.4f}, delta {r['delta_rms']:+.4f})" for r in s[key])
            console.print(f"    {title}: {items}", highlight=False)
    ui = record["tracking_uri"]
    ui = f"mlflow ui --backend-store-uri {ui}" if ui.startswith("sqlite:") else ui
    console.print(f"  table {fs.join(sdir, 'table.csv')}, plot {fs.join(sdir, 'sensitivity.png')}; "
                  f"MLflow run {record['mlflow_run_id']} (open it with: {ui})", highlight=False)


class _LayerProgress:
    """A bar over the study's results on a terminal; a line every PLAIN_EVERY_S s otherwise."""

    def __init__(self, console: Console, total: int, done: int) -> None:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
        )

        self.console, self.total, self.done = console, total, done
        self.live = console.is_terminal
        self.bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(bar_width=24), MofNCompleteColumn(),
                            TimeRemainingColumn(), console=console, disable=not self.live)
        self.last_plain = time.monotonic()
        self.first_at = time.monotonic()
        self.computed = 0

    def __enter__(self) -> _LayerProgress:
        self.bar.start()
        self.task = self.bar.add_task("layers", total=self.total, completed=self.done)
        return self

    def advance(self, item: Item, rec: dict[str, Any]) -> None:
        self.done += 1
        self.computed += 1
        what = f"{item.scaling} {rec.get('layer') or 'all layers, exact table'}: rms {rec['rms']:.4f} ({rec['delta_rms']:+.4f})"
        self.bar.update(self.task, advance=1, description=what)
        now = time.monotonic()
        if self.computed == 1:
            self.first_at = now  # the rate counts from the first result: worker start-up is no layer's
        if not self.live and (now - self.last_plain >= PLAIN_EVERY_S or self.done == self.total or self.computed == 1):
            self.last_plain = now
            rate = (self.computed - 1) / (now - self.first_at) if self.computed > 1 and now > self.first_at else None
            eta = f"{(self.total - self.done) / rate:.0f} s" if rate else "-"
            speed = f"{rate:.2f}/s" if rate else "-"
            self.console.print(f"results {self.done}/{self.total} | {what} | {speed} | ETA {eta}", highlight=False)

    def __exit__(self, *exc: object) -> None:
        self.bar.stop()
