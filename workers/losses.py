"""The loss registry (l1, dice, rmse, ssim, bce) and build_loss, which sums weighted losses.

Every loss takes logits (N, C, H, W) and a target in [0, 1] of the same shape, applies the
sigmoid itself, and computes in float32 so it is safe under autocast.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor

from orchestrator.registry import Registry

LossFn = Callable[[Tensor, Tensor], Tensor]
LOSSES: Registry[LossFn] = Registry("loss")


def _prep(logits: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    if logits.shape != target.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and target {tuple(target.shape)} differ")
    return torch.sigmoid(logits.float()), target.float()


@LOSSES.register("l1")
def l1_loss(logits: Tensor, target: Tensor) -> Tensor:
    """mean |sigmoid(logits) - target|."""
    p, t = _prep(logits, target)
    return (p - t).abs().mean()


@LOSSES.register("rmse")
def rmse_loss(logits: Tensor, target: Tensor) -> Tensor:
    """sqrt(mean((sigmoid(logits) - target)^2) + 1e-8); the epsilon keeps the gradient finite at 0."""
    p, t = _prep(logits, target)
    return torch.sqrt(((p - t) ** 2).mean() + 1e-8)


@LOSSES.register("dice")
def dice_loss(logits: Tensor, target: Tensor, eps: float = 1.0) -> Tensor:
    """1 - (2 sum(p t) + eps) / (sum(p) + sum(t) + eps) per sample, then the batch mean."""
    p, t = _prep(logits, target)
    p, t = p.flatten(1), t.flatten(1)
    dice = (2 * (p * t).sum(1) + eps) / (p.sum(1) + t.sum(1) + eps)
    return (1 - dice).mean()


@LOSSES.register("bce")
def bce_loss(logits: Tensor, target: Tensor) -> Tensor:
    """Binary cross-entropy with logits (the fused, numerically stable form)."""
    if logits.shape != target.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and target {tuple(target.shape)} differ")
    return F.binary_cross_entropy_with_logits(logits.float(), target.float())


_SSIM_WINDOW, _SSIM_SIGMA = 11, 1.5
_SSIM_C1, _SSIM_C2 = 0.01**2, 0.03**2  # data range 1: both inputs lie in [0, 1]
_gauss_cache: dict[tuple[torch.device, torch.dtype], Tensor] = {}


def _gauss_1d(device: torch.device, dtype: torch.dtype) -> Tensor:
    key = (device, dtype)
    g = _gauss_cache.get(key)
    if g is None:
        x = torch.arange(_SSIM_WINDOW, dtype=torch.float64) - (_SSIM_WINDOW - 1) / 2
        g = torch.exp(-(x**2) / (2 * _SSIM_SIGMA**2))
        g = (g / g.sum()).to(device=device, dtype=dtype)
        _gauss_cache[key] = g
    return g


def ssim(p: Tensor, t: Tensor) -> Tensor:
    """Mean SSIM of two (N, C, H, W) images in [0, 1]: 11x11 Gaussian window (sigma 1.5),
    'valid' filtering (no padding, so no edge artefacts; needs H, W >= 11), computed as a
    separable 1x11 then 11x1 depthwise conv over all five moment maps at once."""
    n, c, h, w = p.shape
    if min(h, w) < _SSIM_WINDOW:
        raise ValueError(f"ssim needs H, W >= {_SSIM_WINDOW}, got {(h, w)}")
    g = _gauss_1d(p.device, p.dtype)
    k = 5 * c
    maps = torch.cat([p, t, p * p, t * t, p * t], dim=1)
    maps = F.conv2d(maps, g.view(1, 1, 1, -1).expand(k, 1, 1, -1), groups=k)
    maps = F.conv2d(maps, g.view(1, 1, -1, 1).expand(k, 1, -1, 1), groups=k)
    mu_p, mu_t, pp, tt, pt = maps.split(c, dim=1)
    var_p, var_t, cov = pp - mu_p**2, tt - mu_t**2, pt - mu_p * mu_t
    num = (2 * mu_p * mu_t + _SSIM_C1) * (2 * cov + _SSIM_C2)
    den = (mu_p**2 + mu_t**2 + _SSIM_C1) * (var_p + var_t + _SSIM_C2)
    return (num / den).mean()


@LOSSES.register("ssim")
def ssim_loss(logits: Tensor, target: Tensor) -> Tensor:
    """1 - SSIM(sigmoid(logits), target); see `ssim` for the window and padding."""
    p, t = _prep(logits, target)
    return 1 - ssim(p, t)


class WeightedLoss:
    """sum_i w_i * loss_i(logits, target) over a {name: weight} spec."""

    def __init__(self, spec: Mapping[str, float]) -> None:
        if not spec:
            raise ValueError("empty loss spec; give at least one {name: weight}")
        # Resolving eagerly makes a typo fail at build time, not at the first batch.
        self.terms: list[tuple[str, float, LossFn]] = []
        for name, weight in spec.items():
            fn = LOSSES.get(name)
            if not math.isfinite(float(weight)):
                raise ValueError(f"loss {name!r} has a non-finite weight {weight!r}")
            self.terms.append((name, float(weight), fn))
        self.spec = {name: w for name, w, _ in self.terms}

    def __call__(self, logits: Tensor, target: Tensor) -> Tensor:
        total = None
        for _, weight, fn in self.terms:
            term = weight * fn(logits, target)
            total = term if total is None else total + term
        return total

    def parts(self, logits: Tensor, target: Tensor) -> dict[str, Tensor]:
        """Unweighted value of each term, for logging."""
        return {name: fn(logits, target) for name, _, fn in self.terms}

    def __repr__(self) -> str:
        return f"WeightedLoss({self.spec!r})"


def build_loss(spec: Mapping[str, float]) -> WeightedLoss:
    """A callable summing the weighted registered losses, e.g. {"l1": 1.0, "dice": 1.0}."""
    return WeightedLoss(spec)
