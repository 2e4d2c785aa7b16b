"""Shapes, operand checks and the small tensor helpers every approximate-conv method shares
(conv.py holds the whole story)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from workers.approx.multipliers import ProductTable

METHODS = ("auto", "gather", "onehot", "factors", "bag", "bag_input", "bag_weight")
F64_EXACT = 2**53
F32_EXACT = 2**24

Padding = int | tuple[int, int] | str


# ---------------------------------------------------------------------------------------------
# Shapes and checks


def _pair(v: int | Sequence[int], what: str) -> tuple[int, int]:
    if not isinstance(v, (tuple, list, torch.Size)):
        return (int(v), int(v))
    t = tuple(int(i) for i in v)
    if len(t) == 1:
        return (t[0], t[0])
    if len(t) != 2:
        raise ValueError(f"{what} must be an int or a pair, got {v!r}")
    return t  # type: ignore[return-value]


def _pads(
    padding: Padding, kernel: tuple[int, int], stride: tuple[int, int], dilation: tuple[int, int]
) -> tuple[int, int, int, int]:
    """(left, right, top, bottom) like nn.Conv2d: an int, a pair, 'valid' or 'same'."""
    if isinstance(padding, str):
        if padding == "valid":
            return (0, 0, 0, 0)
        if padding == "same":
            if stride != (1, 1):
                raise ValueError("padding='same' needs stride 1")
            th, tw = (d * (k - 1) for d, k in zip(dilation, kernel, strict=True))
            return (tw // 2, tw - tw // 2, th // 2, th - th // 2)
        raise ValueError(f"padding must be an int, a pair, 'valid' or 'same', got {padding!r}")
    ph, pw = _pair(padding, "padding")
    return (pw, pw, ph, ph)


def _check(xq: torch.Tensor, wq: torch.Tensor, table: ProductTable, groups: int) -> None:
    for name, t in (("xq", xq), ("wq", wq)):
        if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
            raise ValueError(f"{name} must be an integer tensor (quantized operands), got {t.dtype}")
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D, got shape {tuple(t.shape)}")
        if t.numel():
            mn, mx = (int(v) for v in torch.aminmax(t))
            if mn < table.lo or mx > table.hi:
                raise ValueError(
                    f"{name} holds operands {mn}..{mx} outside the {table.name!r} table's "
                    f"{table.lo}..{table.hi}"
                )
    if groups < 1 or xq.shape[1] % groups or wq.shape[0] % groups:
        raise ValueError(f"groups={groups} must divide in ({xq.shape[1]}) and out ({wq.shape[0]}) channels")
    if wq.shape[1] * groups != xq.shape[1]:
        raise ValueError(
            f"weight {tuple(wq.shape)} expects {wq.shape[1] * groups} input channels with "
            f"groups={groups}, input has {xq.shape[1]}"
        )


def _prepare(
    xq: torch.Tensor, wq: torch.Tensor, table: ProductTable, stride: object, padding: Padding,
    dilation: object, groups: int,
) -> tuple[tuple[int, int], tuple[int, int], tuple[int, int, int, int]]:
    """Checks the operands; (stride, dilation, (left, right, top, bottom) padding)."""
    _check(xq, wq, table, groups)
    st, di = _pair(stride, "stride"), _pair(dilation, "dilation")  # type: ignore[arg-type]
    pads = _pads(padding, (wq.shape[2], wq.shape[3]), st, di)
    h, w = xq.shape[2] + pads[2] + pads[3], xq.shape[3] + pads[0] + pads[1]
    if h < di[0] * (wq.shape[2] - 1) + 1 or w < di[1] * (wq.shape[3] - 1) + 1:
        raise ValueError(f"input {tuple(xq.shape)} (padded {h}x{w}) is smaller than the kernel")
    return st, di, pads


def _pad(xq: torch.Tensor, pads: tuple[int, int, int, int]) -> torch.Tensor:
    """The int64 input with its padding: operand 0, looked up like any other."""
    xp = xq.to(torch.int64)
    return F.pad(xp, pads, value=0) if any(pads) else xp


def _depthwise_like(wq: torch.Tensor, groups: int) -> bool:
    return groups > 1 and wq.shape[0] == groups


def _patches(xp: torch.Tensor, kh: int, kw: int, st: tuple[int, int], di: tuple[int, int]) -> torch.Tensor:
    """A view (N, C, kh, kw, Ho, Wo) of the padded input: element [n, c, i, j, y, x] is the
    operand at tap (i, j) of output (y, x)."""
    n, c, h, w = xp.shape
    ho = (h - di[0] * (kh - 1) - 1) // st[0] + 1
    wo = (w - di[1] * (kw - 1) - 1) // st[1] + 1
    s = xp.stride()
    return xp.as_strided(
        (n, c, kh, kw, ho, wo), (s[0], s[1], s[2] * di[0], s[3] * di[1], s[2] * st[0], s[3] * st[1])
    )


def output_shape(
    x_shape: Sequence[int], w_shape: Sequence[int], stride: object = 1, padding: Padding = 0,
    dilation: object = 1,
) -> tuple[int, int, int, int]:
    st, di = _pair(stride, "stride"), _pair(dilation, "dilation")  # type: ignore[arg-type]
    kh, kw = int(w_shape[2]), int(w_shape[3])
    left, right, top, bottom = _pads(padding, (kh, kw), st, di)
    ho = (int(x_shape[2]) + top + bottom - di[0] * (kh - 1) - 1) // st[0] + 1
    wo = (int(x_shape[3]) + left + right - di[1] * (kw - 1) - 1) // st[1] + 1
    return (int(x_shape[0]), int(w_shape[0]), ho, wo)


def _present(t: torch.Tensor, table: ProductTable) -> torch.Tensor:
    """Sorted table indices (operand - lo) that occur in t (int64, t's device)."""
    counts = torch.bincount((t - table.lo).reshape(-1), minlength=table.size)
    return counts.nonzero().reshape(-1)


def _index_map(present: torch.Tensor, size: int) -> torch.Tensor:
    """index -> its position in `present` (size,), -1 where absent."""
    m = torch.full((size,), -1, dtype=torch.int64, device=present.device)
    m[present] = torch.arange(present.numel(), device=present.device)
    return m


def _to_int(acc: torch.Tensor) -> torch.Tensor:
    return torch.round(acc).to(torch.int64)
