"""The typed layer-sensitivity study: YAML on disk, validated by pydantic as strictly as a recipe,
overridable with `--set a.b=value` (common.recipe_yaml.apply_override).

A study evaluates a finished depth run's model with ONE conv layer at a time replaced by an
approximate one (inputs and weights scaled to integers, each product looked up in an
approximate multiplier's table, exact integer sums, scaled back) and records the depth metrics
per layer, for each scaling in `scalings`. `orchestrator study STUDY.yaml` runs it
(orchestrator/study/); what a Ray task runs is workers/study.py.
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from common.errors import RecipeError
from common.recipe_yaml import apply_override, format_validation_error, load_recipe_dict

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"
# `layers:` may name a group instead of a list of module names.
LAYER_GROUPS = ("all", "encoder", "decoder", "pointwise", "depthwise", "dense")


def _no_credentials(v: str) -> str:
    """A URI field: credentials in it would be printed and stored with the study (common.redact)."""
    from common.redact import credentials_problem

    problem = credentials_problem(v)
    if problem:
        raise ValueError(problem)
    return v


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class FixedScaling(_Strict):
    kind: Literal["fixed"] = Field(description="The same factors for every layer (the updates' way).")
    name: str | None = Field(None, pattern=NAME_PATTERN,
                             description="Column/metric name of this scaling; default fixed_<input>x<weight>.")
    input: float = Field(10.0, gt=0,
                         description="Inputs are multiplied by this and rounded to integers (the updates: 10, first "
                                     "1000).")
    weight: float = Field(100.0, gt=0,
                          description="Weights are multiplied by this and rounded to integers (the updates: 100, first "
                                      "1000).")

    def label(self) -> str:
        return self.name or f"fixed_{self.input:g}x{self.weight:g}"


class CalibratedScaling(_Strict):
    kind: Literal["calibrated"] = Field(description="Per-layer factors that map each layer's own range onto the "
                                                    "table's.")
    name: str | None = Field(None, pattern=NAME_PATTERN,
                             description="Column/metric name of this scaling; default calibrated_minmax or "
                                         "calibrated_p<percentile>.")
    method: Literal["minmax", "percentile"] = Field("percentile",
                                                    description="Input range: the largest magnitude seen, or this "
                                                                "percentile of the magnitudes (outliers saturate).")
    percentile: float = Field(99.99, gt=0, le=100,
                              description="Percentile of the input magnitudes mapped to the table's end (method "
                                          "percentile).")
    calibration_samples: int = Field(8, ge=1, le=4096,
                                     description="Training-split images whose activations set the input ranges.")

    def label(self) -> str:
        return self.name or ("calibrated_minmax" if self.method == "minmax" else f"calibrated_p{self.percentile:g}")


Scaling = Annotated[FixedScaling | CalibratedScaling, Field(discriminator="kind")]


class EvalSection(_Strict):
    samples: int = Field(5, ge=1, le=10_000,
                         description="Held-out images of the run's plan (its eval split, in id order) every layer is "
                                     "scored on.")
    batch_size: int = Field(5, ge=1, description="Images per forward pass.")
    resolution: int | None = Field(None, ge=16,
                                   description="Input side in px; default the run's working resolution (its last "
                                               "stage's).")


class TrackingSection(_Strict):
    uri: str = Field("sqlite:///mlflow.db",
                     description="MLflow tracking URI; a relative sqlite path is relative to the current directory.")
    experiment: str = Field("orchestrator", description="MLflow experiment name.")

    _uri = field_validator("uri")(_no_credentials)


class ExecutionSection(_Strict):
    backend: Literal["ray", "local"] = Field("ray",
                                             description="ray: one Ray task per layer (batch) over the cluster's "
                                                         "workers; local: the same in this process.")
    num_workers: int | None = Field(None, ge=1,
                                    description="Tasks in flight at once; default the cluster's CPUs / cpus_per_task.")
    cpus_per_task: float = Field(1.0, gt=0, description="CPUs Ray reserves per task.")
    torch_threads: int = Field(1, ge=1, description="torch threads per task (and in-process).")
    layers_per_task: int = Field(1, ge=1,
                                 description="Layers one task evaluates before it returns (each still committed on its "
                                             "own).")


class StudySpec(_Strict):
    name: str = Field(pattern=NAME_PATTERN,
                      description="Study name: its folder <storage>/studies/<name> and its MLflow run name.")
    storage: str = Field("runs",
                         description="Run storage root (any fsspec URI): model_from's run is looked up here, the study "
                                     "lives in studies/<name>.")
    model_from: str = Field(min_length=1,
                            description="A finished depth run's name (under storage), or a run folder / checkpoint "
                                        "folder URI.")
    layers: str | list[str] = Field(
        "all",
        description="Layers to study: a group (all, encoder, decoder, pointwise, depthwise, dense), or module names "
        "(the model's own, e.g. decoder.up0.convB, or the updates' style, e.g. Encoder.0.0); `--list-layers` lists "
        "them.")
    multiplier: str = Field(min_length=1,
                            description="Approximate multiplier: a built-in table name (exact, truncated8, mitchell, "
                                        "drum4) or a .npy/.csv table path.")
    scalings: list[Scaling] = Field(min_length=1,
                                    description="Scalings to study, each its own column set (`scaling:` takes one).")
    eval: EvalSection = Field(default_factory=EvalSection)
    tracking: TrackingSection = Field(default_factory=TrackingSection)
    execution: ExecutionSection = Field(default_factory=ExecutionSection)

    _uris = field_validator("storage", "model_from")(_no_credentials)

    @model_validator(mode="before")
    @classmethod
    def _one_scaling(cls, data: Any) -> Any:
        if isinstance(data, dict) and "scaling" in data:
            if "scalings" in data:
                raise ValueError("scaling: give either `scaling` (one) or `scalings` (a list), not both")
            data = dict(data)
            data["scalings"] = [data.pop("scaling")]
        return data

    @field_validator("layers", mode="before")
    @classmethod
    def _layer_list(cls, v: Any) -> Any:
        """A group name stays a group; any other single name is a list of one."""
        if isinstance(v, str):
            return v if v in LAYER_GROUPS else [v]
        if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
            raise ValueError(f"a group ({', '.join(LAYER_GROUPS)}) or a list of layer names, got {v!r}")
        if not v:
            raise ValueError(f"an empty list; name layers, or a group: {', '.join(LAYER_GROUPS)}")
        if any(not x.strip() for x in v):
            raise ValueError("an empty layer name")
        return list(dict.fromkeys(x.strip() for x in v))

    @model_validator(mode="after")
    def _unique_scalings(self) -> StudySpec:
        labels = [s.label() for s in self.scalings]
        dup = sorted({x for x in labels if labels.count(x) > 1})
        if dup:
            raise ValueError(f"scalings: names must be unique, {', '.join(dup)} repeats; give each a `name`")
        return self

    def scaling_names(self) -> list[str]:
        return [s.label() for s in self.scalings]

    def scaling(self, name: str) -> FixedScaling | CalibratedScaling:
        return self.scalings[self.scaling_names().index(name)]

    def sha256(self) -> str:
        """Identity of what the study measures: `execution` (how it runs) may change between attempts."""
        body = self.model_dump(mode="json", exclude={"execution"})
        return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()

    def flat_params(self) -> dict[str, str]:
        out: dict[str, str] = {}

        def walk(prefix: str, obj: Any) -> None:
            if isinstance(obj, dict):
                for k, v in obj.items():
                    walk(f"{prefix}.{k}" if prefix else str(k), v)
            else:
                out[prefix] = json.dumps(obj) if isinstance(obj, list) else str(obj)

        body = self.model_dump(mode="json")
        scalings = body.pop("scalings")
        walk("", body)
        for s, label in zip(scalings, self.scaling_names(), strict=True):
            walk(f"scalings.{label}", {k: v for k, v in s.items() if k != "name"})
        return out


def validate_study(data: dict[str, Any], source: str = "study") -> StudySpec:
    try:
        return StudySpec.model_validate(data)
    except ValidationError as err:
        text = format_validation_error(source, err)
        # A scaling's errors are located under its kind's tag (scalings.0.fixed.input): drop the tag.
        text = re.sub(r"(field 'scalings\.\d+)\.(fixed|calibrated)\b", r"\1", text)
        raise RecipeError(text.replace("the recipe reference in README",
                                       "the study reference in docs/STUDY.md")) from None


def load_study(path: str, overrides: list[str] | None = None) -> StudySpec:
    data = copy.deepcopy(load_recipe_dict(path, kind="study", expect="a study must be a YAML mapping with at least "
                                          "'name', 'model_from', 'multiplier' and 'scaling' or 'scalings'"))
    for item in overrides or []:
        apply_override(data, item)
    return validate_study(data, source=path)


def layer_aliases(name: str) -> list[str]:
    """The other spellings a layer may be given by: the approx-conv updates named layers after
    their model's state_dict keys with a capital part name and no `features`/`conv` containers
    (`Encoder.0.0` is encoder.features.0.0, the first conv; `Decoder.up0.convB` is
    decoder.up0.convB). Every spelling is matched case-insensitively, and a trailing `.weight`
    (a state_dict key) is dropped."""
    parts = name.split(".")
    out = [name]
    if parts[:2] == ["encoder", "features"] and len(parts) > 2:
        rest = parts[2:]
        out.append(".".join(["encoder", *rest]))
        if len(rest) > 2 and rest[1] == "conv":  # an inverted residual block's inner layers
            out.append(".".join(["encoder", rest[0], *rest[2:]]))
    return out


def resolve_layer_name(given: str, names: list[str]) -> str | None:
    """The model's own name for a layer given in any spelling `layer_aliases` accepts, or None.

    The rule, in order: the name itself; the same ignoring case and a trailing `.weight`/`.bias`;
    then the updates' style, where `Encoder.I.J...` is encoder.features.I.J... (e.g. Encoder.0.0,
    Encoder.1.conv.0.0) or, inside an inverted residual block, encoder.features.I.conv.J...
    (Encoder.2.1.0 = encoder.features.2.conv.1.0)."""
    if given in names:
        return given
    key = given.strip().lower()
    for suffix in (".weight", ".bias"):
        key = key.removesuffix(suffix)
    table: dict[str, str] = {}
    for name in names:
        for alias in layer_aliases(name):
            table.setdefault(alias.lower(), name)
    return table.get(key)


def close_layer_names(given: str, names: list[str], n: int = 5) -> list[str]:
    """The model's layer names nearest to a name that matched none (difflib, over every spelling)."""
    import difflib

    spellings: dict[str, str] = {}
    for name in names:
        for alias in layer_aliases(name):
            spellings.setdefault(alias.lower(), name)
    hits = difflib.get_close_matches(given.strip().lower(), list(spellings), n=n * 3, cutoff=0.6)
    return list(dict.fromkeys(spellings[h] for h in hits))[:n]
