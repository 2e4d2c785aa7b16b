"""Classification eval: overall and per-class accuracy, and a most-frequent-class baseline."""

from __future__ import annotations

import torch
from torch import Tensor

from workers.eval.base import SumAccumulator, class_keys, count_into


class ClassificationEval(SumAccumulator):
    """Accuracy over a split from logits (B x K) and integer labels (B).

    compute() gives
      eval/accuracy            correct / samples
      eval/accuracy/<class>    correct / samples among samples of that true class (a class with
                               no samples in the split is left out)
      eval/accuracy_baseline   accuracy of always predicting `baseline_class` (the training
                               split's most frequent class, chosen by the caller)

    Prediction is the argmax of the logits (ties: the lowest index, as torch.argmax). A label
    outside 0..K-1 is counted without a sync and makes compute() raise ValueError.
    """

    def __init__(self, classes: list[str], baseline_class: int) -> None:
        self.classes = list(classes)
        self._keys = class_keys(self.classes)
        k = len(self.classes)
        if not 0 <= baseline_class < k:
            raise ValueError(f"baseline_class {baseline_class} is not in 0..{k - 1}")
        self.baseline_class = int(baseline_class)
        self._shapes = {"correct": (k,), "count": (k,), "bad": ()}
        self._config = (tuple(self.classes), self.baseline_class)
        super().__init__()

    @torch.no_grad()
    def update(self, logits: Tensor, labels: Tensor) -> None:
        k = len(self.classes)
        if logits.ndim != 2 or logits.shape[1] != k:
            raise ValueError(f"logits must be B x {k}, got {tuple(logits.shape)}")
        if labels.shape != logits.shape[:1]:
            raise ValueError(f"labels must be ({logits.shape[0]},), got {tuple(labels.shape)}")
        self._ensure(logits.device)
        labels = labels.to(logits.device, torch.int64)
        valid = (labels >= 0) & (labels < k)
        label = torch.where(valid, labels, k)  # k: the dump bin of count_into
        hit = valid & (logits.argmax(1) == labels)
        self._add("count", count_into(label, k))
        self._add("correct", count_into(torch.where(hit, labels, k), k))
        self._add("bad", (~valid).sum())

    def compute(self) -> dict[str, float]:
        t = self._host_totals()
        if t["bad"].item() > 0:
            raise ValueError(f"{int(t['bad'].item())} labels outside 0..{len(self.classes) - 1}")
        count, correct = t["count"].tolist(), t["correct"].tolist()
        total = sum(count)
        if total == 0:
            raise ValueError("no eval samples")
        out = {
            "eval/accuracy": sum(correct) / total,
            "eval/accuracy_baseline": count[self.baseline_class] / total,
        }
        for key, n, c in zip(self._keys, count, correct, strict=True):
            if n > 0:
                out[f"eval/accuracy/{key}"] = c / n
        return out
