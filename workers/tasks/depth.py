"""Monocular depth: an RGB image in, depth in metres out (the approx-conv updates' MobileNetV2
model on NYU Depth v2). Stored depth is integer (millimetres, 0 = no measurement).

The model's output is a logit map, at its own resolution (DenseDepth-style decoders predict at
half size): the task upsamples it to the target's size and maps it into the dataset's depth range,
min + sigmoid(logit) * (max - min), so the registered dense losses (rmse, ssim, berhu, grad, l1:
logits against targets in [0, 1]) train it as they train the mask_depth task's depth channel.
Pixels without a measurement count in no loss and no metric.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from common.tasks import DEFAULT_DEPTH_RANGE_M, DEPTH, MM_PER_M
from storage.codec import decode_depth_uint16
from workers.losses import build_loss
from workers.tasks.base import Batch, Task
from workers.tasks.samples import ImageSamples, image_batch, resize_nearest, unnormalize

DEFAULT_RANGE_M = DEFAULT_DEPTH_RANGE_M  # for datasets whose manifest names none


def _depth_map(value: bytes, side: int) -> np.ndarray:
    return resize_nearest(decode_depth_uint16(value), side)


class DepthTask(Task, spec=DEPTH):
    eval_keys = ("eval/a1", "eval/a2", "eval/a3", "eval/rel", "eval/rms", "eval/log10", "eval/rms_baseline")

    def __init__(self, recipe: Any, info: dict[str, Any]) -> None:
        super().__init__(recipe, info)
        self.loss = build_loss(recipe.loss.depth)
        self.scale = float(info["depth_scale"])  # stored units per metre
        self.min_depth, self.max_depth = float(info["min_depth_m"]), float(info["max_depth_m"])

    @classmethod
    def data_info(cls, dataset: Any, train_ids: np.ndarray) -> dict[str, Any]:
        meta = dataset.meta
        total = float(np.sum(dataset.index_values("depth_sum_m", train_ids), dtype=np.float64))
        valid = int(np.sum(dataset.index_values("depth_valid", train_ids), dtype=np.int64))
        return {"depth_scale": float(meta.get("depth_scale", MM_PER_M)),
                "min_depth_m": float(meta.get("min_depth_m", DEFAULT_RANGE_M[0])),
                "max_depth_m": float(meta.get("max_depth_m", DEFAULT_RANGE_M[1])),
                # The constant the baseline rms predicts: the training split's mean (valid) depth.
                "baseline_depth_m": total / valid if valid else float(np.mean(DEFAULT_RANGE_M))}

    @classmethod
    def metric_keys(cls, info: dict[str, Any]) -> set[str]:
        return {*cls.train_keys, *cls.eval_keys}

    def samples(self, rows: dict[str, Any], resolution: int, describe: Any, train: bool,
                flip_key: tuple[int, ...] = ()) -> ImageSamples:
        return ImageSamples(rows, resolution, 3, describe, "depth", _depth_map,
                            self.recipe.data.hflip if train else 0.0, 0, flip_key)

    def to_device(self, raw: tuple[torch.Tensor, torch.Tensor], device: torch.device | str) -> Batch:
        x, depth = image_batch(raw, device)
        return Batch(x, (depth.unsqueeze(1).float().div_(self.scale),))

    def _logits(self, out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if out.shape[-2:] != target.shape[-2:]:
            out = F.interpolate(out, size=target.shape[-2:], mode="bilinear", align_corners=False)
        return out

    def predicted_metres(self, out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.min_depth + torch.sigmoid(self._logits(out, target).float()) * (self.max_depth - self.min_depth)

    def losses(self, out: torch.Tensor, batch: Batch) -> Sequence[torch.Tensor]:
        metres = batch.targets[0]
        logits = self._logits(out, metres)
        span = self.max_depth - self.min_depth
        target = ((metres - self.min_depth) / span).clamp_(0.0, 1.0)
        # Where nothing was measured the target is the prediction itself: no error, no gradient.
        valid = metres > 0
        target = torch.where(valid, target, torch.sigmoid(logits.detach().float()))
        return (self.loss(logits, target),)

    def evaluator(self) -> Any:
        from workers.eval.depth import DepthEval

        return _DepthAdapter(self, DepthEval(self.min_depth, self.max_depth, float(self.info["baseline_depth_m"])))

    def picture(self, batch: Batch, out: torch.Tensor, path: str) -> None:
        from workers.pictures import depth_grid

        metres = batch.targets[0]
        depth_grid(unnormalize(batch.x), metres, self.predicted_metres(out, metres), path, self.max_depth)


class _DepthAdapter:
    def __init__(self, task: DepthTask, acc: Any) -> None:
        self.task, self.acc = task, acc

    def update(self, out: torch.Tensor, batch: Batch) -> None:
        metres = batch.targets[0]
        self.acc.update(self.task.predicted_metres(out, metres), metres)

    def compute(self) -> dict[str, float]:
        return self.acc.compute()
