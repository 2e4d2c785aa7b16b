"""Checks of a recipe against what only the worker side knows: the model registry (a model's task,
variants, options, parts and paths) and the loss registry (names and the kind of target each scores).

common/ validates a recipe without importing this layer; the driver hands `CHECKS` to
`common.recipe.validate_recipe` (orchestrator/recipes.py), so a mismatch is a bad recipe (exit 2)
naming its field, before any data is read or worker started.
"""

from __future__ import annotations

from typing import Any

from common.tasks import get_task_spec


class WorkerChecks:
    """common.recipe.RecipeChecks over the worker registries (models, losses)."""

    def model(self, name: str) -> str:
        from workers.models.registry import MODELS

        return MODELS.check(name)

    def loss(self, name: str) -> str:
        from workers.losses import LOSSES

        if not name:
            raise ValueError(f"needs at least one loss; valid: {', '.join(LOSSES.names())}")
        return LOSSES.check(name)

    def problems(self, recipe: Any) -> list[str]:
        return recipe_problems(recipe)


CHECKS = WorkerChecks()


def _resolves(name: str) -> bool:
    from workers.losses import LOSSES

    try:
        LOSSES.resolve(name)
    except ValueError:
        return False
    return True


def _loss_problems(recipe: Any) -> list[str]:
    from workers.losses import LOSSES, loss_kind

    labels = [n for n in LOSSES.names() if loss_kind(n) == "labels"]
    problems = []
    for section, slot in get_task_spec(recipe.task).loss_sections.items():
        names = recipe.loss.sections().get(section, {})
        known = [n for n in names if n in LOSSES or _resolves(n)]  # an unknown name is reported on its own
        wrong = [n for n in known if loss_kind(n) != slot.kind]
        if wrong:
            kind = "class labels" if slot.kind == "labels" else "one dense channel"
            fix = f"use {', '.join(labels)}" if slot.kind == "labels" else "pick a mask/depth loss"
            problems.append(f"loss.{section}: {', '.join(wrong)} cannot score {kind}; {fix}")
    return problems


def recipe_problems(recipe: Any) -> list[str]:
    """One line per problem, each starting with the dotted field it is about."""
    import torch

    from workers.models.registry import (
        MODELS,
        build_model,
        model_kwargs,
        model_options,
        model_task,
        model_tasks,
    )

    task = get_task_spec(recipe.task).name
    problems: list[str] = []
    m = recipe.model
    if task not in model_tasks(m.name):
        fitting = [n for n in MODELS.names() if task in model_tasks(n)]
        problems.append(f"model.name: {m.name!r} is a {model_task(m.name)} model and the recipe's task is "
                        f"{task}; models for {task}: {', '.join(fitting) or 'none'}")
        return problems
    try:
        model_kwargs(m.name, m.variant, m.options)
    except ValueError as exc:
        problems.append(f"model.{'variant' if 'variant' in str(exc) else 'options'}: {exc}")
        return problems
    if m.width != 1.0 and "width" not in model_options(m.name):
        problems.append(f"model.width: {m.name!r} takes no width multiplier; leave it at 1.0 or use a variant")
    problems += _loss_problems(recipe)
    cls = MODELS.get(m.name)
    with torch.device("meta"):  # parts only: no memory, no init cost
        model = build_model(m.name, m.variant, m.options, width=m.width if m.width != 1.0 else None)
    parts = list(model.parts()) if hasattr(model, "parts") else []
    paths = getattr(cls, "paths", ("full",))
    for i, st in enumerate(recipe.stages):
        if st.forward not in paths:
            problems.append(f"stages.{i}.forward: {m.name!r} has no {st.forward!r} path; valid: {', '.join(paths)}")
        check = getattr(cls, "resolution_problem", None)
        why = check(st.forward, st.resolution) if check else None
        if why:
            problems.append(f"stages.{i}.resolution: {why}")
        unknown = [p for p in st.trainable if p != "all" and p not in parts]
        if unknown:
            valid = ", ".join(["all", *parts]) if parts else "all (this model has no named parts)"
            problems.append(f"stages.{i}.trainable: unknown part(s) {', '.join(unknown)}; valid: {valid}")
    return problems
