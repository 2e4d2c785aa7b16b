"""Sweeps: many runs of one base recipe, run concurrently as Ray Tune trials.

Each trial is an ordinary orchestrator run (its own run dir, its own MLflow run in the sweep's
experiment, preemption-proof like any run), so the sweep needs no state of its own: re-running
`orchestrator sweep` starts a fresh Tune experiment whose trials each resume their run, or
report it completed without training it again. Tune does the scheduling (trial concurrency,
resources, retrying a trial whose node vanished); nothing here decides what runs where.
"""

from __future__ import annotations

import copy
import itertools
import os
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

from common.errors import RecipeError, RunError
from common.recipe import Recipe
from common.recipe_yaml import apply_override, format_validation_error, load_recipe_dict
from orchestrator.recipes import validate_recipe


class SweepSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$",
                      description="Sweep name: prefix of its runs' names and default MLflow experiment.")
    base: str = Field(description="Base recipe, relative to the sweep file.")
    set: dict[str, Any] = Field(default_factory=dict, description="Dotted-key overrides applied to every run.")
    grid: dict[str, list[Any]] = Field(default_factory=dict,
                                       description="Dotted key -> values; every combination is a run.")
    runs: list[dict[str, Any]] = Field(default_factory=list, description=(
        "Explicit runs, each a mapping of dotted-key overrides (instead of, or after, the grid); a `label` key names "
        "the run (<sweep>-<label>) instead of its values."))
    max_concurrent: int = Field(2, ge=1, description="Runs in flight at once; the others wait for resources.")
    max_failures: int = Field(2, ge=0, description=(
        "Times Tune restarts a trial whose process or node was lost; the run resumes from its checkpoint."))

    @model_validator(mode="after")
    def _has_runs(self) -> SweepSpec:
        if not self.grid and not self.runs:
            raise ValueError("a sweep needs a `grid` or a list of `runs`")
        return self


class SweepFile(BaseModel):
    model_config = ConfigDict(extra="forbid")
    sweep: SweepSpec


def _label(value: Any) -> str:
    """A run-name fragment for one override value: {bce: 1, dice: 1} -> bce+dice."""
    if isinstance(value, dict):
        return "+".join(k if float(v) == 1.0 else f"{k}{v:g}" for k, v in value.items())
    if isinstance(value, list):
        return "+".join(_label(v) for v in value)
    return str(value).replace("/", "_")


def _set(data: dict[str, Any], key: str, value: Any, where: str) -> None:
    # Through the same code as --set, so list items (stages) are addressed the same way; a bad key
    # is named where the sweep file has it, not as a --set the user never typed.
    dumped = yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()
    apply_override(data, f"{key}={dumped}", where=f"{where}: key {key!r}")


def _absolute(path_or_uri: str, base: Path) -> str:
    """Trials run in other processes (and Tune moves their cwd): pin relative local paths."""
    if not path_or_uri or "://" in path_or_uri:
        return path_or_uri
    return str((base / path_or_uri).resolve())


def _no_credentials(sweep_path: str, field: str, value: Any) -> None:
    from common.redact import credentials_problem

    problem = credentials_problem(value) if isinstance(value, str) else None
    if problem:
        raise RecipeError(f"{sweep_path}: field '{field}': {problem}")


def expand(sweep_path: str, overrides: list[str] | None = None,
           cwd: Path | None = None) -> tuple[SweepSpec, list[Recipe]]:
    """The sweep file and the recipes of its runs, validated before anything starts."""
    from pydantic import ValidationError

    raw = load_recipe_dict(sweep_path, kind="sweep", expect="a sweep file must be a YAML mapping with a 'sweep' "
                                                            "section (name, base, grid or runs)")
    try:
        spec = SweepFile.model_validate(raw).sweep
    except ValidationError as err:
        raise RecipeError(format_validation_error(sweep_path, err)) from None
    base_path = Path(sweep_path).parent / spec.base
    if not base_path.is_file():
        raise RecipeError(f"{sweep_path}: field 'sweep.base': {base_path}: recipe file not found (the path is "
                          "relative to the sweep file)")
    base = load_recipe_dict(str(base_path))
    cwd = cwd or Path.cwd()
    for key, value in spec.set.items():
        _no_credentials(sweep_path, f"sweep.set.{key}", value)
        _set(base, key, value, f"{sweep_path}: field 'sweep.set'")
    for item in overrides or []:
        apply_override(base, item)
    base.setdefault("tracking", {}).setdefault("experiment", spec.name)

    keys = list(spec.grid)
    combos = [("sweep.grid", dict(zip(keys, values, strict=True)))
              for values in itertools.product(*spec.grid.values())] if keys else []
    combos += [(f"sweep.runs.{i}", run) for i, run in enumerate(spec.runs)]
    recipes, names = [], set()
    for origin, combo in combos:
        data = copy.deepcopy(base)
        combo = dict(combo)
        label = combo.pop("label", None)
        # Before the run's name is made of the values: a URI's password must not become part of it.
        _no_credentials(sweep_path, f"{origin}.label", label)
        for key, value in combo.items():
            _no_credentials(sweep_path, f"{origin}.{key}", value)
        for key, value in combo.items():
            _set(data, key, value, f"{sweep_path}: field '{origin}'")
        name = "-".join([spec.name, *([_label(label)] if label is not None else (_label(v) for v in combo.values()))])
        if name in names:
            raise RecipeError(f"{sweep_path}: two runs of the sweep would both be named {name!r}")
        names.add(name)
        data.setdefault("run", {})["name"] = name
        data["run"]["storage"] = _absolute(data["run"].get("storage", "runs"), cwd)
        data.setdefault("data", {})["uri"] = _absolute(data["data"].get("uri", ""), cwd)
        uri = data.setdefault("tracking", {}).get("uri", "sqlite:///mlflow.db")
        if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
            data["tracking"]["uri"] = "sqlite:///" + _absolute(uri[len("sqlite:///"):], cwd)
        recipes.append(validate_recipe(data, source=f"{sweep_path} run {name}"))
    return spec, recipes


def _trial(config: dict[str, Any]) -> None:
    """One Tune trial: one orchestrator run, resumed if it exists, reported if it is done."""
    from ray import tune

    from common.recipe import Recipe as _Recipe
    from orchestrator import runner

    recipe = _Recipe.model_validate(config["recipe"])
    final = runner.run(recipe, address="auto")
    metrics = {k: float(v) for k, v in (final.get("metrics") or {}).items()}
    tune.report({"done": 1.0, **metrics})


def run_sweep(spec: SweepSpec, recipes: list[Recipe], address: str | None, console) -> list[dict[str, Any]]:
    """Run every recipe as a Tune trial, at most spec.max_concurrent at once; returns one row per run."""
    from orchestrator import runner
    from orchestrator.launcher import init_ray

    if _all_completed(recipes):
        # Nothing to train: report each run as `orchestrator run` would (restoring a lost local
        # MLflow store on the way), without starting Ray and Tune for it.
        for r in recipes:
            runner.run(r, console=console)
        console.print(f"sweep '{spec.name}': all {len(recipes)} runs completed already; nothing trained")
        return [{"run_name": r.run.name, "error": None} for r in recipes]

    # Dataset synthesis and the size checks happen once, here, before trials race for them:
    # a quickstart-style base (empty data.uri) gets one dataset for the whole sweep.
    first = recipes[0].model_copy(deep=True)
    first.run.name = spec.name
    uri = runner.resolve_data(first, console)
    if not recipes[0].data.uri:
        for r in recipes:
            r.data.uri = uri if "://" in uri else os.path.abspath(uri)
    # Create the MLflow store and experiment once: concurrent trials creating a fresh sqlite
    # schema at the same moment collide ("duplicate column name").
    from orchestrator import tracking
    from storage import fs

    for uri in {r.tracking.uri for r in recipes}:
        for exp in {r.tracking.experiment for r in recipes if r.tracking.uri == uri}:
            storage = next(r.run.storage for r in recipes if (r.tracking.uri, r.tracking.experiment) == (uri, exp))
            resolved = tracking.resolve_tracking_uri(uri)
            tracking.ensure_experiment(resolved, exp,
                                       tracking.local_artifact_location(resolved, fs.normalize(storage), exp))
    init_ray(address)
    from ray import tune

    ex = recipes[0].execution
    # An in-process trial trains inside the trial's own process; a Ray Train trial only drives
    # its workers, which reserve their own CPUs. Tune refuses an empty reservation ({"CPU": 0}),
    # so such a trial reserves one byte of memory: a CPU fraction would leave the workers short of
    # whole CPUs on a small machine (two trials at 0.01 CPU plus two 1-CPU workers > 2 CPUs).
    trial_resources = {"CPU": ex.cpus_per_worker} if ex.backend == "local" else {"memory": 1}
    storage = recipes[0].run.storage
    tuner = tune.Tuner(
        tune.with_resources(_trial, trial_resources),
        param_space={"recipe": tune.grid_search([r.model_dump(mode="json") for r in recipes])},
        tune_config=tune.TuneConfig(
            max_concurrent_trials=spec.max_concurrent,
            # Trials are named after their runs, not after the (long) recipe they carry.
            trial_name_creator=_trial_name, trial_dirname_creator=_trial_name,
        ),
        run_config=tune.RunConfig(
            name=f"_sweep-{spec.name}",
            storage_path=storage if "://" in storage else os.path.abspath(storage),
            failure_config=tune.FailureConfig(max_failures=spec.max_failures),
            verbose=0,
        ),
    )
    console.print(f"sweep '{spec.name}': {len(recipes)} runs, {spec.max_concurrent} at a time; "
                  f"`orchestrator compare {recipes[0].tracking.experiment}` compares them")
    results = tuner.fit()
    rows = []
    for res in results:
        name = res.config["recipe"]["run"]["name"]
        rows.append({"run_name": name, "error": None if res.error is None else _first_line(res.error)})
    failed = [r for r in rows if r["error"]]
    if failed:
        lines = "\n".join(f"  {r['run_name']}: {r['error']}" for r in failed)
        raise RunError(f"sweep '{spec.name}': {len(failed)} of {len(rows)} runs failed:\n{lines}\n"
                       "Fix the cause and re-run the same command: finished runs are not trained again")
    return rows


def _all_completed(recipes: list[Recipe]) -> bool:
    """Every run of the sweep exists, completed, with this very recipe (a base with an empty
    data.uri gets its dataset later, so its sha differs here: such a sweep takes the full path)."""
    from orchestrator.engine import RunState, record
    from storage import fs

    for r in recipes:
        try:
            rec = record.load(record.run_dir(fs.normalize(r.run.storage), r.run.name))
        except Exception:  # noqa: BLE001 - unreadable here: the full path reports it properly
            return False
        if rec is None or rec.state != RunState.COMPLETED or rec.recipe_sha256 != r.sha256():
            return False
    return True


def _trial_name(trial) -> str:
    return trial.config["recipe"]["run"]["name"]


def _first_line(exc: BaseException) -> str:
    from orchestrator.engine import root_cause

    return root_cause(exc)
