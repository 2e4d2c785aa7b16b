"""The chief worker's progress.json: what the driver's progress line and `status` show live."""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque
from typing import Any

from storage import fs
from storage.layout import PROGRESS_JSON

log = logging.getLogger(__name__)

PROGRESS_EVERY_S_LOCAL = 1.0
PROGRESS_EVERY_S_REMOTE = 10.0  # object stores bill and throttle per write


class Rate:
    """Samples/s and steps/s over the last steps: the last MIN_STEPS step times whatever their
    age, so that slow steps (the full UNet-224 on a CPU: ~30 s each) still give a rate at every
    step, and beyond those only the steps of the last WINDOW_S seconds, so that the rate follows
    a change of stage; at most MAX_STEPS."""

    WINDOW_S = 30.0
    MIN_STEPS = 4  # step times kept whatever their age: three intervals
    MAX_STEPS = 200

    def __init__(self) -> None:
        self.events: deque[tuple[float, int]] = deque(maxlen=self.MAX_STEPS)

    def add(self, samples: int) -> None:
        now = time.monotonic()
        self.events.append((now, samples))
        while len(self.events) > self.MIN_STEPS and now - self.events[0][0] > self.WINDOW_S:
            self.events.popleft()

    def _span(self) -> float:
        return self.events[-1][0] - self.events[0][0] if len(self.events) > 1 else 0.0

    def per_s(self) -> float | None:
        span = self._span()
        return sum(n for _, n in list(self.events)[1:]) / span if span > 0 else None

    def steps_per_s(self) -> float | None:
        span = self._span()
        return (len(self.events) - 1) / span if span > 0 else None


class ProgressWriter:
    """Throttled writes of progress.json; `force` writes at once (phase changes, first step).

    progress.json is advisory (nothing resumes from it), so it is written on a thread of its own,
    newest value wins: a store that stalls or fails these writes for minutes costs the training
    thread nothing, and one warning line says the live view is stale until a write lands again.
    """

    def __init__(self, run_dir: str, stage_names: list[str], chunks_per_stage: list[int], total_steps: int,
                 node_id: str | None) -> None:
        self.uri = fs.join(run_dir, PROGRESS_JSON)
        self.every_s = PROGRESS_EVERY_S_LOCAL if fs.is_local(run_dir) else PROGRESS_EVERY_S_REMOTE
        self.stage_names = stage_names
        self.chunks_per_stage = chunks_per_stage
        self.total_steps = total_steps
        self.node_id = node_id
        self.rate = Rate()
        self._last = 0.0
        self.precision: str | None = None  # what the worker resolved (workers/precision.py); the driver shows it once
        self._slot: dict[str, Any] | None = None
        self._cv = threading.Condition()
        self._closed = False
        self._failing = False
        self._thread = threading.Thread(target=self._write_loop, name="progress-writer", daemon=True)
        self._thread.start()

    def due(self, force: bool) -> bool:
        return force or time.monotonic() - self._last >= self.every_s

    def write(self, phase: str, cursor: Any, loss: float | None) -> None:
        self._last = time.monotonic()
        s = min(cursor.stage, len(self.stage_names) - 1)
        step_rate = self.rate.steps_per_s()
        self._post({
            "phase": phase, "stage": self.stage_names[s], "stage_index": s, "stages": len(self.stage_names),
            "chunk": cursor.chunk, "chunks": self.chunks_per_stage[s], "global_step": cursor.global_step,
            "total_steps": self.total_steps, "loss": loss, "samples_per_s": self.rate.per_s(),
            "eta_s": (self.total_steps - cursor.global_step) / step_rate if step_rate else None,
            "updated_at": time.time(), "pid": os.getpid(), "node_id": self.node_id, "precision": self.precision,
        })

    def _post(self, payload: dict[str, Any]) -> None:
        with self._cv:
            self._slot = payload
            self._cv.notify()

    def _write_loop(self) -> None:
        while True:
            with self._cv:
                while self._slot is None and not self._closed:
                    self._cv.wait()
                if self._slot is None:
                    return
                payload, self._slot = self._slot, None
            try:
                fs.write_json(self.uri, payload)
            except Exception as exc:  # noqa: BLE001 - advisory: training goes on, the next write may land
                if not self._failing:
                    log.warning("progress.json cannot be written (%s); training goes on, the live view is stale until "
                                "it can", exc)
                self._failing = True
                continue
            if self._failing:
                log.warning("progress.json is written again")
            self._failing = False

    def close(self, timeout_s: float = 10.0) -> None:
        """Write what is posted (the final phase), waiting at most timeout_s, then end the thread."""
        with self._cv:
            self._closed = True
            self._cv.notify()
        self._thread.join(timeout=timeout_s)
