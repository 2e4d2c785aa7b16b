"""BaseNet: the small Fashion-MNIST classifier and its ablation rows, as constructor options.

Two conv stages (conv k5, no padding -> [BatchNorm2d] -> ReLU -> max-pool 2 [-> dropout]) and a
fully connected stack (linear -> [BatchNorm1d] -> ReLU, dropout after the first hidden layer)
ending in a linear layer to the class logits.

Variants, one per ablation row, each adding to the row before it:
  baseline  conv widths 6, 12; one hidden layer of 12 (192 -> 12 -> 10):    4,414 parameters
  bn        + BatchNorm after every conv and hidden layer:                   4,474
  dropout   + dropout 0.2 (after the first conv stage and first hidden layer): 4,474
  deep      + hidden layers 512, 256, 128:                                   268,126
  best      + conv widths 32, 64 (fc input 1024):                            744,394
Data augmentation, the row between baseline and bn, is a data setting, not a model one: that
row trains "baseline".
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from workers.models.parts import FreezableParts
from workers.models.registry import MODELS

_DEEP = [512, 256, 128]


@MODELS.register("basenet")
class BaseNet(FreezableParts):
    """Conv classifier for small images (1 x 28 x 28 by default); parts: features, classifier.

    `image_size` is the side of the (square) input; the flattened conv output, and so the first
    linear layer's input size, is computed from it: each stage maps a side s to (s - k + 1) // 2.
    """

    task = "classification"
    variants: dict = {
        "baseline": {},
        "bn": {"batchnorm": True},
        "dropout": {"batchnorm": True, "dropout": 0.2},
        "deep": {"batchnorm": True, "dropout": 0.2, "hidden": _DEEP},
        "best": {"batchnorm": True, "dropout": 0.2, "hidden": _DEEP, "channels": [32, 64]},
    }

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 10,
        channels: Sequence[int] = (6, 12),
        hidden: Sequence[int] = (12,),
        batchnorm: bool = False,
        dropout: float = 0.0,
        image_size: int = 28,
        kernel_size: int = 5,
    ) -> None:
        super().__init__()
        channels, hidden = [int(c) for c in channels], [int(h) for h in hidden]
        if not channels:
            raise ValueError("basenet: channels must name at least one conv width")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"basenet: dropout must be in [0, 1), got {dropout}")
        side = int(image_size)
        layers: list[nn.Module] = []
        cin = in_channels
        for i, cout in enumerate(channels):
            side = (side - kernel_size + 1) // 2
            if side < 1:
                raise ValueError(
                    f"basenet: image_size {image_size} is too small for {len(channels)} conv "
                    f"stages of kernel {kernel_size} (each maps s to (s - {kernel_size - 1}) // 2)"
                )
            layers.append(nn.Conv2d(cin, cout, kernel_size))
            if batchnorm:
                layers.append(nn.BatchNorm2d(cout))
            layers += [nn.ReLU(inplace=True), nn.MaxPool2d(2)]
            if dropout > 0 and i < len(channels) - 1:
                layers.append(nn.Dropout(dropout))
            cin = cout
        self.features = nn.Sequential(*layers)

        fc: list[nn.Module] = [nn.Flatten()]
        width = cin * side * side
        for i, h in enumerate(hidden):
            fc.append(nn.Linear(width, h))
            if batchnorm:
                fc.append(nn.BatchNorm1d(h))
            fc.append(nn.ReLU(inplace=True))
            if dropout > 0 and i == 0:
                fc.append(nn.Dropout(dropout))
            width = h
        fc.append(nn.Linear(width, num_classes))
        self.classifier = nn.Sequential(*fc)
        self.in_features = cin * side * side

    def parts(self) -> dict[str, nn.Module]:
        return {"features": self.features, "classifier": self.classifier}

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x))
