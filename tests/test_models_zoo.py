"""Rules for the model zoo (basenet, resnet18_seg, mobilenetv2_depth) and `model.init_from`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from workers.models import build_model, count_params, model_task, model_variants
from workers.models.pretrained import init_from

ZOO = ("basenet", "resnet18_seg", "mobilenetv2_depth")
# The torchvision state_dicts (key, shape) these encoders must equal, recorded from
# torchvision's own model definitions (see "about" in the file).
TORCHVISION = json.loads(
    (Path(__file__).parent / "fixtures" / "torchvision_state_dicts.json").read_text()
)

# Every variant's parameter count (dataset defaults: basenet 1 in / 10 classes, seg 3 in / 6).
PARAMS = {
    ("basenet", "baseline"): 4_414,
    ("basenet", "bn"): 4_474,
    ("basenet", "dropout"): 4_474,
    ("basenet", "deep"): 268_126,
    ("basenet", "best"): 744_394,
    ("resnet18_seg", "baseline"): 11_179_590,
    ("resnet18_seg", "dilated"): 13_539_398,
    ("resnet18_seg", "dilated_bn"): 13_540_422,
    ("resnet18_seg", "best"): 18_262_086,
    ("mobilenetv2_depth", "full"): 13_143_057,
    ("mobilenetv2_depth", "cpu"): 1_953_843,
}


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def _recorded(name: str, drop: tuple[str, ...] = ()) -> list[tuple[str, tuple[int, ...]]]:
    return [(k, tuple(s)) for k, s in TORCHVISION[name]["state_dict"] if not k.startswith(drop)]


def _shapes(module: nn.Module, prefix: str = "") -> list[tuple[str, tuple[int, ...]]]:
    return [(prefix + k, tuple(v.shape)) for k, v in module.state_dict().items()]


def _n(shapes: list[tuple[str, tuple[int, ...]]]) -> int:
    """Parameters in a recorded list: BN buffers (running stats, counters) are not parameters."""
    buffers = ("running_mean", "running_var", "num_batches_tracked")
    return sum(torch.Size(s).numel() for k, s in shapes if not k.endswith(buffers))


def _fake_checkpoint(name: str, skip: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    """A state_dict shaped like torchvision's `name`, head included, with random values."""
    return {
        k: torch.randint(0, 9, s) if k.endswith("num_batches_tracked") else torch.randn(s)
        for k, s in _recorded(name)
        if not k.endswith(skip)
    }


def test_basenet_best_has_exactly_the_reports_744394_params() -> None:
    assert count_params(build_model("basenet", "best")) == 744_394


def test_resnet18_seg_best_has_exactly_the_reports_18262086_params() -> None:
    assert count_params(build_model("resnet18_seg", "best")) == 18_262_086


@pytest.mark.parametrize(("name", "variant"), sorted(PARAMS))
def test_every_variant_builds_with_its_recorded_param_count(name: str, variant: str) -> None:
    n = count_params(build_model(name, variant))
    print(f"{name}/{variant}: {n:,} parameters")
    assert n == PARAMS[(name, variant)]


def test_every_variant_is_listed_and_tasks_are_declared() -> None:
    assert {(n, v) for n in ZOO for v in model_variants(n)} == set(PARAMS)
    assert [model_task(n) for n in ZOO] == ["classification", "segmentation", "depth"]


def test_basenet_ablation_rows_add_one_change_each_in_the_reports_order() -> None:
    variants = model_variants("basenet")
    assert list(variants) == ["baseline", "bn", "dropout", "deep", "best"]
    rows = list(variants.values())
    for before, after in zip(rows, rows[1:], strict=False):
        assert len(after) == len(before) + 1
        assert all(after[k] == v for k, v in before.items())
    assert model_variants("basenet")["best"] == {
        "batchnorm": True,
        "dropout": 0.2,
        "hidden": [512, 256, 128],
        "channels": [32, 64],
    }


def test_basenet_output_is_batch_by_classes_at_28px_and_other_sizes() -> None:
    assert build_model("basenet", "best").eval()(torch.randn(2, 1, 28, 28)).shape == (2, 10)
    model = build_model("basenet", "best", {"image_size": 32}, in_channels=3, num_classes=7).eval()
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 7)
    assert model.in_features == 64 * 5 * 5


def test_basenet_rejects_an_image_too_small_for_its_conv_stages() -> None:
    with pytest.raises(ValueError, match="image_size 12"):
        build_model("basenet", options={"image_size": 12})


def test_resnet18_seg_output_is_full_resolution_logits_for_every_variant() -> None:
    x = torch.randn(2, 3, 64, 64)
    for variant in model_variants("resnet18_seg"):
        assert build_model("resnet18_seg", variant).eval()(x).shape == (2, 6, 64, 64), variant
    model = build_model("resnet18_seg", "best", num_classes=4, in_channels=1).eval()
    assert model(torch.randn(1, 1, 64, 96)).shape == (1, 4, 64, 96)


def test_resnet18_seg_best_upsamples_x2_then_x4_then_x4_like_the_report() -> None:
    head = build_model("resnet18_seg", "best").decoder
    assert head.factors == [2, 4, 1]
    assert [type(m) for m in head.blocks[0]] == [nn.Conv2d, nn.BatchNorm2d, nn.ReLU]
    assert head.blocks[0][0].dilation == (2, 2)
    assert build_model("resnet18_seg", "dilated").decoder.factors == [1]


def test_mobilenetv2_depth_predicts_one_channel_at_half_resolution() -> None:
    for variant in model_variants("mobilenetv2_depth"):
        out = build_model("mobilenetv2_depth", variant).eval()(torch.randn(2, 3, 64, 64))
        assert out.shape == (2, 1, 32, 32), variant


def test_mobilenetv2_depth_decoder_has_the_public_models_layer_names_and_shapes() -> None:
    convs = {
        n: tuple(m.weight.shape)
        for n, m in build_model("mobilenetv2_depth").named_modules()
        if isinstance(m, nn.Conv2d) and n.startswith("decoder.")
    }
    # decoder width 0.6 of 1280 = 768; skips of 320, 160, 64, 32, 24 and 16 channels.
    assert convs == {
        "decoder.conv2": (768, 1280, 1, 1),
        "decoder.up0.convA": (384, 768 + 320, 3, 3),
        "decoder.up0.convB": (384, 384, 3, 3),
        "decoder.up1.convA": (384, 384 + 160, 3, 3),
        "decoder.up1.convB": (384, 384, 3, 3),
        "decoder.up2.convA": (192, 384 + 64, 3, 3),
        "decoder.up2.convB": (192, 192, 3, 3),
        "decoder.up3.convA": (96, 192 + 32, 3, 3),
        "decoder.up3.convB": (96, 96, 3, 3),
        "decoder.up4.convA": (96, 96 + 24, 3, 3),
        "decoder.up4.convB": (96, 96, 3, 3),
        "decoder.up5.convA": (48, 96 + 16, 3, 3),
        "decoder.up5.convB": (48, 48, 3, 3),
        "decoder.conv3": (1, 48, 3, 3),
    }


def test_recorded_torchvision_lists_add_up_to_torchvisions_param_counts() -> None:
    assert _n(_recorded("resnet18")) == TORCHVISION["resnet18"]["params"] == 11_689_512
    assert _n(_recorded("resnet18", drop=("fc.",))) == 11_689_512 - 513_000
    assert _n(_recorded("mobilenet_v2")) == TORCHVISION["mobilenet_v2"]["params"] == 3_504_872
    assert (
        _n(_recorded("mobilenet_v2", drop=("classifier.",))) == 3_504_872 - 1_281_000 == 2_223_872
    )


def test_resnet18_encoder_state_dict_equals_torchvision_resnet18_without_fc() -> None:
    encoder = build_model("resnet18_seg", "best").encoder
    assert _shapes(encoder) == _recorded("resnet18", drop=("fc.",))
    assert count_params(encoder) == 11_176_512


@pytest.mark.parametrize(
    ("width", "recorded"), [(1.0, "mobilenet_v2"), (0.35, "mobilenet_v2_width0.35")]
)
def test_mobilenetv2_encoder_state_dict_equals_torchvision_features(
    width: float, recorded: str
) -> None:
    encoder = build_model("mobilenetv2_depth", options={"width": width}).encoder
    assert _shapes(encoder) == _recorded(recorded, drop=("classifier.",))
    if width == 1.0:
        assert count_params(encoder) == 2_223_872


@pytest.mark.parametrize(
    ("name", "recorded", "head"),
    [("resnet18_seg", "resnet18", "fc."), ("mobilenetv2_depth", "mobilenet_v2", "classifier.")],
)
def test_init_from_a_torchvision_checkpoint_loads_the_encoder_and_drops_the_head(
    tmp_path: Path, name: str, recorded: str, head: str
) -> None:
    checkpoint = _fake_checkpoint(recorded)
    path = tmp_path / f"{recorded}.pth"
    torch.save(checkpoint, path)
    model = build_model(name)
    decoder_before = {k: v.clone() for k, v in model.decoder.state_dict().items()}
    assert init_from(model, path) == "encoder"
    for key, value in model.encoder.state_dict().items():
        assert torch.equal(value, checkpoint[key]), key
    for key, value in model.decoder.state_dict().items():
        assert torch.equal(value, decoder_before[key]), key
    assert any(k.startswith(head) for k in checkpoint)


def test_init_from_accepts_old_checkpoints_without_bn_counters_and_wrapped_ones(
    tmp_path: Path,
) -> None:
    checkpoint = _fake_checkpoint("resnet18", skip=("num_batches_tracked",))
    torch.save({"state_dict": checkpoint, "epoch": 3}, tmp_path / "a.pth")
    model = build_model("resnet18_seg", "baseline")
    assert init_from(model, tmp_path / "a.pth") == "encoder"
    assert torch.equal(model.encoder.conv1.weight, checkpoint["conv1.weight"])
    assert int(model.encoder.bn1.num_batches_tracked) == 0


def test_init_from_a_whole_model_or_run_checkpoint_loads_every_tensor(tmp_path: Path) -> None:
    source = build_model("basenet", "best")
    for p in source.parameters():
        nn.init.normal_(p)
    # the layout of a run checkpoint's state.pt: the weights under "model", beside the rest
    state = {"cursor": {"stage": 1}, "model": source.state_dict(), "rng": {"torch": torch.ones(3)}}
    torch.save(state, tmp_path / "m.pt")
    target = build_model("basenet", "best")
    assert init_from(target, tmp_path / "m.pt") == "model"
    for (k, a), b in zip(source.state_dict().items(), target.state_dict().values(), strict=True):
        assert torch.equal(a, b), k


def test_init_from_another_zoo_model_with_the_same_encoder_loads_the_encoder(
    tmp_path: Path,
) -> None:
    source = build_model("resnet18_seg", "baseline")
    nn.init.normal_(source.encoder.conv1.weight)
    torch.save(source.state_dict(), tmp_path / "baseline.pt")
    target = build_model("resnet18_seg", "best")
    assert init_from(target, tmp_path / "baseline.pt") == "encoder"
    assert torch.equal(target.encoder.conv1.weight, source.encoder.conv1.weight)


def test_init_from_a_file_that_does_not_fit_names_the_path_and_the_mismatch(tmp_path: Path) -> None:
    path = tmp_path / "basenet.pt"
    torch.save(build_model("basenet").state_dict(), path)
    with pytest.raises(ValueError, match=rf"{path}.*missing.*unexpected") as info:
        init_from(build_model("resnet18_seg"), path)
    assert "\n" not in str(info.value)


def test_init_from_a_wrong_shape_names_the_path_and_the_tensor(tmp_path: Path) -> None:
    path = tmp_path / "r18.pth"
    torch.save(_fake_checkpoint("resnet18"), path)
    with pytest.raises(ValueError, match=rf"{path}.*conv1.weight.*in_channels"):
        init_from(build_model("resnet18_seg", in_channels=1), path)


@pytest.mark.parametrize("content", [None, b"not a checkpoint", "list", "dir"])
def test_init_from_a_missing_or_non_checkpoint_file_is_a_valueerror_naming_it(
    tmp_path: Path, content: object
) -> None:
    path = tmp_path / "weights.pt"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content == "list":
        torch.save([torch.zeros(1)], path)
    elif content == "dir":
        path.mkdir()
    with pytest.raises(ValueError, match=str(path)):
        init_from(build_model("basenet"), path)


@pytest.mark.parametrize(("name", "variant"), sorted(PARAMS))
def test_parts_cover_every_parameter_exactly_once(name: str, variant: str) -> None:
    model = build_model(name, variant)
    ids = [id(p) for part in model.parts().values() for p in part.parameters()]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))
    assert set(ids) == {id(p) for p in model.parameters()}


def test_freezing_the_encoder_leaves_only_the_decoder_trainable() -> None:
    for name in ("resnet18_seg", "mobilenetv2_depth"):
        model = build_model(name)
        model.set_trainable(["decoder"])
        model.train()
        assert count_params(model, trainable_only=True) == count_params(model.decoder)
        assert not any(m.training for m in model.encoder.modules() if isinstance(m, nn.BatchNorm2d))


@pytest.mark.parametrize(
    ("name", "variant", "x", "target"),
    [
        ("basenet", "best", (4, 1, 28, 28), "classes"),
        ("basenet", "baseline", (4, 1, 28, 28), "classes"),
        ("resnet18_seg", "best", (2, 3, 64, 64), "mask"),
        ("resnet18_seg", "baseline", (2, 3, 64, 64), "mask"),
        ("mobilenetv2_depth", "cpu", (2, 3, 64, 64), "depth"),
        ("mobilenetv2_depth", "full", (2, 3, 64, 64), "depth"),
    ],
)
def test_one_training_step_on_cpu_changes_the_weights(
    name: str, variant: str, x: tuple[int, ...], target: str
) -> None:
    model = build_model(name, variant).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    before = [p.detach().clone() for p in model.parameters()]
    out = model(torch.randn(x))
    if target == "classes":
        loss = F.cross_entropy(out, torch.randint(0, 10, (x[0],)))
    elif target == "mask":
        loss = F.cross_entropy(out, torch.randint(0, 6, (x[0], *x[2:])))
    else:
        loss = F.l1_loss(out, torch.rand(x[0], 1, x[2] // 2, x[3] // 2))
    opt.zero_grad()
    loss.backward()
    opt.step()
    assert torch.isfinite(loss)
    assert all(p.grad is not None for p in model.parameters())
    assert sum(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True)) > 0
