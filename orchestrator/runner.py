"""`orchestrator run`: start a run, or resume it, or report it when it already finished."""

from __future__ import annotations

import os
import sqlite3
from typing import Any

import numpy as np
from rich.console import Console

from common.errors import RecipeError, RunError, RunInterrupted
from common.plan import Plan, plan_for_dataset
from common.recipe import Recipe
from orchestrator import memory_check, tracking
from orchestrator.engine import Attempt, RunState, RunWatcher, cause_of_type, record, root_cause
from orchestrator.engine.lease import DriverLease, LeaseLostError
from orchestrator.failure_policy import STOPPED_CLEANLY, FatalErrorWatch
from orchestrator.interrupt import StopOnInterrupt
from orchestrator.progress import ProgressDisplay, count_progress
from storage import fs
from storage.errors import MountDropped, StorageError, StorageUnavailable
from storage.layout import CURSOR_JSON, ERROR_JSON, FINAL_JSON
from storage.plans import load_plan, save_plan
from workers.preemption import PreemptedError, StopRequested
from workers.windows import stored_order_note


def resolve_data(recipe: Recipe, console: Console) -> str:
    """The dataset URI; quickstart-style recipes synthesize it on first run."""
    return open_data(recipe, console)[0]


def open_data(recipe: Recipe, console: Console) -> tuple[str, Any]:
    """The dataset URI (synthesized on first run for quickstart-style recipes) and the dataset,
    opened and checked once: its index is the driver's biggest object (~100 MB at 1.2M samples)."""
    from storage.shards import DatasetError, open_dataset

    uri = recipe.data.uri
    if not uri:
        if not recipe.data.synthesize:
            raise RecipeError(
                "field 'data.uri' is empty: point it at a packed dataset (--set data.uri=gs://bucket/dataset or a "
                "local path), "
                "or make one with `orchestrator data synth DEST`"
            )
        uri = fs.normalize(fs.join("data", recipe.run.name))
        if not fs.exists(fs.join(uri, "manifest.json")):
            from storage.dest_check import foreign_files
            from storage.synth import synthesize
            from storage.synth_tasks import synthesize_task

            foreign = foreign_files(uri)
            if foreign:  # `run` has no --force: the folder is the user's, say how to keep both
                raise RecipeError(
                    f"{uri} holds files that orchestrator did not write ({', '.join(foreign[:3])}); the first run of "
                    f"'{recipe.run.name}' synthesizes its dataset there. Move those files, or set data.uri to a packed "
                    "dataset (or a new folder for the synthetic one)")
            sy = recipe.data.synth
            console.print(f"data.uri is empty: synthesizing {sy.samples} {recipe.task} samples into {uri} "
                          "(first run only)")
            with count_progress(console, "synthesizing", sy.samples) as advance:
                if recipe.task == "mask_depth":
                    synthesize(uri, sy.samples, seed=sy.seed, image_size=sy.image_size, progress=advance)
                else:
                    synthesize_task(recipe.task, uri, sy.samples, seed=sy.seed, image_size=sy.image_size,
                                    progress=advance)
    try:
        ds = open_dataset(uri)
    except DatasetError as exc:
        raise RunError(str(exc)) from None
    except StorageError as exc:
        raise RunError(f"{exc}. Check data.uri and your credentials") from None
    if recipe.data.expected_samples and ds.num_samples != recipe.data.expected_samples:
        raise RunError(
            f"{uri}: holds {ds.num_samples} samples, the recipe's data.expected_samples is "
            f"{recipe.data.expected_samples}; "
            "point data.uri at the full dataset or change data.expected_samples"
        )
    check_image_sizes(ds, recipe.data.image_size)
    return fs.normalize(uri), ds


def check_image_sizes(ds: Any, expected: tuple[int, int] | None) -> None:
    """Images of the wrong size fail before any worker starts, naming the first bad samples."""
    if expected is None:
        return
    h = ds.index.column("height").to_numpy()
    w = ds.index.column("width").to_numpy()
    bad = np.nonzero((h != expected[0]) | (w != expected[1]))[0]
    if len(bad):
        first = int(ds.sample_ids[bad[0]])
        raise RunError(
            f"{ds.describe(first)}: image is {int(h[bad[0]])}x{int(w[bad[0]])}, the recipe's data.image_size is "
            f"{expected[0]}x{expected[1]} ({len(bad)} of {ds.num_samples} samples differ); re-pack the data at that "
            "size "
            "or change data.image_size"
        )


def task_info(recipe: Recipe, ds: Any, train_ids: np.ndarray) -> dict[str, Any]:
    """What the recipe's task needs to know about the data (classes, its baseline constant), read
    once here from the manifest and index and sent to every worker."""
    from workers.tasks import TaskDataError, get_task

    task = get_task(recipe.task)
    try:
        task.check_dataset(ds)
        return task.data_info(ds, train_ids)
    except TaskDataError as exc:
        raise RecipeError(f"field 'task': {exc}") from None


def run(recipe: Recipe, address: str | None = None, console: Console | None = None) -> dict[str, Any]:
    """Run to completion; returns the final record. Raises OrchestratorError subclasses."""
    console = console or Console(stderr=True)
    storage_root = fs.normalize(recipe.run.storage)
    rdir = record.run_dir(storage_root, recipe.run.name)
    try:
        fs.probe_writable(storage_root)
    except StorageError as exc:
        cause: BaseException = exc
        while cause.__cause__ is not None:  # the filesystem's own error, under storage's wrappers
            cause = cause.__cause__
        reason = " ".join(f"{type(cause).__name__}: {cause}".split())
        raise RunError(f"run.storage {storage_root}: cannot write there ({reason}); set run.storage to a folder you "
                       "can create and write, or a bucket path with write access (check the credentials)") from None
    # Everything below happens under the run's lease, so two drivers never train one run. A driver
    # that loses the lease stops without committing (orchestrator/engine/lease.py). The watcher is
    # the one thread that follows run storage: the lease's heartbeat, later progress and errors.
    with RunWatcher(rdir) as watcher, DriverLease(rdir, recipe.run.name, watcher=watcher) as lease:
        return _run_leased(recipe, rdir, address, console, lease, watcher)


def _run_leased(recipe: Recipe, rdir: str, address: str | None, console: Console, lease: DriverLease,
                watcher: RunWatcher) -> dict[str, Any]:
    rec = record.load(rdir)
    if rec is not None:
        if rec.recipe_sha256 != recipe.sha256():
            raise RecipeError(
                f"run '{recipe.run.name}' already exists in {rdir} with a different recipe; "
                "re-run it with the recipe it started with, or pick a new run.name (--set run.name=...)"
            )
        _restore_tracking_store(recipe, rdir, rec, console)
        if rec.state == RunState.COMPLETED:
            tracking.deliver_leftovers(rec.tracking_uri, rec.mlflow_run_id, rdir)  # MLflow was down at its end
            final = record.read_optional(rdir, FINAL_JSON)
            console.print(f"run '{recipe.run.name}' already completed; not training again. "
                          f"`orchestrator status {recipe.run.name}` shows it.")
            return final or {}

    data_uri, ds = open_data(recipe, console)
    from workers.tasks import TaskDataError, get_task

    try:
        get_task(recipe.task).check_dataset(ds)  # before a run record exists: a wrong pairing leaves nothing behind
    except TaskDataError as exc:
        raise RecipeError(f"field 'task': {exc}") from None
    rec, plan = _new_run(recipe, rdir, data_uri, ds, console) if rec is None else \
        (rec, _resumed_plan(recipe, rdir, rec, data_uri, ds, console))
    rec.attempts += 1
    attempt = Attempt(rec, lambda: record.save(rdir, rec), store_copy_dir=rdir)
    attempt.begin()
    fs.remove(fs.join(rdir, ERROR_JSON))

    config = {
        "recipe": recipe.model_dump(mode="json"),
        "run_dir": rdir,
        "data_uri": data_uri,
        "task_info": task_info(recipe, ds, plan.train_ids),
        "tracking_uri": rec.tracking_uri,
        "mlflow_run_id": rec.mlflow_run_id,
        "attempt": rec.attempts,
        "lease_token": lease.token,  # the chief checks it before each commit (storage.lease.check_holder)
    }
    from orchestrator.launcher import launch

    watch = FatalErrorWatch(watcher)
    stop = StopOnInterrupt(rdir, rec.attempts, console, fatal_watch=watch)
    ends = _Ends(recipe.run.name, attempt)
    try:
        with ProgressDisplay(rdir, console, watcher), watch, stop:
            launch(recipe, config, address)
    except BaseException as exc:
        lease.check()  # lost: the heartbeat stopped the run; another driver owns run.json now, write nothing
        fenced = cause_of_type(exc, LeaseLostError)
        if fenced is not None:  # the chief found another holder before a commit: the same, seen first by the worker
            lease.lost = str(fenced)
            raise lease.lost_error() from None
        end = ends.after(exc, watch.fatal, rdir)
        if end is exc:
            raise
        raise end from ends.cause
    lease.verify()  # still ours in run storage, before this driver's last writes
    if watch.fatal is not None:
        raise ends.recorded(watch.fatal)
    final = _read_optional(rdir, FINAL_JSON) or {}
    if stop.requested and not final:
        # On Ray the workers end cleanly after the stop's checkpoint (a failure would be restarted).
        cursor = _read_optional(rdir, CURSOR_JSON) or {}
        raise ends.interrupted((cursor.get("cursor") or {}).get("global_step"))
    attempt.finish(RunState.COMPLETED)
    return final


def _new_run(recipe: Recipe, rdir: str, data_uri: str, ds: Any, console: Console) -> tuple[record.RunRecord, Plan]:
    plan = plan_for_dataset(recipe, ds)
    memory_check.check_chunks_fit(recipe, plan, ds)  # a chunk no worker can hold: exit 2 before anything exists
    # A bad tracking.uri fails here, leaving no plan. In local mode a new experiment keeps its
    # artifacts (prediction grids, the final model) in run storage, where they outlive the VM.
    tracking_uri = tracking.resolve_tracking_uri(recipe.tracking.uri)
    exp_id = tracking.ensure_experiment(tracking_uri, recipe.tracking.experiment, tracking.local_artifact_location(
        tracking_uri, fs.normalize(recipe.run.storage), recipe.tracking.experiment))
    save_plan(plan, rdir)
    run_id = tracking.create_run(tracking_uri, exp_id, recipe)
    rec = record.RunRecord(
        run_name=recipe.run.name, recipe=recipe.model_dump(mode="json"), recipe_sha256=recipe.sha256(),
        data_uri=data_uri, mlflow_run_id=run_id, mlflow_experiment_id=exp_id, tracking_uri=tracking_uri,
    )
    console.print(f"run '{recipe.run.name}': new, {_plan_line(plan)}; run storage {rdir}; MLflow run {run_id}")
    note = stored_order_note(ds, plan, recipe.stages[0].batch_size)
    if note:
        console.print(f"note: {note}", highlight=False, markup=False)
    return rec, plan


def _resumed_plan(recipe: Recipe, rdir: str, rec: record.RunRecord, data_uri: str, ds: Any, console: Console) -> Plan:
    plan = load_plan(rdir)
    if plan.num_samples != ds.num_samples:
        raise RunError(
            f"{data_uri}: holds {ds.num_samples} samples but run '{recipe.run.name}' was planned over "
            f"{plan.num_samples}; resume it on the same dataset, or start a new run.name"
        )
    if not tracking.mark_running_if_present(rec.tracking_uri, rec.mlflow_run_id):
        # Lost with its machine, and no copy to restore (a run started before copies were kept):
        # training resumes all the same, its MLflow history from here on in a new MLflow run.
        old_id = rec.mlflow_run_id
        rec.mlflow_experiment_id = tracking.ensure_experiment(
            rec.tracking_uri, recipe.tracking.experiment, tracking.local_artifact_location(
                rec.tracking_uri, fs.normalize(recipe.run.storage), recipe.tracking.experiment))
        rec.mlflow_run_id = tracking.create_run(rec.tracking_uri, rec.mlflow_experiment_id, recipe)
        console.print(f"warning: MLflow run {old_id} is not in {rec.tracking_uri} and run storage holds no copy of "
                      f"it; its history from here on goes to a new MLflow run {rec.mlflow_run_id}", highlight=False)
    console.print(f"run '{recipe.run.name}': resuming from {rdir} in MLflow run {rec.mlflow_run_id}")
    return plan


class _Ends:
    """How an attempt of `run` ends when training did not complete: each way ends the attempt
    (Attempt.finish, once) and returns the error the command raises."""

    def __init__(self, name: str, attempt: Attempt) -> None:
        self.name, self.attempt = name, attempt
        self.cause: BaseException | None = None  # what after()'s error is raised from (None: its own line only)

    def failed(self, msg: str, kind: str | None = None) -> RunError:
        self.attempt.finish(RunState.FAILED, msg)
        # A diverged run, or one whose restarts make no progress, would only fail again on resume:
        # its message says what to change instead.
        advice = "" if kind in ("diverged", "no_progress", "checkpoint") else \
            ". Fix the cause and re-run the same command to resume from the last checkpoint"
        return RunError(f"run '{self.name}' failed: {msg}{advice}")

    def stopped(self, msg: str) -> RunError:
        # The run is fine; its storage stopped answering. Nothing is lost: the last checkpoint stands.
        self.attempt.finish(RunState.INTERRUPTED, msg)
        return RunError(f"run '{self.name}' stopped: {msg}")

    def interrupted(self, step: int | None) -> RunInterrupted:
        self.attempt.finish(RunState.INTERRUPTED)
        at = f"at step {step}" if step is not None else "at its last checkpoint"
        return RunInterrupted(f"run '{self.name}': stopped {at} on your interrupt, checkpoint saved; "
                              "the same command resumes it there", step)

    def recorded(self, err: dict[str, Any]) -> RunError:
        return self.stopped(err["error"]) if err.get("kind") in STOPPED_CLEANLY else \
            self.failed(err["error"], err.get("kind"))

    def after(self, exc: BaseException, fatal: dict[str, Any] | None, rdir: str) -> BaseException:
        """What ends the attempt when launch() raised `exc` (the lease still ours)."""
        if fatal is not None:
            # A failure no restart can fix (failure_policy.py): the watch interrupted fit(), and
            # Ray Train's SIGINT handler aborted the run; whatever that raised, this is the cause.
            return self.recorded(fatal)
        if isinstance(exc, StopRequested):
            # In-process backend: the user's interrupt, and its checkpoint is saved.
            return self.interrupted(exc.step)
        if isinstance(exc, PreemptedError):
            # In-process backend: the notice came, the checkpoint is saved; the next run resumes there.
            self.attempt.finish(RunState.INTERRUPTED, str(exc))
            return RunError(f"run '{self.name}': {exc}. Re-run the same command to resume")
        if isinstance(exc, StorageUnavailable):
            # In-process backend: storage did not answer within its budget (a dropped mount, an outage).
            return self.stopped(fs.mount_advice(exc) if isinstance(exc, MountDropped) else
                                f"{exc}; nothing is lost: re-run the same command once the storage answers")
        if isinstance(exc, KeyboardInterrupt):
            self.attempt.finish(RunState.INTERRUPTED)
            return exc
        if not isinstance(exc, Exception):
            return exc
        self.cause = exc
        err = _read_optional(rdir, ERROR_JSON)
        return self.recorded(err) if err else self.failed(root_cause(exc))


def _read_optional(rdir: str, name: str) -> dict[str, Any] | None:
    try:
        return record.read_optional(rdir, name)
    except StorageError:
        return None


def _restore_tracking_store(recipe: Recipe, rdir: str, rec: record.RunRecord, console: Console) -> None:
    """Local mode on a fresh machine (an expired Colab VM): the MLflow store on local disk is
    gone, or older than the run. Bring the run's copy back from run storage first, so the run
    goes on in the same MLflow run with its whole history (workers/tracking_store.py)."""
    from workers import tracking_store

    if rec.mlflow_run_id is None or tracking_store.sqlite_path(rec.tracking_uri) is None:
        return
    db = tracking_store.sqlite_path(rec.tracking_uri)
    here = tracking.resolve_tracking_uri(recipe.tracking.uri)
    if not os.path.isdir(os.path.dirname(db)) and tracking_store.sqlite_path(here) is not None:
        # The run started on a machine with another layout (a different working directory):
        # the store goes where this machine's recipe says.
        console.print(f"MLflow store {db} is not on this machine: using {here}", highlight=False)
        rec.tracking_uri = here
        record.save(rdir, rec)
    try:
        done = tracking_store.restore(rec.tracking_uri, rec.mlflow_run_id, rdir)
    except StorageError as exc:
        raise RunError(f"run '{recipe.run.name}': cannot read the MLflow store's copy in run storage ({exc})") from None
    except (sqlite3.Error, RuntimeError, OSError) as exc:
        raise RunError(f"run '{recipe.run.name}': cannot restore MLflow run {rec.mlflow_run_id} into "
                       f"{tracking_store.sqlite_path(rec.tracking_uri)} ({type(exc).__name__}: {exc})") from None
    if done is None:
        return
    if done.experiment_id != rec.mlflow_experiment_id:
        rec.mlflow_experiment_id = done.experiment_id
        record.save(rdir, rec)
    where = "into a new local store" if done.how == "copied" else "into the local store"
    console.print(f"MLflow: restored run {rec.mlflow_run_id} ({done.metric_points} metric points) from run storage "
                  f"{where} {tracking_store.sqlite_path(rec.tracking_uri)} in {done.seconds:.2f} s", highlight=False)


def _plan_line(plan: Plan) -> str:
    chunks = " + ".join(f"{s.name} {s.num_chunks}" for s in plan.stages)
    return f"{len(plan.train_ids)} train / {len(plan.eval_ids)} eval samples, chunks: {chunks}"
