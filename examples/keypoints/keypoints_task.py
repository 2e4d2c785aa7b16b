"""The keypoints task's worker half: decode a chunk, score the heatmap, evaluate the keypoint error.

Its declarations (name, columns, loss sections, train keys, compare columns) come from the spec it is
bound to (`spec=KEYPOINTS`); what is here is what needs torch.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from keypoints_spec import KEYPOINTS
from PIL import Image

from storage.codec import decode_mask
from workers.losses import build_loss
from workers.tasks.base import Batch, Task
from workers.tasks.samples import ImageSamples, image_batch, resize_nearest, unnormalize


def _heatmap(value: bytes, side: int) -> np.ndarray:
    return resize_nearest(decode_mask(value), side)


def _peaks(maps: torch.Tensor) -> torch.Tensor:
    """(N, H, W) -> (N, 2) float (row, col) of each map's maximum."""
    n, _, w = maps.shape
    flat = maps.reshape(n, -1).argmax(1)
    return torch.stack([flat // w, flat % w], 1).float()


class KeypointsEval:
    """Mean distance in px between the predicted and the true peak; the baseline always predicts the centre."""

    def __init__(self) -> None:
        self.err = self.base = 0.0
        self.n = 0

    def update(self, out: torch.Tensor, batch: Batch) -> None:
        target = batch.targets[0].float()
        true = _peaks(target)
        pred = _peaks(out[:, 0].float())
        centre = torch.full_like(true, (target.shape[-1] - 1) / 2)
        self.err += float((pred - true).norm(dim=1).sum())
        self.base += float((centre - true).norm(dim=1).sum())
        self.n += len(true)

    def compute(self) -> dict[str, float]:
        return {"eval/px_error": self.err / max(self.n, 1), "eval/px_error_baseline": self.base / max(self.n, 1)}


class KeypointsTask(Task, spec=KEYPOINTS):
    def __init__(self, recipe: Any, info: dict[str, Any]) -> None:
        super().__init__(recipe, info)
        self.loss = build_loss(recipe.loss.sections()["heatmap"])

    @classmethod
    def metric_keys(cls, info: dict[str, Any]) -> set[str]:
        return {*cls.train_keys, "eval/px_error", "eval/px_error_baseline"}

    def samples(self, rows: dict[str, Any], resolution: int, describe: Any, train: bool,
                flip_key: tuple[int, ...] = ()) -> ImageSamples:
        return ImageSamples(rows, resolution, 3, describe, "heatmap", _heatmap,
                            self.recipe.data.hflip if train else 0.0, 0, flip_key)

    def to_device(self, raw: tuple[torch.Tensor, torch.Tensor], device: torch.device | str) -> Batch:
        x, heat = image_batch(raw, device)
        return Batch(x, (heat,))

    def losses(self, out: torch.Tensor, batch: Batch) -> Sequence[torch.Tensor]:
        target = batch.targets[0].float().unsqueeze(1).div_(255.0)
        return (self.loss(out, target),)

    def evaluator(self) -> KeypointsEval:
        return KeypointsEval()

    def picture(self, batch: Batch, out: torch.Tensor, path: str) -> None:
        """Each sample's image beside its predicted heatmap, in one row."""
        images = (unnormalize(batch.x).permute(0, 2, 3, 1).numpy() * 255).astype(np.uint8)
        heat = (torch.sigmoid(out[:, 0].float()).numpy() * 255).astype(np.uint8)
        tiles = [np.concatenate([img, np.repeat(h[..., None], 3, 2)], 1) for img, h in zip(images, heat, strict=True)]
        Image.fromarray(np.concatenate(tiles, 0)).save(path)
