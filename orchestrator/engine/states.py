"""A run's states and the moves between them, as one table.

The values are the strings run.json, study.json, `orchestrator status --json` and `runs` show
(README: "state"); they are the contract, so they never change. A move the table does not hold
raises IllegalTransition: a driver that would, say, mark a completed run failed has a bug, and
saying so at once beats a run record that lies (Ray Train V2's controller keeps its states the
same way).
"""

from __future__ import annotations

from enum import StrEnum


class RunState(StrEnum):
    PENDING = "pending"  # recorded, no attempt started yet
    RUNNING = "running"
    INTERRUPTED = "interrupted"  # stopped cleanly (an interrupt, a preemption, storage gone quiet): resumable
    COMPLETED = "completed"
    FAILED = "failed"
    # Never recorded: `status`/`runs` list a run whose files cannot be read with this state.
    DAMAGED = "damaged"


class IllegalTransition(RuntimeError):
    """A move the table below does not allow: a bug in the driver, not a user error."""


# Every attempt starts with a move to RUNNING. RUNNING -> RUNNING is a new attempt after a driver
# that died without recording its end (SIGKILL, an expired VM: its lease lapsed, ours took over).
# COMPLETED -> RUNNING: a study whose committed result was torn after it completed redoes it;
# `run` never asks for it (a completed run is reported, not trained again).
ALLOWED: dict[RunState, frozenset[RunState]] = {
    RunState.PENDING: frozenset({RunState.RUNNING, RunState.FAILED}),
    RunState.RUNNING: frozenset({RunState.RUNNING, RunState.COMPLETED, RunState.FAILED, RunState.INTERRUPTED}),
    RunState.INTERRUPTED: frozenset({RunState.RUNNING}),
    RunState.FAILED: frozenset({RunState.RUNNING}),
    RunState.COMPLETED: frozenset({RunState.RUNNING}),
    RunState.DAMAGED: frozenset(),
}

# The states an attempt ends in, and the MLflow run status each one sets.
MLFLOW_STATUS: dict[RunState, str] = {
    RunState.COMPLETED: "FINISHED",
    RunState.FAILED: "FAILED",
    RunState.INTERRUPTED: "KILLED",
}


def check_move(current: RunState | str, new: RunState | str) -> RunState:
    """`new` as a RunState when the table allows current -> new; IllegalTransition otherwise."""
    cur, nxt = RunState(current), RunState(new)
    if nxt not in ALLOWED[cur]:
        allowed = ", ".join(sorted(s.value for s in ALLOWED[cur])) or "none"
        raise IllegalTransition(f"run state {cur.value} -> {nxt.value} is not allowed (from {cur.value}: {allowed})")
    return nxt
