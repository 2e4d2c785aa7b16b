"""Which worker failures are worth a restart, and stopping the run at once when one is not.

Ray Train restarts a failed worker group up to `execution.max_failures` times: right for a lost
process or node, wrong for a 403, a missing bucket or a shard that failed its checksum twice,
where every restart fails the same way after a full start-up (23.5 s measured for three
restarts on the quickstart). The loop writes such failures to the run's error.json; this
watch, on the driver, sees it and stops the run within a second, naming the cause.
"""

from __future__ import annotations

import _thread
import threading

from storage import fs
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
    """While the block runs, poll error.json; on a failure a restart cannot fix, interrupt the
    main thread (blocked in trainer.fit()) and keep the record in `.fatal`."""

    def __init__(self, run_dir: str) -> None:
        self.uri = fs.join(run_dir, ERROR_JSON)
        self.fatal: dict | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="fatal-error-watch", daemon=True)

    def __enter__(self) -> FatalErrorWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _watch(self) -> None:
        while not self._stop.wait(POLL_S):
            try:
                rec = fs.read_json(self.uri)
            except Exception:  # noqa: BLE001 - absent (the normal case) or mid-write
                continue
            if not retry_can_fix(rec.get("kind")):
                self.fatal = rec
                _thread.interrupt_main()
                return
