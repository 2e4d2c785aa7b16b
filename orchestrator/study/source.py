"""What a study starts from: `model_from` resolved to a finished depth run (its recipe, plan, data
and final weights), the layers the spec selects, and the product table."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from typing import Any

from common.errors import RecipeError, RunError
from common.study import StudySpec, close_layer_names, resolve_layer_name
from orchestrator.engine import RunState, record
from storage import checkpoints, fs
from storage.layout import FINAL_JSON, RUN_JSON


@dataclass
class ModelSource:
    """A trained depth model and everything a study needs from its run."""

    run_name: str
    run_dir: str
    recipe: Any  # common.recipe.Recipe
    checkpoint: str
    data_uri: str
    state_dict: dict[str, Any] | None = None
    weights_sha256: str | None = None


def _bad_model_from(msg: str) -> RecipeError:
    return RecipeError(f"field 'model_from': {msg}")


def resolve_model_from(spec: StudySpec, load_weights: bool = True) -> ModelSource:
    """A run name under spec.storage, a run folder, or one of its checkpoint folders."""
    from orchestrator.recipes import validate_recipe

    root = fs.normalize(spec.storage)
    given = spec.model_from
    ckpt: str | None = None
    if "/" not in given and "://" not in given:
        run_dir = record.run_dir(root, given)
        if not fs.exists(fs.join(run_dir, RUN_JSON)):
            runs = [n for n in fs.listdir(root) if fs.exists(fs.join(root, n, RUN_JSON))]
            raise _bad_model_from(f"no run {given!r} under {root}; runs there: {', '.join(runs) or 'none'}")
    else:
        uri = fs.normalize(given)
        if fs.exists(fs.join(uri, RUN_JSON)):
            run_dir = uri
        elif fs.exists(fs.join(uri, checkpoints.META_FILE)):
            ckpt, run_dir = uri, fs.normalize(uri.rstrip("/").rsplit("/", 1)[0])
        else:
            raise _bad_model_from(f"{given} is neither a run folder (with {RUN_JSON}) nor a checkpoint folder "
                                  f"(with {checkpoints.META_FILE})")
    rec = record.load(run_dir)
    if rec is None:
        raise _bad_model_from(f"{run_dir} holds no run record ({RUN_JSON}); name a run folder")
    task = rec.recipe.get("task", "mask_depth") if isinstance(rec.recipe, dict) else None
    if task != "depth":
        raise _bad_model_from(f"run {given!r} is a {task} run; a study needs a depth model (a run with task: depth)")
    if ckpt is None:
        if rec.state != RunState.COMPLETED:
            raise _bad_model_from(f"run {given!r} is {rec.state}, not completed; finish it first (re-run its "
                                  "`orchestrator run` command), or name one of its checkpoint folders "
                                  "(model_from: RUN_DIR/ckpt-...)")
        final = record.read_optional(run_dir, FINAL_JSON) or {}
        ckpt = final.get("checkpoint")
        if not ckpt:
            raise RunError(f"{fs.join(run_dir, FINAL_JSON)}: names no checkpoint; the run's files are incomplete")
    recipe = validate_recipe(rec.recipe, source=fs.join(run_dir, RUN_JSON))
    src = ModelSource(rec.run_name, run_dir, recipe, ckpt, rec.data_uri)
    if load_weights:
        with tempfile.TemporaryDirectory(prefix="orch-study-") as tmp:
            try:
                state, _ = checkpoints.read_local(checkpoints.download(ckpt, tmp))
            except (checkpoints.CheckpointCorruptError, FileNotFoundError, RuntimeError) as exc:
                raise RunError(f"{ckpt}: cannot load the model ({exc})") from None
        src.state_dict = state["model"]
        src.weights_sha256 = checkpoints.weights_sha256(src.state_dict)
    return src




def select_layers(spec: StudySpec, infos: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The study's layers in study order: the model's order for a group, the given order for a list.
    `infos`: the model's conv layers as workers.study.describe_layers gives them."""
    names = [i["name"] for i in infos]
    if isinstance(spec.layers, str):
        group = spec.layers
        chosen = [i for i in infos if group == "all" or i["part"] == group or i["kind"] == group]
        if not chosen:
            raise RecipeError(f"field 'layers': the model has no {group} conv layers; kinds here: "
                              f"{', '.join(sorted({i['kind'] for i in infos}))}, "
                              f"parts: {', '.join(sorted({i['part'] for i in infos}))}")
        return chosen
    by_name = {i["name"]: i for i in infos}
    out: list[dict[str, Any]] = []
    for given in spec.layers:
        name = resolve_layer_name(given, names)
        if name is None:
            close = close_layer_names(given, names)
            hint = f"close matches: {', '.join(close)}" if close else "no close match"
            raise RecipeError(f"field 'layers': unknown layer {given!r}; {hint} "
                              f"(`--list-layers` lists all {len(names)})")
        if by_name[name] not in out:
            out.append(by_name[name])
    return out


def load_table(spec: StudySpec) -> Any:
    from workers.approx.multipliers import table_by_name

    try:
        return table_by_name(spec.multiplier)
    except Exception as exc:  # noqa: BLE001 - a missing file, a wrong shape, an unknown name: all the spec's
        text = " ".join(str(exc).split())
        raise RecipeError(f"field 'multiplier': {spec.multiplier!r}: {text or type(exc).__name__}") from None

