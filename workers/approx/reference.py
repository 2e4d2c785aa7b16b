"""The per-product reference: every product looked up one at a time in Python. The tests check
every method of approx_conv2d against it; `python -m bench.approx` times it as the baseline."""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch

from workers.approx.multipliers import ProductTable
from workers.approx.shapes import Padding, _pad, _prepare, output_shape

# ---------------------------------------------------------------------------------------------
# The per-product reference


def direct_conv2d_tensors(
    xq: torch.Tensor,
    wq: torch.Tensor,
    table: ProductTable,
    outputs: Sequence[tuple[int, int, int, int]],
    stride: int | tuple[int, int] = 1,
    padding: Padding = 0,
    dilation: int | tuple[int, int] = 1,
    groups: int = 1,
) -> torch.Tensor:
    """The source updates' way: Python loops over each output's products, indexing the image, the
    kernel and the table as torch tensors one element at a time (the speed baseline of
    bench/approx.py's `speedup_vs_direct`; `direct_conv2d` is the same arithmetic on Python lists,
    ~10x faster, kept as the strict reference). Only the listed outputs (n, o, y, x)."""
    st, di, pads = _prepare(xq, wq, table, stride, padding, dilation, groups)
    xp = _pad(xq, pads).cpu()
    w, values, lo = wq.cpu(), table.values.cpu(), table.lo
    o_total, cg, kh, kw = w.shape
    og = o_total // groups
    vals = []
    for n, o, i, j in outputs:
        s = 0
        c0 = (o // og) * cg
        for c in range(cg):
            for a in range(kh):
                for b in range(kw):
                    xv = int(xp[n, c0 + c, i * st[0] + a * di[0], j * st[1] + b * di[1]])
                    s += int(values[xv - lo, int(w[o, c, a, b]) - lo])
        vals.append(s)
    return torch.tensor(vals, dtype=torch.int64)


def direct_conv2d(
    xq: torch.Tensor,
    wq: torch.Tensor,
    table: ProductTable,
    stride: int | tuple[int, int] = 1,
    padding: Padding = 0,
    dilation: int | tuple[int, int] = 1,
    groups: int = 1,
    outputs: Sequence[tuple[int, int, int, int]] | None = None,
    stats: dict | None = None,
) -> torch.Tensor:
    """The reference: Python loops over outputs, one table lookup per product.

    With `outputs=None` the whole int64 (N, O, Ho, Wo) result; otherwise only the listed
    outputs (n, o, y, x), returned as a 1-D int64 tensor in that order (it is slow: a few
    million products a second). `stats`, if given, receives "setup_s" (checks, padding, the
    table, the weights and the images in use as Python lists), "loop_s" (the loops) and
    "products"."""
    started = time.perf_counter()
    st, di, pads = _prepare(xq, wq, table, stride, padding, dilation, groups)
    xp = _pad(xq, pads)
    shape = output_shape(xp.shape, wq.shape, st, 0, di)
    lo = table.lo
    t = table.values.tolist()
    xp, wq = xp.cpu(), wq.cpu().to(torch.int64)
    w = wq.tolist()
    o_total, cg, kh, kw = wq.shape
    og = o_total // groups
    if outputs is None:
        todo = [
            (n, o, i, j)
            for n in range(shape[0]) for o in range(shape[1])
            for i in range(shape[2]) for j in range(shape[3])
        ]
    else:
        todo = [tuple(int(v) for v in out) for out in outputs]  # type: ignore[misc]
        for out in todo:
            if len(out) != 4 or not all(0 <= v < s for v, s in zip(out, shape, strict=True)):
                raise ValueError(f"output {out} outside the output shape {shape}")
    x_lists = {n: xp[n].tolist() for n in sorted({out[0] for out in todo})}  # images in use
    (sh, sw), (dh, dw) = st, di
    w1 = [[wc[0][0] for wc in wo] for wo in w] if kh == kw == 1 else []
    vals = []
    looped = time.perf_counter()
    if kh == kw == 1:  # pointwise: no loops over kernel taps
        for n, o, i, j in todo:
            s = 0
            xn, wo = x_lists[n], w1[o]
            c0 = (o // og) * cg
            i0, j0 = i * sh, j * sw
            for cl in range(cg):
                s += t[xn[c0 + cl][i0][j0] - lo][wo[cl] - lo]
            vals.append(s)
    else:
        for n, o, i, j in todo:
            s = 0
            xn, wo = x_lists[n], w[o]
            c0 = (o // og) * cg
            i0, j0 = i * sh, j * sw
            for cl in range(cg):
                xc, wc = xn[c0 + cl], wo[cl]
                for a in range(kh):
                    row, wr = xc[i0 + a * dh], wc[a]
                    for b in range(kw):
                        s += t[row[j0 + b * dw] - lo][wr[b] - lo]
            vals.append(s)
    if stats is not None:
        stats.update(setup_s=looped - started, loop_s=time.perf_counter() - looped,
                     products=len(todo) * cg * kh * kw)
    result = torch.tensor(vals, dtype=torch.int64)
    return result.reshape(shape) if outputs is None else result
