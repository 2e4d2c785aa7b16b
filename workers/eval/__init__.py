"""Eval-pass metrics for the classification, segmentation and depth task kinds.

Each accumulator follows workers/metrics.py: it keeps float64 sums (counts, histograms, error
sums) as tensors on the inputs' device, never calls .item() per batch, and moves everything to
the host in one transfer when asked (`totals()` / `compute()`). Every result is a function of
those sums alone, so it does not depend on how the split was batched, nor on how it was divided
between accumulators that are then `merge`d.

    acc = SegmentationEval(classes, baseline_class=0)
    for x, y in loader:
        acc.update(model(x), y)
    metrics = acc.compute()       # {"eval/miou": ..., "eval/iou/<class>": ..., ...}

Across workers: all-reduce (sum) each tensor of `totals()`, or `merge` the accumulators.

Metric names are "eval/<metric>" and "eval/<metric>/<class name>"; class names are made
MLflow-safe by `metric_name` (anything but letters, digits, "_", "-", "." and " " becomes "_").
"""

from workers.eval.base import SumAccumulator, class_keys, count_into, metric_name
from workers.eval.classification import ClassificationEval
from workers.eval.depth import DepthEval, depth_metrics
from workers.eval.segmentation import SegmentationEval, average_precision

__all__ = [
    "ClassificationEval",
    "DepthEval",
    "SegmentationEval",
    "SumAccumulator",
    "average_precision",
    "class_keys",
    "count_into",
    "depth_metrics",
    "metric_name",
]
