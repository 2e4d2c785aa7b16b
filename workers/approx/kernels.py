"""The exact methods of approx_conv2d (conv.py's docstring: what each does, what it costs):
gather, onehot, factors and the two sides of the bag. Each takes quantized, padded operands and
returns the exact int64 sums."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from workers.approx.shapes import (
    F32_EXACT,
    F64_EXACT,
    _index_map,
    _patches,
    _present,
    _to_int,
    output_shape,
)

# Bound on the largest temporary of a method, in elements (64-128 MB); tests make it small.
CHUNK_ELEMENTS = 2**24
# Nanoseconds per unit of work, single thread, fitted to the measurements in the module
# docstring: a multiply-accumulate of a float64 conv; a lookup-add of an input-side bag (rows
# over output channels) and of a weight-side bag (rows over positions), for rows of 32 values
# or more (shorter rows cost in proportion); one of the gather; a table-row element built for
# the input side and for the weight side.
COST_NS = {
    "conv": 0.25, "bag_input": 0.45, "bag_weight": 1.0, "gather": 6.0,
    "build_input": 2.2, "build_weight": 1.4,
}


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
    if terms * magnitude >= F64_EXACT:
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
    per32 = int(F32_EXACT // m)
    if per32 >= 1:
        return min(k, per32), torch.float32
    return min(k, int(F64_EXACT // m)), torch.float64


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
