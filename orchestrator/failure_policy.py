"""Which worker failures are worth a restart, and stopping the run at once when one is not.

Ray Train restarts a failed worker group up to `execution.max_failures` times: right for a lost
process or node, wrong for a 403, a missing bucket or a shard that failed its checksum twice,
where every restart fails the same way after a full start-up (23.5 s measured for three
restarts on the quickstart). The loop writes such failures to the run's error.json; this
watch, on the driver, sees it and stops the run within a second, naming the cause.
"""

from __future__ import annotations

import _thread
from typing import Any

from orchestrator.engine.watcher import RunWatcher
from storage.layout import ERROR_JSON

# error.json kinds that a restart cannot fix: bad data, a 401/403/404-class storage error, a
# diverged run, restarts that make no progress, no usable checkpoint, a dropped mount (it stays
# down until the user remounts it). "unavailable" (transient faults past their retry budget) is
# not here: Ray Train's restart resumes from the last checkpoint once the store answers again.
NOT_RETRYABLE = frozenset({"data", "storage", "diverged", "no_progress", "checkpoint", "mount"})
# Kinds where the run itself is fine and stopped cleanly: it is "interrupted", not "failed".
STOPPED_CLEANLY = frozenset({"mount", "unavailable"})
POLL_S = 0.5


def retry_can_fix(kind: str | None) -> bool:
    return kind not in NOT_RETRYABLE


class FatalErrorWatch:
    """While the block runs, the attempt's RunWatcher reads error.json every POLL_S; on a failure a
    restart cannot fix, this interrupts the main thread (blocked in trainer.fit()) and keeps the
    record in `.fatal`."""

    def __init__(self, watcher: RunWatcher) -> None:
        self.watcher = watcher
        self.fatal: dict | None = None
        self._entry: Any = None

    def __enter__(self) -> FatalErrorWatch:
        self._entry = self.watcher.watch_json(ERROR_JSON, POLL_S, self.seen)
        return self

    def __exit__(self, *exc: object) -> None:
        self.watcher.remove(self._entry)

    def seen(self, rec: dict | None) -> None:
        """The watcher's callback: error.json's content, or None while there is none."""
        if self.fatal is not None or not isinstance(rec, dict) or retry_can_fix(rec.get("kind")):
            return
        self.fatal = rec
        _thread.interrupt_main()
