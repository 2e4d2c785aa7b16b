"""The driver's one run engine: what `run`, `sweep` and `study` share.

- states.py   RunState (the strings status JSON shows) and the table of allowed moves
- record.py   a run's record in run storage (run.json)
- attempt.py  one attempt: its moves, and its end in ONE place (`Attempt.finish`)
- lease.py    one driver per run, fenced; its heartbeat is a tick of the watcher
- watcher.py  the ONE thread that follows run storage (lease, progress, error) and calls back

A plan (orchestrator/runner.py, sweep.py, study/) decides what an attempt computes; the engine
decides how it starts, is watched and ends.
"""

from orchestrator.engine import record
from orchestrator.engine.attempt import Attempt, cause_of_type, root_cause
from orchestrator.engine.states import (
           ALLOWED,
           MLFLOW_STATUS,
           IllegalTransition,
           RunState,
           check_move,
)
from orchestrator.engine.watcher import RunWatcher

__all__ = ["ALLOWED", "MLFLOW_STATUS", "Attempt", "IllegalTransition", "RunState", "RunWatcher", "cause_of_type",
           "check_move", "record", "root_cause"]
