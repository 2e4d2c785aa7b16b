"""Rules for the ResUNet / ResUNeXt mask+depth models: exact sizes, shapes, parts, training."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from workers.models import MODELS, build_model, count_params
from workers.models.resunet import ResUNet, ResUNeXt

# The source library's published totals at the default constructor.
SOURCE_PARAMS = {ResUNet: 15_855_712, ResUNeXt: 16_409_856}
SMALL = 0.25
BOTH = pytest.mark.parametrize("cls", [ResUNet, ResUNeXt], ids=lambda c: c.__name__)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@BOTH
def test_default_param_count_equals_source_exactly(cls: type) -> None:
    """Any conv, BN or bias that differs from the source's layer tables changes this count."""
    n = count_params(cls())
    print(f"{cls.__name__}: {n:,} parameters")
    assert n == SOURCE_PARAMS[cls]


@BOTH
def test_registry_builds_both_names_with_task_and_cpu_variant(cls: type) -> None:
    """A recipe names "resunet"/"resunext" (task mask_depth); the "cpu" variant is the small one."""
    name = {ResUNet: "resunet", ResUNeXt: "resunext"}[cls]
    assert MODELS.get(name) is cls and cls.task == "mask_depth"
    model = build_model(name, "cpu")
    assert isinstance(model, cls)
    assert count_params(model) == count_params(cls(width=SMALL))


@BOTH
@pytest.mark.parametrize("size", [(64, 64), (64, 128)], ids=["64x64", "64x128"])
def test_output_is_two_channel_logits_at_input_size(cls: type, size: tuple[int, int]) -> None:
    """The mask_depth task needs B x 2 x H x W (mask, depth), square or not."""
    model = cls(width=SMALL).eval()
    with torch.no_grad():
        out = model(torch.rand(2, 6, *size))
    assert out.shape == (2, 2, *size)


def test_input_size_not_divisible_by_16_is_rejected_with_its_size() -> None:
    """Four poolings need H, W divisible by 16; anything else must fail clearly, not misalign."""
    with pytest.raises(ValueError, match="divisible by 16"):
        ResUNet(width=SMALL)(torch.rand(1, 6, 56, 64))


def test_depth_output_depends_on_mask_decoder_features() -> None:
    """The depth decoder adds the mask decoder's block outputs: perturbing them moves depth."""
    model = ResUNet(width=SMALL).eval()
    x = torch.rand(1, 6, 64, 64)
    with torch.no_grad():
        before = model(x)
        model.mask_decoder.ups[0].conv.body[-1].weight.add_(1.0)
        after = model(x)
    assert not torch.allclose(before[:, 1], after[:, 1])


@BOTH
def test_parts_cover_every_parameter_exactly_once(cls: type) -> None:
    """A parameter in no part (or in two) would escape (or break) freezing by part."""
    model = cls(width=SMALL)
    assert set(model.parts()) == {"encoder", "mask_decoder", "depth_decoder"}
    seen = [id(p) for part in model.parts().values() for p in part.parameters()]
    assert len(seen) == len(set(seen))
    assert set(seen) == {id(p) for p in model.parameters()}


@BOTH
def test_training_only_encoder_leaves_decoders_without_grad(cls: type) -> None:
    """set_trainable(["encoder"]) must freeze both decoders, BN statistics included."""
    model = cls(width=SMALL)
    model.set_trainable(["encoder"])
    model.train()
    model(torch.rand(2, 6, 32, 32)).square().mean().backward()
    for name in ("mask_decoder", "depth_decoder"):
        part = model.parts()[name]
        assert all(p.grad is None and not p.requires_grad for p in part.parameters()), name
        assert not any(m.training for m in part.modules() if isinstance(m, torch.nn.BatchNorm2d))
    assert all(p.grad is not None for p in model.encoder.parameters())


@BOTH
def test_width_quarter_shrinks_params_more_than_8x(cls: type) -> None:
    """The CPU-sized variant must actually be small (channels / 4 -> ~16x fewer params)."""
    assert count_params(cls(width=SMALL)) * 8 < count_params(cls())


@BOTH
def test_gradient_steps_reduce_mse_on_a_fixed_batch(cls: type) -> None:
    """Sanity that gradients flow to the output: a few Adam steps lower the loss."""
    model = cls(width=SMALL).train()
    x, y = torch.rand(4, 6, 32, 32), torch.rand(4, 2, 32, 32)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(5):
        opt.zero_grad()
        loss = F.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0], losses
