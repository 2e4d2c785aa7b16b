"""A small fully convolutional heatmap net for the keypoints task (not a model the package ships).

A recipe names it by import path, `model: {name: keypoints_model:TinyHeatmapNet}`; the model contract
is the registered models' (workers/models/registry.py): a `task`, `variants`, keyword options.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn


class TinyHeatmapNet(nn.Module):
    task = "keypoints"
    variants: ClassVar[dict[str, dict[str, int]]] = {}

    def __init__(self, channels: int = 16) -> None:
        super().__init__()
        c = channels
        self.encoder = nn.Sequential(
            nn.Conv2d(3, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU(inplace=True),
            nn.Conv2d(c, c, 3, padding=2, dilation=2), nn.BatchNorm2d(c), nn.ReLU(inplace=True),
        )
        self.decoder = nn.Sequential(
            nn.Conv2d(c, c, 3, padding=4, dilation=4), nn.ReLU(inplace=True), nn.Conv2d(c, 1, 1),
        )

    def parts(self) -> dict[str, nn.Module]:
        return {"encoder": self.encoder, "decoder": self.decoder}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder(x))
