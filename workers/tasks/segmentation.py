"""Semantic segmentation: an RGB image in, a class per pixel out (255 = ignore), as the report's
ResNet18 segmenter."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from common.tasks import IGNORE_INDEX, SEGMENTATION
from storage.codec import decode_mask
from workers.tasks.base import Batch
from workers.tasks.labels import LabelEval, LabelTask, most_frequent
from workers.tasks.samples import ImageSamples, resize_nearest, unnormalize


def _class_map(value: bytes, side: int) -> np.ndarray:
    return resize_nearest(decode_mask(value), side).astype(np.int64)


class SegmentationTask(LabelTask, spec=SEGMENTATION):

    def __init__(self, recipe: Any, info: dict[str, Any]) -> None:
        super().__init__(recipe, info)

    @classmethod
    def data_info(cls, dataset: Any, train_ids: np.ndarray) -> dict[str, Any]:
        classes = list(dataset.meta["classes"])
        per_sample = dataset.index_values("class_pixels", train_ids)
        counts = np.sum(np.stack([np.asarray(c, dtype=np.int64) for c in per_sample]), axis=0)
        return {"classes": classes, "baseline_class": most_frequent(counts), "train_pixels": counts.tolist(),
                "ignore_index": int(dataset.meta.get("ignore_index", IGNORE_INDEX))}

    @classmethod
    def metric_keys(cls, info: dict[str, Any]) -> set[str]:
        from workers.eval import class_keys

        keys = class_keys(info["classes"])
        return {*cls.train_keys, "eval/miou", "eval/map", "eval/miou_baseline",
                *(f"eval/iou/{k}" for k in keys), *(f"eval/ap/{k}" for k in keys)}

    def model_kwargs(self) -> dict[str, Any]:
        return {"in_channels": 3, "num_classes": len(self.classes)}

    def samples(self, rows: dict[str, Any], resolution: int, describe: Any, train: bool,
                flip_key: tuple[int, ...] = ()) -> ImageSamples:
        return ImageSamples(rows, resolution, 3, describe, "mask", _class_map,
                            self.recipe.data.hflip if train else 0.0, 0, flip_key)


    def evaluator(self) -> Any:
        from workers.eval.segmentation import SegmentationEval

        return LabelEval(SegmentationEval(self.classes, int(self.info["baseline_class"]),
                                          int(self.info["ignore_index"])))

    def picture(self, batch: Batch, out: torch.Tensor, path: str) -> None:
        from workers.pictures import segmentation_grid

        segmentation_grid(unnormalize(batch.x), batch.targets[0], out.argmax(1), len(self.classes), path,
                          int(self.info["ignore_index"]), self.classes)
