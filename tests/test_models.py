"""Rules for workers.models: param counts vs the source, shapes, zero-init equivalence, freezing."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from common.registry import UnknownNameError
from workers.models import MODELS, UNet56, UNet224, build_model, count_params

SOURCE_SPINE_PARAMS = 17.3e6
SOURCE_FULL_PARAMS = 17_532_622
SMALL = 0.125


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def test_registry_names_both_models_and_rejects_unknown() -> None:
    """A recipe naming "unet224"/"unet56" would fail to build; a typo would pass silently."""
    assert {"unet56", "unet224"} <= set(MODELS.names())
    assert isinstance(build_model("unet224", width=SMALL), UNet224)
    with pytest.raises(UnknownNameError, match="unet224"):
        build_model("unet225")


def test_unet56_params_within_2pct_of_source() -> None:
    """The spine must be the source's ~17.3M-param Unet-56, not a different architecture."""
    n = count_params(UNet56())
    assert abs(n - SOURCE_SPINE_PARAMS) / SOURCE_SPINE_PARAMS < 0.02, n


def test_unet224_params_within_2pct_of_source() -> None:
    """head + spine + tail must match the source's 17,532,622 params (within 2%)."""
    model = UNet224()
    n = count_params(model)
    assert abs(n - SOURCE_FULL_PARAMS) / SOURCE_FULL_PARAMS < 0.02, n
    # The three parts own every parameter, or freezing by part would miss some.
    assert sum(count_params(p) for p in model.parts().values()) == n


def test_width_shrinks_every_channel_count() -> None:
    """A CPU smoke run at width 0.125 must actually be small (~64x fewer params)."""
    assert count_params(UNet56(width=SMALL)) < count_params(UNet56()) / 40


def test_spine_output_shape_at_multiple_of_16_and_at_source_56px() -> None:
    """Stage 1 trains the spine at 56 px (not a multiple of 16) and must get 2xHxW back."""
    model = UNet56(width=SMALL).eval()
    for size in (32, 56):
        out = model(torch.rand(2, 6, size, size))
        assert out.shape == (2, 2, size, size)


def test_unet224_paths_give_full_resolution_two_channel_output() -> None:
    """path="full" maps 6xHxW -> 2xHxW (224 is the source size); path="spine" runs the spine alone."""
    model = UNet224(width=SMALL).eval()
    with torch.no_grad():
        assert model(torch.rand(2, 6, 64, 64)).shape == (2, 2, 64, 64)
        assert model(torch.rand(1, 6, 224, 224)).shape == (1, 2, 224, 224)
        assert model(torch.rand(2, 6, 32, 32), path="spine").shape == (2, 2, 32, 32)
    with pytest.raises(ValueError, match="path"):
        model(torch.rand(1, 6, 64, 64), path="tail")
    with pytest.raises(ValueError, match="divisible by 4"):
        model(torch.rand(1, 6, 66, 66))


@pytest.mark.parametrize("train_mode", [False, True])
def test_unet224_at_init_equals_spine_on_pooled_input_upsampled_x4(train_mode: bool) -> None:
    """Stage 2 must start from the stage-1 spine's predictions, not from noise (zero-init head/tail residuals)."""
    model = UNet224(width=SMALL).train(train_mode)
    x = torch.rand(2, 6, 64, 64)
    with torch.no_grad():
        full = model(x)
        spine = model(F.avg_pool2d(x, 4), path="spine")
    expected = F.interpolate(spine, size=(64, 64), mode="bilinear", align_corners=False)
    torch.testing.assert_close(full, expected, rtol=0, atol=1e-6)


def _bn_stats(module: nn.Module) -> list[torch.Tensor]:
    return [
        t.clone()
        for m in module.modules()
        if isinstance(m, nn.BatchNorm2d)
        for t in (m.running_mean, m.running_var)
    ]


def test_set_trainable_freezes_exactly_the_other_parts_and_their_bn_stats() -> None:
    """Stage 2 ("freeze all spine layers") would silently drift the spine via BN running stats."""
    model = UNet224(width=SMALL)
    model.set_trainable(["head", "tail"])
    model.train()  # train() re-applies the freeze; callers may call it after set_trainable
    for name, part in model.parts().items():
        flags = {p.requires_grad for p in part.parameters()}
        assert flags == {name != "spine"}, name
        bn_modes = {m.training for m in part.modules() if isinstance(m, nn.BatchNorm2d)}
        assert bn_modes == {name != "spine"}, name

    spine_before, head_before = _bn_stats(model.spine), _bn_stats(model.head)
    out = model(torch.rand(2, 6, 64, 64))
    out.mean().backward()
    for a, b in zip(spine_before, _bn_stats(model.spine), strict=True):
        assert torch.equal(a, b)
    assert any(
        not torch.equal(a, b) for a, b in zip(head_before, _bn_stats(model.head), strict=True)
    )
    assert all(p.grad is None for p in model.spine.parameters())
    assert model.tail.proj.weight.grad is not None


def test_set_trainable_all_unfreezes_everything() -> None:
    """Stage 3 ("unfreeze all layers") must train every part with live BN again."""
    model = UNet224(width=SMALL)
    model.set_trainable(["tail"])
    model.set_trainable(["all"])
    model.train()
    assert all(p.requires_grad for p in model.parameters())
    assert all(m.training for m in model.modules())
    with pytest.raises(ValueError, match="valid"):
        model.set_trainable(["neck"])
