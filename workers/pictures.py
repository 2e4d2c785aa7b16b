"""Prediction pictures for the classification, segmentation and depth task kinds (PNG, PIL).

Like workers/viz.py: a header row of titles, square cells of CELL_PX, one row per sample
(classification: a grid of samples, each with a caption). Inputs are tensors on any device;
images are B x C x H x W floats in [0, 1] (C = 1 or 3), already un-normalised.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from matplotlib import colormaps
from PIL import Image, ImageDraw

CELL_PX = 128
HEADER_PX = 16
CAPTION_PX = 28  # classification: two text lines under each image
FRAME_PX = 3  # classification: red frame around a wrong prediction
LEGEND_LINE_PX = 14  # segmentation: one line of legend entries
LEGEND_ENTRY_PX = 128  # width of one legend entry (swatch and name)
WRONG = (220, 0, 0)
IGNORE_COLOUR = (255, 255, 255)
INVALID_DEPTH = (0, 0, 0)
DEPTH_CMAP = "viridis"  # perceptual; its darkest colour is not black, so invalid pixels stand out

SEG_COLUMNS = ("image", "true classes", "pred classes")


def voc_palette(n: int = 256) -> np.ndarray:
    """The PASCAL VOC colour map (n x 3 uint8): 0 black, 1 (128, 0, 0), 2 (0, 128, 0), ..."""
    pal = np.zeros((n, 3), dtype=np.uint8)
    for i in range(n):
        c, r, g, b = i, 0, 0, 0
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        pal[i] = (r, g, b)
    return pal


def _cpu(x: torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(x).detach().cpu()


def _rgb(image: torch.Tensor) -> np.ndarray:
    """C x H x W in [0, 1] -> H x W x 3 uint8."""
    if image.ndim != 3 or image.shape[0] not in (1, 3):
        raise ValueError(f"image must be C x H x W with C = 1 or 3, got {tuple(image.shape)}")
    x = image.float().clamp(0, 1)
    if x.shape[0] == 1:
        x = x.expand(3, -1, -1)
    return (x.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)


def _cell(array: np.ndarray, smooth: bool = False) -> Image.Image:
    """H x W x 3 uint8 -> a CELL_PX square; maps are resized NEAREST so their colours stay exact."""
    img = Image.fromarray(array, "RGB")
    return img.resize((CELL_PX, CELL_PX), Image.BILINEAR if smooth else Image.NEAREST)


def _fit(draw: ImageDraw.ImageDraw, text: str, width: int) -> str:
    """`text`, cut with ".." so it fits in `width` pixels."""
    if draw.textlength(text) <= width:
        return text
    while text and draw.textlength(text + "..") > width:
        text = text[:-1]
    return text + ".."


def _header(draw: ImageDraw.ImageDraw, titles: tuple[str, ...]) -> None:
    for j, title in enumerate(titles):
        draw.text((j * CELL_PX + 4, 2), _fit(draw, title, CELL_PX - 8), fill="black")


def _name(classes: list[str], i: int) -> str:
    return classes[i] if 0 <= i < len(classes) else str(i)


def classification_grid(
    images: torch.Tensor,
    true: torch.Tensor,
    pred: torch.Tensor,
    classes: list[str],
    path: str,
    columns: int = 4,
) -> None:
    """Samples in a grid of `columns` columns (fewer if there are fewer samples); under each image
    "true: X" and "pred: Y" on two lines. A wrong prediction has a red caption and a red frame."""
    images, true, pred = _cpu(images), _cpu(true).reshape(-1), _cpu(pred).reshape(-1)
    n = images.shape[0]
    if n == 0 or true.shape[0] != n or pred.shape[0] != n:
        raise ValueError(
            f"need B >= 1 images, labels and predictions; got {n}, {len(true)}, {len(pred)}"
        )
    cols = max(1, min(columns, n))
    rows = math.ceil(n / cols)
    grid = Image.new("RGB", (CELL_PX * cols, HEADER_PX + rows * (CELL_PX + CAPTION_PX)), "white")
    draw = ImageDraw.Draw(grid)
    draw.text((4, 2), _fit(draw, "true / pred (red: wrong)", CELL_PX * cols - 8), fill="black")
    for i in range(n):
        x0 = (i % cols) * CELL_PX
        y0 = HEADER_PX + (i // cols) * (CELL_PX + CAPTION_PX)
        grid.paste(_cell(_rgb(images[i]), smooth=True), (x0, y0))
        t, p = int(true[i]), int(pred[i])
        colour = "black" if t == p else WRONG
        if t != p:
            draw.rectangle(
                (x0, y0, x0 + CELL_PX - 1, y0 + CELL_PX - 1), outline=WRONG, width=FRAME_PX
            )
        for line, text in enumerate((f"true: {_name(classes, t)}", f"pred: {_name(classes, p)}")):
            draw.text(
                (x0 + 4, y0 + CELL_PX + 1 + 13 * line), _fit(draw, text, CELL_PX - 8), fill=colour
            )
    grid.save(path, format="PNG")


def class_map_rgb(labels: torch.Tensor, num_classes: int, ignore_index: int = 255) -> np.ndarray:
    """H x W class indices -> H x W x 3 uint8 in the VOC palette; `ignore_index`, and anything
    else that is not a class 0..num_classes-1, in white."""
    lab = _cpu(labels).to(torch.int64).numpy()
    pal = voc_palette(max(num_classes, 1))
    known = (lab >= 0) & (lab < num_classes) & (lab != ignore_index)
    out = np.empty((*lab.shape, 3), dtype=np.uint8)
    out[...] = IGNORE_COLOUR
    out[known] = pal[lab[known]]
    return out


def legend_height(num_classes: int) -> int:
    """Height of the segmentation legend (entries of LEGEND_ENTRY_PX, as many per line as fit)."""
    per_line = max(1, CELL_PX * len(SEG_COLUMNS) // LEGEND_ENTRY_PX)
    return math.ceil(num_classes / per_line) * LEGEND_LINE_PX + 4


def segmentation_grid(
    images: torch.Tensor,
    true: torch.Tensor,
    pred: torch.Tensor,
    num_classes: int,
    path: str,
    ignore_index: int = 255,
    classes: list[str] | None = None,
) -> None:
    """One row per sample: image, true class map, predicted class map (VOC palette, ignore in
    white). With `classes`, a legend of colour swatches and class names under the rows."""
    images, true, pred = _cpu(images), _cpu(true), _cpu(pred)
    n = images.shape[0]
    if true.shape[0] != n or pred.shape[0] != n or true.ndim != 3 or pred.ndim != 3:
        raise ValueError("need B images and B x H x W true and predicted class maps")
    if classes is not None and len(classes) != num_classes:
        raise ValueError(f"{len(classes)} class names for {num_classes} classes")
    width = CELL_PX * len(SEG_COLUMNS)
    legend = legend_height(num_classes) if classes is not None else 0
    grid = Image.new("RGB", (width, HEADER_PX + CELL_PX * n + legend), "white")
    draw = ImageDraw.Draw(grid)
    _header(draw, SEG_COLUMNS)
    for i in range(n):
        cells = [
            _cell(_rgb(images[i]), smooth=True),
            _cell(class_map_rgb(true[i], num_classes, ignore_index)),
            _cell(class_map_rgb(pred[i], num_classes, ignore_index)),
        ]
        for j, cell in enumerate(cells):
            grid.paste(cell, (j * CELL_PX, HEADER_PX + i * CELL_PX))
    if classes is not None:
        pal = voc_palette(max(num_classes, 1))
        per_line = max(1, width // LEGEND_ENTRY_PX)
        top = HEADER_PX + CELL_PX * n + 2
        for c, name in enumerate(classes):
            x0 = (c % per_line) * LEGEND_ENTRY_PX + 4
            y0 = top + (c // per_line) * LEGEND_LINE_PX
            swatch = (x0, y0 + 1, x0 + 10, y0 + 11)
            draw.rectangle(swatch, fill=tuple(int(v) for v in pal[c]), outline="black")
            draw.text((x0 + 14, y0), _fit(draw, name, LEGEND_ENTRY_PX - 22), fill="black")
    grid.save(path, format="PNG")


def depth_rgb(depth: torch.Tensor, max_depth: float, mask_invalid: bool) -> np.ndarray:
    """H x W metres -> H x W x 3 uint8 in DEPTH_CMAP over [0, max_depth] (clipped); with
    `mask_invalid`, pixels <= 0 (no measurement) or not finite in black."""
    d = _cpu(depth).to(torch.float64).numpy()
    x = np.clip(np.nan_to_num(d / max_depth, nan=0.0), 0.0, 1.0)
    out = colormaps[DEPTH_CMAP](x, bytes=True)[..., :3].copy()
    if mask_invalid:
        out[~(np.isfinite(d) & (d > 0))] = INVALID_DEPTH
    return out


def depth_grid(
    images: torch.Tensor,
    true: torch.Tensor,
    pred: torch.Tensor,
    path: str,
    max_depth: float,
) -> None:
    """One row per sample: image, true depth, predicted depth (B x 1 x H x W metres), coloured
    with DEPTH_CMAP from 0 (dark) to `max_depth` (bright); true pixels without a measurement (0)
    in black. The predicted depth is drawn everywhere."""
    if not max_depth > 0:
        raise ValueError(f"max_depth must be > 0, got {max_depth}")
    images, true, pred = _cpu(images), _cpu(true), _cpu(pred)
    n = images.shape[0]
    if true.shape[0] != n or pred.shape[0] != n or true.ndim != 4 or pred.ndim != 4:
        raise ValueError("need B images and B x 1 x H x W true and predicted depth")
    titles = ("image", f"true depth 0-{max_depth:g} m", "pred depth")
    grid = Image.new("RGB", (CELL_PX * len(titles), HEADER_PX + CELL_PX * n), "white")
    draw = ImageDraw.Draw(grid)
    _header(draw, titles)
    for i in range(n):
        cells = [
            _cell(_rgb(images[i]), smooth=True),
            _cell(depth_rgb(true[i, 0], max_depth, mask_invalid=True)),
            _cell(depth_rgb(pred[i, 0], max_depth, mask_invalid=False)),
        ]
        for j, cell in enumerate(cells):
            grid.paste(cell, (j * CELL_PX, HEADER_PX + i * CELL_PX))
    grid.save(path, format="PNG")
