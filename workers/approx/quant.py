"""Scaling floats to a product table's integer operands, with saturation.

q = clamp(round(x * scale), lo, hi): symmetric when the operand range is signed (lo = -128,
hi = 127: zero maps to zero, the scale is the same for both signs), one-sided when it is unsigned
(lo = 0: negative values saturate to 0). Rounding is to nearest, ties to even (torch.round).
The product of two operands is divided by s_x * s_w to come back to float.

Scales are either fixed factors (the source's study used 10 for activations and 100 or 1000 for
weights: `FIXED_SCALES`) or calibrated on observed values with `scale_for`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

FIXED_SCALES = (10.0, 100.0, 1000.0)


def _check_scale(scale: float) -> float:
    s = float(scale)
    if not math.isfinite(s) or s <= 0:
        raise ValueError(f"quantization scale must be a finite number > 0, got {scale!r}")
    return s


def quantize(x: torch.Tensor, scale: float, lo: int, hi: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(q, saturated): q = clamp(round(x * scale), lo, hi) as int64, and the number of values
    that were clamped (a 0-dim int64 tensor on x's device, so no host sync). NaN inputs are not
    allowed (they have no integer); approx_conv2d's range check rejects what they become."""
    s = _check_scale(scale)
    r = torch.round(x.detach() * s)
    saturated = ((r < lo) | (r > hi)).sum()
    return r.clamp_(lo, hi).to(torch.int64), saturated


def dequantize(acc: torch.Tensor, input_scale: float, weight_scale: float) -> torch.Tensor:
    """The float value of an integer sum of operand products: acc / (s_x * s_w), float64."""
    return acc.to(torch.float64) / (_check_scale(input_scale) * _check_scale(weight_scale))


def _flat(values: torch.Tensor | Iterable[torch.Tensor]) -> torch.Tensor:
    if isinstance(values, torch.Tensor):
        parts = [values]
    else:
        parts = list(values)
    if not parts:
        raise ValueError("scale_for: no values to calibrate on")
    return torch.cat([p.detach().reshape(-1).to("cpu", torch.float64) for p in parts])


def scale_for(
    values: torch.Tensor | Iterable[torch.Tensor],
    lo: int,
    hi: int,
    method: str = "minmax",
    percentile: float = 99.99,
) -> float:
    """The scale that maps the observed range onto the operands lo..hi.

    Signed ranges (lo < 0) are symmetric: scale = min(hi, -lo) / m with m = max |v| ("minmax")
    or the `percentile`-th percentile of |v| ("percentile"; values beyond it saturate).
    Unsigned ranges (lo = 0): m = max(v) or the percentile of v, scale = hi / m (negative values
    saturate to 0). `values` is a tensor or several (e.g. one per calibration batch). If m is 0
    (all values zero) the scale is 1.0.
    """
    v = _flat(values)
    if not torch.isfinite(v).all():
        raise ValueError("scale_for: the values contain NaN or infinity")
    if lo < 0:
        target, mag = float(min(hi, -lo)), v.abs()
    else:
        target, mag = float(hi), v.clamp(min=0)
    if method == "minmax":
        m = float(mag.max()) if mag.numel() else 0.0
    elif method == "percentile":
        if not 0 < percentile <= 100:
            raise ValueError(f"scale_for: percentile must be in (0, 100], got {percentile}")
        k = max(1, min(mag.numel(), math.ceil(percentile / 100 * mag.numel())))
        m = float(mag.kthvalue(k).values)
    else:
        raise ValueError(f"scale_for: method must be 'minmax' or 'percentile', got {method!r}")
    return target / m if m > 0 else 1.0
