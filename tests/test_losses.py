"""Rules for workers.losses (each loss vs its definition) and workers.metrics (split-level sums)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from orchestrator.registry import UnknownNameError
from workers.losses import LOSSES, build_loss, ssim
from workers.metrics import EvalAccumulator

BIG = 30.0  # sigmoid(+-30) is 0/1 to float32 precision: a "perfect" logit


def _logit(p: torch.Tensor) -> torch.Tensor:
    return torch.logit(p.clamp(1e-6, 1 - 1e-6))


def _masks() -> tuple[torch.Tensor, torch.Tensor]:
    a = torch.zeros(2, 1, 16, 16)
    a[:, :, :8] = 1
    return a, 1 - a  # disjoint halves


def test_registry_holds_the_source_losses() -> None:
    """Recipes name these five; a missing one fails a run at build time."""
    assert set(LOSSES.names()) >= {"l1", "dice", "rmse", "ssim", "bce"}


@pytest.mark.parametrize("name", ["l1", "dice", "rmse", "ssim"])
def test_perfect_prediction_gives_near_zero_loss(name: str) -> None:
    """A loss that is not ~0 at the optimum would bias training away from the target."""
    target, _ = _masks()
    logits = (target * 2 - 1) * BIG
    assert LOSSES.get(name)(logits, target).item() < 1e-3


def test_l1_and_rmse_match_their_formulas() -> None:
    """l1 = mean|sigmoid(x)-t|, rmse = sqrt(mean((sigmoid(x)-t)^2)+1e-8): the logits are squashed first."""
    torch.manual_seed(0)
    x, t = torch.randn(3, 1, 8, 8), torch.rand(3, 1, 8, 8)
    p = torch.sigmoid(x)
    torch.testing.assert_close(LOSSES.get("l1")(x, t), (p - t).abs().mean())
    torch.testing.assert_close(LOSSES.get("rmse")(x, t), ((p - t) ** 2).mean().add(1e-8).sqrt())
    assert LOSSES.get("rmse")(torch.zeros(1, 1, 4, 4), torch.full((1, 1, 4, 4), 0.5)).item() < 1e-3


def test_dice_of_disjoint_masks_is_near_one_and_is_per_sample() -> None:
    """Dice with eps=1 per sample then batch mean; disjoint masks -> ~1."""
    a, b = _masks()
    assert LOSSES.get("dice")(a * 2 * BIG - BIG, b).item() == pytest.approx(1 - 1 / 257, abs=1e-4)
    # Sample 0 perfect, sample 1 disjoint: mean of per-sample losses, not one pooled ratio.
    logits = torch.stack([a[0], a[0]]) * 2 * BIG - BIG
    target = torch.stack([a[0], b[0]])
    per = [0.0, 1 - 1 / 257]
    assert LOSSES.get("dice")(logits, target).item() == pytest.approx(sum(per) / 2, abs=1e-4)


def test_bce_matches_torch_bce_with_logits() -> None:
    """bce is plain BCE-with-logits (the stable fused form)."""
    x, t = torch.randn(2, 1, 5, 5), torch.rand(2, 1, 5, 5)
    torch.testing.assert_close(LOSSES.get("bce")(x, t), F.binary_cross_entropy_with_logits(x, t))


def test_ssim_identical_images_zero_loss_and_different_images_positive() -> None:
    """SSIM(x, x) = 1 -> loss 0; unrelated images score clearly lower."""
    torch.manual_seed(0)
    t = torch.rand(2, 1, 24, 24).clamp(0.05, 0.95)
    assert LOSSES.get("ssim")(_logit(t), t).item() == pytest.approx(0.0, abs=1e-4)
    assert LOSSES.get("ssim")(torch.randn(2, 1, 24, 24), t).item() > 0.5


def test_ssim_matches_a_direct_2d_gaussian_window() -> None:
    """The separable form must equal the textbook 11x11 Gaussian-window SSIM ('valid' padding)."""
    torch.manual_seed(1)
    p, t = (
        torch.rand(1, 1, 20, 20, dtype=torch.float64),
        torch.rand(1, 1, 20, 20, dtype=torch.float64),
    )
    x = torch.arange(11, dtype=torch.float64) - 5
    g = torch.exp(-(x**2) / (2 * 1.5**2))
    g = g / g.sum()
    w = (g[:, None] * g[None, :]).view(1, 1, 11, 11)
    mu_p, mu_t = F.conv2d(p, w), F.conv2d(t, w)
    var_p = F.conv2d(p * p, w) - mu_p**2
    var_t = F.conv2d(t * t, w) - mu_t**2
    cov = F.conv2d(p * t, w) - mu_p * mu_t
    c1, c2 = 0.01**2, 0.03**2
    ref = ((2 * mu_p * mu_t + c1) * (2 * cov + c2)) / (
        (mu_p**2 + mu_t**2 + c1) * (var_p + var_t + c2)
    )
    torch.testing.assert_close(ssim(p, t), ref.mean())


def test_build_loss_sums_weighted_terms() -> None:
    """The source's mask loss is l1 + dice; weights must scale each term."""
    torch.manual_seed(0)
    x, t = torch.randn(2, 1, 16, 16), torch.rand(2, 1, 16, 16)
    got = build_loss({"l1": 2.0, "dice": 0.5})(x, t)
    want = 2.0 * LOSSES.get("l1")(x, t) + 0.5 * LOSSES.get("dice")(x, t)
    torch.testing.assert_close(got, want)


def test_unknown_loss_name_error_lists_valid_names() -> None:
    """A typo in a recipe must fail at build time and say what was meant."""
    with pytest.raises(UnknownNameError) as info:
        build_loss({"l1": 1.0, "dcie": 1.0})
    for name in ("l1", "dice", "rmse", "ssim", "bce"):
        assert name in str(info.value)


def _eval_batches(split: int) -> tuple[dict[str, float], EvalAccumulator]:
    torch.manual_seed(3)
    ml, mt = torch.randn(10, 1, 8, 8), (torch.rand(10, 1, 8, 8) > 0.6).float()
    dl, dt = torch.randn(10, 1, 8, 8), torch.rand(10, 1, 8, 8)
    acc = EvalAccumulator()
    for i in range(0, 10, split):
        s = slice(i, i + split)
        acc.update(
            ml[s], mt[s], dl[s], dt[s], baseline_depth=0.4, mask_loss=float(i), depth_loss=1.0
        )
    return acc.compute(), acc


def test_eval_metrics_do_not_depend_on_batch_split_and_match_definitions() -> None:
    """IoU is total intersection / total union over the split, RMSE over all pixels: not batch means."""
    whole, _ = _eval_batches(10)
    for split in (1, 3, 4):
        got, _ = _eval_batches(split)
        for k in ("eval/mask_iou", "eval/depth_rmse", "eval/depth_rmse_baseline"):
            assert got[k] == pytest.approx(whole[k], rel=1e-12), (k, split)
    torch.manual_seed(3)
    ml, mt = torch.randn(10, 1, 8, 8), (torch.rand(10, 1, 8, 8) > 0.6).float()
    dl, dt = torch.randn(10, 1, 8, 8), torch.rand(10, 1, 8, 8)
    pred, true = torch.sigmoid(ml) > 0.5, mt > 0.5
    iou = (pred & true).sum().item() / (pred | true).sum().item()
    assert whole["eval/mask_iou"] == pytest.approx(iou)
    assert whole["eval/depth_rmse"] == pytest.approx(
        ((torch.sigmoid(dl) - dt) ** 2).mean().sqrt().item()
    )
    assert whole["eval/depth_rmse_baseline"] == pytest.approx(
        ((dt - 0.4) ** 2).mean().sqrt().item()
    )
    assert whole["eval/depth_loss"] == pytest.approx(1.0)


def test_eval_iou_is_one_when_both_masks_empty() -> None:
    """An empty union (nothing predicted, nothing there) is a perfect score, not a 0/0 crash."""
    acc = EvalAccumulator()
    z = torch.zeros(2, 1, 4, 4)
    acc.update(z - BIG, z, z, z + 0.5, baseline_depth=0.5)
    out = acc.compute()
    assert out["eval/mask_iou"] == 1.0
    assert out["eval/depth_rmse"] == pytest.approx(0.0, abs=1e-12)
    assert out["eval/depth_rmse_baseline"] == 0.0
    assert "eval/mask_loss" not in out


def test_eval_accumulator_merge_equals_one_pass() -> None:
    """Workers' shards merged must give the same split metrics as one worker seeing it all."""
    whole, _ = _eval_batches(10)
    torch.manual_seed(3)
    ml, mt = torch.randn(10, 1, 8, 8), (torch.rand(10, 1, 8, 8) > 0.6).float()
    dl, dt = torch.randn(10, 1, 8, 8), torch.rand(10, 1, 8, 8)
    shards = [EvalAccumulator(), EvalAccumulator()]
    for acc, s in zip(shards, (slice(0, 3), slice(3, 10)), strict=True):
        acc.update(ml[s], mt[s], dl[s], dt[s], baseline_depth=0.4)
    merged = EvalAccumulator()
    for acc in shards:
        merged.merge(acc)
    got = merged.compute()
    for k in ("eval/mask_iou", "eval/depth_rmse", "eval/depth_rmse_baseline"):
        assert got[k] == pytest.approx(whole[k], rel=1e-12)
