"""ResUNet and ResUNeXt: one residual encoder, two PixelShuffle decoders (mask, depth).

Both take the fg_bg and bg images concatenated (6 channels) and return B x 2 x H x W logits,
channel 0 the mask, channel 1 the depth (the `mask_depth` task). H and W must be multiples
of 16 (four 2x poolings, undone by four 2x pixel shuffles).

Layout, with the channel counts at width 1 (the mask and depth decoders differ):

    stem    5x5 conv 6 -> 32
    encoder ResDownBlock 32->64, 64->128, 128->256, 256->512 (each also returns its
            pre-pool features as a skip), then a bridge ResDoubleConv 512->512 at H/16
    mask    ResUpBlock 512->256, 256->128, 128->64, 64->16, then a 1x1 conv 16 -> 1
    depth   ResUpBlock 512->64, 64->64, 64->32, 32->16, then a 1x1 conv 16 -> 1; each block
            also adds the output of the mask decoder's block at the same level

Residual joins are additions, not concatenations: 1x1 convs bring skips to the upsampled
width first, which keeps activation memory down at full resolution.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from workers.models.parts import FreezableParts
from workers.models.registry import MODELS

ENCODER = (64, 128, 256, 512)
MASK_DECODER = (256, 128, 64, 16)
DEPTH_DECODER = (64, 64, 32, 16)
STEM = 32
CARDINALITY = 32  # ResUNeXt: groups in every grouped 3x3 conv


def _ch(channels: int, width: float) -> int:
    return max(4, int(round(channels * width)))


def _bn_relu(channels: int) -> list[nn.Module]:
    return [nn.BatchNorm2d(channels), nn.ReLU(inplace=True)]


def _conv(cin: int, cout: int, k: int, groups: int = 1) -> nn.Conv2d:
    # No conv biases anywhere: each conv is followed by a BatchNorm, or by a residual sum
    # that ends up in the next block's pre-activation BatchNorm.
    return nn.Conv2d(cin, cout, k, padding=k // 2, groups=groups, bias=False)


class ResDoubleConv(nn.Module):
    """Pre-activation residual unit (ResNet v2): shortcut(x) + body(x).

    cardinality=None: body = (BN-ReLU-conv3x3) x 2 (ResUNet).
    cardinality=C:    body = BN-ReLU-conv1x1 to C * (cout // 6) channels, BN-ReLU-grouped
                      conv3x3 with C groups, BN-ReLU-conv1x1 back to cout (ResUNeXt).
    The shortcut is a 1x1 conv + BN when `project` (always, in the down and up blocks) and
    the identity otherwise (the bridge, where cin == cout).
    """

    def __init__(
        self, cin: int, cout: int, cardinality: int | None = None, project: bool = True
    ) -> None:
        super().__init__()
        if not project and cin != cout:
            raise ValueError(f"an identity shortcut needs cin == cout, got {cin} -> {cout}")
        self.shortcut = (
            nn.Sequential(_conv(cin, cout, 1), nn.BatchNorm2d(cout)) if project else nn.Identity()
        )
        if cardinality is None:
            layers = [*_bn_relu(cin), _conv(cin, cout, 3), *_bn_relu(cout), _conv(cout, cout, 3)]
        else:
            mid = cardinality * max(1, cout // 6)
            layers = [
                *_bn_relu(cin),
                _conv(cin, mid, 1),
                *_bn_relu(mid),
                _conv(mid, mid, 3, groups=cardinality),
                *_bn_relu(mid),
                _conv(mid, cout, 1),
            ]
        self.body = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.shortcut(x) + self.body(x)


class ResDownBlock(nn.Module):
    """ResDoubleConv then 2x max-pool; returns (pooled, pre-pool features for the skip)."""

    def __init__(self, cin: int, cout: int, cardinality: int | None = None) -> None:
        super().__init__()
        self.conv = ResDoubleConv(cin, cout, cardinality)
        self.pool = nn.MaxPool2d(2)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        features = self.conv(x)
        return self.pool(features), features


def _icnr_(weight: Tensor, scale: int = 2) -> None:
    """Initialise a conv feeding PixelShuffle(scale) so that all scale**2 sub-pixels start
    equal: the shuffle then begins as nearest-neighbour upsampling, free of checkerboards."""
    cout, cin, kh, kw = weight.shape
    sub = torch.empty(cout // scale**2, cin, kh, kw)
    nn.init.kaiming_normal_(sub)
    with torch.no_grad():
        weight.copy_(sub.repeat_interleave(scale**2, dim=0))


class ResUpBlock(nn.Module):
    """x2 up by 1x1 conv (cin -> 4 cin) + PixelShuffle, add the skip (and the other
    decoder's `dense` features), each brought to cin by a 1x1 conv, then ResDoubleConv."""

    def __init__(
        self,
        cin: int,
        cout: int,
        skip_channels: int,
        dense_channels: int | None = None,
        cardinality: int | None = None,
    ) -> None:
        super().__init__()
        self.up = nn.Sequential(_conv(cin, 4 * cin, 1), nn.PixelShuffle(2))
        _icnr_(self.up[0].weight)
        self.skip = _conv(skip_channels, cin, 1)
        self.dense = _conv(dense_channels, cin, 1) if dense_channels else None
        self.conv = ResDoubleConv(cin, cout, cardinality)

    def forward(self, x: Tensor, skip: Tensor, dense: Tensor | None = None) -> Tensor:
        y = self.up(x) + self.skip(skip)
        if self.dense is not None:
            if dense is None:
                raise ValueError("this block was built with dense_channels; pass `dense`")
            y = y + self.dense(dense)
        return self.conv(y)


class Encoder(nn.Module):
    def __init__(self, in_channels: int, width: float, cardinality: int | None) -> None:
        super().__init__()
        # A wide 5x5 stem (no BN/ReLU: the first block pre-activates its input).
        self.stem = _conv(in_channels, _ch(STEM, width), 5)
        chans = [_ch(STEM, width), *(_ch(c, width) for c in ENCODER)]
        self.downs = nn.ModuleList(
            ResDownBlock(a, b, cardinality) for a, b in zip(chans, chans[1:], strict=False)
        )
        self.bridge = ResDoubleConv(chans[-1], chans[-1], cardinality, project=False)

    def forward(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        """Returns (bridge output at H/16, skips from deepest (H/8) to shallowest (H))."""
        x = self.stem(x)
        skips = []
        for down in self.downs:
            x, skip = down(x)
            skips.append(skip)
        return self.bridge(x), skips[::-1]


class Decoder(nn.Module):
    """Four ResUpBlocks and a bias-free 1x1 conv to one logit channel.

    `dense` gives, per block, the channels of the other decoder's block output that this
    decoder adds in (None: a stand-alone decoder)."""

    def __init__(
        self,
        bottom: int,
        skips: list[int],
        outs: list[int],
        dense: list[int] | None,
        cardinality: int | None,
    ) -> None:
        super().__init__()
        ins = [bottom, *outs[:-1]]
        dense = dense or [None] * len(outs)
        self.ups = nn.ModuleList(
            ResUpBlock(a, b, s, d, cardinality)
            for a, b, s, d in zip(ins, outs, skips, dense, strict=True)
        )
        self.out = _conv(outs[-1], 1, 1)

    def forward(
        self, x: Tensor, skips: list[Tensor], dense: list[Tensor] | None = None
    ) -> tuple[Tensor, list[Tensor]]:
        """Returns (B x 1 x H x W logits, every block's output for the other decoder)."""
        features = []
        for i, up in enumerate(self.ups):
            x = up(x, skips[i], None if dense is None else dense[i])
            features.append(x)
        return self.out(x), features


class _ResUNetBase(FreezableParts):
    task = "mask_depth"
    variants: dict = {"cpu": {"width": 0.25}}
    cardinality: int | None = None

    def __init__(self, in_channels: int = 6, width: float = 1.0) -> None:
        super().__init__()
        self.in_channels = in_channels
        enc = [_ch(c, width) for c in ENCODER]
        mask = [_ch(c, width) for c in MASK_DECODER]
        depth = [_ch(c, width) for c in DEPTH_DECODER]
        self.encoder = Encoder(in_channels, width, self.cardinality)
        self.mask_decoder = Decoder(enc[-1], enc[::-1], mask, None, self.cardinality)
        # The depth decoder adds the mask decoder's features level by level.
        self.depth_decoder = Decoder(enc[-1], enc[::-1], depth, mask, self.cardinality)

    def forward(self, x: Tensor) -> Tensor:
        h, w = x.shape[-2:]
        if h % 16 or w % 16:
            raise ValueError(f"{type(self).__name__} needs H, W divisible by 16, got {(h, w)}")
        bottom, skips = self.encoder(x)
        mask, mask_features = self.mask_decoder(bottom, skips)
        depth, _ = self.depth_decoder(bottom, skips, mask_features)
        return torch.cat([mask, depth], dim=1)

    def parts(self) -> dict[str, nn.Module]:
        return {
            "encoder": self.encoder,
            "mask_decoder": self.mask_decoder,
            "depth_decoder": self.depth_decoder,
        }


@MODELS.register("resunet")
class ResUNet(_ResUNetBase):
    """Residual U-Net with plain (BN-ReLU-conv3x3) x 2 pre-activation blocks.

    15,855,712 parameters at width 1 with 6 input channels. `width` scales every channel
    count (rounded, minimum 4); variant "cpu" is width 0.25 (about 1M parameters), for
    CPU smoke runs. Parts: encoder, mask_decoder, depth_decoder.
    """

    cardinality = None


@MODELS.register("resunext")
class ResUNeXt(_ResUNetBase):
    """ResUNet with ResNeXt bottleneck blocks: 1x1 conv, 3x3 conv in 32 groups, 1x1 conv.

    16,409,856 parameters at width 1 with 6 input channels. Each block's bottleneck has
    32 * (out_channels // 6) channels (group width at least 1); `width` scales the block
    channels, not the cardinality. Variant "cpu" is width 0.25. Parts as ResUNet.
    """

    cardinality = CARDINALITY
