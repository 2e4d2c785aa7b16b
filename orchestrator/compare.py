"""`orchestrator compare`: the runs of one MLflow experiment side by side, like the source's
loss-comparison table (mIoU, mRMSE, time, steps, interruptions), best value per column marked.

Everything is read from MLflow alone, so it works wherever the tracking server is reachable,
with no access to run storage.
"""

from __future__ import annotations

from typing import Any

from orchestrator.errors import RunError

# (column, metric or field, which way is better)
COLUMNS = (
    ("mIoU", "eval/mask_iou", "max"),
    ("mRMSE", "eval/depth_rmse", "min"),
    ("time_s", "time_s", "min"),
    ("steps", "steps", None),
    ("interruptions", "interruptions", None),
)


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
            raise RunError(f"no experiments in {tracking_uri}; run something first (`orchestrator run recipes/quickstart.yaml`)")
        exp = max(exps, key=lambda e: e.last_update_time or 0)
    else:
        exp = client.get_experiment_by_name(experiment)
        if exp is None:
            names = ", ".join(e.name for e in client.search_experiments())
            raise RunError(f"no MLflow experiment {experiment!r} in {tracking_uri}; experiments there: {names or 'none'}")
    rows = []
    for run in client.search_runs([exp.experiment_id], max_results=10_000):
        m, tags = run.data.metrics, run.data.tags
        if "orchestrator.run_name" not in tags:
            continue  # lr-find and other side runs of the experiment
        history = client.get_metric_history(run.info.run_id, "train/loss")
        end = run.info.end_time or None
        rows.append({
            "run_name": tags.get("orchestrator.run_name", run.info.run_name),
            "run_id": run.info.run_id,
            "state": run.info.status,
            "mask_loss": _losses(run.data.params, "mask"),
            "depth_loss": _losses(run.data.params, "depth"),
            "eval/mask_iou": m.get("eval/mask_iou"),
            "eval/depth_rmse": m.get("eval/depth_rmse"),
            "eval/depth_rmse_baseline": m.get("eval/depth_rmse_baseline"),
            # Wall time from the run's first start to its end, restarts and waits included.
            "time_s": round((end - run.info.start_time) / 1000, 1) if end else None,
            "steps": max((h.step for h in history), default=0),
            "interruptions": sum(1 for k in tags if k.startswith("orchestrator.interruption.")),
        })
    rows.sort(key=lambda r: r["run_name"])
    best = {}
    for _, key, way in COLUMNS:
        values = [r[key] for r in rows if r[key] is not None]
        if way and values:
            target = max(values) if way == "max" else min(values)
            best[key] = [r["run_name"] for r in rows if r[key] == target]
    return {"experiment": exp.name, "tracking_uri": tracking_uri, "runs": rows, "best": best}


def render(table: dict[str, Any], console) -> None:
    from rich.console import Console
    from rich.table import Table

    # Piped output (CI logs, notebooks) defaults to 80 columns, which truncates run names.
    console = Console(width=max(console.width, 160), soft_wrap=True) if not console.is_terminal else console
    t = Table(title=f"experiment {table['experiment']} ({len(table['runs'])} runs; * = best)")
    t.add_column("run")
    t.add_column("mask loss")
    t.add_column("depth loss")
    for title, _, _ in COLUMNS:
        t.add_column(title, justify="right")
    for r in table["runs"]:
        cells = []
        for _, key, _ in COLUMNS:
            v = r[key]
            text = "-" if v is None else (f"{v:.4f}" if isinstance(v, float) and key.startswith("eval/") else f"{v:g}" if isinstance(v, float) else str(v))
            if r["run_name"] in table["best"].get(key, []):
                text = f"[bold]{text}*[/bold]"
            cells.append(text)
        t.add_row(r["run_name"], r["mask_loss"], r["depth_loss"], *cells)
    console.print(t)
