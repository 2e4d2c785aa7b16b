"""The prediction grid logged at each stage end: input, true/predicted mask, true/predicted depth."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image, ImageDraw

from workers.data import INPUT_MEAN, INPUT_STD

COLUMNS = ("input fg_bg", "true mask", "pred mask", "true depth", "pred depth")
CELL_PX = 128
HEADER_PX = 16


def _gray(plane: torch.Tensor) -> np.ndarray:
    return (plane.clamp(0, 1).numpy() * 255).astype(np.uint8)


def prediction_grid(x: torch.Tensor, mask: torch.Tensor, depth: torch.Tensor, out: torch.Tensor, path: str) -> None:
    """One row per sample; columns as in COLUMNS. `out` holds logits (channel 0 mask, 1 depth)."""
    n = x.shape[0]
    grid = Image.new("RGB", (CELL_PX * len(COLUMNS), HEADER_PX + CELL_PX * n), "white")
    draw = ImageDraw.Draw(grid)
    for j, title in enumerate(COLUMNS):
        draw.text((j * CELL_PX + 4, 2), title, fill="black")
    for i in range(n):
        rgb = ((x[i, :3] * INPUT_STD + INPUT_MEAN).clamp(0, 1).permute(1, 2, 0).numpy() * 255).astype(np.uint8)
        cells = [
            rgb,
            _gray(mask[i, 0]),
            _gray(torch.sigmoid(out[i, 0])),
            _gray(depth[i, 0]),
            _gray(torch.sigmoid(out[i, 1])),
        ]
        for j, cell in enumerate(cells):
            img = Image.fromarray(cell).convert("RGB").resize((CELL_PX, CELL_PX), Image.NEAREST)
            grid.paste(img, (j * CELL_PX, HEADER_PX + i * CELL_PX))
    grid.save(path)
