"""The UNet56 spine and the UNet224 head+spine+tail model (6-channel fg_bg+bg in, mask+depth logits out)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from workers.models.parts import FreezableParts
from workers.models.registry import MODELS

PARTS = ("head", "spine", "tail")


def _ch(channels: int, width: float) -> int:
    return max(4, int(round(channels * width)))


def conv_bn_relu(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    # No conv bias: the BatchNorm that follows has its own shift.
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class DoubleConv(nn.Sequential):
    """(conv3x3-BN-ReLU) x 2."""

    def __init__(self, cin: int, cout: int, mid: int | None = None) -> None:
        mid = cout if mid is None else mid
        super().__init__(conv_bn_relu(cin, mid), conv_bn_relu(mid, cout))


class Down(nn.Sequential):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__(nn.MaxPool2d(2), DoubleConv(cin, cout))


class Up(nn.Module):
    """Bilinear x2 upsample, concat the skip, DoubleConv(in, out, mid=in//2)."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.conv = DoubleConv(cin, cout, cin // 2)

    def forward(self, x: Tensor, skip: Tensor) -> Tensor:
        # Upsampling to the skip's size (not a fixed x2) lets sizes that are not a multiple
        # of 16 (the source's 56 px: 56->28->14->7->3) line up, in place of the classic pad.
        x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=True)
        return self.conv(torch.cat([skip, x], dim=1))


@MODELS.register("unet56")
class UNet56(nn.Module):
    task = "mask_depth"
    variants: dict = {}
    """Classic bilinear U-Net: widths 64..512 (bottleneck 1024//2), four downs, four ups.

    17,264,770 parameters at width 1 with 6 in / 2 out channels. Any H, W >= 16 works;
    multiples of 16 upsample by exactly x2 at every level.
    """

    def __init__(self, in_channels: int = 6, out_channels: int = 2, width: float = 1.0) -> None:
        super().__init__()
        c1, c2, c3, c4, c5 = (_ch(c, width) for c in (64, 128, 256, 512, 1024 // 2))
        self.in_channels, self.out_channels = in_channels, out_channels
        self.inc = DoubleConv(in_channels, c1)
        self.down1 = Down(c1, c2)
        self.down2 = Down(c2, c3)
        self.down3 = Down(c3, c4)
        self.down4 = Down(c4, c5)
        self.up1 = Up(c4 + c5, c3)
        self.up2 = Up(c3 + c3, c2)
        self.up3 = Up(c2 + c2, c1)
        self.up4 = Up(c1 + c1, c1)
        self.outc = nn.Conv2d(c1, out_channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        if min(x.shape[-2:]) < 16:
            raise ValueError(f"UNet56 needs H, W >= 16, got {tuple(x.shape[-2:])}")
        x1 = self.inc(x)
        x2 = self.down1(x1)
        x3 = self.down2(x2)
        x4 = self.down3(x3)
        x = self.down4(x4)
        x = self.up1(x, x4)
        x = self.up2(x, x3)
        x = self.up3(x, x2)
        x = self.up4(x, x1)
        return self.outc(x)


class Head(nn.Module):
    """Two stride-2 conv-BN-ReLU (H -> H/4) whose zero-initialised 1x1 projection is added
    to avg_pool(x, 4), so at init the spine sees exactly the 4x-downsampled image it was
    trained on in stage 1 (avg_pool by 4 == F.interpolate(mode="area", scale_factor=0.25))."""

    def __init__(self, in_channels: int, c: int) -> None:
        super().__init__()
        self.conv1 = conv_bn_relu(in_channels, c, stride=2)
        self.conv2 = conv_bn_relu(c, c, stride=2)
        self.proj = nn.Conv2d(c, in_channels, 1)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Returns (spine input at H/4, features at H/2 for the tail's skip)."""
        f2 = self.conv1(x)
        f4 = self.conv2(f2)
        return F.avg_pool2d(x, 4) + self.proj(f4), f2


class Tail(nn.Module):
    """Upsample the spine output back to full size through two skip-joined convs; a
    zero-initialised 1x1 conv is added to the spine output upsampled x4, so at init the
    model's output is exactly the stage-1 spine's output, bilinearly upsampled."""

    def __init__(self, in_channels: int, out_channels: int, c: int) -> None:
        super().__init__()
        self.conv1 = conv_bn_relu(out_channels + c, c)
        self.conv2 = conv_bn_relu(c + in_channels, c)
        self.proj = nn.Conv2d(c, out_channels, 1)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, s: Tensor, f2: Tensor, x: Tensor) -> Tensor:
        y = F.interpolate(s, size=f2.shape[-2:], mode="bilinear", align_corners=False)
        y = self.conv1(torch.cat([y, f2], dim=1))
        y = F.interpolate(y, size=x.shape[-2:], mode="bilinear", align_corners=False)
        y = self.conv2(torch.cat([y, x], dim=1))
        return upsample_like(s, x) + self.proj(y)


def upsample_like(s: Tensor, x: Tensor) -> Tensor:
    """The spine output resized to x's H, W: the tail's residual path."""
    return F.interpolate(s, size=x.shape[-2:], mode="bilinear", align_corners=False)


@MODELS.register("unet224")
class UNet224(FreezableParts):
    """head (6xH -> 6xH/4) + spine (UNet56) + tail (2xH/4 -> 2xH).

    `head_channels` defaults to round(96 * width) (min 4): 96 puts the total at width 1
    at 17,527,242, 0.03% under the source's 17,532,622.

    Freezing: `set_trainable(["head", "tail"])` freezes the spine's parameters *and* keeps
    its BatchNorm layers in eval mode. `train()` is overridden to re-apply that, so callers
    may call `model.train()` freely afterwards.
    """

    def __init__(
        self,
        in_channels: int = 6,
        out_channels: int = 2,
        width: float = 1.0,
        head_channels: int | None = None,
    ) -> None:
        super().__init__()
        c = _ch(96, width) if head_channels is None else head_channels
        self.in_channels, self.out_channels = in_channels, out_channels
        self.head = Head(in_channels, c)
        self.spine = UNet56(in_channels, out_channels, width)
        self.tail = Tail(in_channels, out_channels, c)
        self._trainable: tuple[str, ...] = PARTS

    task = "mask_depth"
    variants: dict = {}
    # Stage paths: "spine" runs the 56-px spine alone; "full" needs H, W divisible by 4 and >= 64.
    paths = ("full", "spine")

    @classmethod
    def resolution_problem(cls, path: str, resolution: int) -> str | None:
        # The full path's head and tail scale by 4 around the spine, which needs at least 16 px.
        if path == "full" and (resolution % 4 or resolution < 64):
            return f"resolution {resolution} must be a multiple of 4 and at least 64 for forward='full'"
        return None

    def forward(self, x: Tensor, path: str = "full") -> Tensor:
        if path == "spine":
            return self.spine(x)
        if path != "full":
            raise ValueError(f"unknown path {path!r}; valid: full, spine")
        h, w = x.shape[-2:]
        if h % 4 or w % 4 or min(h, w) < 64:
            raise ValueError(f"path 'full' needs H, W divisible by 4 and >= 64, got {(h, w)}")
        s_in, f2 = self.head(x)
        return self.tail(self.spine(s_in), f2, x)

    def parts(self) -> dict[str, nn.Module]:
        return {"head": self.head, "spine": self.spine, "tail": self.tail}
