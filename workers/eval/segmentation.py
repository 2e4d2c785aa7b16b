"""Semantic segmentation eval: per-class IoU and mIoU, per-class AP and mAP, a constant baseline."""

from __future__ import annotations

import torch
from torch import Tensor

from workers.eval.base import SumAccumulator, class_keys, count_into


def average_precision(pos: Tensor, neg: Tensor) -> Tensor:
    """AP from score histograms over fixed bins (last dim, ascending score): pos[..., i] and
    neg[..., i] count the positives and negatives whose score fell in bin i.

    The step-wise area under precision-recall, as sklearn's average_precision_score:
    AP = sum_n (R_n - R_{n-1}) P_n, thresholds walked from the highest bin down, the scores in one
    bin treated as ties. Sorting by exact scores would only reorder within a bin, so this is exact
    up to the bin width. NaN where there are no positives.
    """
    pos, neg = pos.to(torch.float64), neg.to(torch.float64)
    tp = pos.flip(-1).cumsum(-1).flip(-1)  # positives with score in bin i or above
    fp = neg.flip(-1).cumsum(-1).flip(-1)
    seen = tp + fp
    precision = torch.where(seen > 0, tp / seen.clamp(min=1), torch.zeros_like(seen))
    # Recall grows by pos[i] / P at bin i, where precision is tp[i] / (tp[i] + fp[i]).
    n_pos = pos.sum(-1)
    return (pos * precision).sum(-1) / n_pos


class SegmentationEval(SumAccumulator):
    """IoU, mIoU, AP and mAP over a split from logits (B x K x H x W) and class maps (B x H x W).

    Pixels whose target is `ignore_index` are left out of everything (confusion matrix, AP
    histograms, baseline). A target value that is neither a class nor `ignore_index` is counted
    (no sync) and makes compute() raise ValueError.

    compute() gives
      eval/iou/<class>    |pred = c and true = c| / |pred = c or true = c|
      eval/miou           mean IoU over the classes *present*: the classes that occur in the
                          truth or in the prediction (union > 0) anywhere in the split. A class
                          absent from both has no IoU (no key, not in the mean); a class that is
                          only predicted counts with IoU 0.
      eval/ap/<class>     average precision of the class's softmax score per pixel, positives =
                          pixels whose true class is c, over `ap_bins` fixed score bins (see
                          `average_precision`); only for classes with positives in the split
      eval/map            mean of eval/ap over the classes with positives
      eval/miou_baseline  mIoU of predicting `baseline_class` on every pixel, same rule (the
                          present classes are those in the truth plus `baseline_class`)
    The prediction is the argmax of the logits (ties: the lowest index).
    """

    def __init__(
        self,
        classes: list[str],
        baseline_class: int,
        ignore_index: int = 255,
        ap_bins: int = 1000,
    ) -> None:
        self.classes = list(classes)
        self._keys = class_keys(self.classes)
        k = len(self.classes)
        if not 0 <= baseline_class < k:
            raise ValueError(f"baseline_class {baseline_class} is not in 0..{k - 1}")
        if 0 <= ignore_index < k:
            raise ValueError(f"ignore_index {ignore_index} is a class index (0..{k - 1})")
        if ap_bins < 1:
            raise ValueError("ap_bins must be >= 1")
        self.baseline_class = int(baseline_class)
        self.ignore_index = int(ignore_index)
        self.ap_bins = int(ap_bins)
        # confusion[t, p]: pixels of true class t predicted as p; hist[0 / 1, c, bin]: pixels
        # negative / positive for class c whose class-c score fell in that bin.
        self._shapes = {"confusion": (k, k), "hist": (2, k, self.ap_bins), "bad": ()}
        self._config = (tuple(self.classes), self.baseline_class, self.ignore_index, self.ap_bins)
        super().__init__()

    @torch.no_grad()
    def update(self, logits: Tensor, target: Tensor) -> None:
        k, bins = len(self.classes), self.ap_bins
        if logits.ndim != 4 or logits.shape[1] != k:
            raise ValueError(f"logits must be B x {k} x H x W, got {tuple(logits.shape)}")
        b, _, h, w = logits.shape
        if tuple(target.shape) != (b, h, w):
            raise ValueError(f"target must be {(b, h, w)}, got {tuple(target.shape)}")
        self._ensure(logits.device)
        t = target.to(logits.device, torch.int64)
        valid = (t >= 0) & (t < k)
        self._add("bad", (~valid & (t != self.ignore_index)).sum())
        pred = logits.argmax(1)
        cell = torch.where(valid, t * k + pred, k * k)
        self._add("confusion", count_into(cell, k * k).reshape(k, k))

        scores = torch.softmax(logits.float(), dim=1)
        bin_ = (scores * bins).to(torch.int64).clamp_(0, bins - 1)
        cls = torch.arange(k, device=logits.device).view(1, k, 1, 1)
        positive = (t.unsqueeze(1) == cls).to(torch.int64)
        idx = (positive * k + cls) * bins + bin_
        idx = torch.where(valid.unsqueeze(1), idx, 2 * k * bins)
        self._add("hist", count_into(idx, 2 * k * bins).reshape(2, k, bins))

    def compute(self) -> dict[str, float]:
        tot = self._host_totals()
        if tot["bad"].item() > 0:
            raise ValueError(
                f"{int(tot['bad'].item())} target pixels are neither a class"
                f" (0..{len(self.classes) - 1}) nor ignore_index {self.ignore_index}"
            )
        conf = tot["confusion"]
        n = conf.sum().item()
        if n == 0:
            raise ValueError("no eval pixels (all ignored?)")
        inter = conf.diagonal()
        true_n, pred_n = conf.sum(1), conf.sum(0)
        union = true_n + pred_n - inter
        out: dict[str, float] = {}
        ious = []
        for key, i, u in zip(self._keys, inter.tolist(), union.tolist(), strict=True):
            if u > 0:
                out[f"eval/iou/{key}"] = i / u
                ious.append(i / u)
        out["eval/miou"] = sum(ious) / len(ious)

        ap = average_precision(tot["hist"][1], tot["hist"][0])
        aps = []
        for key, a, p in zip(self._keys, ap.tolist(), true_n.tolist(), strict=True):
            if p > 0:
                out[f"eval/ap/{key}"] = a
                aps.append(a)
        out["eval/map"] = sum(aps) / len(aps)

        # Baseline: every pixel predicted as c0. IoU(c0) = |true = c0| / n; any other class in
        # the truth has IoU 0.
        c0 = self.baseline_class
        present = sum(1 for c, p in enumerate(true_n.tolist()) if p > 0 or c == c0)
        out["eval/miou_baseline"] = true_n[c0].item() / n / present
        return out
