"""Approximate-multiplier convolution: the vectorized kernel against the per-product reference.

For each layer (default: decoder.up0.convB, a dense 3x3 384 -> 384 conv on the 7x7 map, and
encoder.features.2.conv.0.0, the pointwise 16 -> 96 conv at 112x112; the full-width
mobilenetv2_depth at its 224-px working resolution, batch 1, a non-exact table, operands
calibrated on the layer's real input), in the same run:
  - the per-element reference in the updates' own style (`direct_conv2d_tensors`: Python loops
    indexing torch tensors one element at a time) on a small slice of the outputs, scaled linearly
    to the whole layer: the baseline of `speedup_vs_direct`;
  - `direct_conv2d` (the same loops over Python lists, ~10x faster) on a larger slice: its
    set-up (an empty slice) and the per-output time, scaled linearly: `speedup_vs_python_lists`;
  - `approx_conv2d` (method "auto") on the whole layer, best of --repeats; its values on the slice
    must equal the reference's (`exact_on_slice`);
  - with --methods, every method on the whole layer (the figures behind conv.py's choice).
Then every conv layer of the model, one `ApproxConv2d` forward each on a batch of --images images
(quantize, kernel, dequantize): `kernel_seconds_all_layers_5_images` (the lower-level estimate of
the study's cost; the study itself is `study_seconds`, filled by --study through
bench.approx_study, which starts Ray and takes minutes).

Usage: python -m bench.approx --json
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from typing import Any

import torch

from bench import machine

DEFAULT_LAYERS = ("decoder.up0.convB", "encoder.features.2.conv.0.0")


def _best(fn, repeats: int) -> float:  # noqa: ANN001
    best = float("inf")
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def _capture_inputs(model: torch.nn.Module, images: torch.Tensor, names: set[str]) -> dict[str, torch.Tensor]:
    got: dict[str, torch.Tensor] = {}
    hooks = [
        mod.register_forward_hook(lambda _m, inp, _o, n=name: got.__setitem__(n, inp[0].detach()))
        for name, mod in model.named_modules() if name in names
    ]
    try:
        with torch.no_grad():
            model(images)
    finally:
        for h in hooks:
            h.remove()
    return got


def _layer_bench(conv, x, table, args, rng: torch.Generator) -> dict[str, Any]:  # noqa: ANN001
    from workers.approx.conv import approx_conv2d, auto_method, output_shape
    from workers.approx.quant import quantize, scale_for
    from workers.approx.reference import direct_conv2d, direct_conv2d_tensors
    from workers.approx.surgery import conv_kind

    sx = scale_for(x, table.lo, table.hi, "percentile", 99.99)
    sw = scale_for(conv.weight, table.lo, table.hi, "minmax")
    xq, _ = quantize(x, sx, table.lo, table.hi)
    wq, _ = quantize(conv.weight, sw, table.lo, table.hi)
    kw = {"stride": conv.stride, "padding": conv.padding, "dilation": conv.dilation, "groups": conv.groups}
    shape = output_shape(xq.shape, wq.shape, conv.stride, conv.padding, conv.dilation)
    n_out = shape[0] * shape[1] * shape[2] * shape[3]
    macs = n_out * wq.shape[1] * wq.shape[2] * wq.shape[3]
    k = wq.shape[1] * wq.shape[2] * wq.shape[3]
    count = max(args.direct_outputs, -(-args.direct_products // k))
    outs = [tuple(int(torch.randint(0, s, (1,), generator=rng)) for s in shape) for _ in range(count)]

    stats: dict[str, float] = {}
    ref = direct_conv2d(xq, wq, table, outputs=outs, stats=stats, **kw)
    setup_s = stats["setup_s"]
    per_output_s = stats["loop_s"] / len(outs)
    direct_s = setup_s + per_output_s * n_out

    # The updates' own style (tensor element indexing in Python loops) on a small slice of its own.
    few = outs[: max(1, -(-args.direct_products // (10 * k)))]
    t0 = time.perf_counter()
    tensor_ref = direct_conv2d_tensors(xq, wq, table, few, **kw)
    tensor_s = (time.perf_counter() - t0) / len(few) * n_out
    assert tensor_ref.tolist() == ref.tolist()[: len(few)], "the two references disagree"

    method = auto_method(xq, wq, table, **kw)
    y = approx_conv2d(xq, wq, table, **kw)  # warm-up, and the values checked against the slice
    exact = [int(y[o]) for o in outs] == ref.tolist()
    approx_s = _best(lambda: approx_conv2d(xq, wq, table, **kw), args.repeats)
    row: dict[str, Any] = {
        "kind": conv_kind(conv),
        "input_shape": list(x.shape),
        "weight_shape": list(conv.weight.shape),
        "macs": macs,
        "operand_values_present": {"input": int(torch.unique(xq).numel()), "weight": int(torch.unique(wq).numel())},
        "direct_outputs_timed": len(outs),
        "direct_setup_s": round(setup_s, 4),
        "direct_ns_per_mac": round(per_output_s * n_out / macs * 1e9, 2),
        "direct_full_layer_s_estimate": round(direct_s, 2),
        "method": method,
        "approx_s": round(approx_s, 4),
        "approx_ns_per_mac": round(approx_s / macs * 1e9, 3),
        "exact_on_slice": exact,
        "update_style_outputs_timed": len(few),
        "update_style_full_layer_s_estimate": round(tensor_s, 1),
        "speedup_vs_direct": round(tensor_s / approx_s, 1),
        "speedup_vs_python_lists": round(direct_s / approx_s, 1),
    }
    if args.methods:
        names = ["gather", "onehot", "bag_input", "bag_weight"] + (["factors"] if table.factors is not None else [])
        timed = {}
        for m in names:
            if m == "onehot" and macs * (1 + row["operand_values_present"]["input"]) > args.onehot_limit:
                timed[m] = None  # one float64 conv per operand value: minutes on the big layers
                continue
            approx_conv2d(xq, wq, table, method=m, **kw)
            best = _best(lambda m=m: approx_conv2d(xq, wq, table, method=m, **kw), args.repeats)
            timed[m] = round(best / macs * 1e9, 3)
        row["methods_ns_per_mac"] = timed
    return row


def _all_layers(model, images: torch.Tensor, table) -> dict[str, Any]:  # noqa: ANN001
    """One float forward of the images; at every conv, an ApproxConv2d forward on the input it
    got (timed), as the study does one layer at a time. Nothing is kept between layers."""
    from workers.approx.conv import auto_method
    from workers.approx.quant import quantize, scale_for
    from workers.approx.surgery import ApproxConv2d, conv_kind

    seconds: dict[str, float] = {}
    per_kind: dict[str, float] = {}
    methods: dict[str, int] = {}

    def hook(name: str):  # noqa: ANN202
        def fn(conv: torch.nn.Conv2d, inp: tuple, _out: torch.Tensor) -> None:
            x = inp[0]
            sx = scale_for(x, table.lo, table.hi, "percentile", 99.99)
            sw = scale_for(conv.weight, table.lo, table.hi, "minmax")
            layer = ApproxConv2d(conv, table, sx, sw)
            t0 = time.perf_counter()
            layer(x)
            dt = time.perf_counter() - t0
            seconds[name] = dt
            kind = conv_kind(conv)
            per_kind[kind] = per_kind.get(kind, 0.0) + dt
            xq, _ = quantize(x, sx, table.lo, table.hi)
            wq, _ = quantize(conv.weight, sw, table.lo, table.hi)
            m = auto_method(xq, wq, table, conv.stride, conv.padding, conv.dilation, conv.groups)
            methods[m] = methods.get(m, 0) + 1
        return fn

    hooks = [mod.register_forward_hook(hook(name)) for name, mod in model.named_modules()
             if isinstance(mod, torch.nn.Conv2d)]
    try:
        with torch.no_grad():
            model(images)
    finally:
        for h in hooks:
            h.remove()
    slowest = sorted(seconds.items(), key=lambda kv: -kv[1])[:5]
    return {"seconds": sum(seconds.values()), "per_kind": {k: round(v, 2) for k, v in per_kind.items()},
            "methods": methods, "slowest": {k: round(v, 2) for k, v in slowest}}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", default=",".join(DEFAULT_LAYERS), help="comma-separated conv names")
    ap.add_argument("--table", default="mitchell", help="a built-in multiplier or a .npy/.csv table")
    ap.add_argument("--resolution", type=int, default=224)
    ap.add_argument("--images", type=int, default=5)
    # One thread by default: the kernel is a few hundred short torch ops per layer, and on this
    # shared 2-core box two intra-op threads wait for each other at every op whenever another
    # job holds a core (measured: the all-layers pass 14 s with one thread, 42 s with two).
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--direct-outputs", type=int, default=48, help="least outputs the reference computes per layer")
    ap.add_argument("--direct-products", type=int, default=1_000_000, help="least products in the reference's slice")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--methods", action="store_true", help="also time every method on each layer")
    ap.add_argument("--onehot-limit", type=float, default=3e10, help="skip onehot above this many conv multiplies")
    ap.add_argument("--no-all-layers", action="store_true", help="skip the all-layers x images pass")
    ap.add_argument("--study", action="store_true", help="also run bench.approx_study (Ray; minutes)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)

    import workers.models  # noqa: F401  (registers the models)
    from workers.approx.multipliers import table_by_name
    from workers.approx.surgery import conv_layers
    from workers.models.registry import build_model

    started = time.perf_counter()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    table = table_by_name(args.table)
    model = build_model("mobilenetv2_depth", "full").eval()
    layer_names = [n.strip() for n in args.layers.split(",") if n.strip()]
    all_names = {info.name for info in conv_layers(model)}
    unknown = [n for n in layer_names if n not in all_names]
    if unknown:
        raise SystemExit(f"unknown conv layer(s) {unknown}; the model has {len(all_names)}, "
                         f"e.g. {sorted(all_names)[:3]}")
    images = torch.rand(args.images, 3, args.resolution, args.resolution)
    inputs = _capture_inputs(model, images[:1], set(layer_names))
    rng = torch.Generator().manual_seed(args.seed)

    layers = {}
    for name in layer_names:
        layers[name] = _layer_bench(model.get_submodule(name), inputs[name], table, args, rng)
    direct = sum(r["update_style_full_layer_s_estimate"] for r in layers.values())
    lists = sum(r["direct_full_layer_s_estimate"] for r in layers.values())
    approx = sum(r["approx_s"] for r in layers.values())

    result: dict[str, Any] = {
        "bench": "approx",
        "machine": machine(),
        "torch_threads": args.threads,
        "table": table.name,
        "resolution": args.resolution,
        "batch_per_layer_timing": 1,
        "images": args.images,
        "layers": layers,
        # vs the updates' style: per-element loops over torch tensors; vs the same loops over Python lists
        "speedup_vs_direct": round(direct / approx, 1),
        "speedup_vs_python_lists": round(lists / approx, 1),
        "study_seconds": None,
    }
    if not args.no_all_layers:
        allr = _all_layers(model, images, table)
        macs = sum(info.macs or 0 for info in conv_layers(model, (args.images, 3, args.resolution, args.resolution)))
        # the reference at the rate it showed on the timed layer of the same kernel size
        # (the mean of the timed layers for a size none of them has)
        rate = {tuple(r["weight_shape"][2:]): r["direct_ns_per_mac"] for r in layers.values()}
        mean_rate = sum(rate.values()) / len(rate)
        direct_all = sum((info.macs or 0) * rate.get(info.kernel_size, mean_rate)
                         for info in conv_layers(model, (args.images, 3, args.resolution, args.resolution)))
        result.update({
            "conv_layers": len(all_names),
            "macs_all_layers": macs,
            "kernel_seconds_all_layers_5_images": round(allr["seconds"], 2),
            "kernel_seconds_all_layers_per_kind": allr["per_kind"],
            "kernel_seconds_slowest_layers": allr["slowest"],
            "methods_chosen": allr["methods"],
            "direct_seconds_all_layers_5_images_estimate": round(direct_all * 1e-9, 0),
        })
        result["speedup_all_layers_vs_direct_estimate"] = round(
            result["direct_seconds_all_layers_5_images_estimate"] / allr["seconds"], 1)
        if args.images != 5:
            result["kernel_seconds_all_layers_images"] = result.pop("kernel_seconds_all_layers_5_images")
            estimate = result.pop("direct_seconds_all_layers_5_images_estimate")
            result["direct_seconds_all_layers_images_estimate"] = estimate
    if args.study:
        from bench.approx_study import study_seconds

        study = study_seconds()
        result["study_seconds"] = study["study_seconds"]
        result["study"] = study
    result["bench_seconds"] = round(time.perf_counter() - started, 1)
    result["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    print(json.dumps(result) if args.json else json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
