"""The `orchestrator` command line (names and exit codes as in CONTRACT.md)."""

from __future__ import annotations

import json
import logging
import os
import posixpath
import signal
import sys
from typing import Annotated, NoReturn, Optional

import typer
from rich.console import Console
from rich.table import Table

from common.errors import OrchestratorError, RecipeError, RunError, RunInterrupted
from orchestrator.process_exit import exit_code, leave, leave_at_once
from storage.errors import StorageError

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Chunked, preemption-proof training of vision models.")

from orchestrator.data_cli import data_app  # noqa: E402 - after `app` so the CLI reads top-down

app.add_typer(data_app, name="data")

# soft_wrap: piped output (CI logs, notebooks) keeps one line per message instead of 80-column wraps.
out = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)

SetOpt = Annotated[Optional[list[str]],  # noqa: UP045
                   typer.Option("--set",
                                help="Override a recipe key: --set stages.spine.batch_size=64 (YAML-typed value).")]


@app.command()
def run(
    recipe: Annotated[str, typer.Argument(help="Recipe YAML, e.g. recipes/quickstart.yaml.")],
    set_: SetOpt = None,
    address: Annotated[Optional[str],  # noqa: UP045
                       typer.Option("--address",
                                    help="Ray cluster (host:6379, http://host:8265 or ray://host:10001): the run is "
                                         "submitted as a Ray Job whose driver lives on the head. Default: this "
                                         "machine, with a local Ray.")] = None,
    detach: Annotated[bool,
                      typer.Option("--detach",
                                   help="With --address: submit (or find) the run's job and return at once.")] = False,
    workdir: Annotated[Optional[str],  # noqa: UP045
                       typer.Option("--workdir",
                                    help="With --address: where relative paths (runs/, mlflow.db, data/) resolve on "
                                         "the head. Default: this directory on a loopback cluster, ~/orchestrator on a "
                                         "remote one.")] = None,
    from_env: Annotated[bool,
                        typer.Option("--from-env", hidden=True,
                                     help="Read the resolved recipe from $ORCHESTRATOR_RECIPE_JSON (the Ray Job "
                                          "entrypoint).")] = False,
) -> None:
    """Start the run the recipe names, or resume it; a finished run is reported, not retrained."""
    from orchestrator import runner
    from orchestrator.recipes import load_recipe, validate_recipe
    from orchestrator.status import build_status
    from storage import fs

    if from_env:
        from orchestrator.jobs import RECIPE_ENV

        rec = validate_recipe(json.loads(os.environ[RECIPE_ENV]), source=f"${RECIPE_ENV}")
    else:
        rec = load_recipe(recipe, set_ or [])
    run_dir = fs.join(fs.normalize(rec.run.storage), rec.run.name)
    if address and address != "auto" and not from_env:
        from orchestrator.jobs import submit_or_attach

        # The job's log, streamed here, ends with the driver's own summary.
        raise typer.Exit(submit_or_attach(rec, run_dir, address, err, detach, workdir))
    try:
        runner.run(rec, address=address, console=err)
    except RunInterrupted as exc:
        # Name the exact command: a notebook user re-runs the cell, a terminal user pastes this.
        raise RunInterrupted(f"{exc}: {resume_command()}", exc.step) from None
    _print_summary(build_status(run_dir), rec.tracking.uri, rec.task)


def resume_command() -> str:
    """This process's own command line, as the user would type it again."""
    import shlex

    return "orchestrator " + shlex.join(sys.argv[1:])


def headline_metrics(metrics: dict[str, float], task: str) -> dict[str, float]:
    """The task's compare columns that are present, then its eval/*_baseline values: what the run
    line shows. Per-class values (dozens for classification and segmentation) stay in
    `status --json`."""
    from workers.tasks import get_task

    keys = [key for _, key, _ in get_task(task).compare_columns]
    keys += sorted(k for k in metrics if k.startswith("eval/") and k.endswith("_baseline") and k.count("/") == 1)
    return {k: metrics[k] for k in dict.fromkeys(keys) if k in metrics}


def _print_summary(status: dict | None, tracking_uri: str, task: str = "mask_depth") -> None:
    if not status:
        return
    final = status.get("final") or {}
    shown = headline_metrics(final.get("metrics") or {}, task)
    metrics = " ".join(f"{k}={v:.4f}" for k, v in shown.items())
    if status["state"] == "completed":
        metrics += f" (all metrics: `orchestrator status {status['run_name']} --json`)"
    err.print(f"run '{status['run_name']}': {status['state']} at step {status['global_step']}; {metrics}")
    ui = f"mlflow ui --backend-store-uri {tracking_uri}" if tracking_uri.startswith("sqlite:") else tracking_uri
    err.print(f"  weights_sha256 {final.get('weights_sha256')}\n  MLflow run {status['mlflow_run_id']} (open it with: "
              f"{ui})")


def _runs_root(storage: str) -> str:
    from common.redact import check_no_credentials
    from storage import fs

    check_no_credentials(storage, "--storage")

    return fs.normalize(storage)


@app.command()
def status(
    run_name: Annotated[Optional[str],  # noqa: UP045
                        typer.Argument(help="Run name (default: the most recently updated run).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the contract's status JSON.")] = False,
    storage: Annotated[str, typer.Option("--storage", help="Run storage root (the recipe's run.storage).")] = "runs",
    address: Annotated[Optional[str],  # noqa: UP045
                       typer.Option("--address",
                                    help="Ray cluster the run was submitted to: find its run storage and job "
                                         "there.")] = None,
) -> None:
    """Show a run's state, chunk log and final metrics."""
    from orchestrator.status import DAMAGED, build_status, list_runs
    from storage import fs

    root = _runs_root(storage)
    job = None
    if address:
        if run_name is None:
            raise RecipeError("status --address needs the RUN_NAME")
        from orchestrator.jobs import latest_job

        _, job = latest_job(address, run_name)
        if not fs.exists(fs.join(job.run_dir, "run.json")):
            raise RunError(f"run '{run_name}' is Ray job {job.submission_id} ({job.status}) on {address}, but its run "
                           f"storage {job.run_dir} is not reachable from here (a path on the head's disk); "
                           f"`orchestrator logs {run_name} --address {address}` shows its progress, or keep "
                           "run.storage on gs://")
        root = posixpath.dirname(job.run_dir.rstrip("/"))
    if run_name is None:
        runs = list_runs(root)
        if not runs:
            raise RunError(f"no runs under {root}; start one with `orchestrator run recipes/quickstart.yaml`")
        st = runs[0]
        if st["state"] == DAMAGED:  # damaged runs sort last: every run there is
            raise RunError(st["error"])
    else:
        st = build_status(fs.join(root, run_name))
        if st is None:
            raise RunError(f"no run '{run_name}' under {root}; `orchestrator runs` lists the runs there (--storage "
                           "picks another root)")
    if as_json:
        keys = ("run_name", "state", "mlflow_run_id", "global_step", "interruptions", "interruption_log", "stages",
                "chunk_log", "final")
        extra = {"run_dir": st["run_dir"], "last_checkpoint": st["last_checkpoint"], "error": st["error"]}
        if job:
            extra["ray_job"] = {"submission_id": job.submission_id, "status": job.status}
        out.print_json(json.dumps({k: st[k] for k in keys} | extra))
        return
    if job:
        out.print(f"Ray job {job.submission_id}: {job.status}")
    out.print(f"[bold]{st['run_name']}[/bold]: {st['state']}   step {st['global_step']}   interruptions "
              f"{st['interruptions']}   MLflow {st['mlflow_run_id']}")
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
def logs(
    run_name: Annotated[str, typer.Argument(help="Run name.")],
    address: Annotated[str, typer.Option("--address", help="Ray cluster the run was submitted to.")],
    follow_: Annotated[bool, typer.Option("--follow", "-f", help="Keep streaming until the run's job ends.")] = False,
) -> None:
    """Print the driver log of a run submitted to a cluster (its newest Ray job)."""
    from orchestrator.jobs import follow, latest_job

    jc, job = latest_job(address, run_name)
    err.print(f"run '{run_name}': Ray job {job.submission_id} ({job.status})")
    if follow_:
        raise typer.Exit(follow(jc, job.submission_id, sys.stdout.write, err))
    sys.stdout.write(jc.get_job_logs(job.submission_id))


@app.command()
def runs(
    as_json: Annotated[bool, typer.Option("--json")] = False,
    storage: Annotated[str, typer.Option("--storage", help="Run storage root.")] = "runs",
) -> None:
    """List the runs in run storage (a run whose files cannot be read is listed as damaged, with the file named)."""
    from orchestrator.status import DAMAGED, list_runs

    items = list_runs(_runs_root(storage))
    if as_json:
        # A damaged run (its run.json, plan.json or cursor.json unreadable) also carries `error`:
        # the message naming the file and what to do.
        keys = ("run_name", "state", "global_step", "interruptions", "mlflow_run_id")
        out.print_json(json.dumps([{k: r[k] for k in keys}
                                   | ({"error": r["error"], "run_dir": r["run_dir"]} if r["state"] == DAMAGED else {})
                                   for r in items]))
        return
    t = Table("run", "state", "step", "chunks done", "interruptions", "MLflow run")
    for r in items:
        done = sum(s["chunks_done"] for s in r["stages"])
        total = sum(s["chunks_total"] for s in r["stages"])
        if r["state"] == DAMAGED:
            t.add_row(r["run_name"], DAMAGED, "", "", "", "")
        else:
            t.add_row(r["run_name"], r["state"], str(r["global_step"]), f"{done}/{total}", str(r["interruptions"]),
                      r["mlflow_run_id"] or "")
    out.print(t)
    for r in items:
        if r["state"] == DAMAGED:
            err.print(f"damaged: {r['error']}", highlight=False, markup=False)


@app.command()
def sweep(
    sweep_recipe: Annotated[str, typer.Argument(help="Sweep YAML, e.g. recipes/loss_sweep.yaml.")],
    set_: SetOpt = None,
    address: Annotated[Optional[str],  # noqa: UP045
                       typer.Option("--address",
                                    help="Ray cluster to run the sweep's trials on (default: a local Ray).")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="List the runs the sweep would make, and stop.")] = False,
) -> None:
    """Run a sweep: one orchestrator run per grid point, concurrently, as Ray Tune trials.

    Re-running the same command resumes it: finished runs are reported, unfinished ones resume."""
    from orchestrator.sweep import expand, run_sweep

    spec, recipes = expand(sweep_recipe, set_ or [])
    if dry_run:
        for r in recipes:
            out.print(f"{r.run.name}: loss.mask={dict(r.loss.mask)} loss.depth={dict(r.loss.depth)}")
        return
    run_sweep(spec, recipes, address, err)
    _compare(recipes[0].tracking.experiment, recipes[0].tracking.uri, as_json=False)


def _compare(experiment: str | None, tracking_uri: str, as_json: bool) -> None:
    from common.redact import check_no_credentials
    from orchestrator.compare import collect, render
    from orchestrator.tracking import resolve_tracking_uri

    check_no_credentials(tracking_uri, "--tracking-uri")
    uri = resolve_tracking_uri(tracking_uri)
    try:
        table = collect(uri, experiment)
    except OrchestratorError:
        raise
    except Exception as exc:  # noqa: BLE001 - MLflow, SQLAlchemy and HTTP errors alike: one line naming the store
        from orchestrator.tracking import store_error

        raise store_error(uri, exc, "--tracking-uri") from None
    if as_json:
        out.print_json(json.dumps(table))
    else:
        render(table, out)


@app.command()
def compare(
    experiment: Annotated[Optional[str],  # noqa: UP045
                          typer.Argument(help="MLflow experiment (default: the most recently updated).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the table as JSON.")] = False,
    tracking_uri: Annotated[str,
                            typer.Option("--tracking-uri",
                                         help="MLflow tracking store (the recipe's "
                                              "tracking.uri).")] = "sqlite:///mlflow.db",
) -> None:
    """Compare an experiment's runs: mIoU, mRMSE, time, steps, interruptions; best per column marked."""
    _compare(experiment, tracking_uri, as_json)


@app.command("lr-find")
def lr_find(
    recipe: Annotated[str, typer.Argument(help="Recipe YAML.")],
    set_: SetOpt = None,
    stage: Annotated[Optional[str],  # noqa: UP045
                     typer.Option("--stage", help="Stage to test (default: the first).")] = None,
    steps: Annotated[int, typer.Option("--steps", min=10, help="Steps of exponentially rising LR.")] = 200,
    min_lr: Annotated[float, typer.Option("--min-lr")] = 1e-6,
    max_lr: Annotated[float, typer.Option("--max-lr")] = 1.0,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """LR range test: raise the LR over a few hundred steps, log the curve to MLflow, suggest max_lr."""
    from orchestrator.lr_find import run_lr_find
    from orchestrator.recipes import load_recipe

    rec = load_recipe(recipe, set_ or [])
    res = run_lr_find(rec, stage, steps, min_lr, max_lr, err)
    if as_json:
        out.print_json(json.dumps(res))
        return
    if res["suggested_max_lr"] is None:
        out.print(f"stage {res['stage']}: the loss diverged too early for a suggestion; lower --max-lr")
        return
    out.print(f"stage {res['stage']}: suggested max_lr {res['suggested_max_lr']:.3g} (steepest fall of the loss); "
              f"the loss was lowest at lr {res['suggested_lr_at_min_loss']:.3g}. "
              f"Use it with --set stages.{res['stage']}.lr={res['suggested_max_lr']:.3g}  (plot: MLflow run "
              f"{res['mlflow_run_id']})")


@app.command()
def models(as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """List the registered models and their named variants (task, parameter count), and the losses."""
    from workers.losses import LOSSES
    from workers.models import MODELS, count_params, model_task, model_variants
    from workers.models.registry import build_model

    def params(name: str, variant: str | None) -> int:
        with torch.device("meta"):  # shapes only: the 18M-param models cost no memory or init time
            return count_params(build_model(name, variant))

    import torch

    rows = []
    for name in MODELS.names():
        rows.append({"name": name, "model": name, "variant": None, "task": model_task(name),
                     "params": params(name, None)})
        for variant in model_variants(name):
            rows.append({"name": f"{name}/{variant}", "model": name, "variant": variant, "task": model_task(name),
                         "params": params(name, variant)})
    if as_json:
        out.print_json(json.dumps({"models": rows, "losses": LOSSES.names()}))
        return
    for r in rows:
        out.print(f"{r['name']:28s} {r['task']:15s} {r['params']:>12,} params")
    out.print("Use a variant with `model: {name: MODEL, variant: VARIANT}` in a recipe.")
    out.print(f"losses: {', '.join(LOSSES.names())}")


@app.command()
def study(
    study_spec: Annotated[str,
                          typer.Argument(metavar="STUDY", help="Study YAML, e.g. recipes/approx_mobilenetv2.yaml.")],
    set_: SetOpt = None,
    list_layers: Annotated[bool,
                           typer.Option("--list-layers",
                                        help="List the model's conv layers (kind, weight shape, multiplies at its "
                                             "resolution) and stop.")] = False,
    address: Annotated[Optional[str],  # noqa: UP045
                       typer.Option("--address",
                                    help="Ray cluster whose workers evaluate the layers (default: a local "
                                         "Ray).")] = None,
) -> None:
    """Layer sensitivity of approximate convolution: score a finished depth run with one conv layer
    at a time approximate. Re-running the same command computes only the missing layers."""
    from common.study import load_study
    from orchestrator.study import list_layers as print_layers
    from orchestrator.study import run_study

    spec = load_study(study_spec, set_ or [])
    if list_layers:
        print_layers(spec, out)
        return
    run_study(spec, address=address, console=err)


def _raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _log_level() -> str:
    """ORCHESTRATOR_LOG in any case (debug, INFO); an unknown value warns and keeps WARNING."""
    level = os.environ.get("ORCHESTRATOR_LOG", "").strip().upper() or "WARNING"
    if level in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
        return level
    print(f"warning: ORCHESTRATOR_LOG={level!r} is not a log level (DEBUG, INFO, WARNING, ERROR); using WARNING",
          file=sys.stderr)
    return "WARNING"


def main() -> None:
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")  # its table-creation INFO lines are noise here
    logging.basicConfig(level=_log_level(), format="%(levelname)s %(name)s: %(message)s")
    from common.redact import redact_text

    # GCE and Colab stop a VM with SIGTERM: turn it into KeyboardInterrupt so the run is
    # recorded as interrupted (and resumable) instead of dying mid-write.
    signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        # Without standalone mode click returns typer.Exit's code instead of raising it.
        code = app(standalone_mode=False, prog_name="orchestrator")
        if isinstance(code, int) and code:
            sys.exit(code)
    except OrchestratorError as exc:
        prefix = "interrupted" if isinstance(exc, RunInterrupted) else "error"
        err.print(f"{prefix}: {redact_text(str(exc))}", highlight=False, markup=False)
        if getattr(exc, "lease_lost", False):
            leave_at_once(exc.exit_code)
        sys.exit(exc.exit_code)
    except StorageError as exc:
        err.print(f"error: {redact_text(str(exc))}", highlight=False, markup=False)
        sys.exit(1)
    except KeyboardInterrupt:
        err.print("interrupted; re-run the same command to resume from the last checkpoint")
        sys.exit(130)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except typer.Abort:
        err.print("aborted")
        sys.exit(1)
    except Exception as exc:  # noqa: BLE001 - no traceback reaches a user: usage errors, then anything unforeseen
        if _is_usage_error(exc):
            _show_usage_error(exc)
        log = logging.getLogger("orchestrator")
        log.debug("unexpected error", exc_info=exc)
        text = " ".join(redact_text(f"{type(exc).__name__}: {exc}").split())
        err.print(f"error: unexpected {text}; this is a bug in orchestrator: re-run with ORCHESTRATOR_LOG=DEBUG "
                  "for the traceback and report it", highlight=False, markup=False)
        sys.exit(1)


def _is_usage_error(exc: BaseException) -> bool:
    """click's ClickException, whichever click raised it: typer >= 0.29 vendors its own
    (typer._click), whose exceptions are not the `click` package's."""
    return any(c.__name__ == "ClickException" for c in type(exc).__mro__)


def _show_usage_error(exc: BaseException) -> None:
    """One line naming the command and the argument or option, exit 2 (click's own report is a
    usage block and a hint over several lines); `orchestrator` or `orchestrator data` without a
    command prints the help, as before."""
    ctx = getattr(exc, "ctx", None)
    if type(exc).__name__ == "NoArgsIsHelpError":
        exc.show()
        sys.exit(exc.exit_code)
    message = " ".join(exc.format_message().split()).rstrip(".")
    if ctx is not None:
        message = f"{ctx.command_path}: {message} (`{ctx.command_path} --help` lists its arguments and options)"
    err.print(f"error: {message}", highlight=False, markup=False)
    sys.exit(exc.exit_code)


def entry() -> NoReturn:
    """The process's entry point (the `orchestrator` script, `python -m orchestrator.cli`): `main`,
    then an exit that skips the interpreter's teardown (orchestrator/process_exit.py says why).
    `main` alone raises SystemExit, for callers that run it inside their own process."""
    try:
        main()
        code = 0
    except SystemExit as exc:
        code = exit_code(exc.code)
    leave(code)


if __name__ == "__main__":
    entry()
