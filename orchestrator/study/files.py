"""What a study keeps: its folder, its record (study.json), its result files and the MLflow
points each result becomes. A result is committed as one file, whole; a file that does not parse
or does not belong to this study is redone."""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any

from common.study import StudySpec
from orchestrator.engine import RunState
from storage import fs

log = logging.getLogger(__name__)

STUDY_JSON = "study.json"
METRICS = ("a1", "a2", "a3", "rel", "rms", "log10")
# What one layer's record holds besides its metrics, and the MLflow keys it becomes.
LAYER_KEYS = (*METRICS, *(f"delta_{m}" for m in METRICS), "saturation_inputs", "saturation_weights", "saturation",
              "seconds")
# The layer ranking: how far the rms (metres) moves from the float model's when that layer alone is
# approximate, either way (on a few images a small change can go either way by chance).
SENSITIVITY_KEY = "delta_rms"


def sensitivity(rec: dict[str, Any]) -> float:
    return abs(rec[SENSITIVITY_KEY])


def study_dir(spec: StudySpec) -> str:
    return fs.join(fs.normalize(spec.storage), "studies", spec.name)


def layer_file(sdir: str, scaling: str, layer: str) -> str:
    return fs.join(sdir, "layers", scaling, f"{layer}.json")


def read_valid(uri: str, sha: str, required: tuple[str, ...]) -> dict[str, Any] | None:
    """A committed result, or None when absent, torn or not this study's (it is then redone)."""
    try:
        data = fs.read_json(uri)
    except FileNotFoundError:
        return None
    except ValueError:
        log.warning("%s: not valid JSON; computing it again", uri)
        return None
    if not isinstance(data, dict) or data.get("spec_sha256") != sha or any(k not in data for k in required):
        log.warning("%s: not a result of this study; computing it again", uri)
        return None
    return data


def finite(points: list[tuple[str, float, int]]) -> list[tuple[str, float, int]]:
    """MLflow gets finite values only (a collapsed layer's metric may be inf or nan; its file keeps it)."""
    return [p for p in points if isinstance(p[1], (int, float)) and math.isfinite(p[1])]


@dataclass
class Item:
    """One unit of work: a scaling and the layers approximate in it (one, or all for a reference)."""

    id: str
    scaling: str
    layers: list[str]
    table: str  # "approx" or "exact"
    uri: str
    index: int | None = None  # the layer's step in the study order; None for a reference
    input_scale: dict[str, float] = field(default_factory=dict)
    weight_scale: dict[str, float] = field(default_factory=dict)

    def task_item(self) -> dict[str, Any]:
        return {"id": self.id, "layers": self.layers, "table": self.table,
                "input_scale": self.input_scale, "weight_scale": self.weight_scale}



class StudyRecord:
    """study.json as the engine sees it (orchestrator/engine/attempt.py's Record): the dict is
    what is written, keys and all; a study records no error text (its failures raise)."""

    def __init__(self, data: dict[str, Any], sdir: str) -> None:
        self.data, self.sdir = data, sdir
        self.error: str | None = None

    @property
    def state(self) -> RunState:
        return RunState(self.data["state"])

    @state.setter
    def state(self, value: RunState) -> None:
        self.data["state"] = RunState(value)

    @property
    def tracking_uri(self) -> str:
        return self.data["tracking_uri"]

    @property
    def mlflow_run_id(self) -> str | None:
        return self.data["mlflow_run_id"]

    def save(self) -> None:
        self.data["updated_at"] = time.time()
        fs.write_json(fs.join(self.sdir, STUDY_JSON), self.data)


# ----------------------------------------------------------------------------------- MLflow points
def layer_points(rec: dict[str, Any]) -> list[tuple[str, float, int]]:
    return [(f"study/{rec['scaling']}/{k}", rec[k], rec["index"]) for k in LAYER_KEYS if rec.get(k) is not None]


def reference_points(rec: dict[str, Any]) -> list[tuple[str, float, int]]:
    prefix = "reference/exact" if rec["scaling"] is None else f"reference/{rec['scaling']}"
    keys = METRICS if rec["scaling"] is None else LAYER_KEYS
    return [(f"{prefix}/{k}", rec[k], 0) for k in keys if rec.get(k) is not None]


def metric_keys(scalings: list[str]) -> list[str]:
    """Every key the study's MLflow run may hold (asked on resume: which points it has)."""
    keys = [f"reference/exact/{m}" for m in METRICS]
    for s in scalings:
        keys += [f"study/{s}/{k}" for k in LAYER_KEYS] + [f"reference/{s}/{k}" for k in LAYER_KEYS]
    return keys
