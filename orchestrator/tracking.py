"""Driver-side MLflow: one MLflow run per orchestrator run, found again by the id in run storage."""

from __future__ import annotations

import os
from typing import Any

from common.recipe import Recipe


def resolve_tracking_uri(uri: str) -> str:
    """Make a relative sqlite path absolute: Ray workers run in other directories."""
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri.startswith(prefix + "/"):
        return prefix + os.path.abspath(uri[len(prefix):])
    if "://" not in uri:
        return os.path.abspath(uri)
    return uri


def _client(tracking_uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri)


def artifact_root(tracking_uri: str) -> str | None:
    """Next to a local sqlite store, artifacts go to ./mlartifacts; a server chooses its own."""
    if tracking_uri.startswith("sqlite:///"):
        db = tracking_uri[len("sqlite:///"):]
        return "file://" + os.path.join(os.path.dirname(db), "mlartifacts")
    return None


def local_artifact_location(tracking_uri: str, storage_root: str, name: str) -> str | None:
    """Local mode (a sqlite store): a new experiment's artifacts go under run storage
    (<run.storage>/mlartifacts/<experiment>), which outlives the machine as the checkpoints do;
    the store itself is copied there at each checkpoint (workers/tracking_store.py). A tracking
    server keeps its own artifact store: None."""
    if not tracking_uri.startswith("sqlite:///"):
        return None
    from storage import fs

    root = fs.join(storage_root, "mlartifacts", name)
    return "file://" + root if fs.is_local(root) else root


def ensure_experiment(tracking_uri: str, name: str, artifact_location: str | None = None) -> str:
    """The experiment's id, made if need be (its artifacts at `artifact_location` when given, else
    ./mlartifacts beside a sqlite store); the first contact with the store, so a store that
    cannot be opened (a bad scheme, a sqlite path under a file, a server that is down) is one
    RunError naming tracking.uri here, before anything is trained. An experiment that already
    exists keeps its artifact location."""
    try:
        client = _client(tracking_uri)
        exp = client.get_experiment_by_name(name)
        if exp is not None:
            return exp.experiment_id
        root = artifact_root(tracking_uri)
        if artifact_location is None and root:
            artifact_location = f"{root}/{name}"
        # MLflow 3's UI opens an experiment of unknown kind on its GenAI (traces) overview; this
        # kind opens it on the runs table and charts, where training runs are compared.
        return client.create_experiment(name, artifact_location=artifact_location,
                                        tags={"mlflow.experimentKind": "custom_model_development"})
    except Exception as exc:  # noqa: BLE001 - MLflow, SQLAlchemy and HTTP errors alike
        raise store_error(tracking_uri, exc, "tracking.uri") from None


def store_error(tracking_uri: str, exc: BaseException, field: str) -> Exception:
    """One line naming the tracking store (and the field or option that set it) and what to do."""
    from common.errors import RunError
    from common.redact import redact_text

    text = " ".join(str(exc).split())
    text = text.split(". ", 1)[0][:300]
    return RunError(f"{field} {redact_text(tracking_uri)}: cannot open the MLflow tracking store "
                    f"({type(exc).__name__}: {redact_text(text)}); use sqlite:///PATH (a file in a folder you can "
                    "write) or an MLflow server's http(s)://HOST:PORT")


def create_run(tracking_uri: str, experiment_id: str, recipe: Recipe) -> str:
    client = _client(tracking_uri)
    run = client.create_run(
        experiment_id,
        run_name=recipe.run.name,
        tags={"orchestrator.run_name": recipe.run.name, "orchestrator.recipe_sha256": recipe.sha256()},
    )
    from mlflow.entities import Param

    flat = recipe.flat_params()
    # One value per loss side as well ("bce_dice", "rmse+ssim"): MLflow's compare view and its
    # parallel-coordinates plot group runs by a param's value, not by which keys a run has.
    for part in ("mask", "depth"):
        terms = getattr(recipe.loss, part)
        flat[f"loss.{part}_terms"] = "+".join(k if w == 1 else f"{k}*{w:g}" for k, w in sorted(terms.items()))
    params = [Param(k, v[:6000]) for k, v in sorted(flat.items())]
    for i in range(0, len(params), 100):
        client.log_batch(run.info.run_id, params=params[i : i + 100])
    return run.info.run_id


def set_tags(tracking_uri: str, run_id: str, tags: dict[str, Any]) -> None:
    client = _client(tracking_uri)
    for k, v in tags.items():
        client.set_tag(run_id, k, str(v))


def end_run(tracking_uri: str, run_id: str, status: str) -> None:
    """status: FINISHED, FAILED or KILLED. A resumed run is set back to RUNNING first. An MLflow
    server that is down does not turn the run's end into a traceback: one warning line."""
    _tolerant(tracking_uri, f"mark MLflow run {run_id} {status}",
              lambda: _client(tracking_uri).set_terminated(run_id, status=status))


def mark_running(tracking_uri: str, run_id: str) -> None:
    _client(tracking_uri).update_run(run_id, status="RUNNING")


def mark_running_if_present(tracking_uri: str, run_id: str) -> bool:
    """mark_running; False when the store does not hold the run (a local store lost with its
    machine, and no copy in run storage to restore it from). A server that is down: a warning,
    and training resumes (its metrics wait in the chief's buffer: workers/mlflow_sink.py)."""
    from mlflow.exceptions import MlflowException

    try:
        _tolerant(tracking_uri, f"mark MLflow run {run_id} RUNNING", lambda: mark_running(tracking_uri, run_id))
    except MlflowException as exc:
        if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
            return False
        raise
    return True


def deliver_leftovers(tracking_uri: str, run_id: str | None, run_dir: str) -> None:
    """A completed run whose end found MLflow down left what it could not send (metric points,
    tags, artifacts) in run storage (workers/mlflow_sink.py): sent now, once, and the MLflow run
    marked FINISHED; still down, one warning line again. Nothing to do is one listing."""
    from workers.mlflow_sink import MlflowSink, has_leftovers

    if run_id is None or not has_leftovers(run_dir):
        return
    if MlflowSink(tracking_uri, run_id, run_dir).close(wait_s=0):
        end_run(tracking_uri, run_id, "FINISHED")


def _tolerant(tracking_uri: str, what: str, call) -> None:
    """Run an MLflow call with a few quick retries (not MLflow's four minutes); an outage (no
    connection, a timeout, a 5xx) is one warning line, any other error is raised."""
    import logging

    from common.redact import redact_text
    from workers.mlflow_sink import is_transient, quick_http

    try:
        with quick_http(retries="2"):
            call()
    except Exception as exc:
        if not is_transient(exc):
            raise
        text = redact_text(" ".join(str(exc).split()))[:200]
        logging.getLogger(__name__).warning("MLflow at %s unreachable: could not %s (%s: %s); the run goes on, "
                                            "MLflow shows its old status until the next run", redact_text(tracking_uri),
                                            what, type(exc).__name__, text)
