"""The record of an interruption, made on the resume after it: its cause, read from the checkpoint
resumed from, and what it cost, from the last progress.json written before the cut."""

from __future__ import annotations

import json
import time
from typing import Any

from workers.state import TrainState
from workers.train.sink import Sink


def cause_of(meta: dict[str, Any], attempt: int) -> str:
    """Why training stopped, from the meta of the checkpoint resumed from (a stop's checkpoint is
    saved under its reason, workers/train/stops.py)."""
    reason = meta.get("reason")
    if reason == "preemption":
        return "preemption notice"
    if reason == "error":
        return "stopped on an error"
    if reason == "interrupt":
        return "interrupted by the user"
    if int(meta.get("attempt", attempt)) != attempt:
        return "driver lost"
    return "worker lost"


def record_interruption(state: TrainState, meta: dict[str, Any], previous: dict[str, Any] | None,
                        attempt: int, sink: Sink) -> None:
    """Count the interruption on the cursor, log it in the state (it rides in checkpoints) and tag it."""
    c = state.cursor
    c.interruptions += 1
    cause = cause_of(meta, attempt)
    now = time.time()
    last_step = int(previous["global_step"]) if previous else c.global_step
    last_alive = float(previous["updated_at"]) if previous else meta.get("saved_at", now)
    record = {
        "n": c.interruptions, "cause": cause, "resumed_at_step": c.global_step,
        "steps_lost": max(0, last_step - c.global_step),
        "time_lost_s": round(max(0.0, last_alive - meta.get("saved_at", last_alive)), 3),
        # Downtime only means something within one driver attempt; a re-run may come days later.
        "downtime_s": round(now - last_alive, 3) if cause not in ("driver lost", "interrupted by the user") else None,
        "at": now,
    }
    state.interruption_log.append(record)
    sink.set_tags({f"orchestrator.interruption.{c.interruptions}": json.dumps(record, sort_keys=True)})
