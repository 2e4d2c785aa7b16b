"""Eval metrics and prediction pictures of the classification, segmentation and depth task kinds."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from matplotlib import colormaps
from PIL import Image

from workers.eval import (
    ClassificationEval,
    DepthEval,
    SegmentationEval,
    average_precision,
    depth_metrics,
    metric_name,
)
from workers.pictures import (
    CAPTION_PX,
    CELL_PX,
    DEPTH_CMAP,
    HEADER_PX,
    WRONG,
    classification_grid,
    depth_grid,
    legend_height,
    segmentation_grid,
    voc_palette,
)

# ----------------------------------------------------------------------------- helpers


def _onehot_logits(labels: torch.Tensor, k: int, scale: float = 10.0) -> torch.Tensor:
    """Logits whose argmax is `labels` (B or B x H x W), class on dim 1."""
    lab = labels.clamp(0, k - 1)
    out = torch.nn.functional.one_hot(lab, k).to(torch.float32) * scale
    return out if labels.ndim == 1 else out.permute(0, 3, 1, 2).contiguous()


def _binary_logits(p1: list[float]) -> torch.Tensor:
    """1 x 2 x 1 x N logits whose softmax gives class 1 the scores p1 (class 0: 1 - p1)."""
    p = torch.tensor(p1, dtype=torch.float64)
    logit = torch.log(p / (1 - p))
    return torch.stack([torch.zeros_like(logit), logit]).view(1, 2, 1, -1).float()


def _exact_ap(scores: np.ndarray, positive: np.ndarray) -> float:
    """Reference AP: sort by score, sum over distinct thresholds of (R_n - R_{n-1}) P_n."""
    order = np.argsort(-scores, kind="stable")
    s, y = scores[order], positive[order].astype(np.float64)
    tp, fp = np.cumsum(y), np.cumsum(1 - y)
    last = np.r_[np.diff(s) != 0, True]  # the last element of each run of tied scores
    tp, fp = tp[last], fp[last]
    recall, precision = tp / y.sum(), tp / (tp + fp)
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def _random_segmentation(seed: int, b: int = 3, k: int = 4, h: int = 12, w: int = 10):
    g = torch.Generator().manual_seed(seed)
    target = torch.randint(0, k, (b, h, w), generator=g)
    target[torch.rand(b, h, w, generator=g) < 0.1] = 255
    # Noisy logits that lean towards the truth, so AP and IoU are neither 0 nor 1.
    logits = torch.randn(b, k, h, w, generator=g) * 1.5 + 1.0 * _onehot_logits(target, k, 1.0)
    return logits, target


# ----------------------------------------------------------------------------- classification

CLS = ["cat", "dog", "bird"]


def test_classification_perfect_predictions_give_accuracy_one():
    labels = torch.tensor([0, 1, 2, 2, 1])
    acc = ClassificationEval(CLS, baseline_class=2)
    acc.update(_onehot_logits(labels, 3), labels)
    out = acc.compute()
    assert out["eval/accuracy"] == 1.0
    assert all(out[f"eval/accuracy/{c}"] == 1.0 for c in CLS)


def test_classification_hand_case_gives_overall_per_class_and_baseline_accuracy():
    labels = torch.tensor([0, 0, 1, 2, 2, 2])
    preds = torch.tensor([0, 1, 1, 2, 0, 2])
    acc = ClassificationEval(CLS, baseline_class=2)
    acc.update(_onehot_logits(preds, 3), labels)
    assert acc.compute() == pytest.approx(
        {
            "eval/accuracy": 4 / 6,
            "eval/accuracy/cat": 1 / 2,
            "eval/accuracy/dog": 1 / 1,
            "eval/accuracy/bird": 2 / 3,
            "eval/accuracy_baseline": 3 / 6,  # always "bird": right on the three birds
        }
    )


def test_classification_baseline_uses_the_given_class_even_if_absent_from_the_split():
    labels = torch.tensor([0, 0, 1])
    acc = ClassificationEval(CLS, baseline_class=2)
    acc.update(_onehot_logits(labels, 3), labels)
    assert acc.compute()["eval/accuracy_baseline"] == 0.0


def test_classification_class_without_eval_samples_is_omitted_not_divided_by_zero():
    labels = torch.tensor([0, 1, 1])
    acc = ClassificationEval(CLS, baseline_class=1)
    acc.update(_onehot_logits(torch.tensor([0, 1, 2]), 3), labels)  # "bird" predicted, never true
    out = acc.compute()
    assert "eval/accuracy/bird" not in out
    assert out["eval/accuracy/dog"] == 0.5 and out["eval/accuracy"] == pytest.approx(2 / 3)


def test_classification_results_identical_in_one_batch_several_batches_or_merged():
    g = torch.Generator().manual_seed(0)
    logits, labels = torch.randn(40, 3, generator=g), torch.randint(0, 3, (40,), generator=g)
    one = ClassificationEval(CLS, 0)
    one.update(logits, labels)
    several = ClassificationEval(CLS, 0)
    for i in range(0, 40, 7):
        several.update(logits[i : i + 7], labels[i : i + 7])
    a, b = ClassificationEval(CLS, 0), ClassificationEval(CLS, 0)
    a.update(logits[:13], labels[:13])
    b.update(logits[13:], labels[13:])
    a.merge(b)
    assert one.compute() == several.compute() == a.compute()
    c = ClassificationEval(CLS, 0)
    c.merge(one.totals())  # all-reduced totals fold in the same way
    assert c.compute() == one.compute()


def test_classification_compute_before_update_raises():
    with pytest.raises(ValueError, match="before any update"):
        ClassificationEval(CLS, 0).compute()


def test_classification_label_out_of_range_raises_at_compute():
    acc = ClassificationEval(CLS, 0)
    acc.update(torch.zeros(2, 3), torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="outside"):
        acc.compute()


def test_classification_merge_refuses_a_different_configuration():
    with pytest.raises(ValueError, match="merge"):
        ClassificationEval(CLS, 0).merge(ClassificationEval(CLS, 1))


def test_class_names_become_distinct_mlflow_safe_metric_names():
    assert metric_name("t-shirt/top (1)") == "t-shirt_top _1_"
    with pytest.raises(ValueError, match="collide"):
        ClassificationEval(["a/b", "a_b"], 0)


# ----------------------------------------------------------------------------- segmentation

SEG = ["bg", "person", "car", "tree"]


def test_segmentation_perfect_predictions_give_miou_and_map_one():
    target = torch.tensor([[[0, 1, 1], [2, 2, 0]]])
    acc = SegmentationEval(SEG, baseline_class=0)
    acc.update(_onehot_logits(target, 4), target)
    out = acc.compute()
    assert out["eval/miou"] == 1.0 and out["eval/map"] == pytest.approx(1.0)
    assert out["eval/iou/person"] == 1.0 and out["eval/ap/car"] == pytest.approx(1.0)
    assert "eval/iou/tree" not in out and "eval/ap/tree" not in out  # absent everywhere


def test_segmentation_hand_case_iou_miou_and_ignored_pixels_left_out():
    # 2 x 4 image; the two ignored pixels are predicted wrong and must not count.
    target = torch.tensor([[[0, 0, 1, 1], [2, 255, 255, 0]]])
    pred = torch.tensor([[[0, 1, 1, 1], [0, 3, 2, 0]]])
    acc = SegmentationEval(SEG, baseline_class=0)
    acc.update(_onehot_logits(pred, 4), target)
    out = acc.compute()
    # bg: true {0,1,7} pred {0,4,7} -> 2 / 4; person: true {2,3} pred {1,2,3} -> 2 / 3;
    # car: true {4}, pred {} -> 0 / 1; tree: only predicted on an ignored pixel -> absent.
    assert out["eval/iou/bg"] == pytest.approx(2 / 4)
    assert out["eval/iou/person"] == pytest.approx(2 / 3)
    assert out["eval/iou/car"] == 0.0
    assert "eval/iou/tree" not in out
    assert out["eval/miou"] == pytest.approx((2 / 4 + 2 / 3 + 0) / 3)


def test_segmentation_class_only_predicted_counts_in_miou_with_iou_zero():
    target = torch.tensor([[[0, 0, 1, 1]]])
    pred = torch.tensor([[[0, 3, 1, 1]]])
    acc = SegmentationEval(SEG, baseline_class=0)
    acc.update(_onehot_logits(pred, 4), target)
    out = acc.compute()
    assert out["eval/iou/tree"] == 0.0
    assert out["eval/miou"] == pytest.approx((1 / 2 + 1 + 0) / 3)
    assert "eval/ap/tree" not in out  # no positives: no AP


def test_segmentation_baseline_miou_on_hand_case():
    target = torch.tensor([[[0, 0, 0, 1], [1, 2, 255, 255]]])  # 6 valid: bg 3, person 2, car 1
    acc = SegmentationEval(SEG, baseline_class=0)
    acc.update(torch.randn(1, 4, 2, 4), target)
    # all-bg: IoU(bg) = 3 / 6, person and car 0; tree is absent from truth and prediction.
    assert acc.compute()["eval/miou_baseline"] == pytest.approx((3 / 6) / 3)
    acc = SegmentationEval(SEG, baseline_class=3)
    acc.update(torch.randn(1, 4, 2, 4), target)
    # all-tree: tree is predicted (IoU 0) and bg, person, car are true (IoU 0).
    assert acc.compute()["eval/miou_baseline"] == 0.0


def test_segmentation_ap_hand_case_and_ignored_pixels_left_out():
    # class-1 scores 0.9 (pos), 0.8 (neg), 0.3 (pos), 0.1 (neg), and 0.95 on an ignored pixel
    # (a negative there would lower AP(person)). Ranking: P@R=.5 is 1, P@R=1 is 2/3.
    logits = _binary_logits([0.9, 0.8, 0.3, 0.1, 0.95])
    target = torch.tensor([[[1, 0, 1, 0, 255]]])
    acc = SegmentationEval(["bg", "person"], baseline_class=0)
    acc.update(logits, target)
    out = acc.compute()
    ap = 0.5 * 1 + 0.5 * 2 / 3
    assert out["eval/ap/person"] == pytest.approx(ap)
    # class 0 scores 0.1 (neg), 0.2 (pos), 0.7 (neg), 0.9 (pos): P@R=.5 is 1, P@R=1 is 2/3.
    assert out["eval/ap/bg"] == pytest.approx(ap)
    assert out["eval/map"] == pytest.approx(ap)


def test_average_precision_treats_one_bin_as_tied_scores():
    # 3 bins; bin 2 holds 1 pos + 1 neg (tied), bin 0 holds 1 pos: P@R=.5 is 1/2, P@R=1 is 2/3.
    ap = average_precision(torch.tensor([1.0, 0.0, 1.0]), torch.tensor([0.0, 0.0, 1.0]))
    assert ap.item() == pytest.approx(0.5 * 0.5 + 0.5 * 2 / 3)


def test_segmentation_ap_matches_exact_sorted_ap_within_bin_error():
    logits, target = _random_segmentation(1)
    acc = SegmentationEval(SEG, baseline_class=0)
    acc.update(logits, target)
    out = acc.compute()
    scores = torch.softmax(logits, 1).permute(1, 0, 2, 3).reshape(4, -1).numpy()
    t = target.reshape(-1).numpy()
    keep = t != 255
    for c, name in enumerate(SEG):
        exact = _exact_ap(scores[c][keep], t[keep] == c)
        assert out[f"eval/ap/{name}"] == pytest.approx(exact, abs=0.01)
        assert 0.2 < exact < 0.99  # the case is not trivial


def test_segmentation_ap_matches_sklearn_average_precision_within_001():
    sklearn_metrics = pytest.importorskip("sklearn.metrics")
    logits, target = _random_segmentation(2, b=4, h=16, w=16)
    acc = SegmentationEval(SEG, baseline_class=0)
    acc.update(logits, target)
    out = acc.compute()
    scores = torch.softmax(logits, 1).permute(1, 0, 2, 3).reshape(4, -1).numpy()
    t = target.reshape(-1).numpy()
    keep = t != 255
    aps = []
    for c, name in enumerate(SEG):
        ref = sklearn_metrics.average_precision_score(t[keep] == c, scores[c][keep])
        assert out[f"eval/ap/{name}"] == pytest.approx(ref, abs=0.01)
        aps.append(ref)
    assert out["eval/map"] == pytest.approx(np.mean(aps), abs=0.01)


def test_segmentation_results_identical_in_one_batch_several_batches_or_merged():
    logits, target = _random_segmentation(3, b=5)
    one = SegmentationEval(SEG, 0)
    one.update(logits, target)
    several = SegmentationEval(SEG, 0)
    for i in range(5):
        several.update(logits[i : i + 1], target[i : i + 1])
    a, b = SegmentationEval(SEG, 0), SegmentationEval(SEG, 0)
    a.update(logits[:2], target[:2])
    b.update(logits[2:], target[2:])
    a.merge(b)
    assert one.compute() == several.compute() == a.compute()


def test_segmentation_compute_before_update_or_with_only_ignored_pixels_raises():
    acc = SegmentationEval(SEG, 0)
    with pytest.raises(ValueError, match="before any update"):
        acc.compute()
    acc.update(torch.randn(1, 4, 2, 2), torch.full((1, 2, 2), 255))
    with pytest.raises(ValueError, match="no eval pixels"):
        acc.compute()


def test_segmentation_target_neither_class_nor_ignore_raises_at_compute():
    acc = SegmentationEval(SEG, 0)
    acc.update(torch.randn(1, 4, 1, 2), torch.tensor([[[0, 7]]]))
    with pytest.raises(ValueError, match="neither a class"):
        acc.compute()


# ----------------------------------------------------------------------------- depth


def _depth(values: list[float]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32).view(1, 1, 1, -1)


def test_depth_perfect_predictions_give_a1_one_and_zero_errors():
    t = torch.rand(2, 1, 5, 5) * 8 + 1
    acc = DepthEval(0.5, 10.0, baseline_depth=3.0)
    acc.update(t.clone(), t)
    out = acc.compute()
    assert out["eval/a1"] == out["eval/a2"] == out["eval/a3"] == 1.0
    assert out["eval/rms"] == 0.0 and out["eval/rel"] == 0.0 and out["eval/log10"] == 0.0


def test_depth_hand_case_and_invalid_pixels_excluded():
    # Valid: (t, p) = (1, 1.2), (2, 1.1), (4, 4). Excluded: t = 0 (no measurement) and
    # t = 12 > max_depth, both with predictions far off.
    target = _depth([1.0, 2.0, 4.0, 0.0, 12.0])
    pred = _depth([1.2, 1.1, 4.0, 3.0, 1.0])
    acc = DepthEval(0.1, 10.0, baseline_depth=2.0)
    acc.update(pred, target)
    out = acc.compute()
    # ratios 1.2, 1.818, 1: < 1.25 twice, < 1.5625 twice, < 1.953 three times
    assert out["eval/a1"] == pytest.approx(2 / 3)
    assert out["eval/a2"] == pytest.approx(2 / 3)
    assert out["eval/a3"] == pytest.approx(1.0)
    assert out["eval/rel"] == pytest.approx((0.2 / 1 + 0.9 / 2 + 0) / 3, rel=1e-6)
    assert out["eval/rms"] == pytest.approx(math.sqrt((0.04 + 0.81 + 0) / 3), rel=1e-6)
    log10 = (abs(math.log10(1.2)) + abs(math.log10(2) - math.log10(1.1))) / 3
    assert out["eval/log10"] == pytest.approx(log10, rel=1e-6)
    assert out["eval/rms_baseline"] == pytest.approx(math.sqrt((1 + 0 + 4) / 3))
    assert depth_metrics(pred, target, 0.1, 10.0) == pytest.approx(
        {k[5:]: v for k, v in out.items() if k != "eval/rms_baseline"}
    )


def test_depth_predictions_are_clamped_to_the_valid_range():
    target = _depth([10.0, 0.5, 0.5])
    pred = _depth([25.0, 0.0, -3.0])  # above max, zero, negative: clamped to 10, 0.5, 0.5
    out = depth_metrics(pred, target, 0.5, 10.0)
    assert out == {"a1": 1.0, "a2": 1.0, "a3": 1.0, "rel": 0.0, "rms": 0.0, "log10": 0.0}


def test_depth_baseline_rms_is_the_constant_prediction_error_over_valid_pixels():
    target = _depth([1.0, 3.0, 0.0, 6.0])
    acc = DepthEval(0.5, 10.0, baseline_depth=3.0)
    acc.update(target.clone(), target)
    assert acc.compute()["eval/rms_baseline"] == pytest.approx(math.sqrt((4 + 0 + 9) / 3))


def test_depth_results_identical_in_one_batch_several_batches_or_merged():
    g = torch.Generator().manual_seed(0)
    target = torch.rand(6, 1, 8, 8, generator=g) * 9 + 0.5
    target[torch.rand(6, 1, 8, 8, generator=g) < 0.2] = 0
    pred = target * (1 + 0.4 * torch.randn(6, 1, 8, 8, generator=g))
    one = DepthEval(0.5, 10.0, 4.0)
    one.update(pred, target)
    several = DepthEval(0.5, 10.0, 4.0)
    for i in range(6):
        several.update(pred[i : i + 1], target[i : i + 1])
    a, b = DepthEval(0.5, 10.0, 4.0), DepthEval(0.5, 10.0, 4.0)
    a.update(pred[:1], target[:1])  # unequal shards: per-image means would differ
    b.update(pred[1:], target[1:])
    a.merge(b)
    ref = one.compute()
    assert 0 < ref["eval/a1"] < 1 and ref["eval/rms"] > 0
    assert several.compute() == pytest.approx(ref, rel=1e-12)
    assert a.compute() == pytest.approx(ref, rel=1e-12)


def test_depth_means_are_pixel_weighted_not_image_weighted():
    target = torch.ones(2, 1, 1, 4)
    target[0, 0, 0, 1:] = 0  # image 0: one valid pixel, error 1; image 1: four valid, error 0
    pred = torch.ones(2, 1, 1, 4)
    pred[0, 0, 0, 0] = 2.0
    out = depth_metrics(pred, target, 0.5, 10.0)
    assert out["rms"] == pytest.approx(math.sqrt(1 / 5))  # image-mean would give sqrt(1/2)


def test_depth_compute_before_update_or_without_valid_pixels_raises():
    acc = DepthEval(0.5, 10.0, 3.0)
    with pytest.raises(ValueError, match="before any update"):
        acc.compute()
    acc.update(_depth([1.0]), _depth([0.0]))
    with pytest.raises(ValueError, match="no valid depth pixels"):
        acc.compute()
    with pytest.raises(ValueError):
        DepthEval(0.0, 10.0, 3.0)


# ----------------------------------------------------------------------------- pictures


def _cell_pixel(
    img: Image.Image, row: int, col: int, fx: float = 0.5, fy: float = 0.5, top=HEADER_PX
):
    return img.getpixel(
        (col * CELL_PX + int(fx * CELL_PX), top + row * CELL_PX + int(fy * CELL_PX))
    )


def test_voc_palette_has_the_voc_colours():
    pal = voc_palette()
    assert pal.shape == (256, 3)
    assert tuple(pal[0]) == (0, 0, 0) and tuple(pal[1]) == (128, 0, 0)
    assert tuple(pal[2]) == (0, 128, 0) and tuple(pal[15]) == (192, 128, 128)  # person


def test_classification_grid_size_and_wrong_predictions_framed_in_red(tmp_path):
    images = torch.zeros(5, 3, 20, 20)
    images[:, 2] = 1.0  # blue
    images[4] = 0.5  # gray
    true, pred = torch.tensor([0, 1, 2, 0, 1]), torch.tensor([0, 2, 2, 0, 1])
    path = tmp_path / "cls.png"
    classification_grid(images, true, pred, ["cat", "dog", "bird"], str(path))
    img = Image.open(path)
    assert img.format == "PNG"
    assert img.size == (4 * CELL_PX, HEADER_PX + 2 * (CELL_PX + CAPTION_PX))
    step = CELL_PX + CAPTION_PX
    assert img.getpixel((CELL_PX // 2, HEADER_PX + CELL_PX // 2)) == (0, 0, 255)
    assert img.getpixel((CELL_PX // 2, HEADER_PX + step + CELL_PX // 2)) == (128, 128, 128)
    # sample 1 (dog -> bird) is wrong: red frame; sample 0 is right: no frame
    assert img.getpixel((CELL_PX + 1, HEADER_PX + 1)) == WRONG
    assert img.getpixel((1, HEADER_PX + 1)) == (0, 0, 255)
    caption = np.asarray(img)[HEADER_PX + CELL_PX : HEADER_PX + step]
    r, g, b = (caption[..., i].astype(int) for i in range(3))
    red = (r > 150) & (g < 100) & (b < 100)  # the red caption text (anti-aliased)
    assert red[:, CELL_PX : 2 * CELL_PX].any() and not red[:, :CELL_PX].any()


def test_classification_grid_takes_grayscale_images(tmp_path):
    path = tmp_path / "gray.png"
    classification_grid(
        torch.full((2, 1, 8, 8), 1.0),
        torch.tensor([0, 1]),
        torch.tensor([0, 1]),
        ["a", "b"],
        str(path),
    )
    img = Image.open(path)
    assert img.size == (2 * CELL_PX, HEADER_PX + CELL_PX + CAPTION_PX)
    assert img.getpixel((CELL_PX // 2, HEADER_PX + CELL_PX // 2)) == (255, 255, 255)


def test_segmentation_grid_size_and_palette_colours_of_maps(tmp_path):
    images = torch.zeros(2, 3, 16, 16)
    true = torch.zeros(2, 16, 16, dtype=torch.int64)
    true[:, :, 8:] = 255  # right half ignored
    pred = torch.full((2, 16, 16), 15, dtype=torch.int64)
    pred[1, :, :8] = 2
    path = tmp_path / "seg.png"
    segmentation_grid(images, true, pred, 21, str(path))
    img = Image.open(path)
    assert img.size == (3 * CELL_PX, HEADER_PX + 2 * CELL_PX)
    pal = voc_palette()
    assert _cell_pixel(img, 0, 1, fx=0.25) == tuple(pal[0])  # true: class 0
    assert _cell_pixel(img, 0, 1, fx=0.75) == (255, 255, 255)  # true: ignored -> white
    assert _cell_pixel(img, 0, 2) == tuple(pal[15])  # pred: class 15
    assert _cell_pixel(img, 1, 2, fx=0.25) == tuple(pal[2])
    assert _cell_pixel(img, 1, 2, fx=0.75) == tuple(pal[15])


def test_segmentation_grid_with_classes_adds_a_legend_with_swatches(tmp_path):
    classes = ["bg", "person", "car", "tree", "sky"]
    path = tmp_path / "seg_legend.png"
    segmentation_grid(
        torch.zeros(1, 3, 8, 8),
        torch.zeros(1, 8, 8, dtype=torch.int64),
        torch.zeros(1, 8, 8, dtype=torch.int64),
        5,
        str(path),
        classes=classes,
    )
    img = Image.open(path)
    assert img.size == (3 * CELL_PX, HEADER_PX + CELL_PX + legend_height(5))
    assert legend_height(5) > legend_height(3) > 0  # 5 entries need two lines of three
    legend = np.asarray(img)[HEADER_PX + CELL_PX :]
    for c in range(1, 5):
        assert (legend == voc_palette()[c]).all(-1).any(), classes[c]


def test_depth_grid_size_colormap_and_invalid_truth_black(tmp_path):
    images = torch.ones(2, 3, 10, 10)
    true = torch.full((2, 1, 10, 10), 5.0)
    true[:, :, :, 5:] = 0.0  # right half: no measurement
    pred = torch.full((2, 1, 10, 10), 2.5)
    pred[1] = 20.0  # beyond max_depth: clipped to the top colour
    path = tmp_path / "depth.png"
    depth_grid(images, true, pred, str(path), max_depth=10.0)
    img = Image.open(path)
    assert img.size == (3 * CELL_PX, HEADER_PX + 2 * CELL_PX)
    cmap = colormaps[DEPTH_CMAP]

    def colour(x: float) -> tuple[int, ...]:
        return tuple(int(v) for v in cmap(x, bytes=True)[:3])

    assert _cell_pixel(img, 0, 0) == (255, 255, 255)
    assert _cell_pixel(img, 0, 1, fx=0.25) == colour(0.5)
    assert _cell_pixel(img, 0, 1, fx=0.75) == (0, 0, 0)
    assert _cell_pixel(img, 0, 2, fx=0.75) == colour(0.25)  # predictions drawn everywhere
    assert _cell_pixel(img, 1, 2) == colour(1.0)
