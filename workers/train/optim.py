"""Freezing, the optimizer and the learning-rate schedule of a stage: the training loop and the LR
range test (workers/lr_range.py) build them here, so both train exactly the same parameters."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch

from common.recipe import Recipe, StageSection

log = logging.getLogger(__name__)

# OneCycleLR divides by the length of its warm-up and its anneal phase; a stage of a handful of
# steps (a small subset of a big recipe's data) has no room for either, and gets a constant rate.
ONECYCLE_MIN_STEPS = 10


def trainable_params(model: torch.nn.Module, trainable: Sequence[str]) -> list[torch.nn.Parameter]:
    """Freeze/unfreeze `model` for a stage's `trainable` parts, put it in training mode, and return
    the parameters that train (in the model's order: the optimizer's state follows it)."""
    if hasattr(model, "set_trainable"):
        model.set_trainable(trainable)
    model.train()
    return [p for p in model.parameters() if p.requires_grad]


def make_optimizer(recipe: Recipe, params: list[torch.nn.Parameter], lr: float,
                   fused: bool = False) -> torch.optim.Optimizer:
    """fused: the fused kernels, which let GradScaler.step skip a step without a .item() (fp16 only:
    elsewhere the default implementation, so fp32 and bf16 weights stay what they always were)."""
    o = recipe.optimizer
    extra = {"fused": True} if fused else {}
    if o.name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=o.momentum, weight_decay=o.weight_decay, **extra)
    return torch.optim.AdamW(params, lr=lr, weight_decay=o.weight_decay, **extra)


def make_scheduler(opt: torch.optim.Optimizer, st: StageSection, total_steps: int) -> Any:
    """The stage's schedule over its `total_steps`, or None for a constant rate."""
    if st.scheduler == "onecycle" and total_steps < ONECYCLE_MIN_STEPS:
        log.warning("stage %r has %d steps, too few for a one-cycle schedule: training at a constant lr %g",
                    st.name, total_steps, st.lr)
        return None
    if st.scheduler == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=st.lr, total_steps=max(total_steps, 1),
                                                   pct_start=0.2)
    return None
