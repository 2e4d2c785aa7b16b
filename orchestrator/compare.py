"""`orchestrator compare`: the runs of one MLflow experiment side by side, like the source's
loss-comparison table (mIoU, mRMSE, time, steps, interruptions), best value per column marked.

Everything is read from MLflow alone, so it works wherever the tracking server is reachable,
with no access to run storage.
"""

from __future__ import annotations

from typing import Any

from common.errors import RunError
from common.tasks import get_task_spec

# Columns every task's table has after its own metrics: (column, field, which way is better).
RUN_COLUMNS = (
    ("time_s", "time_s", "min"),
    ("steps", "steps", None),
    ("interruptions", "interruptions", None),
)
# Params that name a run rather than describe what it trained.
_IDENTITY_PARAMS = ("run.name", "tracking.experiment", "run.storage", "data.uri")


def _task_of(params: dict[str, str]) -> str:
    return params.get("task", "mask_depth")  # runs made before tasks existed are mask_depth runs


def columns_for(tasks: list[str]) -> list[tuple[str, str, str | None]]:
    """The tasks' own metric columns (each once, in task order), then the run columns."""
    cols: list[tuple[str, str, str | None]] = []
    for task in dict.fromkeys(tasks):
        try:
            spec = get_task_spec(task)
        except ValueError:  # a task by import path that does not import here: its runs show the run columns
            continue
        cols += [c for c in spec.compare_columns if c not in cols]
    return cols + list(RUN_COLUMNS)


def _settings(params: dict[str, str], differing: list[str]) -> str:
    """What sets a run apart from the others of its experiment (an ablation row's components)."""
    return ", ".join(f"{k}={params[k]}" for k in differing if k in params) or "-"


def _losses(params: dict[str, str], part: str) -> str:
    prefix = f"loss.{part}."
    terms = sorted((k[len(prefix):], v) for k, v in params.items() if k.startswith(prefix))
    return "+".join(n if float(w) == 1.0 else f"{n}*{float(w):g}" for n, w in terms) or "-"


def collect(tracking_uri: str, experiment: str | None) -> dict[str, Any]:
    """One row per MLflow run of the experiment (default: the most recently used one)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    if experiment is None:
        exps = [e for e in client.search_experiments() if e.name != "Default"]
        if not exps:
            raise RunError(f"no experiments in {tracking_uri}; run something first (`orchestrator run "
                           "recipes/quickstart.yaml`)")
        exp = max(exps, key=lambda e: e.last_update_time or 0)
    else:
        exp = client.get_experiment_by_name(experiment)
        if exp is None:
            names = ", ".join(e.name for e in client.search_experiments())
            raise RunError(f"no MLflow experiment {experiment!r} in {tracking_uri}; experiments there: "
                           f"{names or 'none'}")
    rows = []
    runs = [r for r in client.search_runs([exp.experiment_id], max_results=10_000)
            if "orchestrator.run_name" in r.data.tags]  # lr-find and other side runs are left out
    tasks = [_task_of(r.data.params) for r in runs]
    columns = columns_for(tasks or ["mask_depth"])
    keys = sorted({k for r in runs for k in r.data.params} - set(_IDENTITY_PARAMS))
    differing = [k for k in keys if len({r.data.params.get(k) for r in runs}) > 1]
    for run, task in zip(runs, tasks, strict=True):
        m, tags = run.data.metrics, run.data.tags
        history = client.get_metric_history(run.info.run_id, "train/loss")
        end = run.info.end_time or None
        rows.append({
            "run_name": tags.get("orchestrator.run_name", run.info.run_name),
            "run_id": run.info.run_id,
            "state": run.info.status,
            "task": task,
            "settings": _settings(run.data.params, differing),
            "mask_loss": _losses(run.data.params, "mask"),
            "depth_loss": _losses(run.data.params, "depth"),
            # Every eval metric of the run (the task's columns and their baselines among them).
            **{k: v for k, v in m.items() if k.startswith("eval/")},
            # Wall time from the run's first start to its end, restarts and waits included.
            "time_s": round((end - run.info.start_time) / 1000, 1) if end else None,
            "steps": max((h.step for h in history), default=0),
            "interruptions": sum(1 for k in tags if k.startswith("orchestrator.interruption.")),
        })
    rows.sort(key=lambda r: r["run_name"])
    studies = study_rows(client, exp.experiment_id)
    best = {}
    for _, key, way in columns:
        values = [r.get(key) for r in rows if r.get(key) is not None]
        if way and values:
            target = max(values) if way == "max" else min(values)
            best[key] = [r["run_name"] for r in rows if r.get(key) == target]
    return {"experiment": exp.name, "tracking_uri": tracking_uri, "runs": rows, "best": best,
            "columns": [{"title": t, "key": k, "better": w} for t, k, w in columns], "studies": studies}


def study_rows(client: Any, experiment_id: str) -> list[dict[str, Any]]:
    """One row per (study, scaling) of the experiment's runs tagged orchestrator.kind=study, from the
    tags the study keeps current as layers commit (orchestrator/study/)."""
    runs = client.search_runs([experiment_id], filter_string="tags.`orchestrator.kind` = 'study'", max_results=10_000)
    newest: dict[str, Any] = {}  # a study made again under its name (its folder removed) shows once, as made last
    for run in runs:
        name = run.data.tags.get("orchestrator.study_name", run.info.run_name)
        if name not in newest or run.info.start_time > newest[name].info.start_time:
            newest[name] = run
    rows = []
    for name, run in newest.items():
        tags = run.data.tags
        for scaling in [s for s in tags.get("orchestrator.study.scalings", "").split(",") if s]:
            prefix = f"orchestrator.study.{scaling}."
            rows.append({
                "study": name, "run_id": run.info.run_id, "state": run.info.status, "scaling": scaling,
                "multiplier": tags.get("orchestrator.study.multiplier"),
                "model_from": tags.get("orchestrator.study.model_from"),
                "layers_done": tags.get(prefix + "layers_done", f"0/{tags.get('orchestrator.study.layers', '?')}"),
                "most_sensitive": tags.get(prefix + "most_sensitive"),
                "least_sensitive": tags.get(prefix + "least_sensitive"),
                "float_rms": float(tags["orchestrator.study.float_rms"]) if "orchestrator.study.float_rms" in tags
                else None,
            })
    return sorted(rows, key=lambda r: (r["study"], r["scaling"]))


def render(table: dict[str, Any], console) -> None:
    from rich.console import Console

    # Piped output (CI logs, notebooks) defaults to 80 columns, which truncates run names.
    console = Console(width=max(console.width, 160), soft_wrap=True) if not console.is_terminal else console
    studies = table.get("studies") or []
    if table["runs"] or not studies:
        _render_runs(table, console)
    if studies:
        _render_studies(table["experiment"], studies, console)


def _render_studies(experiment: str, studies: list[dict[str, Any]], console) -> None:
    from rich.table import Table

    t = Table(title=f"experiment {experiment}: layer-sensitivity studies (sensitivity = |rms change| when that layer "
                    "alone is approximate)")
    for col in ("study", "scaling", "multiplier", "model", "state", "layers done", "float rms", "most sensitive",
                "least sensitive"):
        t.add_column(col, justify="right" if col in ("layers done", "float rms") else "left")
    for r in studies:
        t.add_row(r["study"], r["scaling"], r["multiplier"] or "-", r["model_from"] or "-", r["state"],
                  r["layers_done"],
                  "-" if r["float_rms"] is None else f"{r['float_rms']:.4f}", r["most_sensitive"] or "-",
                  r["least_sensitive"] or "-")
    console.print(t)


def _render_runs(table: dict[str, Any], console) -> None:
    from rich.table import Table
    t = Table(title=f"experiment {table['experiment']} ({len(table['runs'])} runs; * = best)")
    # mask_depth runs differ in their losses (the source's loss tables); other tasks' experiments
    # are ablations, whose rows are told apart by the settings that differ between them.
    loss_table = all(r["task"] == "mask_depth" for r in table["runs"])
    t.add_column("run")
    if loss_table:
        t.add_column("mask loss")
        t.add_column("depth loss")
    else:
        t.add_column("settings")
    for col in table["columns"]:
        t.add_column(col["title"], justify="right")
    for r in table["runs"]:
        cells = []
        for col in table["columns"]:
            key = col["key"]
            v = r.get(key)
            text = "-" if v is None else (f"{v:.4f}" if isinstance(v, float) and key.startswith("eval/") else f"{v:g}"
                                          if isinstance(v, float) else str(v))
            if r["run_name"] in table["best"].get(key, []):
                text = f"[bold]{text}*[/bold]"
            cells.append(text)
        lead = [r["mask_loss"], r["depth_loss"]] if loss_table else [r["settings"]]
        t.add_row(r["run_name"], *lead, *cells)
    console.print(t)
