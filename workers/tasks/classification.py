"""Classification: one image in (gray or RGB), a class label out (the report's FashionMNIST BaseNet)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from common.tasks import CLASSIFICATION
from workers.tasks.base import Batch
from workers.tasks.labels import LabelEval, LabelTask, most_frequent
from workers.tasks.samples import ImageSamples, unnormalize


def _label(value: Any, side: int) -> np.ndarray:
    return np.asarray(int(value), dtype=np.int64)


class ClassificationTask(LabelTask, spec=CLASSIFICATION):

    def __init__(self, recipe: Any, info: dict[str, Any]) -> None:
        super().__init__(recipe, info)
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


    def evaluator(self) -> Any:
        from workers.eval.classification import ClassificationEval

        return LabelEval(ClassificationEval(self.classes, int(self.info["baseline_class"])))

    def picture(self, batch: Batch, out: torch.Tensor, path: str) -> None:
        from workers.pictures import classification_grid

        classification_grid(unnormalize(batch.x), batch.targets[0], out.argmax(1), self.classes, path)
