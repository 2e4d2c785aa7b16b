"""Checks of a recipe against the registries that only the worker side knows: the task, the
model's task, variants, options and parts, and which losses fit which loss section.

Called by the recipe's validator, so a mismatch is a bad recipe (exit 2) naming its field,
before any data is read or worker started.
"""

from __future__ import annotations

from typing import Any

# Losses that take class logits and integer labels; every other registered loss takes one
# dense channel of logits and a target in [0, 1].
LABEL_LOSSES = ("cross_entropy",)


def recipe_problems(recipe: Any) -> list[str]:
    """One line per problem, each starting with the dotted field it is about."""
    import torch

    from workers.models.registry import MODELS, build_model, model_kwargs, model_options, model_task
    from workers.tasks import TASKS

    task = TASKS.get(recipe.task)
    problems: list[str] = []
    m = recipe.model
    if model_task(m.name) != recipe.task:
        fitting = [n for n in MODELS.names() if model_task(n) == recipe.task]
        problems.append(f"model.name: {m.name!r} is a {model_task(m.name)} model and the recipe's task is "
                        f"{recipe.task}; models for {recipe.task}: {', '.join(fitting) or 'none'}")
        return problems
    try:
        model_kwargs(m.name, m.variant, m.options)
    except ValueError as exc:
        problems.append(f"model.{'variant' if 'variant' in str(exc) else 'options'}: {exc}")
        return problems
    if m.width != 1.0 and "width" not in model_options(m.name):
        problems.append(f"model.width: {m.name!r} takes no width multiplier; leave it at 1.0 or use a variant")
    for section in ("mask", "depth", "labels"):
        names = getattr(recipe.loss, section)
        if section not in task.loss_sections:
            continue
        wrong = [n for n in names if (n in LABEL_LOSSES) != (section == "labels")]
        if wrong:
            kind = "class labels" if section == "labels" else "one dense channel"
            problems.append(f"loss.{section}: {', '.join(wrong)} cannot score {kind}; "
                            f"{'use ' + ', '.join(LABEL_LOSSES) if section == 'labels' else 'pick a mask/depth loss'}")
    if recipe.data.shift and recipe.task != "classification":
        problems.append("data.shift: random shifts are a classification augmentation; set it to 0")
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
