"""Rules for workers.losses (each loss vs its definition) and workers.metrics (split-level sums)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from common.registry import UnknownNameError
from workers.losses import (
    BCE_TVERSKY_ALPHA,
    BCE_TVERSKY_BETA,
    LOSSES,
    build_loss,
    ssim,
    tversky_loss,
)
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


# --- The rest of the source team's loss comparison (their Table 1) ------------------------------

NEW_LOSSES = ["tversky", "bce_dice", "bce_tversky", "berhu", "grad", "ssim5", "ssim11"]


def test_registry_holds_every_loss_of_the_source_table() -> None:
    """Table 1 names these (bce doubles as a depth loss); recipes refer to them by these names."""
    assert set(LOSSES.names()) >= {"bce", "dice", "rmse", "ssim", *NEW_LOSSES}


@pytest.mark.parametrize("name", NEW_LOSSES)
def test_new_losses_are_near_zero_at_a_perfect_prediction(name: str) -> None:
    """Each definition has its minimum 0 at prediction == target (BCE at a saturated logit)."""
    target, _ = _masks()
    logits = (target * 2 - 1) * BIG
    assert LOSSES.get(name)(logits, target).item() < 1e-3


@pytest.mark.parametrize("name", NEW_LOSSES)
def test_new_losses_give_finite_gradients(name: str) -> None:
    """A NaN or inf gradient would poison the weights at the first step."""
    torch.manual_seed(0)
    x = (torch.randn(2, 1, 16, 16) * 4).requires_grad_()
    t = torch.rand(2, 1, 16, 16)
    LOSSES.get(name)(x, t).backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


@pytest.mark.parametrize("name", NEW_LOSSES)
def test_new_losses_accept_float16_and_compute_in_float32(name: str) -> None:
    """Under autocast the head emits float16; the loss must be the float32 loss of those values."""
    torch.manual_seed(0)
    x, t = torch.randn(2, 1, 16, 16).half(), torch.rand(2, 1, 16, 16).half()
    got = LOSSES.get(name)(x, t)
    assert got.dtype == torch.float32 and torch.isfinite(got)
    torch.testing.assert_close(got, LOSSES.get(name)(x.float(), t.float()))


def _soft_counts(p: torch.Tensor, t: torch.Tensor) -> list[tuple[float, float, float]]:
    """(TP, FP, FN) per sample by explicit element loops."""
    out = []
    for ps, ts in zip(p, t, strict=True):
        tp = fp = fn = 0.0
        for pv, tv in zip(ps.flatten().tolist(), ts.flatten().tolist(), strict=True):
            tp += pv * tv
            fp += pv * (1 - tv)
            fn += (1 - pv) * tv
        out.append((tp, fp, fn))
    return out


def _tversky_by_hand(x: torch.Tensor, t: torch.Tensor, alpha: float, beta: float) -> float:
    counts = _soft_counts(torch.sigmoid(x.double()), t.double())
    per = [1 - (tp + 1) / (tp + alpha * fp + beta * fn + 1) for tp, fp, fn in counts]
    return sum(per) / len(per)


def _hand_pair() -> tuple[torch.Tensor, torch.Tensor]:
    p = torch.tensor([[[[0.9, 0.8], [0.3, 0.1]]], [[[0.2, 0.6], [0.7, 0.05]]]])
    t = torch.tensor([[[[1.0, 1.0], [0.0, 0.0]]], [[[1.0, 0.0], [1.0, 0.0]]]])
    return torch.logit(p), t


def test_tversky_is_one_minus_tp_over_tp_plus_alpha_fp_plus_beta_fn_per_sample() -> None:
    """Soft TP/FP/FN summed per sample, eps=1 on both sides, then the batch mean."""
    x, t = _hand_pair()
    for alpha, beta in ((0.3, 0.7), (0.6, 0.5), (1.0, 1.0)):
        got = tversky_loss(x, t, alpha=alpha, beta=beta).item()
        assert got == pytest.approx(_tversky_by_hand(x, t, alpha, beta), rel=1e-6)


def test_tversky_registered_default_is_alpha_0_3_beta_0_7() -> None:
    """The source gives no default; the registry's plain callable fixes alpha=0.3, beta=0.7."""
    x, t = _hand_pair()
    assert LOSSES.get("tversky")(x, t).item() == pytest.approx(
        _tversky_by_hand(x, t, 0.3, 0.7), rel=1e-6
    )


def test_tversky_alpha_weighs_false_positives_and_beta_false_negatives() -> None:
    """A prediction with only false positives is punished by alpha, one with only misses by beta."""
    t = torch.zeros(1, 1, 4, 4)
    t[..., :2, :] = 1
    fp_only = torch.where(t > 0, BIG, 0.0)  # every target pixel hit, the rest at p = 0.5
    fn_only = torch.where(t > 0, 0.0, -BIG)  # nothing outside, target pixels only at p = 0.5
    fp_heavy = {"alpha": 0.9, "beta": 0.1}
    fn_heavy = {"alpha": 0.1, "beta": 0.9}
    assert tversky_loss(fp_only, t, **fp_heavy) > tversky_loss(fp_only, t, **fn_heavy)
    assert tversky_loss(fn_only, t, **fn_heavy) > tversky_loss(fn_only, t, **fp_heavy)


def test_tversky_with_alpha_beta_half_is_dice_with_doubled_eps() -> None:
    """alpha = beta = 0.5: (TP+e)/((sum p + sum t)/2 + e) is the Dice ratio with smoothing 2e."""
    torch.manual_seed(2)
    x, t = torch.randn(3, 1, 8, 8), torch.rand(3, 1, 8, 8)
    dice = LOSSES.get("dice")(x, t, eps=2.0)
    torch.testing.assert_close(tversky_loss(x, t, alpha=0.5, beta=0.5, eps=1.0), dice)


def _dice_by_hand(x: torch.Tensor, t: torch.Tensor) -> float:
    counts = _soft_counts(torch.sigmoid(x.double()), t.double())
    per = [1 - (2 * tp + 1) / ((tp + fp) + (tp + fn) + 1) for tp, fp, fn in counts]
    return sum(per) / len(per)


def test_bce_dice_is_bce_plus_twice_dice() -> None:
    """The source's BCEDiceLoss: bce + 2 * dice."""
    x, t = _hand_pair()
    want = F.binary_cross_entropy_with_logits(x, t).item() + 2 * _dice_by_hand(x, t)
    assert LOSSES.get("bce_dice")(x, t).item() == pytest.approx(want, rel=1e-6)


def test_bce_tversky_is_bce_plus_twice_tversky_at_the_source_alpha_beta() -> None:
    """The source's BCETverskyLoss: bce + 2 * tversky with its fixed alpha=0.6, beta=0.5."""
    assert (BCE_TVERSKY_ALPHA, BCE_TVERSKY_BETA) == (0.6, 0.5)
    x, t = _hand_pair()
    want = F.binary_cross_entropy_with_logits(x, t).item() + 2 * _tversky_by_hand(x, t, 0.6, 0.5)
    assert LOSSES.get("bce_tversky")(x, t).item() == pytest.approx(want, rel=1e-6)


def test_berhu_is_l1_below_c_and_scaled_l2_above() -> None:
    """e = sigmoid(x) - t, c = 0.2 max|e|: |e| if |e| <= c else (e^2 + c^2) / (2c); the mean."""
    p = torch.tensor([[[[0.50, 0.55], [0.90, 0.40]]], [[[0.52, 0.05], [0.48, 0.70]]]])
    t = torch.tensor([[[[0.50, 0.50], [0.10, 0.45]]], [[[0.50, 0.95], [0.50, 0.30]]]])
    x = torch.logit(p)
    pairs = zip(torch.sigmoid(x).flatten().tolist(), t.flatten().tolist(), strict=True)
    errs = [abs(a - b) for a, b in pairs]
    c = 0.2 * max(errs)
    per = []
    for e in errs:
        if e <= c:
            per.append(e)
        else:
            per.append((e * e + c * c) / (2 * c))
    assert any(e <= c for e in errs) and any(e > c for e in errs)  # both branches exercised
    assert LOSSES.get("berhu")(x, t).item() == pytest.approx(sum(per) / len(per), rel=1e-5)


def test_berhu_threshold_is_detached_so_gradient_is_sign_below_c_and_e_over_c_above() -> None:
    """c is a per-batch constant: d/dp = sign(e) for |e| <= c, e / c above (then times sigmoid')."""
    torch.manual_seed(4)
    x = torch.randn(2, 1, 5, 5, dtype=torch.float64).requires_grad_()
    t = torch.rand(2, 1, 5, 5, dtype=torch.float64)
    LOSSES.get("berhu")(x, t).backward()
    with torch.no_grad():
        p = torch.sigmoid(x).float().double()
        e = p - t.float().double()
        c = 0.2 * e.abs().max()
        d_dp = torch.where(e.abs() <= c, e.sign(), e / c)
        want = d_dp * p * (1 - p) / e.numel()
    torch.testing.assert_close(x.grad, want, rtol=1e-4, atol=1e-7)


def test_berhu_at_an_exact_match_is_zero_with_a_finite_gradient() -> None:
    """max|e| = 0 gives c = 0: the L1 branch everywhere, loss 0, and no 0/0 leaks into the grad."""
    x = torch.randn(2, 1, 6, 6).requires_grad_()
    t = torch.sigmoid(x.detach())
    loss = LOSSES.get("berhu")(x, t)
    loss.backward()
    assert loss.item() == 0.0
    assert x.grad is not None and torch.isfinite(x.grad).all()


def _sobel_by_hand(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised (1/8) 3x3 Sobel x and y derivatives with replicate padding, by explicit shifts."""
    q = F.pad(a, (1, 1, 1, 1), mode="replicate")
    h, w = a.shape[-2:]

    def at(dy: int, dx: int) -> torch.Tensor:
        return q[..., 1 + dy : 1 + dy + h, 1 + dx : 1 + dx + w]

    gx = (at(-1, 1) + 2 * at(0, 1) + at(1, 1) - at(-1, -1) - 2 * at(0, -1) - at(1, -1)) / 8
    gy = (at(1, -1) + 2 * at(1, 0) + at(1, 1) - at(-1, -1) - 2 * at(-1, 0) - at(-1, 1)) / 8
    return gx, gy


def test_grad_is_mean_l1_between_normalised_sobel_xy_gradients() -> None:
    """The source's GradLoss (kornia SpatialGradient: Sobel / 8, replicate padding): the mean of
    |Gx(p) - Gx(t)| and |Gy(p) - Gy(t)| over all pixels and both directions."""
    torch.manual_seed(5)
    x = torch.randn(2, 2, 6, 7, dtype=torch.float64)
    t = torch.rand(2, 2, 6, 7, dtype=torch.float64)
    px, py = _sobel_by_hand(torch.sigmoid(x))
    tx, ty = _sobel_by_hand(t)
    want = (torch.cat([(px - tx).flatten(), (py - ty).flatten()])).abs().mean()
    torch.testing.assert_close(LOSSES.get("grad")(x, t).double(), want, rtol=1e-5, atol=1e-7)


def test_grad_ignores_a_constant_depth_offset_and_sees_edges() -> None:
    """Only gradients count: target + 0.1 costs ~0, a flattened ramp costs clearly more."""
    ramp = torch.linspace(0.2, 0.7, 12).expand(1, 1, 12, 12).contiguous()
    assert LOSSES.get("grad")(_logit(ramp + 0.1), ramp).item() < 1e-5
    flat = torch.full_like(ramp, 0.45)
    assert LOSSES.get("grad")(_logit(flat), ramp).item() > 1e-2


def _ssim_direct(p: torch.Tensor, t: torch.Tensor, win: int) -> torch.Tensor:
    """Textbook SSIM: a full win x win Gaussian (sigma 1.5) window, 'valid' padding, mean map."""
    x = torch.arange(win, dtype=torch.float64) - (win - 1) / 2
    g = torch.exp(-(x**2) / (2 * 1.5**2))
    g = g / g.sum()
    w = (g[:, None] * g[None, :]).view(1, 1, win, win).to(p.dtype)
    mu_p, mu_t = F.conv2d(p, w), F.conv2d(t, w)
    var_p = F.conv2d(p * p, w) - mu_p**2
    var_t = F.conv2d(t * t, w) - mu_t**2
    cov = F.conv2d(p * t, w) - mu_p * mu_t
    c1, c2 = 0.01**2, 0.03**2
    return (
        ((2 * mu_p * mu_t + c1) * (2 * cov + c2))
        / ((mu_p**2 + mu_t**2 + c1) * (var_p + var_t + c2))
    ).mean()


@pytest.mark.parametrize(("name", "win"), [("ssim5", 5), ("ssim11", 11)])
def test_ssim5_and_ssim11_are_one_minus_ssim_over_their_gaussian_window(
    name: str, win: int
) -> None:
    """1 - SSIM (not (1 - SSIM) / 2), win x win Gaussian window, sigma 1.5, 'valid' padding."""
    torch.manual_seed(6)
    x = torch.randn(2, 1, 14, 13, dtype=torch.float64)
    t = torch.rand(2, 1, 14, 13, dtype=torch.float64)
    want = 1 - _ssim_direct(torch.sigmoid(x), t, win)
    torch.testing.assert_close(LOSSES.get(name)(x, t).double(), want, rtol=1e-5, atol=1e-6)


def test_ssim_stays_the_same_function_as_ssim11_bit_for_bit() -> None:
    """Old recipes naming "ssim" must reproduce exactly: it is the 11x11 loss, unchanged."""
    assert LOSSES.get("ssim") is LOSSES.get("ssim11")
    torch.manual_seed(7)
    x, t = torch.randn(2, 1, 16, 16), torch.rand(2, 1, 16, 16)
    assert torch.equal(LOSSES.get("ssim")(x, t), 1 - ssim(torch.sigmoid(x), t))
    assert not torch.equal(LOSSES.get("ssim5")(x, t), LOSSES.get("ssim11")(x, t))


def test_ssim5_works_on_images_too_small_for_the_11x11_window() -> None:
    """The 5x5 window needs H, W >= 5 only; the 11x11 one refuses 8x8 rather than mis-pad."""
    x, t = torch.randn(1, 1, 8, 8), torch.rand(1, 1, 8, 8)
    assert torch.isfinite(LOSSES.get("ssim5")(x, t))
    with pytest.raises(ValueError, match="H, W >= 11"):
        LOSSES.get("ssim11")(x, t)


def _ssim_nchw_reference(p: torch.Tensor, t: torch.Tensor, win: int) -> torch.Tensor:
    """SSIM exactly as workers.losses computed it before its CPU fast path: the five moment maps
    through two NCHW depthwise 1D convs (the values every earlier run, quickstart's included, trained on)."""
    x = torch.arange(win, dtype=torch.float64) - (win - 1) / 2
    g = torch.exp(-(x**2) / (2 * 1.5**2))
    g = (g / g.sum()).to(p.dtype)
    c = p.shape[1]
    k = 5 * c
    maps = torch.cat([p, t, p * p, t * t, p * t], dim=1)
    maps = F.conv2d(maps, g.view(1, 1, 1, -1).expand(k, 1, 1, -1), groups=k)
    maps = F.conv2d(maps, g.view(1, 1, -1, 1).expand(k, 1, -1, 1), groups=k)
    mu_p, mu_t, pp, tt, pt = maps.split(c, dim=1)
    var_p, var_t, cov = pp - mu_p**2, tt - mu_t**2, pt - mu_p * mu_t
    num = (2 * mu_p * mu_t + 0.01**2) * (2 * cov + 0.03**2)
    den = (mu_p**2 + mu_t**2 + 0.01**2) * (var_p + var_t + 0.03**2)
    return (num / den).mean()


@pytest.mark.parametrize("shape", [(16, 1, 128, 128), (32, 1, 32, 32), (3, 2, 40, 29), (2, 1, 11, 11)])
@pytest.mark.parametrize("win", [5, 11])
def test_ssim_fast_path_gives_the_very_bits_of_the_nchw_path_value_and_gradient(shape, win) -> None:
    """The CPU fast path (channels_last depthwise convs, cached kernels) changes no bit of the loss
    or of its gradient, so runs that trained with SSIM before (quickstart) reproduce bit for bit."""
    torch.manual_seed(sum(shape) + win)
    x, t = torch.randn(shape), torch.rand(shape)
    got_x, want_x = x.clone().requires_grad_(), x.clone().requires_grad_()
    got = 1 - ssim(torch.sigmoid(got_x), t, window=win)
    want = 1 - _ssim_nchw_reference(torch.sigmoid(want_x), t, win)
    got.backward()
    want.backward()
    assert torch.equal(got, want)
    assert torch.equal(got_x.grad, want_x.grad)
