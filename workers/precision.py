"""The numeric policy of a training step: precision, memory format and compilation.

`execution.precision` (auto | fp32 | bf16 | fp16), `execution.channels_last` (auto | true | false)
and `execution.compile` (false | true) are resolved here, once, against the worker's device:

- precision auto: bf16 on a CUDA GPU that runs it natively (Ampere and newer), fp16 with a
  gradient scaler on older CUDA GPUs (T4, V100), fp32 anywhere else (CPU, TPU). bf16 and fp16 are
  autocast: the weights, the optimizer and the losses stay fp32.
- channels_last auto: on for a CUDA model with 2D convolutions, off elsewhere, so the CPU path
  (and its weights) stays exactly what fp32 training always was.
- compile: `torch.compile` of the model; the loop keeps the un-compiled module for its state_dict.

The loop asks this object for the autocast context and the scaler; nothing here runs per step
beyond entering that context.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import torch

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def cuda_bf16_native() -> bool:
    """bf16 in hardware (compute capability 8.0+); torch's default check also counts emulation (a T4)."""
    try:
        return bool(torch.cuda.is_bf16_supported(including_emulation=False))
    except TypeError:  # an older torch without the argument
        return bool(torch.cuda.is_bf16_supported())


def resolve_precision(requested: str, device: torch.device) -> str:
    """auto -> bf16 / fp16 / fp32 by device; an explicit value is kept (checked against the device)."""
    if requested not in PRECISIONS:
        raise ValueError(f"execution.precision: {requested!r} is not one of {', '.join(PRECISIONS)}")
    if requested == "auto":
        if device.type == "cuda":
            return "bf16" if cuda_bf16_native() else "fp16"
        return "fp32"
    if requested == "fp16" and device.type not in ("cuda", "cpu"):
        raise ValueError(f"execution.precision: fp16 needs a CUDA GPU or the CPU, not {device.type}; use bf16 or fp32")
    return requested


def has_conv2d(model: torch.nn.Module) -> bool:
    return any(isinstance(m, torch.nn.Conv2d) for m in model.modules())


def resolve_channels_last(requested: bool | str, device: torch.device, model: torch.nn.Module) -> bool:
    if requested == "auto":
        return device.type == "cuda" and has_conv2d(model)
    return bool(requested)


@dataclass(frozen=True)
class Precision:
    requested: str
    name: str  # fp32 | bf16 | fp16
    device_type: str
    channels_last: bool = False
    compile: bool = False

    @classmethod
    def resolve(cls, execution: Any, device: torch.device, model: torch.nn.Module) -> Precision:
        """From a recipe's `execution` section, for the model on `device`."""
        return cls(
            requested=execution.precision,
            name=resolve_precision(execution.precision, device),
            device_type=device.type,
            channels_last=resolve_channels_last(execution.channels_last, device, model),
            compile=bool(execution.compile),
        )

    @property
    def dtype(self) -> torch.dtype:
        return DTYPES.get(self.name, torch.float32)

    @property
    def low(self) -> bool:
        return self.name != "fp32"

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        """The forward pass's context: autocast to bf16/fp16, or nothing at all for fp32."""
        if not self.low:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)

    def make_scaler(self) -> torch.amp.GradScaler | None:
        """fp16 only: a loss scaler, so small gradients do not flush to zero (bf16 has fp32's range)."""
        if self.name != "fp16":
            return None
        return torch.amp.GradScaler(self.device_type)

    def prepare_model(self, model: torch.nn.Module) -> torch.nn.Module:
        """channels_last in place (the same module, the same state_dict values); returns the module
        to train through: compiled, or the model itself."""
        if self.channels_last:
            model.to(memory_format=torch.channels_last)
        # Static shapes: a stage trains at one resolution and batch size (a chunk's last batch may
        # add one more graph); dynamic shapes after a recompile crash inductor's backward on
        # unet224's second path in torch 2.13 (InductorError: cannot convert expression to float).
        return torch.compile(model, dynamic=False) if self.compile else model

    def prepare_input(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels_last and x.dim() == 4:
            return x.contiguous(memory_format=torch.channels_last)
        return x

    def tags(self) -> dict[str, str]:
        """MLflow tags of what this worker resolved (the recipe's own values are the params)."""
        return {"orchestrator.precision": self.name, "orchestrator.channels_last": str(self.channels_last).lower(),
                "orchestrator.compile": str(self.compile).lower()}

    def describe(self) -> str:
        how = f"{self.name} ({self.requested})" if self.requested == "auto" else self.name
        scaler = ", gradient scaler" if self.name == "fp16" else ""
        return (f"precision {how}{scaler} on {self.device_type}, channels_last "
                f"{'on' if self.channels_last else 'off'}, compile {'on' if self.compile else 'off'}")


def as_float(out: Any) -> Any:
    """A model's output (a tensor, or a tuple/list/dict of them) in float32, for the losses."""
    if isinstance(out, torch.Tensor):
        return out.float() if out.is_floating_point() else out
    if isinstance(out, tuple) and hasattr(out, "_fields"):  # a NamedTuple
        return type(out)(*(as_float(o) for o in out))
    if isinstance(out, (tuple, list)):
        return type(out)(as_float(o) for o in out)
    if isinstance(out, dict):
        return {k: as_float(v) for k, v in out.items()}
    return out
