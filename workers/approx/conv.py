"""Convolutions whose every product goes through an approximate multiplier's table.

`approx_conv2d(xq, wq, table, ...)` returns, for each output, the exact integer sum over its
receptive field of table[x - lo, w - lo]; `direct_conv2d` (reference.py) computes the same one
product at a time in Python (the reference, and the speed baseline). `ApproxConv2d` (surgery.py)
wraps an nn.Conv2d (quantize input and weight, approx_conv2d, dequantize, + bias); there too
`conv_layers`, `trace_macs` and `swap_layer` let a study replace one layer of a model at a time.

The pieces: shapes.py (shapes, checks, shared helpers), kernels.py (the methods below and their
costs), this module (choosing a method, and approx_conv2d itself), reference.py, surgery.py.

Padding: a padded position is operand 0, and it goes through the table like any other operand
(contributes table[0, w], which is 0 for every built-in but not necessarily for a user's table).
That is what the source did (it unfolded the zero-padded input and looked up every element),
and every method here and `direct_conv2d` do the same.

Methods (all exact, bit-identical int64 for every table; the tests check each one against
direct_conv2d):
  "gather"      option (a): index = (x - lo) * n + (w - lo) into the flat table for every
                product, looked up and summed per output by one embedding_bag over the table
                as a one-column matrix (no tensor of looked-up values); chunked.
  "onehot"      option (b), per value: table = exact product + E; one float64 conv of x and w
                plus the E term split over the operand values present on the side with fewer of
                them, skipping values whose E row/column is zero there: sum_v conv(1[x == v],
                E[v, w]) or sum_u conv(E[x, u], 1[w == u]), stacked as the channels of float64
                convs. An exact table (or one exact on the operands present) is one conv.
  "factors"     option (b), low rank: a table that is a sum of r products f(a) g(b)
                (ProductTable.factors: exact and DRUM r = 1, truncated one term per operand bit,
                less the terms that vanish on the operands present) is one float64 conv with r
                stacked channels.
  "bag_input"   the lookups as a sparse sum: rows (operand value v, tap t) hold table[v, w[:, t]]
                over the output channels, one embedding_bag run per output position (float32;
                rows for the values present only; taps chunked by input channel).
  "bag_weight"  the same with rows (weight value u, tap t) holding table[x[t, :], u] over the
                output positions, one run per output channel (for small output maps).
  "bag"         the bag side with the lower estimate (bag_side); "auto": see choose_method.
Exactness: every summand is an integer and every float partial sum stays below 2**53 (float64
convs and sums; checked) or 2**24 (float32 bags hold at most floor(2**24 / max |table value
present|) lookups each, and bags are added in float64), so the sums are exact whatever the
order; the conv results are rounded before the cast, which also absorbs the last-bit errors of
an FFT or Winograd float64 conv a GPU library might pick.

Measurements (`python -m bench.approx --methods`, and the same layers one method at a time): ns
per multiply-accumulate, one thread of the shared 2-core x86_64 box (load average 4-7 from other
jobs, so figures move up to 2-3x between runs), batch 1 at the model's 224 px, operands
calibrated on the layer's real input (99.99th percentile; 140-250 distinct values present on
each side), mitchell table (drum4 for "factors"); the Python reference ran 150-260 ns per
product on the same box when it was quiet, up to 660 when it was not:

  layer                                  multiplies gather onehot bag_input bag_weight factors
  enc features.2.conv.0.0 1x1 16->96 @112     19.3M    4.0     43      0.32        5.9    0.44
  enc features.2.conv.1.0 dw 3x3 s2 @112       2.7M    6.1    411        31         34      11
  dec up0.convB 3x3 384->384 @7x7             65.0M     15    137        15        3.2    0.20
  dec up2.convB 3x3 192->192 @14x14           65.0M     10     43       3.5        5.5    0.14
  dec up4.convB 3x3 96->96 @56x56              260M     20      -      0.49         13    0.12
  dec up5.convA 3x3 112->48 @112x112           607M     15      -      0.44         25    0.25
  dec conv3 3x3 48->1 @112x112                 5.4M    6.5   1638        12        533      13
  (truncated8 "factors", 8 terms: 1.1-4.0; exact table, "onehot" = one conv: 0.1-0.4)

Why "auto" picks as it does (choose_method, constants in COST_NS): the per-value decomposition
costs one float64 conv per operand value present (0.25-0.35 ns per multiply each), and with
calibrated scales 140-250 values are present, so it is 40-1600 ns per multiply: it is used only
when it needs no correction at all (an exact table). A rank-1 factorization (DRUM) is a single
conv and the fastest everywhere but in depthwise layers. For any other table the bag wins: on
large output maps the input side, whose rows depend on the weights and the values present only
(0.3-0.5 ns, 300x to 800x below the Python reference); on the decoder's 7x7 and 14x14 maps,
where building input-side rows would cost more than the multiplies, the weight side (2-3 ns);
on depthwise layers and one-output-channel layers, whose bag rows would hold one value, the
gather (5-10 ns). Against the per-product Python loop that is 15x (depthwise gather) to about
1000x (one factor on a large map); `python -m bench.approx` measures it per layer and for the
whole model. The source's Python implementation took about 1 to 7 hours per layer for 5 images.

Threads: every method is a few large torch ops that use torch's intra-op threads. On a machine
busier than its cores (a shared box, several Ray workers per node) set torch threads to 1 per
process: the threads of one op otherwise wait for each other at every op.
"""

from __future__ import annotations

import torch

from workers.approx.kernels import (
    COST_NS,
    _bag,
    _factors,
    _gather,
    _live_factors,
    _onehot,
    bag_side,
)
from workers.approx.multipliers import ProductTable
from workers.approx.shapes import (
    METHODS,
    Padding,
    _depthwise_like,
    _pad,
    _prepare,
    _present,
    output_shape,
)

__all__ = ["COST_NS", "METHODS", "approx_conv2d", "auto_method", "bag_side", "choose_method", "estimate_costs",
           "output_shape"]


# ---------------------------------------------------------------------------------------------
# Choosing a method


def estimate_costs(
    xp: torch.Tensor, wq: torch.Tensor, table: ProductTable, groups: int,
    st: tuple[int, int] = (1, 1), di: tuple[int, int] = (1, 1),
) -> dict[str, float]:
    """Estimated seconds of each method for this call (the padded input xp), from COST_NS."""
    if _depthwise_like(wq, groups):
        # Depthwise: float64 grouped convs and one-channel bag rows are slow (measured 10-50
        # ns per multiply); the gather is the one to run.
        return {"gather": 0.0}
    o, cg, kh, kw = wq.shape
    og, k = o // groups, cg * kh * kw
    _, _, ho, wo = output_shape(xp.shape, wq.shape, st, 0, di)
    npos = xp.shape[0] * ho * wo
    macs = npos * k * o
    vx, vw = _present(xp, table), _present(wq, table)
    ops = table.operands().to(xp.device)
    err = table.values.to(xp.device)[vx][:, vw] - ops[vx][:, None] * ops[vw][None, :]
    nz = err.ne(0)
    d_eff = min(int(nz.any(dim=1).sum()), int(nz.any(dim=0).sum()))
    c = COST_NS
    short = lambda length: max(1.0, 32.0 / max(1, length))  # noqa: E731  (bag rows under 32 values)
    costs = {
        "onehot": (1 + d_eff) * macs * c["conv"],
        "gather": macs * c["gather"],
        "bag_input": macs * c["bag_input"] * short(og) + groups * k * vx.numel() * og * c["build_input"],
        "bag_weight": macs * c["bag_weight"] * short(npos) + groups * k * vw.numel() * npos * c["build_weight"],
    }
    if table.factors is not None:
        costs["factors"] = _live_factors(xp, wq, table)[0].shape[1] * macs * c["conv"]
    return {m: v * 1e-9 for m, v in costs.items()}


def choose_method(
    xp: torch.Tensor, wq: torch.Tensor, table: ProductTable, groups: int,
    st: tuple[int, int] = (1, 1), di: tuple[int, int] = (1, 1),
) -> str:
    """The method "auto" runs: the cheapest by estimate_costs. In practice: an exact table (or
    exact on the operands present) -> "onehot" with no correction, a single float64 conv, or the
    input-side bag where that is cheaper; DRUM (rank 1) -> "factors" on small output maps;
    any other table -> "bag_input" on large output maps, "bag_weight" on small ones (the
    decoder's 7 x 7 and 14 x 14 maps); depthwise -> "gather"."""
    costs = estimate_costs(xp, wq, table, groups, st, di)
    return min(costs, key=costs.__getitem__)


def auto_method(
    xq: torch.Tensor,
    wq: torch.Tensor,
    table: ProductTable,
    stride: int | tuple[int, int] = 1,
    padding: Padding = 0,
    dilation: int | tuple[int, int] = 1,
    groups: int = 1,
) -> str:
    """The method approx_conv2d(..., method="auto") runs for these operands."""
    st, di, pads = _prepare(xq, wq, table, stride, padding, dilation, groups)
    if _depthwise_like(wq, groups):
        return "gather"
    return choose_method(_pad(xq, pads), wq, table, groups, st, di)


def approx_conv2d(
    xq: torch.Tensor,
    wq: torch.Tensor,
    table: ProductTable,
    stride: int | tuple[int, int] = 1,
    padding: Padding = 0,
    dilation: int | tuple[int, int] = 1,
    groups: int = 1,
    method: str = "auto",
) -> torch.Tensor:
    """conv2d with every product looked up in `table`; int64 (N, O, Ho, Wo), exact.

    xq (N, C, H, W) and wq (O, C / groups, kh, kw) are integer operands in table.lo..table.hi.
    Padding positions are operand 0 and go through the table (table[0, w]). `method` picks the
    algorithm (see the module docstring); all give identical integers."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; valid: {', '.join(METHODS)}")
    st, di, pads = _prepare(xq, wq, table, stride, padding, dilation, groups)
    if method == "auto" and _depthwise_like(wq, groups):
        method = "gather"  # see estimate_costs
    if method == "gather":
        return _gather(xq, wq, table, st, di, groups, pads)
    xp = _pad(xq, pads)
    if method == "auto":
        method = choose_method(xp, wq, table, groups, st, di)
        if method == "gather":
            return _gather(xq, wq, table, st, di, groups, pads)
    if method == "onehot":
        return _onehot(xp, wq, table, st, di, groups)
    if method == "factors":
        return _factors(xp, wq, table, st, di, groups)
    if method in ("bag", "bag_input", "bag_weight"):
        side = {"bag": None, "bag_input": "input", "bag_weight": "weight"}[method]
        return _bag(xp, wq, table, st, di, groups, side)
    raise ValueError(f"unknown method {method!r}; valid: {', '.join(METHODS)}")
