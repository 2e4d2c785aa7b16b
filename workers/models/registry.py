"""The model registry and how a recipe's model section becomes a module.

A registered model is an nn.Module class with two class attributes:
  task:     the task kind whose batches it takes ("mask_depth", "classification", ...); or `tasks`,
            a tuple of them, for a model that serves several (same input, same output shape);
  variants: named constructor settings (e.g. the source's "baseline" and "best"); may be empty.
`build_model(name, variant, options, **task_kwargs)` merges variant, then the recipe's options,
then what the task knows from the dataset (in_channels, num_classes), and passes only the keyword
arguments the constructor takes, so an unknown option is an error that names it.
"""

from __future__ import annotations

import inspect
from typing import Any

from torch import nn

from common.registry import Registry


def _is_module_class(obj: object) -> str | None:
    if isinstance(obj, type) and issubclass(obj, nn.Module):
        return None
    return f"is a {type(obj).__name__}, not a torch.nn.Module subclass"


# A recipe may also name a model by import path (`model: {name: mypkg.nets:TinyUNet}`), or a package
# may add names through the `orchestrator.models` entry point group; the contract above is the same.
MODELS: Registry[type[nn.Module]] = Registry("model", entry_points="orchestrator.models", accepts=_is_module_class)


def count_params(model: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def model_tasks(name: str) -> tuple[str, ...]:
    """The tasks whose batches the model takes: its `tasks` (several), else its one `task`."""
    cls = MODELS.get(name)
    return tuple(getattr(cls, "tasks", None) or (getattr(cls, "task", "mask_depth"),))


def model_task(name: str) -> str:
    """The model's first (for most, only) task: what `orchestrator models` lists."""
    return model_tasks(name)[0]


def model_variants(name: str) -> dict[str, dict[str, Any]]:
    return dict(getattr(MODELS.get(name), "variants", {}) or {})


def model_options(name: str) -> list[str]:
    """The constructor's keyword arguments: what `model.options` may set."""
    sig = inspect.signature(MODELS.get(name).__init__)
    kinds = (inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return [p for p in list(sig.parameters)[1:] if sig.parameters[p].kind in kinds]


def model_kwargs(name: str, variant: str | None = None, options: dict[str, Any] | None = None,
                 **task_kwargs: Any) -> dict[str, Any]:
    """Constructor kwargs: variant, then options (both checked by name), then task kwargs the model takes."""
    variants = model_variants(name)
    if variant is not None and variant not in variants:
        valid = ", ".join(sorted(variants)) or "none (this model has no named variants)"
        raise ValueError(f"model {name!r} has no variant {variant!r}; valid: {valid}")
    accepted = model_options(name)
    kwargs: dict[str, Any] = dict(variants.get(variant, {})) if variant else {}
    for key, value in (options or {}).items():
        if key not in accepted:
            raise ValueError(f"model {name!r} has no option {key!r}; valid: {', '.join(accepted)}")
        kwargs[key] = value
    kwargs.update({k: v for k, v in task_kwargs.items() if k in accepted and v is not None})
    return kwargs


def build_model(name: str, variant: str | None = None, options: dict[str, Any] | None = None,
                **task_kwargs: Any) -> nn.Module:
    """Instantiate a registered model; unknown names raise UnknownNameError listing valid ones."""
    return MODELS.get(name)(**model_kwargs(name, variant, options, **task_kwargs))


def build_from_recipe(section: Any, **task_kwargs: Any) -> nn.Module:
    """The recipe's `model` section -> the module, with `init_from` weights loaded if set.

    `width` 1.0 leaves the model's (or the variant's) own width; other values need a model that
    takes one (the recipe check says so before a run starts).
    """
    width = section.width if section.width != 1.0 else None
    model = build_model(section.name, section.variant, section.options, width=width, **task_kwargs)
    if getattr(section, "init_from", None):
        from workers.models.pretrained import init_from

        init_from(model, section.init_from)
    return model
