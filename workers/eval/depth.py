"""Monocular depth eval: the DenseDepth error measures (Alhashim & Wonka 2018, arXiv 1812.11941).

Over the valid pixels (see `valid_pixels`), with t the true and p the predicted depth in metres,
p clamped to [min_depth, max_depth] first (as DenseDepth clips its predictions):
  a1, a2, a3   share of pixels with max(p / t, t / p) < 1.25, 1.25^2, 1.25^3
  rel          mean |t - p| / t
  rms          sqrt(mean (t - p)^2), metres
  log10        mean |log10 t - log10 p|
Every mean is over all valid pixels of the split (pixel-weighted), not a mean of image means.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from workers.eval.base import SumAccumulator

_KEYS = ("pixels", "a1", "a2", "a3", "rel", "sq_err", "log10", "sq_err_base")
_LN10 = math.log(10.0)


def _check_range(min_depth: float, max_depth: float) -> None:
    if not (0 < min_depth < max_depth and math.isfinite(max_depth)):
        raise ValueError(f"need 0 < min_depth < max_depth, got {min_depth}, {max_depth}")


def valid_pixels(target: Tensor, min_depth: float, max_depth: float) -> Tensor:
    """The pixels that count: target > 0 (0 marks a missing measurement) and within
    [min_depth, max_depth] (both ends included); NaN targets are not valid."""
    return (target > 0) & (target >= min_depth) & (target <= max_depth)


def _sums(
    pred: Tensor, target: Tensor, min_depth: float, max_depth: float, baseline_depth: float
) -> dict[str, Tensor]:
    """Per-batch float64 sums (0-d tensors on the inputs' device), no host sync."""
    if pred.shape != target.shape:
        raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} differ")
    t = target.detach().to(pred.device, torch.float64)
    valid = valid_pixels(t, min_depth, max_depth)
    w = valid.to(torch.float64)
    t = torch.where(valid, t, torch.ones_like(t))  # keeps t / p and log t finite off the mask
    p = pred.detach().to(torch.float64).clamp(min_depth, max_depth)
    ratio = torch.maximum(p / t, t / p)
    return {
        "pixels": w.sum(),
        "a1": (w * (ratio < 1.25)).sum(),
        "a2": (w * (ratio < 1.25**2)).sum(),
        "a3": (w * (ratio < 1.25**3)).sum(),
        "rel": (w * (t - p).abs() / t).sum(),
        "sq_err": (w * (t - p) ** 2).sum(),
        "log10": (w * (t.log() - p.log()).abs()).sum() / _LN10,
        "sq_err_base": (w * (t - float(baseline_depth)) ** 2).sum(),
    }


def _metrics(t: dict[str, float]) -> dict[str, float]:
    n = t["pixels"]
    if n == 0:
        raise ValueError("no valid depth pixels")
    return {
        "a1": t["a1"] / n,
        "a2": t["a2"] / n,
        "a3": t["a3"] / n,
        "rel": t["rel"] / n,
        "rms": math.sqrt(t["sq_err"] / n),
        "log10": t["log10"] / n,
        "rms_baseline": math.sqrt(t["sq_err_base"] / n),
    }


@torch.no_grad()
def depth_metrics(
    pred: Tensor, target: Tensor, min_depth: float, max_depth: float
) -> dict[str, float]:
    """a1, a2, a3, rel, rms, log10 of one set of predictions (e.g. a handful of images), same
    definitions and valid-pixel rule as DepthEval; ValueError if no pixel is valid."""
    _check_range(min_depth, max_depth)
    s = _sums(pred, target, min_depth, max_depth, baseline_depth=0.0)
    values = torch.stack([s[k] for k in _KEYS]).cpu().tolist()
    out = _metrics(dict(zip(_KEYS, values, strict=True)))
    del out["rms_baseline"]
    return out


class DepthEval(SumAccumulator):
    """The DenseDepth measures over a split from predictions and targets in metres (B x 1 x H x W;
    any matching shapes work). compute() gives eval/a1, eval/a2, eval/a3, eval/rel, eval/rms,
    eval/log10 and eval/rms_baseline: the rms of predicting `baseline_depth` on every valid pixel
    (not clamped; pass e.g. the training split's mean depth)."""

    def __init__(self, min_depth: float, max_depth: float, baseline_depth: float) -> None:
        _check_range(min_depth, max_depth)
        if not math.isfinite(baseline_depth):
            raise ValueError(f"baseline_depth must be finite, got {baseline_depth}")
        self.min_depth, self.max_depth = float(min_depth), float(max_depth)
        self.baseline_depth = float(baseline_depth)
        self._shapes = {k: () for k in _KEYS}
        self._config = (self.min_depth, self.max_depth, self.baseline_depth)
        super().__init__()

    @torch.no_grad()
    def update(self, pred: Tensor, target: Tensor) -> None:
        sums = _sums(pred, target, self.min_depth, self.max_depth, self.baseline_depth)
        self._ensure(pred.device)
        for k, v in sums.items():
            self._add(k, v)

    def compute(self) -> dict[str, float]:
        t = {k: v.item() for k, v in self._host_totals().items()}
        return {f"eval/{k}": v for k, v in _metrics(t).items()}
