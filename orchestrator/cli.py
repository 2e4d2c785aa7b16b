"""The `orchestrator` command line (names and exit codes as in CONTRACT.md)."""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from orchestrator.errors import OrchestratorError, RunError
from storage.retry import StorageError

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Chunked, preemption-proof training of vision models.")

from orchestrator.data_cli import data_app  # noqa: E402 - after `app` so the CLI reads top-down

app.add_typer(data_app, name="data")

# soft_wrap: piped output (CI logs, notebooks) keeps one line per message instead of 80-column wraps.
out = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)

SetOpt = Annotated[Optional[list[str]], typer.Option("--set", help="Override a recipe key: --set stages.spine.batch_size=64 (YAML-typed value).")]  # noqa: UP045


@app.command()
def run(
    recipe: Annotated[str, typer.Argument(help="Recipe YAML, e.g. recipes/quickstart.yaml.")],
    set_: SetOpt = None,
    address: Annotated[Optional[str], typer.Option("--address", help="Ray cluster address (default: start a local Ray).")] = None,  # noqa: UP045
) -> None:
    """Start the run the recipe names, or resume it; a finished run is reported, not retrained."""
    from orchestrator import runner
    from orchestrator.recipe import load_recipe
    from orchestrator.status import build_status

    rec = load_recipe(recipe, set_ or [])
    runner.run(rec, address=address, console=err)
    from storage import fs

    status = build_status(fs.join(fs.normalize(rec.run.storage), rec.run.name))
    _print_summary(status, rec.tracking.uri)


def _print_summary(status: dict | None, tracking_uri: str) -> None:
    if not status:
        return
    final = status.get("final") or {}
    metrics = " ".join(f"{k}={v:.4f}" for k, v in sorted((final.get("metrics") or {}).items()))
    err.print(f"run '{status['run_name']}': {status['state']} at step {status['global_step']}; {metrics}")
    ui = f"mlflow ui --backend-store-uri {tracking_uri}" if tracking_uri.startswith("sqlite:") else tracking_uri
    err.print(f"  weights_sha256 {final.get('weights_sha256')}\n  MLflow run {status['mlflow_run_id']} (open it with: {ui})")


def _runs_root(storage: str) -> str:
    from storage import fs

    return fs.normalize(storage)


@app.command()
def status(
    run_name: Annotated[Optional[str], typer.Argument(help="Run name (default: the most recently updated run).")] = None,  # noqa: UP045
    as_json: Annotated[bool, typer.Option("--json", help="Print the contract's status JSON.")] = False,
    storage: Annotated[str, typer.Option("--storage", help="Run storage root (the recipe's run.storage).")] = "runs",
) -> None:
    """Show a run's state, chunk log and final metrics."""
    from orchestrator.status import build_status, list_runs
    from storage import fs

    root = _runs_root(storage)
    if run_name is None:
        runs = list_runs(root)
        if not runs:
            raise RunError(f"no runs under {root}; start one with `orchestrator run recipes/quickstart.yaml`")
        st = runs[0]
    else:
        st = build_status(fs.join(root, run_name))
        if st is None:
            raise RunError(f"no run '{run_name}' under {root}; `orchestrator runs` lists the runs there (--storage picks another root)")
    if as_json:
        keys = ("run_name", "state", "mlflow_run_id", "global_step", "interruptions", "interruption_log", "stages", "chunk_log", "final")
        out.print_json(json.dumps({k: st[k] for k in keys} | {"run_dir": st["run_dir"], "last_checkpoint": st["last_checkpoint"], "error": st["error"]}))
        return
    out.print(f"[bold]{st['run_name']}[/bold]: {st['state']}   step {st['global_step']}   interruptions {st['interruptions']}   MLflow {st['mlflow_run_id']}")
    for s in st["stages"]:
        out.print(f"  stage {s['name']}: {s['chunks_done']}/{s['chunks_total']} chunks")
    if st.get("progress") and st["state"] == "running":
        from orchestrator.progress import describe

        out.print(f"  {describe(st['progress'])}")
    if st["final"]:
        for k, v in sorted(st["final"]["metrics"].items()):
            out.print(f"  {k} = {v:.4f}")
        out.print(f"  weights_sha256 {st['final']['weights_sha256']}")
    if st["error"]:
        out.print(f"  [red]error[/red]: {st['error']}")


@app.command()
def runs(
    as_json: Annotated[bool, typer.Option("--json")] = False,
    storage: Annotated[str, typer.Option("--storage", help="Run storage root.")] = "runs",
) -> None:
    """List the runs in run storage."""
    from orchestrator.status import list_runs

    items = list_runs(_runs_root(storage))
    if as_json:
        out.print_json(json.dumps([{k: r[k] for k in ("run_name", "state", "global_step", "interruptions", "mlflow_run_id")} for r in items]))
        return
    t = Table("run", "state", "step", "chunks done", "interruptions", "MLflow run")
    for r in items:
        done = sum(s["chunks_done"] for s in r["stages"])
        total = sum(s["chunks_total"] for s in r["stages"])
        t.add_row(r["run_name"], r["state"], str(r["global_step"]), f"{done}/{total}", str(r["interruptions"]), r["mlflow_run_id"] or "")
    out.print(t)


@app.command()
def models(as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """List the registered models, losses and their parameter counts."""
    from workers.losses import LOSSES
    from workers.models import MODELS, build_model, count_params

    rows = [{"name": n, "params_width_1": count_params(build_model(n, width=1.0))} for n in MODELS.names()]
    if as_json:
        out.print_json(json.dumps({"models": rows, "losses": LOSSES.names()}))
        return
    for r in rows:
        out.print(f"{r['name']:10s} {r['params_width_1']:,} params at width 1")
    out.print(f"losses: {', '.join(LOSSES.names())}")


def _raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main() -> None:
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")  # its table-creation INFO lines are noise here
    logging.basicConfig(level=os.environ.get("ORCHESTRATOR_LOG", "WARNING"), format="%(levelname)s %(name)s: %(message)s")
    from orchestrator.redact import redact_text

    # GCE and Colab stop a VM with SIGTERM: turn it into KeyboardInterrupt so the run is
    # recorded as interrupted (and resumable) instead of dying mid-write.
    signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        app(standalone_mode=False)
    except OrchestratorError as exc:
        err.print(f"error: {redact_text(str(exc))}", highlight=False, markup=False)
        sys.exit(exc.exit_code)
    except StorageError as exc:
        err.print(f"error: {redact_text(str(exc))}", highlight=False, markup=False)
        sys.exit(1)
    except KeyboardInterrupt:
        err.print("interrupted; re-run the same command to resume from the last checkpoint")
        sys.exit(130)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except Exception as exc:  # click usage errors
        import click

        if isinstance(exc, click.ClickException):
            exc.show()
            sys.exit(exc.exit_code)
        raise


if __name__ == "__main__":
    main()
