"""One attempt of a run or a study: its record moves through the state table (states.py), and
the attempt ends ONCE, in one place (`finish`).

The end is the same for every plan: the record saved with its state and reason, the MLflow run
marked with the matching status, and (for a run) the MLflow store copied into run storage. Each
step is best-effort: storage or MLflow that stopped answering must not turn a clean stop into a
traceback (the next attempt re-reads what it needs from the checkpoints).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Protocol

from common.redact import redact_text
from orchestrator import tracking
from orchestrator.engine.states import MLFLOW_STATUS, IllegalTransition, RunState, check_move
from storage.errors import StorageError

log = logging.getLogger(__name__)


class Record(Protocol):
    """What the engine needs of a record (a run's RunRecord, a study's StudyRecord)."""

    state: RunState
    error: str | None
    tracking_uri: str
    mlflow_run_id: str | None


class Attempt:
    """`save` writes the record where it lives; `store_copy_dir`, when given, is where the MLflow
    store's copy goes at the attempt's end (a run's folder; a study keeps none)."""

    def __init__(self, record: Record, save: Callable[[], None], store_copy_dir: str | None = None) -> None:
        self.record = record
        self._save = save
        self.store_copy_dir = store_copy_dir
        self.ended: RunState | None = None  # the state finish() recorded, once it has

    @property
    def state(self) -> RunState:
        return RunState(self.record.state)

    def move(self, state: RunState, error: str | None = None) -> None:
        """A move the table allows, saved (storage errors raise: the attempt has not started)."""
        self.record.state = check_move(self.record.state, state)
        self.record.error = error
        self._save()

    def begin(self) -> None:
        """The attempt starts: RUNNING, no error, saved, and the store's copy made (a new run's
        params are in run storage before its first step)."""
        self.move(RunState.RUNNING)
        self.copy_tracking_store()

    def finish(self, state: RunState, reason: str | None = None) -> bool:
        """End the attempt in `state` (completed, failed or interrupted) with `reason`: save the
        record, end the MLflow run, copy the store. Only the first call does anything (False after)."""
        if self.ended is not None:
            return False
        new = check_move(self.record.state, state)
        if new not in MLFLOW_STATUS:
            raise IllegalTransition(f"an attempt ends completed, failed or interrupted, not {new.value}")
        self.ended = new
        self.record.state, self.record.error = new, reason
        try:
            self._save()
        except StorageError as exc:
            log.warning("could not record the run's state (%s) in run storage: %s", new.value, exc)
        status = MLFLOW_STATUS[new]
        try:
            tracking.end_run(self.record.tracking_uri, self.record.mlflow_run_id, status)
        except Exception as exc:  # noqa: BLE001 - the tracking server may be down; the state is recorded above
            log.warning("could not mark the MLflow run %s as %s: %s", self.record.mlflow_run_id, status,
                        redact_text(str(exc)))
        self.copy_tracking_store()
        return True

    def copy_tracking_store(self) -> None:
        """The driver's copies of the MLflow store (a new run's params, a run's end state); the chief
        worker writes one at each checkpoint. A failure costs nothing but that copy: say so, go on."""
        from workers import tracking_store

        if self.store_copy_dir is None or self.record.mlflow_run_id is None:
            return
        try:
            tracking_store.save_copy(self.record.tracking_uri, self.record.mlflow_run_id, self.store_copy_dir)
        except Exception as exc:  # noqa: BLE001 - storage or sqlite: the run itself is unaffected
            log.warning("could not copy the MLflow store into run storage: %s", exc)


def cause_of_type(exc: BaseException, kind: type[BaseException]) -> BaseException | None:
    """`exc` or the first exception of `kind` in its chain of causes (Ray wraps worker errors)."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, kind):
            return seen
        nxt = getattr(seen, "cause", None) or seen.__cause__
        seen = None if nxt is seen else nxt
    return None


def root_cause(exc: BaseException) -> str:
    """The innermost exception's message: Ray wraps worker errors several layers deep. A storage
    error's own message names the URI, so the search stops there rather than at its cause."""
    from storage import fs
    from storage.errors import MountDropped

    seen = exc
    while not isinstance(seen, StorageError):
        nxt = getattr(seen, "cause", None) or seen.__cause__
        if nxt is None or nxt is seen:
            break
        seen = nxt
    if isinstance(seen, MountDropped):
        return fs.mount_advice(seen)
    if isinstance(seen, StorageError):
        return str(seen)
    text = str(seen).strip().splitlines()
    return f"{type(seen).__name__}: {text[-1] if text else ''}"
