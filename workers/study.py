"""What a study's Ray task runs: the model and the eval images, loaded once per worker process,
then one layer (or a few) at a time swapped for an approximate convolution and scored.

The driver (orchestrator/study/) puts one payload into the object store: the model's recipe
and weights, where the eval images are (dataset, ids, resolution), the product tables. A task
receives it by reference and builds its `StudyContext` (model and eval images) only the first
time a process sees that payload, so a worker process that runs 60 layers loads the model once.
In-process (execution.backend local) the same functions run on the payload itself.

Every model forward of a study runs here, never on the driver: the layer listing
(describe_layers, model_layers), the float model's reference, the calibration, the layers.
"""

from __future__ import annotations

import contextlib
import os
import time
from typing import Any

import numpy as np
import torch

# One context per worker process: the payload's key -> its context. A newer study's payload
# replaces an older one, so a long-lived Ray worker holds one model at most.
_CONTEXTS: dict[str, StudyContext] = {}
# Contexts this process has built (reported with each result: a test and the summary read it).
_LOADS = {"count": 0}

# Per calibration batch and layer, at most this many input values are kept for the percentile;
# the extremes are kept exactly, so method minmax sees every value.
CALIBRATION_SAMPLE_PER_BATCH = 1 << 18


def _counts(value: Any) -> tuple[int, int]:
    """(inputs, weights) from ApproxConv2d's saturated/total counters ({"input": n, "weight": m})."""
    if isinstance(value, dict):
        get = lambda *keys: next((int(value[k]) for k in keys if k in value), 0)  # noqa: E731
        return get("inputs", "input", "x"), get("weights", "weight", "w")
    if isinstance(value, (tuple, list)):
        return int(value[0]), int(value[1])
    if hasattr(value, "inputs"):
        return int(value.inputs), int(value.weights)
    return int(value), 0


def exact_table_like(table: Any) -> Any:
    """The exact products over `table`'s own operands (same bits, same signedness): the
    approximate path with no approximation, so the difference from the float model is the
    quantization error alone."""
    from workers.approx.multipliers import table_by_name

    return table_by_name("exact", signed=table.signed, bits=table.bits)


class StudyContext:
    """The model (float, eval mode) and the eval images of one study, on the CPU."""

    def __init__(self, payload: dict[str, Any]) -> None:
        from common.recipe import Recipe
        from workers.models.registry import build_from_recipe
        from workers.tasks.depth import DepthTask

        torch.set_num_threads(int(payload.get("torch_threads", 1)))
        recipe = Recipe.model_validate(payload["recipe"])
        self.task = DepthTask(recipe, payload["task_info"])
        # The run's own weights replace everything: init_from (a file on the training machine) is not read.
        section = recipe.model.model_copy(update={"init_from": None})
        model = build_from_recipe(section, **self.task.model_kwargs())
        model.load_state_dict(payload["state_dict"])
        self.model = model.eval()
        self.data = payload.get("data")  # {"uri", "eval_ids", "resolution"}: where the images come from
        if "images" in payload:
            self.images, self.targets = payload["images"], payload["targets"]
        else:
            self.images, self.targets = self.load_images(payload["data"]["eval_ids"])
        self.batch_size = int(payload["batch_size"])
        self.tables = payload.get("tables", {})
        self.use_prefix = bool(payload.get("prefix_cache", True))
        self.prefix: PrefixCache | None = None  # recorded on the first swap (the driver may never swap)
        _LOADS["count"] += 1

    def load_images(self, ids: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """The images (and true depth) of dataset samples `ids` at the study's resolution, as one batch."""
        from storage.shards import open_dataset
        from workers.data import make_loader

        assert self.data is not None
        ids = np.asarray(ids)
        ds = open_dataset(self.data["uri"])
        samples = self.task.samples(ds.read_samples(ids), int(self.data["resolution"]), ds.describe, train=False)
        batch = self.task.to_device(next(iter(make_loader(samples, batch_size=len(ids)))), "cpu")
        return batch.x.contiguous(), batch.targets[0].contiguous()

    def batches(self) -> list[torch.Tensor]:
        return [self.images[i : i + self.batch_size] for i in range(0, len(self.images), self.batch_size)]

    @torch.no_grad()
    def predict(self, skip_before: list[str] | None = None) -> torch.Tensor:
        """Predicted depth in metres for every eval image, at the targets' size. With
        `skip_before`, the parts of the float model that finish before the first of those layers
        starts are not run again: their outputs come from the prefix cache."""
        out = []
        replay = self.prefix.replaying(skip_before) if self.prefix and skip_before else contextlib.nullcontext()
        with replay:
            for b, x in enumerate(self.batches()):
                if self.prefix:
                    self.prefix.batch = b
                t = self.targets[b * self.batch_size : (b + 1) * self.batch_size]
                out.append(self.task.predicted_metres(self.model(x), t))
        return torch.cat(out)

    def metrics(self, pred: torch.Tensor) -> dict[str, float]:
        from workers.eval.depth import depth_metrics

        return depth_metrics(pred, self.targets, self.task.min_depth, self.task.max_depth)

    def evaluate(self, layers: list[str], table: Any, input_scales: dict[str, float],
                 weight_scales: dict[str, float]) -> dict[str, Any]:
        """Metrics with every layer in `layers` approximate at once (usually one), the saturated
        shares of its inputs and weights, and the seconds it took."""
        from workers.approx.surgery import ApproxConv2d, swap_layer

        started = time.perf_counter()
        if self.use_prefix and self.prefix is None:
            # Recorded from the float model, before any swap: every replayed output is the float one.
            self.prefix = PrefixCache(self.model, self.batches())
        swapped = []
        with contextlib.ExitStack() as stack:
            for name in layers:
                approx = ApproxConv2d(self.model.get_submodule(name), table, float(input_scales[name]),
                                      float(weight_scales[name]))
                stack.enter_context(swap_layer(self.model, name, approx))
                swapped.append(approx)
            pred = self.predict(skip_before=layers)
        metrics = self.metrics(pred)
        sat = np.sum([_counts(a.saturated) for a in swapped], axis=0) if swapped else np.zeros(2)
        tot = np.sum([_counts(a.total) for a in swapped], axis=0) if swapped else np.zeros(2)
        return {
            "metrics": metrics,
            "saturation": {"inputs": float(sat[0] / tot[0]) if tot[0] else 0.0,
                           "weights": float(sat[1] / tot[1]) if tot[1] else 0.0,
                           "all": float(sat.sum() / tot.sum()) if tot.sum() else 0.0},
            "seconds": time.perf_counter() - started,
        }

    def run_item(self, item: dict[str, Any]) -> dict[str, Any]:
        """One unit of work the driver planned: {id, layers, table: name in tables, scales}."""
        res = self.evaluate(item["layers"], self.tables[item["table"]], item["input_scale"], item["weight_scale"])
        return {"id": item["id"], **res, "worker": {"pid": os.getpid(), "context_loads": _LOADS["count"]}}


def _clone(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.clone()
    if isinstance(value, (list, tuple)):
        return type(value)(_clone(v) for v in value)
    return value


class PrefixCache:
    """The float model's intermediate outputs on the eval images, to skip what a swap cannot change.

    In a feed-forward network a module whose forward returned before the swapped layer's forward
    began computes the same output with or without the swap. One float pass records, for the
    coarse units of the model (modules at most three names deep and called once per forward:
    encoder, decoder, encoder.features.N, decoder.upN, ...), when each starts and ends and what it
    returns (a copy: later in-place ops must not reach the cache); every module's start is
    recorded too. While `replaying(layers)`, each unit that ended before the first of `layers`
    started returns a copy of its recorded output instead of running. A decoder layer then skips
    the whole encoder; encoder.features.9's layers skip features 0-8. The result is the same
    tensors: the cached outputs are the ones the same float kernels produce.
    """

    MAX_DEPTH = 3

    def __init__(self, model: torch.nn.Module, batches: list[torch.Tensor]) -> None:
        self.model = model
        self.batch = 0
        self.start: dict[str, int] = {}
        self.end: dict[str, int] = {}
        self.outputs: dict[str, list[Any]] = {}
        calls: dict[str, int] = {}
        clock = [0]
        modules = [(name, m) for name, m in model.named_modules() if name]
        units = {name for name, _ in modules if name.count(".") < self.MAX_DEPTH}

        def pre(name: str):
            def hook(_m: torch.nn.Module, _args: Any) -> None:
                calls[name] = calls.get(name, 0) + 1
                self.start.setdefault(name, clock[0])
                clock[0] += 1
            return hook

        def post(name: str):
            def hook(_m: torch.nn.Module, _args: Any, output: Any) -> None:
                self.end[name] = clock[0]
                clock[0] += 1
                if name in units:
                    self.outputs.setdefault(name, []).append(_clone(output))
            return hook

        handles = []
        for name, m in modules:
            handles += [m.register_forward_pre_hook(pre(name)), m.register_forward_hook(post(name))]
        try:
            with torch.no_grad():
                for b, x in enumerate(batches):
                    clock[0] = 0
                    model(x)
                    if b == 0:
                        first = dict(calls)
        finally:
            for h in handles:
                h.remove()
        n = len(batches)
        once = {name for name, c in (first if n else {}).items() if c == 1}
        # Only units called once per forward, the same way in every batch, are replayed.
        self.outputs = {k: v for k, v in self.outputs.items() if k in once and len(v) == n}

    @contextlib.contextmanager
    def replaying(self, layers: list[str]):
        starts = [self.start[name] for name in layers if name in self.start]
        if len(starts) != len(layers):
            yield
            return
        first = min(starts)
        done = [name for name in self.outputs if self.end[name] < first]
        # Only the outermost: a unit inside a replayed one is never called.
        done = [name for name in done if not any(name.startswith(other + ".") for other in done)]
        patched = []
        try:
            for name in done:
                module = self.model.get_submodule(name)
                module.forward = self._replay(name)  # an instance attribute shadows the class's forward
                patched.append(module)
            yield
        finally:
            for module in patched:
                del module.forward

    def _replay(self, name: str):
        def forward(*_args: Any, **_kwargs: Any) -> Any:
            return _clone(self.outputs[name][self.batch])
        return forward


def context(payload_or_ref: Any) -> StudyContext:
    """This process's context for a payload (or a Ray ObjectRef to one), built on first use."""
    if isinstance(payload_or_ref, dict):
        key, payload = payload_or_ref["key"], payload_or_ref
    else:
        key, payload = payload_or_ref.hex(), None
    ctx = _CONTEXTS.get(key)
    if ctx is None:
        if payload is None:
            import ray

            payload = ray.get(payload_or_ref)
        _CONTEXTS.clear()
        ctx = _CONTEXTS[key] = StudyContext(payload)
    return ctx


def evaluate_items(payload_box: list[Any], items: list[dict[str, Any]], delay_s: float = 0.0) -> list[dict[str, Any]]:
    """The task: evaluate each item in turn. The payload comes boxed in a list so that Ray passes
    the reference through instead of fetching (and unpickling) the model for every task.
    `delay_s`: a pause per item, only for the tests that cut a study mid-way."""
    ctx = context(payload_box[0])
    out = []
    for item in items:
        if delay_s:
            time.sleep(delay_s)
        out.append(ctx.run_item(item))
    return out


def describe_layers(payload_box: list[Any], resolution: int) -> list[dict[str, Any]]:
    """The study model's conv layers in model order: name, kind, part, weight shape, multiplies
    per image at `resolution` (a task: the context it loads serves the layers after)."""
    return _layer_rows(context(payload_box[0]).model, resolution)


def model_layers(recipe: dict[str, Any], resolution: int) -> list[dict[str, Any]]:
    """The same for a recipe's model without its weights (`orchestrator study --list-layers`)."""
    from common.recipe import Recipe
    from workers.models.registry import build_from_recipe
    from workers.tasks.depth import DepthTask

    r = Recipe.model_validate(recipe)
    task = DepthTask(r, {"depth_scale": 1000, "min_depth_m": 0.1, "max_depth_m": 10.0, "baseline_depth_m": 1.0})
    model = build_from_recipe(r.model.model_copy(update={"init_from": None}), **task.model_kwargs())
    return _layer_rows(model.eval(), resolution)


def _layer_rows(model: torch.nn.Module, resolution: int) -> list[dict[str, Any]]:
    from workers.approx.surgery import conv_layers, trace_macs

    macs = trace_macs(model, (1, 3, resolution, resolution))
    return [{"name": i.name, "kind": i.kind, "part": i.part, "weight_shape": list(i.weight_shape),
             "macs": int(macs.get(i.name, 0))} for i in conv_layers(model)]


def reference(payload_box: list[Any]) -> dict[str, Any]:
    """The float model's metrics on the eval images, and the seconds they took."""
    ctx = context(payload_box[0])
    started = time.perf_counter()
    metrics = ctx.metrics(ctx.predict())
    return {"metrics": metrics, "seconds": time.perf_counter() - started}


def calibrate_on(payload_box: list[Any], ids: Any, layers: list[str], method: str,
                 percentile: float) -> dict[str, dict[str, float]]:
    """calibrate() on dataset samples `ids` (training images: never those the layers are scored
    on), for the payload's approximate table."""
    ctx = context(payload_box[0])
    images, _ = ctx.load_images(ids)
    return calibrate(ctx, images, layers, ctx.tables["approx"], method, percentile)


@torch.no_grad()
def calibrate(ctx: StudyContext, images: torch.Tensor, layers: list[str], table: Any, method: str,
              percentile: float, seed: int = 0) -> dict[str, dict[str, float]]:
    """Per-layer scales: the input's from the activations that reach each layer when the float
    model runs on `images` (method minmax or percentile), the weight's from the weights' own
    range (minmax). Both map onto the table's operand range [lo, hi]."""
    from workers.approx.quant import scale_for

    gen = torch.Generator().manual_seed(seed)
    lows: dict[str, float] = {}
    highs: dict[str, float] = {}
    samples: dict[str, list[torch.Tensor]] = {name: [] for name in layers}

    def hook(name: str):
        def pre(_module: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            x = args[0].detach().float().reshape(-1)
            lows[name] = min(lows.get(name, float("inf")), float(x.min()))
            highs[name] = max(highs.get(name, float("-inf")), float(x.max()))
            if method == "percentile":
                if x.numel() > CALIBRATION_SAMPLE_PER_BATCH:
                    x = x[torch.randint(x.numel(), (CALIBRATION_SAMPLE_PER_BATCH,), generator=gen)]
                samples[name].append(x.clone())
        return pre

    handles = [ctx.model.get_submodule(name).register_forward_pre_hook(hook(name)) for name in layers]
    try:
        for i in range(0, len(images), ctx.batch_size):
            ctx.model(images[i : i + ctx.batch_size])
    finally:
        for h in handles:
            h.remove()
    out = {}
    for name in layers:
        extremes = torch.tensor([lows[name], highs[name]])
        values = torch.cat([*samples[name], extremes]) if method == "percentile" else extremes
        weight = ctx.model.get_submodule(name).weight.detach()
        out[name] = {
            "input_scale": float(scale_for(values, table.lo, table.hi, method=method, percentile=percentile)),
            "weight_scale": float(scale_for(weight, table.lo, table.hi, method="minmax")),
            "input_min": lows[name], "input_max": highs[name],
            "weight_min": float(weight.min()), "weight_max": float(weight.max()),
        }
    return out
