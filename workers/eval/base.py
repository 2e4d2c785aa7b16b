"""What every eval accumulator shares: MLflow-safe metric names, class keys, counting into sums and
the SumAccumulator base (the package docstring, workers/eval/__init__.py, says how they are used)."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor


def metric_name(name: str) -> str:
    """A class name as it appears in a metric key: MLflow-safe, no "/" (it would nest)."""
    return re.sub(r"[^\w.\- ]", "_", str(name))


def class_keys(classes: list[str]) -> list[str]:
    """`metric_name` of every class; ValueError if two classes end up with the same key."""
    keys = [metric_name(c) for c in classes]
    if not keys:
        raise ValueError("no classes")
    if len(set(keys)) != len(keys):
        raise ValueError(f"class names collide as metric names: {keys}")
    return keys


def count_into(index: Tensor, n: int) -> Tensor:
    """Counts of the values 0..n-1 in `index` (float64, on its device); the value n is a dump bin
    for left-out elements and is dropped. Unlike torch.bincount, no device sync on CUDA."""
    flat = index.reshape(-1)
    out = torch.zeros(n + 1, dtype=torch.float64, device=flat.device)
    out.index_add_(0, flat, torch.ones(flat.shape, dtype=torch.float64, device=flat.device))
    return out[:n]


class SumAccumulator:
    """Named float64 sums of fixed shapes, created on the first batch's device.

    Subclasses set `_shapes` (key -> shape) and `_config` (what must match for a `merge`),
    add to the sums with `_add` inside `update`, and read `_host_totals()` in `compute`.
    """

    _shapes: dict[str, tuple[int, ...]]
    _config: tuple[Any, ...]

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self._sums: dict[str, Tensor] | None = None

    def _ensure(self, device: torch.device) -> dict[str, Tensor]:
        if self._sums is None:
            self._sums = {
                k: torch.zeros(s, dtype=torch.float64, device=device)
                for k, s in self._shapes.items()
            }
        elif next(iter(self._sums.values())).device != device:
            # e.g. merged on the CPU, then updated with CUDA batches: move once.
            self._sums = {k: v.to(device) for k, v in self._sums.items()}
        return self._sums

    def _add(self, key: str, value: Tensor) -> None:
        assert self._sums is not None
        self._sums[key] += value.detach().to(torch.float64)

    def totals(self) -> dict[str, Tensor]:
        """The raw sums as CPU float64 tensors (zeros before any update), in one transfer.

        To combine workers: all-reduce (sum) each, or pass the dict (or the accumulator) to
        `merge`.
        """
        if self._sums is None:
            return {k: torch.zeros(s, dtype=torch.float64) for k, s in self._shapes.items()}
        flat = torch.cat([v.reshape(-1) for v in self._sums.values()]).cpu()
        out: dict[str, Tensor] = {}
        i = 0
        for k, v in self._sums.items():
            out[k] = flat[i : i + v.numel()].reshape(v.shape)
            i += v.numel()
        return out

    def merge(self, other: SumAccumulator | Mapping[str, Tensor]) -> None:
        """Fold another accumulator of the same kind and configuration (e.g. another worker's
        shard of the split), or its `totals()`, into this one."""
        if isinstance(other, SumAccumulator):
            if type(other) is not type(self) or other._config != self._config:
                raise ValueError("cannot merge accumulators of different kinds or configurations")
            theirs = other.totals()
        else:
            theirs = dict(other)
            if set(theirs) != set(self._shapes):
                raise ValueError(f"totals have keys {sorted(theirs)}, want {sorted(self._shapes)}")
        dev = (
            next(iter(self._sums.values())).device
            if self._sums is not None
            else torch.device("cpu")
        )
        sums = self._ensure(dev)
        for k, shape in self._shapes.items():
            value = torch.as_tensor(theirs[k], dtype=torch.float64)
            if tuple(value.shape) != tuple(shape):
                raise ValueError(f"totals[{k!r}] has shape {tuple(value.shape)}, want {shape}")
            sums[k] += value.to(dev)

    def _host_totals(self) -> dict[str, Tensor]:
        if self._sums is None:
            raise ValueError("compute() before any update()")
        return self.totals()
