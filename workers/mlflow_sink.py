"""The chief worker's line to MLflow: committed metrics, prediction grids, checkpoint URIs.

The driver creates the MLflow run; the worker only appends to it by id, so every restart
of every process writes into the same run.
"""

from __future__ import annotations

import logging
import time
from typing import Any

log = logging.getLogger(__name__)

MAX_BATCH = 1000  # MLflow's limit of metrics per log_batch call


class MlflowSink:
    def __init__(self, tracking_uri: str, run_id: str) -> None:
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=tracking_uri)
        self.run_id = run_id
        # Per metric, the highest step MLflow already held when this process resumed. Steps at or
        # below it are being trained again after a cut; their points are not sent twice.
        self.floor: dict[str, int] = {}

    def resume(self, keys: set[str]) -> None:
        self.floor = self._logged_through(keys)

    def _logged_through(self, keys: set[str]) -> dict[str, int]:
        """Highest step already in MLflow per metric key (-1 if none)."""
        out = {}
        for key in keys:
            hist = self.client.get_metric_history(self.run_id, key)
            out[key] = max((m.step for m in hist), default=-1)
        return out

    def log_metrics(self, points: list[tuple[str, float, int]], dedupe: bool = False) -> None:
        """Send (key, value, step) points. With dedupe, points MLflow already holds are skipped,
        which makes re-sending a restored checkpoint's pending points idempotent."""
        from mlflow.entities import Metric

        if not points:
            return
        if dedupe:
            through = self._logged_through({k for k, _, _ in points})
            points = [p for p in points if p[2] > through[p[0]]]
        points = [p for p in points if p[2] > self.floor.get(p[0], -1)]
        now = int(time.time() * 1000)
        metrics = [Metric(k, float(v), now, int(s)) for k, v, s in points]
        for i in range(0, len(metrics), MAX_BATCH):
            self.client.log_batch(self.run_id, metrics=metrics[i : i + MAX_BATCH])

    def log_artifact(self, local_path: str, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, local_path, artifact_path)

    def set_tags(self, tags: dict[str, Any]) -> None:
        for k, v in tags.items():
            self.client.set_tag(self.run_id, k, str(v))
