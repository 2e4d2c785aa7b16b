"""The loss registry and build_loss, which sums weighted losses.

Registered: l1, rmse, dice, bce, ssim (= ssim11), and the rest of the source team's loss
comparison (their Table 1): tversky, bce_dice, bce_tversky, berhu, grad, ssim5, ssim11; and
cross_entropy for class labels (classification, segmentation).

Every loss but cross_entropy takes logits (N, C, H, W) and a target in [0, 1] of the same shape, applies the
sigmoid itself (bce and the bce_* sums use the fused BCE-with-logits form for their BCE term),
and computes in float32 so it is safe under autocast.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor

from common.registry import Registry
from common.tasks import IGNORE_INDEX

LossFn = Callable[[Tensor, Tensor], Tensor]


def _is_callable(obj: object) -> str | None:
    return None if callable(obj) else f"is a {type(obj).__name__}, not a callable (logits, target) -> loss"


# A recipe may also name a loss by import path (`loss: {mask: {mypkg.losses:focal: 1.0}}`), or a package
# may add names through the `orchestrator.losses` entry point group. Such a loss scores one dense
# channel unless it says otherwise with an attribute `kind = "labels"`.
LOSSES: Registry[LossFn] = Registry("loss", entry_points="orchestrator.losses", accepts=_is_callable)


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


@LOSSES.register("tversky")
def tversky_loss(
    logits: Tensor, target: Tensor, alpha: float = 0.3, beta: float = 0.7, eps: float = 1.0
) -> Tensor:
    """1 - (TP + eps) / (TP + alpha FP + beta FN + eps) per sample, then the batch mean, with the
    soft counts TP = sum(p t), FP = sum(p (1 - t)), FN = sum((1 - p) t), p = sigmoid(logits).

    alpha weighs false positives, beta false negatives (alpha = beta = 0.5 is Dice with 2 eps).
    The source gives TverskyLoss no default alpha/beta, so the registered "tversky" uses
    alpha=0.3, beta=0.7 (the usual recall-leaning choice); call this function for other values.
    eps = 1 smooths both sides, as in `dice_loss`, so an empty mask predicted empty scores 0.
    """
    p, t = _prep(logits, target)
    p, t = p.flatten(1), t.flatten(1)
    tp = (p * t).sum(1)
    fp = (p * (1 - t)).sum(1)
    fn = ((1 - p) * t).sum(1)
    index = (tp + eps) / (tp + alpha * fp + beta * fn + eps)
    return (1 - index).mean()


@LOSSES.register("bce_dice")
def bce_dice_loss(logits: Tensor, target: Tensor) -> Tensor:
    """bce + 2 * dice (the source's BCEDiceLoss weights Dice by 2)."""
    return bce_loss(logits, target) + 2 * dice_loss(logits, target)


# The source's BCETverskyLoss fixes its Tversky term at alpha=0.6, beta=0.5 (not the defaults
# of the standalone "tversky"); kept so that the bce_tversky row of their Table 1 reproduces.
BCE_TVERSKY_ALPHA, BCE_TVERSKY_BETA = 0.6, 0.5


@LOSSES.register("bce_tversky")
def bce_tversky_loss(logits: Tensor, target: Tensor) -> Tensor:
    """bce + 2 * tversky(alpha=0.6, beta=0.5), as the source's BCETverskyLoss."""
    tversky = tversky_loss(logits, target, alpha=BCE_TVERSKY_ALPHA, beta=BCE_TVERSKY_BETA)
    return bce_loss(logits, target) + 2 * tversky


BERHU_THRESHOLD = 0.2


@LOSSES.register("berhu")
def berhu_loss(logits: Tensor, target: Tensor) -> Tensor:
    """Reverse Huber: mean of |e| where |e| <= c, else (e^2 + c^2) / (2 c), with
    e = sigmoid(logits) - target and c = 0.2 * max|e| over the whole batch, detached (a
    constant per batch, so the gradient is sign(e) below c and e / c above it). The two
    branches meet at |e| = c; c = 0 (an exact match) leaves only the L1 branch, i.e. 0.
    """
    p, t = _prep(logits, target)
    err = (p - t).abs()
    c = BERHU_THRESHOLD * err.max().detach()
    # The clamp only matters when c == 0, where every |e| is 0 and the L1 branch is taken;
    # it keeps the unused branch finite so torch.where does not pass a NaN gradient through.
    quad = (err * err + c * c) / (2 * c.clamp_min(1e-12))
    return torch.where(err <= c, err, quad).mean()


_sobel_cache: dict[tuple[torch.device, torch.dtype], Tensor] = {}


def _sobel_xy(device: torch.device, dtype: torch.dtype) -> Tensor:
    """(2, 1, 3, 3): the x and y Sobel kernels, each divided by 8 (the sum of its |weights|)."""
    key = (device, dtype)
    k = _sobel_cache.get(key)
    if k is None:
        smooth = torch.tensor([1.0, 2.0, 1.0], dtype=torch.float64)
        diff = torch.tensor([-1.0, 0.0, 1.0], dtype=torch.float64)
        kx = smooth[:, None] * diff[None, :] / 8
        k = torch.stack([kx, kx.T]).unsqueeze(1).to(device=device, dtype=dtype)
        _sobel_cache[key] = k
    return k


@LOSSES.register("grad")
def grad_loss(logits: Tensor, target: Tensor) -> Tensor:
    """mean over x and y and all pixels of |G(sigmoid(logits)) - G(target)|, G the 3x3 Sobel
    derivative normalised by 1/8 with replicate padding (same size), as the source's GradLoss
    (kornia SpatialGradient defaults). G is linear, so it is applied once, to the difference.
    """
    p, t = _prep(logits, target)
    n, c, h, w = p.shape
    d = F.pad((p - t).reshape(n * c, 1, h, w), (1, 1, 1, 1), mode="replicate")
    return F.conv2d(d, _sobel_xy(d.device, d.dtype)).abs().mean()


_SSIM_SIGMA = 1.5  # for every window size, as the source's (kornia) SSIM
_SSIM_C1, _SSIM_C2 = 0.01**2, 0.03**2  # data range 1: both inputs lie in [0, 1]
_gauss_cache: dict[tuple[int, torch.device, torch.dtype], Tensor] = {}
_ssim_kernel_cache: dict[tuple[int, int, torch.device, torch.dtype], tuple[Tensor, Tensor]] = {}


def _gauss_1d(window: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    key = (window, device, dtype)
    g = _gauss_cache.get(key)
    if g is None:
        x = torch.arange(window, dtype=torch.float64) - (window - 1) / 2
        g = torch.exp(-(x**2) / (2 * _SSIM_SIGMA**2))
        g = (g / g.sum()).to(device=device, dtype=dtype)
        _gauss_cache[key] = g
    return g


def _ssim_kernels(window: int, k: int, device: torch.device, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """The 1 x window and window x 1 depthwise weights for k channels, cached. On the CPU they are
    channels_last, as the maps they filter are there (see `_blur`)."""
    key = (window, k, device, dtype)
    kw = _ssim_kernel_cache.get(key)
    if kw is None:
        g = _gauss_1d(window, device, dtype)
        row, col = g.view(1, 1, 1, -1).expand(k, 1, 1, -1), g.view(1, 1, -1, 1).expand(k, 1, -1, 1)
        if device.type == "cpu":
            row, col = (w.contiguous(memory_format=torch.channels_last) for w in (row, col))
        kw = _ssim_kernel_cache[key] = (row, col)
    return kw


def _blur(maps: Tensor, window: int) -> Tensor:
    """The separable Gaussian over every channel of `maps` (N, k, H, W), 'valid': a 1 x window then
    a window x 1 depthwise conv. On the CPU the depthwise convs run channels_last: oneDNN's NCHW
    depthwise kernel is ~10x slower there (both directions), and the channels_last one gives the
    very same bits, forward and backward; the result comes back NCHW-contiguous, so what follows
    (and the loss's value) is exactly what the NCHW path computes."""
    k = maps.shape[1]
    row, col = _ssim_kernels(window, k, maps.device, maps.dtype)
    cpu = maps.device.type == "cpu"
    if cpu:
        maps = maps.contiguous(memory_format=torch.channels_last)
    maps = F.conv2d(F.conv2d(maps, row, groups=k), col, groups=k)
    return maps.contiguous() if cpu else maps


def ssim(p: Tensor, t: Tensor, window: int = 11) -> Tensor:
    """Mean SSIM of two (N, C, H, W) images in [0, 1]: window x window Gaussian window (sigma
    1.5), 'valid' filtering (no padding, so no edge artefacts; needs H, W >= window), computed
    as a separable 1 x window then window x 1 depthwise conv over all five moment maps at once."""
    n, c, h, w = p.shape
    if min(h, w) < window:
        raise ValueError(f"ssim needs H, W >= {window}, got {(h, w)}")
    maps = _blur(torch.cat([p, t, p * p, t * t, p * t], dim=1), window)
    mu_p, mu_t, pp, tt, pt = maps.split(c, dim=1)
    var_p, var_t, cov = pp - mu_p**2, tt - mu_t**2, pt - mu_p * mu_t
    num = (2 * mu_p * mu_t + _SSIM_C1) * (2 * cov + _SSIM_C2)
    den = (mu_p**2 + mu_t**2 + _SSIM_C1) * (var_p + var_t + _SSIM_C2)
    return (num / den).mean()


# "ssim" predates ssim5/ssim11 and stays the very same function as ssim11, so runs that name it
# reproduce bit for bit. The source's SSIMLoss is mean((1 - S5) / 2) + mean((1 - S11) / 2) (kornia's
# per-pixel (1 - SSIM) / 2, 'same' zero padding): the closest recipe is {ssim5: 0.5, ssim11: 0.5}.
@LOSSES.register("ssim")
@LOSSES.register("ssim11")
def ssim_loss(logits: Tensor, target: Tensor) -> Tensor:
    """1 - SSIM(sigmoid(logits), target) over an 11x11 window; see `ssim` for window and padding."""
    p, t = _prep(logits, target)
    return 1 - ssim(p, t)


@LOSSES.register("ssim5")
def ssim5_loss(logits: Tensor, target: Tensor) -> Tensor:
    """1 - SSIM(sigmoid(logits), target) over a 5x5 window (sigma 1.5, 'valid'); needs H, W >= 5."""
    p, t = _prep(logits, target)
    return 1 - ssim(p, t, window=5)


# Pixels (segmentation) or samples marked with common.tasks.IGNORE_INDEX count in no loss and no metric.


@LOSSES.register("cross_entropy")
def cross_entropy_loss(logits: Tensor, target: Tensor) -> Tensor:
    """Class logits (N, K) or (N, K, H, W) against integer labels (N) or (N, H, W); label 255 is ignored.

    The one loss here that takes labels rather than a [0, 1] target (workers/recipe_check.py
    keeps it in `loss.labels` and the others out of it)."""
    return F.cross_entropy(logits.float(), target.long(), ignore_index=IGNORE_INDEX)


# The kind of target a loss scores (common.task_spec.LossKind); a loss without the attribute is "dense".
cross_entropy_loss.kind = "labels"  # type: ignore[attr-defined]


def loss_kind(name: str) -> str:
    return getattr(LOSSES.get(name), "kind", "dense")


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
