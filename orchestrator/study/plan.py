"""A study as a plan of layer items on the run engine: what is committed, what is left, each
result committed as it comes back, and the attempt's end through the engine (Attempt.finish)."""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from typing import Any

import numpy as np
from rich.console import Console

from common.errors import RecipeError, RunError
from common.study import CalibratedScaling, StudySpec
from orchestrator import tracking
from orchestrator.engine import Attempt, RunState
from orchestrator.study.compute import Compute
from orchestrator.study.files import (
    LAYER_KEYS,
    METRICS,
    STUDY_JSON,
    Item,
    StudyRecord,
    finite,
    layer_file,
    layer_points,
    metric_keys,
    read_valid,
    reference_points,
    sensitivity,
)
from orchestrator.study.report import (
    LayerProgress,
    describe,
    plot,
    print_summary,
    summarize,
    table_rows,
    to_csv,
)
from orchestrator.study.source import ModelSource, load_table, resolve_model_from, select_layers
from storage import fs

log = logging.getLogger(__name__)

# Tests only: a pause per layer inside the task, so a study can be cut mid-way.
TEST_DELAY_ENV = "ORCHESTRATOR_TEST_STUDY_DELAY_S"
CALIBRATION_SEED = 7  # which training images calibrate: fixed, so a re-made study calibrates alike
ALL_LAYERS = "<all layers, exact table>"


class StudyPlan:
    def __init__(self, spec: StudySpec, sdir: str, address: str | None, console: Console) -> None:
        self.spec, self.sdir, self.console = spec, sdir, console
        self.sha = spec.sha256()
        self.scalings = spec.scaling_names()
        self.compute = Compute(spec, address)
        self.payload: dict[str, Any] = {}
        self._box: list[Any] | None = None

    @property
    def box(self) -> list[Any]:
        """The payload where the tasks take it from; put there on first use (a study with nothing
        left to compute starts no Ray)."""
        if self._box is None:
            self._box = self.compute.box(self.payload)
        return self._box

    # ------------------------------------------------------------------ set-up
    def run(self) -> dict[str, Any]:
        from storage.plans import load_plan
        from storage.shards import open_dataset
        from workers.study import describe_layers, exact_table_like
        from workers.tasks.depth import DepthTask

        spec = self.spec
        table = load_table(spec)
        src = resolve_model_from(spec)
        data = fs.read_json(fs.join(self.sdir, STUDY_JSON)) if fs.exists(fs.join(self.sdir, STUDY_JSON)) else None
        if data is not None and data.get("spec_sha256") != self.sha:
            raise RecipeError(f"study '{spec.name}' already exists in {self.sdir} with a different spec; re-run it "
                              "with the spec it started with, or pick a new name (--set name=...)")
        if data is not None and data["model"]["weights_sha256"] != src.weights_sha256:
            raise RecipeError(f"study '{spec.name}' was started on other weights (sha256 "
                              f"{data['model']['weights_sha256'][:12]}), {src.checkpoint} holds "
                              f"{src.weights_sha256[:12]}; pick a new name (--set name=...)")

        plan = load_plan(src.run_dir)
        info = DepthTask.data_info(open_dataset(src.data_uri), plan.train_ids)
        resolution = spec.eval.resolution or src.recipe.stages[-1].resolution
        if len(plan.eval_ids) < spec.eval.samples:
            raise RecipeError(f"field 'eval.samples': run '{src.run_name}' holds {len(plan.eval_ids)} held-out "
                              f"images, fewer than {spec.eval.samples}")
        eval_ids = plan.eval_ids[: spec.eval.samples]
        payload = {
            "key": f"{self.sha}-{src.weights_sha256}", "recipe": src.recipe.model_dump(mode="json"), "task_info": info,
            "state_dict": src.state_dict, "batch_size": spec.eval.batch_size,
            "data": {"uri": src.data_uri, "eval_ids": eval_ids.tolist(), "resolution": resolution},
            "torch_threads": spec.execution.torch_threads,
            "tables": {"approx": table, "exact": exact_table_like(table)},
        }
        self.payload = payload
        if data is not None:
            self.layers = data["layers"]  # chosen when the study began: same spec, same weights
        else:
            infos = self.compute.call(describe_layers, self.box, resolution)
            if not infos:
                raise RecipeError(f"field 'model_from': {src.recipe.model.name} has no conv layers to study")
            self.layers = [{"index": i, "layer": x["name"], "kind": x["kind"], "part": x["part"],
                            "weight_shape": x["weight_shape"], "macs": x["macs"]}
                           for i, x in enumerate(select_layers(spec, infos))]
        self.by_name = {x["layer"]: x for x in self.layers}

        self.record = StudyRecord(data or self._create(src, resolution, eval_ids, table), self.sdir)
        if data is None:
            self.record.save()
        data = self.record.data
        self.attempt_no = len(data["attempts"]) + 1
        self.train_ids = plan.train_ids
        exact = self._reference_exact()
        scales = self._scales()
        todo, done = self._plan(scales)
        if self.record.state == RunState.COMPLETED and not todo:
            self.console.print(f"study '{spec.name}' already completed; nothing to compute (its table: "
                               f"{fs.join(self.sdir, 'table.csv')}).", highlight=False)
            print_summary(spec.name, data["summary"], self.sdir, data, self.console)
            return {"study_dir": self.sdir, "mlflow_run_id": data["mlflow_run_id"], "computed": 0,
                    "done_before": len(done), "summary": data["summary"]}
        if data["attempts"]:
            tracking.mark_running(data["tracking_uri"], data["mlflow_run_id"])
        attempt = {"attempt": self.attempt_no, "started_at": time.time(), "host": os.uname().nodename,
                   "done_before": len(done), "to_compute": len(todo), "computed": 0}
        data["attempts"].append(attempt)
        self.engine = Attempt(self.record, self.record.save)
        self.engine.begin()
        from workers.mlflow_sink import MlflowSink

        # Points go out once each, whatever the restarts: sent together every 5 s once their result
        # is committed; a cut loses only the queue, and the next attempt sends those results' points
        # from their committed files.
        self.sink = MlflowSink(data["tracking_uri"], data["mlflow_run_id"], any_order=True, flush_every_s=5.0)
        self.sink.load_held(metric_keys(self.scalings))
        try:
            return self._run_attempt(exact, todo, done, attempt)
        except BaseException as exc:
            try:
                self.sink.flush(force=True)  # what is committed goes out now rather than at the next attempt
            except Exception:  # noqa: BLE001 - the next attempt sends it
                log.warning("could not send the study's last points to MLflow", exc_info=True)
            attempt["finished_at"] = time.time()
            self.engine.finish(RunState.INTERRUPTED if isinstance(exc, KeyboardInterrupt) else RunState.FAILED)
            raise

    def _create(self, src: ModelSource, resolution: int, eval_ids: Any, table: Any) -> dict[str, Any]:
        spec = self.spec
        uri = tracking.resolve_tracking_uri(spec.tracking.uri)
        exp_id = tracking.ensure_experiment(uri, spec.tracking.experiment)
        client = tracking._client(uri)
        tags = {"orchestrator.kind": "study", "orchestrator.study_name": spec.name,
                "orchestrator.study.model_from": src.run_name, "orchestrator.study.multiplier": spec.multiplier,
                "orchestrator.study.scalings": ",".join(self.scalings),
                "orchestrator.study.layers": str(len(self.layers)),
                "orchestrator.study.spec_sha256": self.sha}
        run = client.create_run(exp_id, run_name=spec.name, tags=tags)
        from mlflow.entities import Param

        params = spec.flat_params() | {
            "model.run": src.run_name, "model.checkpoint": src.checkpoint,
            "model.weights_sha256": src.weights_sha256 or "",
            "model.name": src.recipe.model.name, "model.variant": str(src.recipe.model.variant),
            "eval.resolution_px": str(resolution), "eval.ids": ",".join(map(str, eval_ids.tolist()))[:6000],
            "table.lo": str(table.lo), "table.hi": str(table.hi), "layers.count": str(len(self.layers)),
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
            "model": {"run": src.run_name, "run_dir": src.run_dir, "checkpoint": src.checkpoint,
                      "weights_sha256": src.weights_sha256},
            "resolution": resolution, "eval_ids": eval_ids.tolist(), "layers": self.layers, "scalings": self.scalings,
            "mlflow_run_id": run.info.run_id, "mlflow_experiment_id": exp_id, "tracking_uri": uri,
            "state": RunState.PENDING, "attempts": [], "created_at": time.time(),
        }
        self.console.print(f"study '{spec.name}': new, {len(self.layers)} layers x {len(self.scalings)} scalings "
                           f"({', '.join(self.scalings)}) on {len(eval_ids)} images at {resolution} px of run "
                           f"'{src.run_name}'; study folder {self.sdir}; MLflow run {run.info.run_id}", highlight=False)
        return record

    # ------------------------------------------------------------------ references and scales
    def _reference_exact(self) -> dict[str, Any]:
        from workers.study import reference

        uri = fs.join(self.sdir, "reference", "exact.json")
        rec = read_valid(uri, self.sha, METRICS)
        if rec is None:
            res = self.compute.call(reference, self.box)
            rec = {"scaling": None, "layer": None, **res["metrics"], "seconds": res["seconds"],
                   "spec_sha256": self.sha, "attempt": self.attempt_no, "committed_at": time.time()}
            fs.write_json(uri, rec)
        return rec

    def _scales(self) -> dict[str, tuple[dict[str, float], dict[str, float]]]:
        """Per scaling: (input scale, weight scale) per layer. Calibrated ones are computed once and
        kept in the study folder, so a resumed study uses the very same scales."""
        from workers.study import calibrate_on

        names = [x["layer"] for x in self.layers]
        out = {}
        for label in self.scalings:
            sc = self.spec.scaling(label)
            if not isinstance(sc, CalibratedScaling):
                out[label] = ({n: sc.input for n in names}, {n: sc.weight for n in names})
                continue
            uri = fs.join(self.sdir, "calibration", f"{label}.json")
            cal = read_valid(uri, self.sha, ("layers",))
            if cal is None:
                # n training-split images (a seeded choice): never the eval images the layers are scored on.
                rng = np.random.default_rng(CALIBRATION_SEED)
                n = sc.calibration_samples
                ids = np.sort(rng.choice(self.train_ids, size=min(n, len(self.train_ids)), replace=False))
                layers = self.compute.call(calibrate_on, self.box, ids, names, sc.method, sc.percentile)
                cal = {"spec_sha256": self.sha, "scaling": label, "samples": len(ids), "layers": layers}
                fs.write_json(uri, cal)
            out[label] = ({n: cal["layers"][n]["input_scale"] for n in names},
                          {n: cal["layers"][n]["weight_scale"] for n in names})
        return out

    # ------------------------------------------------------------------ the work
    def _plan(self, scales: dict[str, tuple[dict[str, float], dict[str, float]]]) -> tuple[list[Item], list[dict]]:
        """Every item of the study, and the results already committed."""
        items, done = [], []
        names = [x["layer"] for x in self.layers]
        for label in self.scalings:
            ins, ws = scales[label]
            ref = Item(f"{label}/{ALL_LAYERS}", label, names, "exact", fs.join(self.sdir, "reference", f"{label}.json"),
                       None, ins, ws)
            layers = [Item(f"{label}/{n}", label, [n], "approx", layer_file(self.sdir, label, n),
                           self.by_name[n]["index"], {n: ins[n]}, {n: ws[n]}) for n in names]
            for it in [ref, *layers]:
                rec = read_valid(it.uri, self.sha, LAYER_KEYS)
                if rec is None:
                    items.append(it)
                else:
                    done.append(rec)
        return items, done

    def _commit(self, item: Item, result: dict[str, Any], exact: dict[str, Any]) -> dict[str, Any]:
        m, sat = result["metrics"], result["saturation"]
        rec: dict[str, Any] = {
            "scaling": item.scaling, "spec_sha256": self.sha, "attempt": self.attempt_no, "committed_at": time.time(),
            **{k: m[k] for k in METRICS}, **{f"delta_{k}": m[k] - exact[k] for k in METRICS},
            "saturation_inputs": sat["inputs"], "saturation_weights": sat["weights"], "saturation": sat["all"],
            "seconds": result["seconds"], "worker": result.get("worker"),
        }
        if item.index is None:
            rec.update({"layer": None, "layers": len(item.layers), "table": "exact"})
        else:
            layer = item.layers[0]
            rec = {**self.by_name[layer], "input_scale": item.input_scale[layer],
                   "weight_scale": item.weight_scale[layer], **rec}
        fs.write_json(item.uri, rec)  # whole, under a temp name then renamed: a cut leaves the old state or the new
        self._log(rec)
        return rec

    def _log(self, rec: dict[str, Any]) -> None:
        self.sink.log_metrics(finite(layer_points(rec) if rec.get("layer") else reference_points(rec)))

    def _run_attempt(self, exact: dict[str, Any], todo: list[Item], done: list[dict[str, Any]],
                     attempt: dict[str, Any]) -> dict[str, Any]:
        self.sink.log_metrics(finite(reference_points(exact)))
        for rec in done:  # committed before a cut, perhaps not yet in MLflow
            self._log(rec)
        total = len(todo) + len(done)
        if done:
            self.console.print(f"study '{self.spec.name}': resuming in MLflow run {self.record.mlflow_run_id}; "
                               f"{len(done)} of {total} results committed, computing {len(todo)}", highlight=False)
        else:
            self.console.print(f"study '{self.spec.name}': computing {len(todo)} results "
                               f"(float model rms {exact['rms']:.4f}, a1 {exact['a1']:.4f})", highlight=False)
        results = {r["scaling"] + "/" + (r["layer"] or ALL_LAYERS): r for r in done}
        self._update_tags(results, exact)
        if todo:
            delay = float(os.environ.get(TEST_DELAY_ENV, "0") or 0)
            with LayerProgress(self.console, total, len(done)) as progress:
                def on_result(item: Item, result: dict[str, Any]) -> None:
                    rec = self._commit(item, result, exact)
                    results[item.id] = rec
                    attempt["computed"] += 1
                    self._update_tags(results, exact)
                    progress.advance(item, rec)

                self.compute.evaluate(self.box, todo, delay, on_result)
        return self._complete(results, exact, attempt)

    # ------------------------------------------------------------------ the end
    def _artifacts_logged(self) -> bool:
        try:
            names = {a.path for a in self.sink.client.list_artifacts(self.record.mlflow_run_id, "study")}
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
                tags[f"orchestrator.study.{label}.most_sensitive"] = describe(ranked[-1])
                tags[f"orchestrator.study.{label}.least_sensitive"] = describe(ranked[0])
        tags["orchestrator.study.float_rms"] = f"{exact['rms']:.4f}"
        self.sink.set_tags({k: str(v)[:5000] for k, v in tags.items()})

    def _complete(self, results: dict[str, dict[str, Any]], exact: dict[str, Any],
                  attempt: dict[str, Any]) -> dict[str, Any]:
        rows = table_rows(exact, results, self.scalings)
        csv_text = to_csv(rows)
        png = plot(rows, self.scalings, exact,
                   f"{self.spec.name}: rms change when one layer is approximate ({self.spec.multiplier})")
        fs.write_bytes(fs.join(self.sdir, "table.csv"), csv_text.encode())
        fs.write_bytes(fs.join(self.sdir, "sensitivity.png"), png)
        if not self._artifacts_logged() or attempt["computed"]:
            with tempfile.TemporaryDirectory() as tmp:
                for name, data in (("layers.csv", csv_text.encode()), ("sensitivity.png", png)):
                    with open(os.path.join(tmp, name), "wb") as f:
                        f.write(data)
                    self.sink.log_artifact(os.path.join(tmp, name), "study")
        summary = summarize(rows, self.scalings, exact)
        self.sink.set_tags({"orchestrator.study.state": RunState.COMPLETED.value})
        if not self.sink.flush(force=True):
            raise RunError(f"study '{self.spec.name}': MLflow at {self.sink.where} did not answer; its results are "
                           "committed: re-run the same command to send them")
        attempt["finished_at"] = time.time()
        self.record.data["summary"] = summary
        self.engine.finish(RunState.COMPLETED)
        print_summary(self.spec.name, summary, self.sdir, self.record.data, self.console)
        return {"study_dir": self.sdir, "mlflow_run_id": self.record.mlflow_run_id, "computed": attempt["computed"],
                "done_before": attempt.get("done_before", 0), "summary": summary}
