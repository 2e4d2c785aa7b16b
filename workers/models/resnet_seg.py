"""ResNet18 segmentation: a ResNet18 encoder (torchvision's parameter names) and a small head.

`model.encoder.state_dict()` has exactly torchvision's `resnet18()` keys and shapes less `fc.*`
(conv1, bn1, layer1.0.conv1, ..., layer2.0.downsample.0/1, ..., layer4.1.bn2), so a torchvision
checkpoint loads into it (`model.init_from`, see pretrained.py): 11,176,512 parameters.

Heads (`head`), named variants by the rows of the source's segmentation ablation:
  baseline    "linear": 1x1 conv 512 -> classes at stride 32, bilinear x32:      11,179,590
  dilated     "dilated": one dilated 3x3 conv 512 -> 512 + ReLU, then as baseline: 13,539,398
  dilated_bn  the same with BatchNorm after the dilated conv:                      13,540,422
  best        three dilated conv+BN+ReLU layers, upsampling step by step
              (x2 after the first, x4 after the second), the 1x1 classifier
              at stride 4, bilinear x4 to the input size:                          18,262,086
(parameter counts at num_classes=6). The data-augmentation row is a data setting.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from workers.models.parts import FreezableParts
from workers.models.registry import MODELS

# Upsampling factors after the first, second, ... dilated conv when `stepwise`; whatever of the
# x32 is left is done at the end, on the class logits.
STEPWISE_FACTORS = (2, 4)


class BasicBlock(nn.Module):
    """Two 3x3 conv+BN with an identity (or 1x1 conv+BN `downsample`) shortcut."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample: nn.Module | None = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class ResNet18Encoder(nn.Module):
    """ResNet18 up to layer4 (stride 32, 512 channels); no pooling, no fc."""

    out_channels = 512

    def __init__(self, in_channels: int = 3) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        widths, cin = (64, 128, 256, 512), 64
        for i, cout in enumerate(widths, start=1):
            stride = 1 if i == 1 else 2
            self.add_module(
                f"layer{i}", nn.Sequential(BasicBlock(cin, cout, stride), BasicBlock(cout, cout))
            )
            cin = cout
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))


class SegHead(nn.Module):
    """Optional dilated 3x3 conv blocks (with in-between upsampling), a 1x1 classifier, and a
    bilinear upsample of the logits to the input size."""

    def __init__(
        self,
        cin: int,
        num_classes: int,
        convs: int,
        batchnorm: bool,
        stepwise: bool,
        dilation: int,
    ) -> None:
        super().__init__()
        blocks = []
        for _ in range(convs):
            layers: list[nn.Module] = [nn.Conv2d(cin, cin, 3, padding=dilation, dilation=dilation)]
            if batchnorm:
                layers.append(nn.BatchNorm2d(cin))
            layers.append(nn.ReLU(inplace=True))
            blocks.append(nn.Sequential(*layers))
        self.blocks = nn.ModuleList(blocks)
        factors = list(STEPWISE_FACTORS) if stepwise else []
        self.factors = [
            factors[i] if i < len(factors) and i < convs - 1 else 1 for i in range(convs)
        ]
        self.classifier = nn.Conv2d(cin, num_classes, 1)

    def forward(self, x: Tensor, size: tuple[int, int]) -> Tensor:
        for block, factor in zip(self.blocks, self.factors, strict=True):
            x = block(x)
            if factor > 1:
                x = F.interpolate(x, scale_factor=factor, mode="bilinear", align_corners=False)
        x = self.classifier(x)
        return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


@MODELS.register("resnet18_seg")
class ResNet18Seg(FreezableParts):
    """Semantic segmentation: B x C x H x W -> B x num_classes x H x W logits; parts: encoder,
    decoder.

    H and W should be multiples of 32 (the encoder's stride); the last upsample goes to the input
    size, so other sizes run too, with a slightly uneven last step. `convs`, `batchnorm`,
    `stepwise` and `dilation` shape the "dilated" head and are ignored by the "linear" one.
    """

    task = "segmentation"
    variants: dict = {
        "baseline": {"head": "linear"},
        "dilated": {"head": "dilated", "convs": 1, "batchnorm": False, "stepwise": False},
        "dilated_bn": {"head": "dilated", "convs": 1, "batchnorm": True, "stepwise": False},
        "best": {"head": "dilated", "convs": 3, "batchnorm": True, "stepwise": True},
    }

    def __init__(
        self,
        in_channels: int = 3,
        num_classes: int = 6,
        head: str = "linear",
        convs: int = 3,
        batchnorm: bool = True,
        stepwise: bool = True,
        dilation: int = 2,
    ) -> None:
        super().__init__()
        if head not in ("linear", "dilated"):
            raise ValueError(f"resnet18_seg: head must be 'linear' or 'dilated', got {head!r}")
        if head == "dilated" and convs < 1:
            raise ValueError(f"resnet18_seg: a 'dilated' head needs convs >= 1, got {convs}")
        self.encoder = ResNet18Encoder(in_channels)
        self.decoder = SegHead(
            ResNet18Encoder.out_channels,
            num_classes,
            convs=convs if head == "dilated" else 0,
            batchnorm=batchnorm,
            stepwise=stepwise,
            dilation=dilation,
        )

    def parts(self) -> dict[str, nn.Module]:
        return {"encoder": self.encoder, "decoder": self.decoder}

    def forward(self, x: Tensor) -> Tensor:
        return self.decoder(self.encoder(x), size=(x.shape[-2], x.shape[-1]))
