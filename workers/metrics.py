"""Eval-pass metrics: mask IoU and depth RMSE (plus a constant-prediction baseline) over a split."""

from __future__ import annotations

import math

import torch
from torch import Tensor

_KEYS = ("inter", "union", "sq_err", "sq_err_base", "pixels", "mask_loss", "depth_loss", "samples")


class EvalAccumulator:
    """Sums over every batch of an eval split, so results do not depend on how it was batched.

    Sums are float64 tensors on the inputs' device: no per-batch .item() (each one is a
    device sync), a single transfer in `compute()`.
    """

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self._sums: dict[str, Tensor] | None = None
        self._has_loss = {"mask_loss": False, "depth_loss": False}

    def _acc(self, key: str, value: Tensor) -> None:
        assert self._sums is not None
        self._sums[key] += value.detach().to(torch.float64)

    @torch.no_grad()
    def update(
        self,
        mask_logits: Tensor,
        mask_true: Tensor,
        depth_logits: Tensor,
        depth_true: Tensor,
        baseline_depth: float,
        mask_loss: Tensor | float | None = None,
        depth_loss: Tensor | float | None = None,
    ) -> None:
        """Add one batch. `mask_loss` / `depth_loss` are batch means; they are weighted by the
        batch size, so `compute()` reports the per-sample mean over the split."""
        if mask_logits.shape != mask_true.shape or depth_logits.shape != depth_true.shape:
            raise ValueError("prediction and target shapes differ")
        if self._sums is None:
            dev = mask_logits.device
            self._sums = {k: torch.zeros((), dtype=torch.float64, device=dev) for k in _KEYS}
        # sigmoid(x) > 0.5 <=> x > 0; comparing logits avoids float rounding of sigmoid near 0.
        pred = mask_logits > 0
        true = mask_true > 0.5
        self._acc("inter", (pred & true).sum())
        self._acc("union", (pred | true).sum())
        d_true = depth_true.to(torch.float64)
        d_pred = torch.sigmoid(depth_logits.to(torch.float64))
        self._acc("sq_err", ((d_pred - d_true) ** 2).sum())
        self._acc("sq_err_base", ((d_true - float(baseline_depth)) ** 2).sum())
        self._sums["pixels"] += d_true.numel()
        n = mask_logits.shape[0]
        self._sums["samples"] += n
        for key, value in (("mask_loss", mask_loss), ("depth_loss", depth_loss)):
            if value is not None:
                self._has_loss[key] = True
                self._acc(key, torch.as_tensor(value, device=self._sums[key].device) * n)

    def totals(self) -> dict[str, float]:
        """The raw sums (e.g. to all-reduce across workers, then `merge`)."""
        if self._sums is None:
            return {k: 0.0 for k in _KEYS}
        values = torch.stack([self._sums[k] for k in _KEYS]).cpu().tolist()
        return dict(zip(_KEYS, values, strict=True))

    def merge(self, other: EvalAccumulator) -> None:
        """Fold another accumulator (e.g. another worker's shard of the split) into this one."""
        theirs = other.totals()
        if self._sums is None:
            self._sums = {k: torch.zeros((), dtype=torch.float64) for k in _KEYS}
        for k in _KEYS:
            self._sums[k] += theirs[k]
        for k, v in other._has_loss.items():
            self._has_loss[k] = self._has_loss[k] or v

    def compute(self) -> dict[str, float]:
        t = self.totals()
        if t["pixels"] == 0:
            raise ValueError("compute() before any update()")
        out = {
            # An empty union means both masks are empty everywhere: a perfect prediction.
            "eval/mask_iou": t["inter"] / t["union"] if t["union"] > 0 else 1.0,
            "eval/depth_rmse": math.sqrt(t["sq_err"] / t["pixels"]),
            "eval/depth_rmse_baseline": math.sqrt(t["sq_err_base"] / t["pixels"]),
        }
        for key in ("mask_loss", "depth_loss"):
            if self._has_loss[key]:
                out[f"eval/{key}"] = t[key] / t["samples"]
        return out
