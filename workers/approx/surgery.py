"""Model surgery for a layer-sensitivity study: `ApproxConv2d` (an nn.Conv2d through a product
table), the model's conv layers (`conv_layers`, `trace_macs`) and `swap_layer`, which puts one
layer in place of another for the duration of a block."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from workers.approx.conv import approx_conv2d
from workers.approx.multipliers import ProductTable
from workers.approx.quant import quantize
from workers.approx.shapes import METHODS

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
