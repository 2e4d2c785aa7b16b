"""Convolutions whose every product goes through an approximate multiplier's table.

`approx_conv2d(xq, wq, table, ...)` returns, for each output, the exact integer sum over its
receptive field of table[x - lo, w - lo]; `direct_conv2d` computes the same one product at a
time in Python (the reference, and the speed baseline). `ApproxConv2d` wraps an nn.Conv2d
(quantize input and weight, approx_conv2d, dequantize, + bias); `conv_layers`, `trace_macs` and
`swap_layer` let a study replace one layer of a model at a time.

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

import contextlib
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from workers.approx.multipliers import ProductTable
from workers.approx.quant import quantize

METHODS = ("auto", "gather", "onehot", "factors", "bag", "bag_input", "bag_weight")
# Bound on the largest temporary of a method, in elements (64-128 MB).
CHUNK_ELEMENTS = 2**24
_F64_EXACT = 2**53
_F32_EXACT = 2**24

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


# ---------------------------------------------------------------------------------------------
# The methods (on the padded input; stride and dilation as pairs)


def _gather(xq, wq, table, st, di, groups, pads) -> torch.Tensor:  # noqa: ANN001
    n_img = xq.shape[0]
    o, cg, kh, kw = wq.shape
    og = o // groups
    n, lo, dev = table.size, table.lo, xq.device
    k = cg * kh * kw
    # index = (x - lo) * n + (w - lo) into the flat table; the lookups and their sum are one
    # embedding_bag over a one-column table (no tensor of looked-up values in between).
    per_bag, dtype = _bag_chunks(k, table.values)
    nb = -(-k // per_bag)
    flat = table.values.to(dev, dtype).reshape(-1, 1)
    xs_all = xq.to(torch.int32, copy=True).sub_(lo).mul_(n)
    if any(pads):
        xs_all = F.pad(xs_all, pads, value=-lo * n)  # padding: operand 0
    pt = _patches(xs_all, kh, kw, st, di)  # (N, C, kh, kw, Ho, Wo) view
    ho, wo = pt.shape[-2:]
    # (N, G, Ho, Wo, 1, Cg, kh, kw): the taps of each output position last, still a view
    xv = pt.reshape(n_img, groups, cg, kh, kw, ho, wo).permute(0, 1, 5, 6, 2, 3, 4).unsqueeze(4)
    wv = (wq - lo).to(torch.int32).reshape(groups, 1, 1, og, cg, kh, kw)
    out = torch.empty(n_img, groups, ho, wo, og, dtype=torch.int64, device=dev)
    per_row = wo * k
    gc = max(1, min(groups, CHUNK_ELEMENTS // (per_row * ho)))
    yc = max(1, min(ho, CHUNK_ELEMENTS // (gc * per_row)))
    oc = max(1, min(og, CHUNK_ELEMENTS // (gc * yc * per_row)))
    offs_full = _bag_offsets(gc * yc * wo * oc, k, per_bag, dev)
    for i in range(n_img):
        for g0 in range(0, groups, gc):
            g1 = min(groups, g0 + gc)
            for y0 in range(0, ho, yc):
                y1 = min(ho, y0 + yc)
                for o0 in range(0, og, oc):
                    o1 = min(og, o0 + oc)
                    idx = torch.empty(g1 - g0, y1 - y0, wo, o1 - o0, cg, kh, kw, dtype=torch.int32, device=dev)
                    torch.add(xv[i, g0:g1, y0:y1], wv[g0:g1, :, :, o0:o1], out=idx)
                    y = F.embedding_bag(idx.reshape(-1), flat, offs_full[: idx.numel() // k * nb], mode="sum")
                    y = y.reshape(g1 - g0, y1 - y0, wo, o1 - o0, nb)
                    out[i, g0:g1, y0:y1, :, o0:o1] = y.sum(dim=4, dtype=torch.float64) if nb > 1 else y[..., 0]
    return out.permute(0, 1, 4, 2, 3).reshape(n_img, o, ho, wo)


def _stacked_conv(xp, wq, st, di, groups, rank, make_a, make_b) -> torch.Tensor:  # noqa: ANN001
    """sum_r conv(A_r, B_r) as float64 convs of stacked channels, chunked over r.

    make_a(r0, r1) -> (N, C, r1 - r0, H, W), make_b(r0, r1) -> (O, Cg, r1 - r0, kh, kw)."""
    n_img, c, h, w = xp.shape
    o, cg, kh, kw = wq.shape
    # a (N, C * rc, H, W) and the conv's per-image unfolded copy (C * rc * kh * kw, Ho * Wo)
    rc = max(1, min(rank, CHUNK_ELEMENTS // max(1, c * h * w * max(n_img, kh * kw))))
    acc = None
    for r0 in range(0, rank, rc):
        r1 = min(rank, r0 + rc)
        a = make_a(r0, r1).reshape(n_img, c * (r1 - r0), h, w)
        b = make_b(r0, r1).reshape(o, cg * (r1 - r0), kh, kw)
        y = F.conv2d(a, b, stride=st, dilation=di, groups=groups)
        acc = y if acc is None else acc.add_(y)
    assert acc is not None
    return acc


def _exact_conv(xp, wq, st, di, groups) -> torch.Tensor:  # noqa: ANN001
    return F.conv2d(xp.to(torch.float64), wq.to(torch.float64), stride=st, dilation=di, groups=groups)


def _bound_check(terms: int, magnitude: float, what: str) -> None:
    if terms * magnitude >= _F64_EXACT:
        raise ValueError(
            f"approx_conv2d ({what}): {terms} products of magnitude up to {magnitude:g} may "
            "exceed 2**53, beyond exact float64 sums"
        )


def _onehot(xp, wq, table, st, di, groups) -> torch.Tensor:  # noqa: ANN001
    dev, lo = xp.device, table.lo
    ops = table.operands().to(dev)
    err = table.values.to(dev) - ops[:, None] * ops[None, :]  # E = table - exact product
    vx, vw = _present(xp, table), _present(wq, table)
    sub = err[vx][:, vw]
    rows = vx[sub.ne(0).any(dim=1)]  # input values whose E row is not zero on the weights
    cols = vw[sub.ne(0).any(dim=0)]
    k = wq.shape[1] * wq.shape[2] * wq.shape[3]
    amax = float(ops.abs().max()) ** 2 + float(sub.abs().max()) if sub.numel() else 0.0
    _bound_check(k, amax, "onehot")
    acc = _exact_conv(xp, wq, st, di, groups)
    xi, wi = xp - lo, wq.to(torch.int64) - lo
    if rows.numel() == 0 or cols.numel() == 0:
        return _to_int(acc)
    if rows.numel() <= cols.numel():
        def make_a(r0: int, r1: int) -> torch.Tensor:
            return (xi[:, :, None] == rows[r0:r1, None, None]).to(torch.float64)

        def make_b(r0: int, r1: int) -> torch.Tensor:
            return err[rows[r0:r1]][:, wi].permute(1, 2, 0, 3, 4).to(torch.float64)

        acc += _stacked_conv(xp, wq, st, di, groups, rows.numel(), make_a, make_b)
    else:
        def make_a(r0: int, r1: int) -> torch.Tensor:  # type: ignore[misc]
            return err[:, cols[r0:r1]][xi].permute(0, 1, 4, 2, 3).to(torch.float64)

        def make_b(r0: int, r1: int) -> torch.Tensor:  # type: ignore[misc]
            return (wi[:, :, None] == cols[r0:r1, None, None]).to(torch.float64)

        acc += _stacked_conv(xp, wq, st, di, groups, cols.numel(), make_a, make_b)
    return _to_int(acc)


def _live_factors(xp, wq, table) -> tuple[torch.Tensor, torch.Tensor]:  # noqa: ANN001
    """The table's factors without the terms that vanish on the operands present."""
    assert table.factors is not None
    f, g = (t.to(xp.device) for t in table.factors)
    vx, vw = _present(xp, table), _present(wq, table)
    live = f[vx].ne(0).any(dim=0) & g[vw].ne(0).any(dim=0)
    return f[:, live], g[:, live]


def _factors(xp, wq, table, st, di, groups) -> torch.Tensor:  # noqa: ANN001
    if table.factors is None:
        raise ValueError(f"method 'factors' needs a table with factors; {table.name!r} has none")
    f, g = _live_factors(xp, wq, table)
    if f.shape[1] == 0:
        return torch.zeros(output_shape(xp.shape, wq.shape, st, 0, di), dtype=torch.int64, device=xp.device)
    k = wq.shape[1] * wq.shape[2] * wq.shape[3]
    _bound_check(k * f.shape[1], float(f.abs().max()) * float(g.abs().max()), "factors")
    xi, wi = xp - table.lo, wq.to(torch.int64) - table.lo
    fx = f.to(torch.float64)
    gw = g.to(torch.float64)

    def make_a(r0: int, r1: int) -> torch.Tensor:
        return fx[:, r0:r1][xi].permute(0, 1, 4, 2, 3)

    def make_b(r0: int, r1: int) -> torch.Tensor:
        return gw[:, r0:r1][wi].permute(0, 1, 4, 2, 3)

    return _to_int(_stacked_conv(xp, wq, st, di, groups, f.shape[1], make_a, make_b))


def _bag_chunks(k: int, table_sub: torch.Tensor) -> tuple[int, torch.dtype]:
    """Lookups per bag and the bag dtype so that every bag's float sum is exact."""
    m = float(table_sub.abs().max()) if table_sub.numel() else 0.0
    if m == 0:
        return k, torch.float32
    per32 = int(_F32_EXACT // m)
    if per32 >= 1:
        return min(k, per32), torch.float32
    return min(k, int(_F64_EXACT // m)), torch.float64


def bag_side(n_positions: int, k: int, out_channels: int, d_in: int, d_w: int) -> str:
    """'input' or 'weight': the cheaper side of the bag method by COST_NS (input: k * d_in rows
    of out_channels values; weight: k * d_w rows of n_positions values)."""
    c = COST_NS
    macs = n_positions * k * out_channels
    cost_in = macs * c["bag_input"] * max(1.0, 32 / out_channels) + k * d_in * out_channels * c["build_input"]
    cost_w = macs * c["bag_weight"] * max(1.0, 32 / n_positions) + k * d_w * n_positions * c["build_weight"]
    return "input" if cost_in <= cost_w else "weight"


def _bag_offsets(bags: int, k: int, per_bag: int, device: torch.device) -> torch.Tensor:
    """Offsets of `bags` runs of k lookups, each cut into bags of at most per_bag (int32)."""
    within = torch.arange(0, k, per_bag, dtype=torch.int32, device=device)
    starts = torch.arange(0, bags * k, k, dtype=torch.int32, device=device)
    return (starts[:, None] + within[None, :]).reshape(-1)


def _bag_group(xp, wg, table, st, di, side) -> torch.Tensor:  # noqa: ANN001
    """One group of the bag method: xp (N, Cg, H, W), wg (Og, Cg, kh, kw) -> (N, Og, Ho, Wo)."""
    dev, lo, size = xp.device, table.lo, table.size
    n_img = xp.shape[0]
    og, cg, kh, kw = wg.shape
    k = cg * kh * kw
    vx, vw = _present(xp, table), _present(wg, table)
    dx, dw = vx.numel(), vw.numel()
    sub = table.values.to(dev)[vx][:, vw]  # (Dx, Dw): the table on the operands present
    per_bag, dtype = _bag_chunks(k, sub)
    # Operands as positions in vx / vw (int32), on the input's own size (before unfolding).
    xm = _index_map(vx, size).to(torch.int32)[xp - lo]
    pt = _patches(xm, kh, kw, st, di)  # (N, Cg, kh, kw, Ho, Wo) view
    ho, wo = pt.shape[-2:]
    npos = n_img * ho * wo
    wi = _index_map(vw, size)[(wg - lo).reshape(og, k)]  # (Og, K)
    if side is None:
        side = bag_side(npos, k, og, dx, dw)
    if side == "input":
        # Rows (value d, tap t) hold sub[d, w[:, t]] over output channels; one run of lookups
        # per output position: row d*kk + t for the operand d at tap t. Value-major rows keep
        # the many equal activations (ReLU zeros) of neighbouring taps on neighbouring rows.
        # Taps go in chunks of whole input channels so that the rows stay below CHUNK_ELEMENTS
        # (the partial sums then add up in float64); output channels are cut only if one
        # input channel's rows are already too many.
        taps = kh * kw
        oc = max(1, min(og, CHUNK_ELEMENTS // max(1, dx * taps)))
        cc = max(1, min(cg, CHUNK_ELEMENTS // max(1, dx * taps * oc)))
        single = cc == cg and oc == og
        out = torch.empty(n_img, ho, wo, og, dtype=torch.int64 if single else torch.float64, device=dev)
        for o0 in range(0, og, oc):
            o1 = min(og, o0 + oc)
            for c0 in range(0, cg, cc):
                c1 = min(cg, c0 + cc)
                kk = (c1 - c0) * taps
                bag = min(per_bag, kk)
                nbk = -(-kk // bag)
                cols = wi[o0:o1, c0 * taps:c1 * taps].T.reshape(-1)
                rows = sub.to(dtype).index_select(1, cols).reshape(dx * kk, o1 - o0)
                tap = torch.arange(kk, dtype=torch.int32, device=dev).reshape(c1 - c0, kh, kw)
                yc = max(1, min(ho, CHUNK_ELEMENTS // max(1, wo * (kk + nbk * (o1 - o0)))))
                offs_full = _bag_offsets(yc * wo, kk, bag, dev)
                for i in range(n_img):
                    for y0 in range(0, ho, yc):
                        y1 = min(ho, y0 + yc)
                        idx = torch.empty(y1 - y0, wo, c1 - c0, kh, kw, dtype=torch.int32, device=dev)
                        view = pt[i, c0:c1, :, :, y0:y1].permute(3, 4, 0, 1, 2)
                        torch.add(tap, view, alpha=kk, out=idx)
                        y = F.embedding_bag(idx.reshape(-1), rows, offs_full[: (y1 - y0) * wo * nbk], mode="sum")
                        if nbk > 1:
                            y = y.reshape(-1, nbk, o1 - o0).sum(dim=1, dtype=torch.float64)
                        y = y.reshape(y1 - y0, wo, o1 - o0)
                        if single:
                            out[i, y0:y1, :, o0:o1] = y
                        elif c0 == 0:
                            out[i, y0:y1, :, o0:o1] = y.to(torch.float64)
                        else:
                            out[i, y0:y1, :, o0:o1] += y
        return (out if single else out.to(torch.int64)).permute(0, 3, 1, 2)
    # Weight side: rows (value d, tap t) hold sub[x[t, p], d] over output positions p; one
    # run of K lookups per output channel: row d*K + t for the weight operand d at tap t.
    xcols = pt.permute(1, 2, 3, 0, 4, 5).reshape(k, npos)
    subt = sub.T.to(dtype).contiguous()  # (Dw, Dx)
    pc = max(1, min(npos, CHUNK_ELEMENTS // max(1, dw)))
    kc = max(1, min(k, CHUNK_ELEMENTS // max(1, dw * pc)))
    acc = torch.zeros(og, npos, dtype=torch.float64, device=dev)
    for p0 in range(0, npos, pc):
        p1 = min(npos, p0 + pc)
        for k0 in range(0, k, kc):
            k1 = min(k, k0 + kc)
            kk = k1 - k0
            rows_w = subt.index_select(1, xcols[k0:k1, p0:p1].reshape(-1)).reshape(dw * kk, p1 - p0)
            idx = (wi[:, k0:k1] * kk + torch.arange(kk, device=dev)).to(torch.int32).reshape(-1)
            bag = min(per_bag, kk)
            y = F.embedding_bag(idx, rows_w, _bag_offsets(og, kk, bag, dev), mode="sum")
            acc[:, p0:p1] += y.reshape(og, -1, p1 - p0).sum(dim=1, dtype=torch.float64)
    return acc.to(torch.int64).reshape(og, n_img, ho, wo).permute(1, 0, 2, 3)


def _bag(xp, wq, table, st, di, groups, side=None) -> torch.Tensor:  # noqa: ANN001
    cg = xp.shape[1] // groups
    og = wq.shape[0] // groups
    outs = [
        _bag_group(xp[:, g * cg:(g + 1) * cg], wq[g * og:(g + 1) * og], table, st, di, side)
        for g in range(groups)
    ]
    return (outs[0] if groups == 1 else torch.cat(outs, dim=1)).contiguous()


# ---------------------------------------------------------------------------------------------
# Choosing a method


# Nanoseconds per unit of work, single thread, fitted to the measurements in the module
# docstring: a multiply-accumulate of a float64 conv; a lookup-add of an input-side bag (rows
# over output channels) and of a weight-side bag (rows over positions), for rows of 32 values
# or more (shorter rows cost in proportion); one of the gather; a table-row element built for
# the input side and for the weight side.
COST_NS = {
    "conv": 0.25, "bag_input": 0.45, "bag_weight": 1.0, "gather": 6.0,
    "build_input": 2.2, "build_weight": 1.4,
}


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
                    s += int(values[int(xp[n, c0 + c, i * st[0] + a * di[0], j * st[1] + b * di[1]]) - lo, int(w[o, c, a, b]) - lo])
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


# ---------------------------------------------------------------------------------------------
# The module and the model helpers


class ApproxConv2d(nn.Module):
    """An nn.Conv2d whose products go through a ProductTable.

    forward: q_x = quantize(x, input_scale), q_w = quantize(weight, weight_scale) (clamped to
    the table's operands, saturations counted), acc = approx_conv2d(q_x, q_w), y = acc /
    (input_scale * weight_scale) + bias, in x's dtype. Shares the conv's weight and bias
    Parameters (same state_dict keys). Inference only: no gradient flows through it.

    After a forward: `saturated` and `total` are {"input": int, "weight": int}; input counts add
    up over forwards (until `reset_counts()`), weight counts are those of the latest forward.
    """

    def __init__(
        self, conv: nn.Conv2d, table: ProductTable, input_scale: float, weight_scale: float,
        method: str = "auto",
    ) -> None:
        super().__init__()
        if not isinstance(conv, nn.Conv2d):
            raise TypeError(f"ApproxConv2d wraps an nn.Conv2d, got {type(conv).__name__}")
        if conv.padding_mode != "zeros":
            raise ValueError(f"ApproxConv2d supports padding_mode 'zeros' only, got {conv.padding_mode!r}")
        if method not in METHODS:
            raise ValueError(f"unknown method {method!r}; valid: {', '.join(METHODS)}")
        self.weight = conv.weight
        self.bias = conv.bias
        self.stride, self.padding = conv.stride, conv.padding
        self.dilation, self.groups = conv.dilation, conv.groups
        self.table = table
        self.input_scale, self.weight_scale = float(input_scale), float(weight_scale)
        self.method = method
        quantize(torch.zeros(1), self.input_scale, 0, 0)  # validates the scales
        quantize(torch.zeros(1), self.weight_scale, 0, 0)
        self.reset_counts()

    def reset_counts(self) -> None:
        self.saturated = {"input": 0, "weight": 0}
        self.total = {"input": 0, "weight": 0}

    def extra_repr(self) -> str:
        return (
            f"{self.weight.shape[1] * self.groups}, {self.weight.shape[0]}, "
            f"kernel_size={tuple(self.weight.shape[2:])}, stride={self.stride}, "
            f"padding={self.padding}, groups={self.groups}, table={self.table.name!r}, "
            f"input_scale={self.input_scale:g}, weight_scale={self.weight_scale:g}"
        )

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lo, hi = self.table.lo, self.table.hi
        xq, sx = quantize(x, self.input_scale, lo, hi)
        wq, sw = quantize(self.weight, self.weight_scale, lo, hi)
        acc = approx_conv2d(
            xq, wq, self.table, self.stride, self.padding, self.dilation, self.groups, self.method
        )
        self.saturated["input"] += int(sx)
        self.total["input"] += x.numel()
        self.saturated["weight"] = int(sw)
        self.total["weight"] = self.weight.numel()
        y = acc.to(torch.float64) / (self.input_scale * self.weight_scale)
        if self.bias is not None:
            y += self.bias.detach().to(torch.float64).reshape(1, -1, 1, 1)
        return y.to(x.dtype)


@dataclass(frozen=True)
class LayerInfo:
    """One nn.Conv2d of a model. `kind`: "pointwise" (1x1 kernel), "depthwise" (groups ==
    in == out channels > 1) or "dense" (anything else, e.g. a 3x3 conv with groups 1);
    `part`: the first component of the name (encoder, decoder); `macs`: multiplies for the
    traced input size (None when conv_layers got no input_size)."""

    name: str
    kind: str
    part: str
    weight_shape: tuple[int, ...]
    in_channels: int
    out_channels: int
    kernel_size: tuple[int, int]
    stride: tuple[int, int]
    padding: object
    dilation: tuple[int, int]
    groups: int
    bias: bool
    macs: int | None = None


def conv_kind(conv: nn.Conv2d) -> str:
    if tuple(conv.kernel_size) == (1, 1):
        return "pointwise"
    if conv.groups > 1 and conv.groups == conv.in_channels == conv.out_channels:
        return "depthwise"
    return "dense"


def _input_tensor(model: nn.Module, input_size: Sequence[int]) -> torch.Tensor:
    size = tuple(int(s) for s in input_size)
    if len(size) == 2:
        first = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
        size = (1, first.in_channels if first is not None else 3, *size)
    elif len(size) == 3:
        size = (1, *size)
    if len(size) != 4:
        raise ValueError(f"input_size must be (H, W), (C, H, W) or (N, C, H, W), got {input_size!r}")
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None and param.dtype.is_floating_point else torch.float32
    return torch.zeros(size, device=device, dtype=dtype)


def trace_macs(model: nn.Module, input_size: Sequence[int]) -> dict[str, int]:
    """Multiplies of every nn.Conv2d for one forward of a zero input of `input_size` ((H, W)
    means batch 1 with the first conv's input channels): output elements x (in / groups) x
    kh x kw, summed over calls. The model runs in eval mode (BatchNorm statistics untouched)
    and gets its mode back."""
    macs: dict[str, int] = {}
    hooks = []

    def hook(name: str):  # noqa: ANN202
        def fn(mod: nn.Conv2d, _inp: tuple, out: torch.Tensor) -> None:
            per = (mod.in_channels // mod.groups) * mod.kernel_size[0] * mod.kernel_size[1]
            macs[name] = macs.get(name, 0) + out.numel() * per
        return fn

    for name, mod in model.named_modules():
        if isinstance(mod, nn.Conv2d):
            hooks.append(mod.register_forward_hook(hook(name)))
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(_input_tensor(model, input_size))
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    return macs


def conv_layers(model: nn.Module, input_size: Sequence[int] | None = None) -> list[LayerInfo]:
    """Every nn.Conv2d of the model in module order (state_dict names), with macs when
    input_size is given (see trace_macs)."""
    macs = trace_macs(model, input_size) if input_size is not None else {}
    out = []
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Conv2d):
            out.append(LayerInfo(
                name=name,
                kind=conv_kind(mod),
                part=name.split(".", 1)[0],
                weight_shape=tuple(mod.weight.shape),
                in_channels=mod.in_channels,
                out_channels=mod.out_channels,
                kernel_size=tuple(mod.kernel_size),  # type: ignore[arg-type]
                stride=tuple(mod.stride),  # type: ignore[arg-type]
                padding=mod.padding,
                dilation=tuple(mod.dilation),  # type: ignore[arg-type]
                groups=mod.groups,
                bias=mod.bias is not None,
                macs=macs.get(name) if input_size is not None else None,
            ))
    return out


@contextlib.contextmanager
def swap_layer(model: nn.Module, name: str, replacement: nn.Module) -> Iterator[nn.Module]:
    """Put `replacement` in place of the module `name` (a state_dict module name such as
    "decoder.up0.convB") for the duration of the with-block; the original comes back after,
    also on an exception. Yields the original."""
    parent_name, _, child = name.rpartition(".")
    try:
        parent = model.get_submodule(parent_name) if parent_name else model
        original = parent.get_submodule(child)
    except AttributeError:
        raise ValueError(f"swap_layer: the model has no module {name!r}") from None
    parent._modules[child] = replacement
    try:
        yield original
    finally:
        parent._modules[child] = original

