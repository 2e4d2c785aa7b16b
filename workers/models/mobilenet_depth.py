"""MobileNetV2 depth: a MobileNetV2 encoder (torchvision's names) and a DenseDepth-style decoder.

Encoder: `model.encoder.state_dict()` has exactly the keys and shapes of torchvision's
`mobilenet_v2(width_mult=width).features` with the "features." prefix (features.0.0.weight,
features.1.conv.0.0.weight, ..., features.18.1.running_var): 2,223,872 parameters at width 1.
A torchvision checkpoint therefore loads into it (`model.init_from`, see pretrained.py).

Decoder (the layout of alinstein/Depth_estimation's MobileNetV2 model, a DenseDepth variant;
module names decoder.conv2, decoder.up0..up5 .convA/.convB, decoder.conv3):
  conv2   1x1 conv on the last encoder map (1280 ch, stride 32) to f = 0.6 x 1280 = 768 ch
  up0..5  each: bilinear resize to a skip's size, concat the skip, 3x3 convA + LeakyReLU(0.2),
          3x3 convB + LeakyReLU(0.2); the skips are the outputs of encoder features 17 (320 ch,
          stride 32), 14 (160, /32), 8 (64, /16), 5 (32, /8), 3 (24, /4) and 1 (16, /2), and the
          widths f/2, f/2, f/4, f/8, f/8, f/16
  conv3   3x3 conv to one channel.
The prediction is at half the input resolution: B x 1 x H/2 x W/2 for H, W multiples of 32
(in general the size of encoder feature 1, ceil(H/2) x ceil(W/2)); the training task upsamples it.

One deviation from that model: its conv2 is a 1x1 conv with padding 1, which only adds a border
of bias values that the next resize smears in; here it has no padding (same parameters).

Parameters at width 1: encoder 2,223,872 + decoder 10,919,185 = 13,143,057 (the public model
also holds the unused ImageNet classifier of mobilenet_v2, 1,281,000 more).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from workers.models.parts import FreezableParts
from workers.models.registry import MODELS

# MobileNetV2's bottleneck table: expansion t, output channels c, repeats n, first stride s.
INVERTED_RESIDUAL_SETTING = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)
# Encoder feature indices whose outputs feed the decoder: the skip of up5 .. up0, then the input
# of conv2 (the last, 1x1 conv layer).
SKIPS = (1, 3, 5, 8, 14, 17)
BOTTOM = 18


def make_divisible(value: float, divisor: int = 8) -> int:
    """Round a channel count to a multiple of `divisor`, never more than 10% down (torchvision's
    rule for `width_mult`)."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * value:
        rounded += divisor
    return rounded


class ConvBNReLU6(nn.Sequential):
    """Conv (no bias, 'same' padding) -> BatchNorm -> ReLU6, as children 0, 1, 2."""

    def __init__(
        self, cin: int, cout: int, kernel_size: int = 3, stride: int = 1, groups: int = 1
    ) -> None:
        super().__init__(
            nn.Conv2d(
                cin, cout, kernel_size, stride, (kernel_size - 1) // 2, groups=groups, bias=False
            ),
            nn.BatchNorm2d(cout),
            nn.ReLU6(inplace=True),
        )


class InvertedResidual(nn.Module):
    """[1x1 expand conv] -> 3x3 depthwise conv -> 1x1 linear projection + BN, all in `conv`;
    a residual connection when the shape is kept."""

    def __init__(self, cin: int, cout: int, stride: int, expand_ratio: int) -> None:
        super().__init__()
        hidden = int(round(cin * expand_ratio))
        self.use_res_connect = stride == 1 and cin == cout
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers.append(ConvBNReLU6(cin, hidden, kernel_size=1))
        layers += [
            ConvBNReLU6(hidden, hidden, stride=stride, groups=hidden),
            nn.Conv2d(hidden, cout, 1, bias=False),
            nn.BatchNorm2d(cout),
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


class MobileNetV2Encoder(nn.Module):
    """MobileNetV2's `features` (19 layers, stride 32); forward returns the outputs that the
    decoder taps (SKIPS, then BOTTOM)."""

    def __init__(self, width_mult: float = 1.0, in_channels: int = 3) -> None:
        super().__init__()
        cin = make_divisible(32 * width_mult)
        self.last_channel = make_divisible(1280 * max(1.0, width_mult))
        layers: list[nn.Module] = [ConvBNReLU6(in_channels, cin, stride=2)]
        for t, c, n, s in INVERTED_RESIDUAL_SETTING:
            cout = make_divisible(c * width_mult)
            for i in range(n):
                layers.append(InvertedResidual(cin, cout, s if i == 0 else 1, t))
                cin = cout
        layers.append(ConvBNReLU6(cin, self.last_channel, kernel_size=1))
        self.features = nn.Sequential(*layers)
        self.channels = {i: self._out_channels(i) for i in (*SKIPS, BOTTOM)}
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def _out_channels(self, index: int) -> int:
        layer = self.features[index]
        convs = [m for m in layer.modules() if isinstance(m, nn.Conv2d)]
        return convs[-1].out_channels

    def forward(self, x: Tensor) -> list[Tensor]:
        taps = set(SKIPS) | {BOTTOM}
        out = []
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in taps:
                out.append(x)
        return out


class UpSample(nn.Module):
    """Resize to the skip's size, concat it, then two 3x3 conv + LeakyReLU(0.2)."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.convA = nn.Conv2d(cin, cout, 3, padding=1)
        self.convB = nn.Conv2d(cout, cout, 3, padding=1)
        self.act = nn.LeakyReLU(0.2)

    def forward(self, x: Tensor, skip: Tensor) -> Tensor:
        x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=True)
        x = self.act(self.convA(torch.cat([x, skip], dim=1)))
        return self.act(self.convB(x))


class DepthDecoder(nn.Module):
    def __init__(self, channels: dict[int, int], features: int) -> None:
        super().__init__()
        f = features
        widths = [max(1, f // d) for d in (2, 2, 4, 8, 8, 16)]
        self.conv2 = nn.Conv2d(channels[BOTTOM], f, 1)
        cin = f
        for i, (skip, cout) in enumerate(zip(reversed(SKIPS), widths, strict=True)):
            self.add_module(f"up{i}", UpSample(cin + channels[skip], cout))
            cin = cout
        self.conv3 = nn.Conv2d(cin, 1, 3, padding=1)

    def forward(self, feats: list[Tensor]) -> Tensor:
        *skips, bottom = feats
        x = self.conv2(bottom)
        for i, skip in enumerate(reversed(skips)):
            x = getattr(self, f"up{i}")(x, skip)
        return self.conv3(x)


@MODELS.register("mobilenetv2_depth")
class MobileNetV2Depth(FreezableParts):
    """Monocular depth: B x C x H x W -> B x 1 x H/2 x W/2 (half resolution, see module doc);
    parts: encoder, decoder.

    `width` scales both halves: the encoder is torchvision's mobilenet_v2(width_mult=width)
    (channels rounded to multiples of 8; the last layer keeps 1280 below width 1), and the
    decoder's first width is round(1280 x decoder_width x width). Variant "cpu" (width 0.35)
    trains at 64-96 px on a CPU.
    """

    task = "depth"
    variants: dict = {
        "full": {"width": 1.0},
        "cpu": {"width": 0.35},
    }

    def __init__(
        self, in_channels: int = 3, width: float = 1.0, decoder_width: float = 0.6
    ) -> None:
        super().__init__()
        if width <= 0 or decoder_width <= 0:
            raise ValueError(
                "mobilenetv2_depth: width and decoder_width must be > 0, "
                f"got {width} and {decoder_width}"
            )
        self.encoder = MobileNetV2Encoder(width, in_channels)
        features = max(16, int(round(1280 * decoder_width * width)))
        self.decoder = DepthDecoder(self.encoder.channels, features)

    def parts(self) -> dict[str, nn.Module]:
        return {"encoder": self.encoder, "decoder": self.decoder}

    def forward(self, x: Tensor) -> Tensor:
        return self.decoder(self.encoder(x))
