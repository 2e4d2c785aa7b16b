"""What the two class-label tasks (classification, segmentation) share: the `loss.labels` terms,
integer targets on the device, the most-frequent-class baseline, and their metric adapter."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from workers.losses import build_loss
from workers.tasks.base import Batch, Task
from workers.tasks.samples import image_batch


def most_frequent(counts: np.ndarray) -> int:
    """The class the trivial baseline always predicts (ties: the lowest index)."""
    return int(np.argmax(counts))


class LabelTask(Task):

    def __init__(self, recipe: Any, info: dict[str, Any]) -> None:
        super().__init__(recipe, info)
        self.loss = build_loss(recipe.loss.labels)
        self.classes: list[str] = list(info["classes"])

    def to_device(self, raw: tuple[torch.Tensor, torch.Tensor], device: torch.device | str) -> Batch:
        x, labels = image_batch(raw, device)
        return Batch(x, (labels,))

    def losses(self, out: torch.Tensor, batch: Batch) -> Sequence[torch.Tensor]:
        return (self.loss(out, batch.targets[0]),)


class LabelEval:
    """A label metric (update(logits, target)) as the loop's Evaluator (update(out, batch))."""

    def __init__(self, acc: Any) -> None:
        self.acc = acc

    def update(self, out: torch.Tensor, batch: Batch) -> None:
        self.acc.update(out, batch.targets[0])

    def compute(self) -> dict[str, float]:
        return self.acc.compute()
