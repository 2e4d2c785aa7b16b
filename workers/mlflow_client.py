"""The MLflow client of the chief's sink (workers/mlflow_sink.py), made at once or in the background.

In the background (the training worker's sink) it is made in a thread that start() begins:
importing mlflow and opening its store took ~2.5 s of a worker's start before its first step
(bench.scale's first step, sqlite store, 2-core machine). Begun with the worker, that thread took
the cores and the GIL that the first chunk and the model's set-up needed, and the first step came
later still; the trainer starts it after its first step, when a GPU's work overlaps it. Only where
nothing else imports mlflow meanwhile: two threads importing its modules at once can meet a partly
imported one (the driver does), so the driver's and the study's sinks make theirs at once.
"""

from __future__ import annotations

import threading
from typing import Any


class ClientMaker:
    def __init__(self, tracking_uri: str, background: bool) -> None:
        self._uri = tracking_uri
        self._client: Any = None
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None
        if not background:
            self._make()
            if self._error is not None:
                raise self._error

    def _make(self) -> None:
        try:
            from mlflow.tracking import MlflowClient

            self._client = MlflowClient(tracking_uri=self._uri)
        except BaseException as exc:  # noqa: BLE001 - raised where the client is first needed
            self._error = exc

    def start(self) -> None:
        """Begin making the client in a thread (once; nothing when it is made)."""
        if self._client is None and self._error is None and self._thread is None:
            self._thread = threading.Thread(target=self._make, name="mlflow-client", daemon=True)
            self._thread.start()

    def ready(self) -> bool:
        """Made (or failed to be): get() returns (or raises) at once."""
        return self._client is not None or self._error is not None

    def get(self) -> Any:
        """The client (starting and waiting for it); the error that making it raised."""
        self.start()
        if self._thread is not None:
            self._thread.join()
        if self._client is None:
            raise self._error or RuntimeError("the MLflow client was not made")
        return self._client

    def set(self, client: Any) -> None:
        """Use this client instead (tests hand in a stand-in)."""
        if self._thread is not None:
            self._thread.join()
        self._client, self._error = client, None
