"""Classification: one image in (gray or RGB), a class label out (the report's FashionMNIST BaseNet)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from workers.losses import build_loss
from workers.tasks.base import Batch, Task
from workers.tasks.samples import ImageSamples, normalize, unnormalize


def most_frequent(counts: np.ndarray) -> int:
    """The class the trivial baseline always predicts (ties: the lowest index)."""
    return int(np.argmax(counts))


def _label(value: Any, side: int) -> np.ndarray:
    return np.asarray(int(value), dtype=np.int64)


class ClassificationTask(Task):
    name = "classification"
    columns = ("image", "label")
    loss_sections = ("labels",)
    train_keys = ("train/loss",)
    compare_columns = (("accuracy", "eval/accuracy", "max"), ("baseline", "eval/accuracy_baseline", None))
    headline = ("eval/accuracy", "max")

    def __init__(self, recipe: Any, info: dict[str, Any]) -> None:
        super().__init__(recipe, info)
        self.loss = build_loss(recipe.loss.labels)
        self.classes: list[str] = list(info["classes"])
        self.channels = int(info.get("channels", 1))

    @classmethod
    def data_info(cls, dataset: Any, train_ids: np.ndarray) -> dict[str, Any]:
        classes = list(dataset.meta["classes"])
        labels = dataset.index_values("label", train_ids).astype(np.int64)
        counts = np.bincount(labels, minlength=len(classes))
        return {"classes": classes, "channels": int(dataset.meta.get("channels", 1)),
                "baseline_class": most_frequent(counts), "train_counts": counts.tolist()}

    @classmethod
    def metric_keys(cls, info: dict[str, Any]) -> set[str]:
        from workers.eval import class_keys

        return {*cls.train_keys, "eval/accuracy", "eval/accuracy_baseline",
                *(f"eval/accuracy/{k}" for k in class_keys(info["classes"]))}

    def model_kwargs(self) -> dict[str, Any]:
        # image_size: the classifier's fully connected layer is sized for one input side.
        return {"in_channels": self.channels, "num_classes": len(self.classes),
                "image_size": self.recipe.stages[0].resolution}

    def samples(self, rows: dict[str, Any], resolution: int, describe: Any, train: bool,
                flip_key: tuple[int, ...] = ()) -> ImageSamples:
        d = self.recipe.data
        return ImageSamples(rows, resolution, self.channels, describe, "label", _label,
                            d.hflip if train else 0.0, d.shift if train else 0, flip_key)

    def to_device(self, raw: tuple[torch.Tensor, torch.Tensor], device: torch.device | str) -> Batch:
        images, labels = (t.to(device, non_blocking=True) for t in raw)
        return Batch(normalize(images), (labels,))

    def losses(self, out: torch.Tensor, batch: Batch) -> Sequence[torch.Tensor]:
        return (self.loss(out, batch.targets[0]),)

    def evaluator(self) -> Any:
        from workers.eval.classification import ClassificationEval

        return _Adapter(ClassificationEval(self.classes, int(self.info["baseline_class"])))

    def picture(self, batch: Batch, out: torch.Tensor, path: str) -> None:
        from workers.pictures import classification_grid

        classification_grid(unnormalize(batch.x), batch.targets[0], out.argmax(1), self.classes, path)


class _Adapter:
    """A label metric (update(logits, target)) as the loop's Evaluator (update(out, batch))."""

    def __init__(self, acc: Any) -> None:
        self.acc = acc

    def update(self, out: torch.Tensor, batch: Batch) -> None:
        self.acc.update(out, batch.targets[0])

    def compute(self) -> dict[str, float]:
        return self.acc.compute()
