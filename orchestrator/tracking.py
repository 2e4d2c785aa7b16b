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


def ensure_experiment(tracking_uri: str, name: str) -> str:
    client = _client(tracking_uri)
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    root = artifact_root(tracking_uri)
    # MLflow 3's UI opens an experiment of unknown kind on its GenAI (traces) overview; this
    # kind opens it on the runs table and charts, where training runs are compared.
    return client.create_experiment(name, artifact_location=f"{root}/{name}" if root else None,
                                    tags={"mlflow.experimentKind": "custom_model_development"})


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
    """status: FINISHED, FAILED or KILLED. A resumed run is set back to RUNNING first."""
    _client(tracking_uri).set_terminated(run_id, status=status)


def mark_running(tracking_uri: str, run_id: str) -> None:
    _client(tracking_uri).update_run(run_id, status="RUNNING")
