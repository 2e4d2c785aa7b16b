"""Where a worker's metrics, tags and artifacts go: the run's MLflow sink (workers/mlflow_sink.py) on
the chief of a run tracked in MLflow, a `NullSink` with the same methods everywhere else, so the
trainer and the checkpointer never ask whether there is one."""

from __future__ import annotations

import json
import os
import tempfile
from typing import TYPE_CHECKING, Any, Union

import torch

from workers import tracking_store

if TYPE_CHECKING:
    from workers.mlflow_sink import MlflowSink

Point = tuple[str, float, int]


class NullSink:
    """MlflowSink's public methods, doing nothing: a non-chief rank, or a run with no MLflow run."""

    run_id: str | None = None

    def resume(self, keys: set[str]) -> None:
        pass

    def connect(self) -> None:
        pass

    def load_held(self, keys: list[str]) -> None:
        pass

    def log_metrics(self, points: list[Point], dedupe: bool = False) -> None:
        pass

    def log_artifact(self, local_path: str, artifact_path: str | None = None) -> None:
        pass

    def set_tags(self, tags: dict[str, Any]) -> None:
        pass

    def undelivered(self) -> list[Point]:
        return []  # nothing is kept for MLflow: nothing stays pending on its account

    def flush(self, force: bool = False) -> bool:
        return True

    def close(self, wait_s: float = 0.0) -> bool:
        return True


Sink = Union["MlflowSink", NullSink]


def open_sink(config: dict[str, Any], is_chief: bool) -> Sink:
    """The chief's MLflow sink when the driver made an MLflow run, else a NullSink."""
    if not (is_chief and config.get("mlflow_run_id")):
        return NullSink()
    from workers.mlflow_sink import MlflowSink  # mlflow is imported by the chief only

    # Its client made in the background, after the first step (Trainer): nothing else in a worker
    # imports mlflow (workers/mlflow_sink.py).
    return MlflowSink(config["tracking_uri"], config["mlflow_run_id"], config["run_dir"], background=True)


def records(sink: Sink) -> bool:
    """Whether the sink sends anything anywhere: work done only for it (the prediction grid, which
    also draws from the RNG; the MLflow store copy) is skipped when it does not."""
    return not isinstance(sink, NullSink)


def store_copy_uri(config: dict[str, Any], sink: Sink) -> str | None:
    """The sqlite tracking URI whose store is copied into run storage with every checkpoint (local
    mode), or None."""
    uri = config.get("tracking_uri")
    return uri if records(sink) and tracking_store.sqlite_path(uri) else None


def log_final(sink: Sink, model: torch.nn.Module, final: dict[str, Any]) -> None:
    """The run's end: the model and final.json as artifacts, the weights hash as a tag, and a bounded
    wait for an MLflow that is down (the run completes either way)."""
    if not records(sink):
        return  # no copy of the weights to write for nobody
    with tempfile.TemporaryDirectory() as tmp:
        p = os.path.join(tmp, "state_dict.pt")
        torch.save(model.state_dict(), p)
        sink.log_artifact(p, "model")
        with open(os.path.join(tmp, "final.json"), "w") as f:
            json.dump(final, f, indent=2)
        sink.log_artifact(os.path.join(tmp, "final.json"))
    sink.set_tags({"orchestrator.weights_sha256": final["weights_sha256"]})
    sink.close()
