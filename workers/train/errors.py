"""The failures a worker records for the driver (error.json), and the kind each is recorded as."""

from __future__ import annotations

from storage.checkpoints import CheckpointCorruptError
from storage.errors import MountDropped, StorageError, StorageUnavailable
from storage.shards import DatasetError
from workers.data import DataError


class DivergedError(RuntimeError):
    """Non-finite losses, `execution.max_nonfinite_steps` in a row: no restart can fix a diverged run."""


class NoProgressError(RuntimeError):
    """The workers restarted `execution.max_restarts_without_progress` times without a new checkpoint."""


# Failures recorded for the driver (error.json). Those of a kind in orchestrator/failure_policy.py's
# NOT_RETRYABLE stop the run at once; StorageUnavailable (transient faults past their budget) is
# recorded too but left to Ray Train's restart, which resumes from the last checkpoint.
FATAL_ERRORS = (DataError, DatasetError, StorageError, DivergedError, NoProgressError, CheckpointCorruptError)


def error_kind(exc: BaseException) -> str:
    """The error.json kind of a recorded failure (orchestrator/failure_policy.py decides on it)."""
    if isinstance(exc, MountDropped):
        return "mount"
    if isinstance(exc, StorageUnavailable):
        return "unavailable"
    if isinstance(exc, (DataError, DatasetError)):
        return "data"
    if isinstance(exc, DivergedError):
        return "diverged"
    if isinstance(exc, NoProgressError):
        return "no_progress"
    if isinstance(exc, CheckpointCorruptError):
        return "checkpoint"
    return "storage"
