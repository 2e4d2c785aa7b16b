"""A stop as a value: what ends this attempt (a preemption notice, the user's interrupt, a fatal
error on some rank), asked for at a step and carried to where its checkpoint is taken.

A stop that comes on a chunk's last step waits for the chunk-end checkpoint, which stands in for
its own: the trainer hands the `Stop` to the chunk's end instead of setting a flag.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import NoReturn

from workers.data import ChunkPrefetcher
from workers.preemption import (
    FATAL,
    GCE,
    INTERRUPT,
    PreemptedError,
    PreemptionMonitor,
    StopRequested,
)
from workers.train.errors import FATAL_ERRORS


@dataclass(frozen=True)
class Stop:
    """`kind`: the agreed notice (workers/preemption.py: "drain", GCE, "sigterm", INTERRUPT, FATAL);
    `cause`: this rank's own fatal error, when it is the rank that failed."""

    kind: str
    cause: BaseException | None = None

    @property
    def reason(self) -> str:
        """The checkpoint reason the stop is saved under: a resume reads it back to name the cause
        of the interruption (workers/train/interruptions.py)."""
        return "error" if self.kind == FATAL else "interrupt" if self.kind == INTERRUPT else "preemption"

    def end(self, step: int) -> NoReturn:
        """End this attempt, the stop's checkpoint landed. FATAL raises this rank's own error (the
        driver reads it and stops the run), or a plain one when only another rank failed; a
        preemption notice raises PreemptedError, and Ray Train restarts from the checkpoint."""
        if self.kind == FATAL:
            if self.cause is not None:
                raise self.cause
            raise RuntimeError(f"another rank cannot fetch its part of the next chunk; stopped at step {step}")
        if self.kind == INTERRUPT:
            raise StopRequested(step)
        from workers import gce_notice

        # How much of GCE's ~30 s the checkpoint took, from the metadata server's notice to landed.
        took = (f" {time.monotonic() - gce_notice.noticed_at:.2f} s after the notice"
                if self.kind == GCE and gce_notice.noticed_at else "")
        raise PreemptedError(f"preemption notice ({self.kind}) at step {step}: checkpoint saved{took}, "
                             "resuming from it")


def ask(monitor: PreemptionMonitor, prefetcher: ChunkPrefetcher, step: int) -> Stop | None:
    """The stop the ranks agree on at this step, or None. A failed background fetch of the next
    chunk counts when no restart could fix it; any other error is raised, as before, when the
    chunk is needed."""
    failed = prefetcher.failure()
    if not isinstance(failed, FATAL_ERRORS):
        failed = None
    notice = monitor.notice(step, fatal=failed is not None)
    return Stop(notice, failed) if notice else None
