"""LR range test (the source's §6.6.1): raise the learning rate exponentially over a few hundred
steps of one stage and watch the loss; the steepest fall suggests the stage's max_lr.

It trains a throw-away copy of the model on this machine (its GPU when there is one): a few
hundred steps need no cluster, no checkpoints and no resume.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from common.plan import Plan
from common.recipe import Recipe
from workers.data import make_loader
from workers.models.registry import build_from_recipe
from workers.tasks import get_task
from workers.train.optim import make_optimizer, trainable_params

SMOOTHING = 0.98  # EMA of the loss, bias-corrected, as in the usual LR finder
DIVERGE_FACTOR = 4.0  # stop once the smoothed loss is this many times its best


@dataclass
class LRCurve:
    lrs: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)  # smoothed
    raw: list[float] = field(default_factory=list)
    stopped_early: bool = False

    def suggestion(self) -> dict[str, float | None]:
        """max_lr at the steepest fall of the smoothed loss (in log-lr), before its minimum;
        and a tenth of the lr at the minimum, the other common rule."""
        if len(self.losses) < 5:
            return {"max_lr": None, "lr_at_min_loss": None}
        losses, lrs = np.asarray(self.losses), np.asarray(self.lrs)
        lo = int(np.argmin(losses))
        # Skip the first steps: the EMA is still warming up there.
        start = min(len(losses) // 10, max(lo - 1, 0))
        window = slice(start, max(lo, start + 2))
        slope = np.gradient(losses[window], np.log(lrs[window]))
        steep = start + int(np.argmin(slope))
        return {"max_lr": float(lrs[steep]), "lr_at_min_loss": float(lrs[lo])}


def lr_range_test(recipe: Recipe, plan: Plan, dataset: Any, stage: int, steps: int, min_lr: float, max_lr: float,
                  device: torch.device, info: dict[str, Any], on_step: Any = None) -> LRCurve:
    """`info`: the task's data_info for this dataset and plan (classes, baseline)."""
    st = recipe.stages[stage]
    task = get_task(recipe.task)(recipe, info)
    torch.manual_seed(recipe.run.seed)
    model = build_from_recipe(recipe.model, **task.model_kwargs()).to(device)
    # The stage's own freezing and optimizer, built as the training loop builds them (workers/train/optim.py).
    opt = make_optimizer(recipe, trainable_params(model, st.trainable), min_lr)
    gamma = (max_lr / min_lr) ** (1.0 / max(steps - 1, 1))

    # Only as many samples as the steps need, from the stage's own chunks, in plan order.
    sp = plan.stages[stage]
    need = steps * st.batch_size
    ids = np.concatenate([sp.chunk_ids(c) for c in range(sp.num_chunks)])[:need]
    rows = dataset.read_samples(ids)
    samples = task.samples(rows, st.resolution, dataset.describe, train=True, flip_key=(recipe.run.seed, 99, stage))
    order = torch.randperm(len(samples), generator=torch.Generator().manual_seed(recipe.run.seed)).tolist()
    batches = [order[i : i + st.batch_size] for i in range(0, len(order) - st.batch_size + 1, st.batch_size)]
    loader = make_loader(samples, batch_sampler=batches)
    curve, avg, best, lr = LRCurve(), 0.0, math.inf, min_lr
    step = 0
    while step < steps:
        for batch in loader:
            batch = task.to_device(batch, device)
            for g in opt.param_groups:
                g["lr"] = lr
            loss = task.losses(task.forward(model, batch.x, st.forward), batch)[0]
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            value = float(loss.detach())
            step += 1
            avg = SMOOTHING * avg + (1 - SMOOTHING) * value
            smooth = avg / (1 - SMOOTHING**step)
            curve.lrs.append(lr)
            curve.losses.append(smooth)
            curve.raw.append(value)
            if on_step:
                on_step(step, lr, smooth)
            best = min(best, smooth)
            if not math.isfinite(smooth) or (step > 10 and smooth > DIVERGE_FACTOR * best):
                curve.stopped_early = True
                return curve
            lr *= gamma
            if step >= steps:
                break
    return curve


def plot(curve: LRCurve, suggestion: dict[str, float | None], title: str) -> bytes:
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    ax.plot(curve.lrs, curve.raw, color="0.8", lw=0.8, label="loss")
    ax.plot(curve.lrs, curve.losses, color="C0", label="smoothed loss")
    if suggestion.get("max_lr"):
        ax.axvline(suggestion["max_lr"], color="C3", ls="--", label=f"suggested max_lr {suggestion['max_lr']:.3g}")
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("train loss")
    ax.set_title(title)
    finite = [v for v in curve.losses if math.isfinite(v)]
    if finite:
        ax.set_ylim(min(finite) * 0.9, min(max(finite), min(finite) * DIVERGE_FACTOR) * 1.1)
    ax.legend()
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()
