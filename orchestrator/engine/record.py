"""The run's record in run storage (run.json) and the files workers leave beside it.

Everything needed to resume lives under <run.storage>/<run.name>/: the recipe, the plan, the
MLflow run id, checkpoints and the cursor, so a lost driver (an expired notebook) costs nothing.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any

from common.errors import RunError
from orchestrator.engine.states import RunState
from storage import fs
from storage.layout import RUN_JSON

# A running run whose progress file has not moved for this long has lost its driver or workers.
STALE_AFTER_S = 120.0


@dataclass
class RunRecord:
    run_name: str
    recipe: dict[str, Any]
    recipe_sha256: str
    state: RunState = RunState.PENDING
    data_uri: str = ""
    mlflow_run_id: str | None = None
    mlflow_experiment_id: str | None = None
    tracking_uri: str = ""
    created_at: float = field(default_factory=time.time)
    updated_at: float = field(default_factory=time.time)
    attempts: int = 0
    error: str | None = None

    def __post_init__(self) -> None:
        try:
            self.state = RunState(self.state)
        except ValueError:
            raise TypeError(f"unknown state {self.state!r}") from None  # load() names the file


def run_dir(recipe_storage: str, run_name: str) -> str:
    return fs.join(recipe_storage, run_name)


def _damaged(run_dir_uri: str, uri: str, what: str) -> RunError:
    """A run file that is not what this code wrote: one line naming it, not a traceback."""
    return RunError(f"{uri}: {what}; the run's files are damaged: restore the file, or move {run_dir_uri} away "
                    "and start the run again")


def _read_json(run_dir_uri: str, uri: str) -> Any:
    try:
        return fs.read_json(uri)
    except ValueError as exc:  # json.JSONDecodeError, UnicodeDecodeError
        raise _damaged(run_dir_uri, uri, f"not valid JSON ({' '.join(str(exc).split())})") from None


def load(run_dir_uri: str) -> RunRecord | None:
    uri = fs.join(run_dir_uri, RUN_JSON)
    if not fs.exists(uri):
        return None
    data = _read_json(run_dir_uri, uri)
    try:
        return RunRecord(**data)
    except TypeError:
        what = f"holds a JSON {type(data).__name__}" if not isinstance(data, dict) else f"keys {sorted(data)}"
        raise _damaged(run_dir_uri, uri, f"not a run record ({what})") from None


def save(run_dir_uri: str, rec: RunRecord) -> None:
    rec.updated_at = time.time()
    fs.write_json(fs.join(run_dir_uri, RUN_JSON), asdict(rec))


def read_optional(run_dir_uri: str, name: str) -> Any:
    uri = fs.join(run_dir_uri, name)
    return _read_json(run_dir_uri, uri) if fs.exists(uri) else None
