"""Decode + augment shared by the single-image tasks (classification, segmentation, depth).

A chunk's rows hold an `image` column (JPEG or PNG, gray or RGB) and the task's target column.
`ImageSamples.__getitems__` decodes a whole batch into integer arrays (images uint8, targets in
their stored dtype) and decides each sample's flip and shift from a hash of its id, so a resumed
run sees the same augmentation; the task's `to_device` makes floats of them on the device.
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np
import torch
from PIL import Image

from storage.codec import CorruptImageError, ImageSizeError
from workers.data import (
    INPUT_MEAN,
    INPUT_STD,
    DataError,
    _mix,
    _mix_on,
    _nearest_index,
    decode_rgb_into,
)


def decode_image_into(data: bytes, out: np.ndarray, what: str = "image") -> None:
    """Image bytes -> `out` (r x r x C uint8, C = 1 or 3), converted and resized as needed."""
    if out.shape[2] == 3:
        decode_rgb_into(data, out, what)
        return
    try:
        img = Image.open(io.BytesIO(data))
        img.draft("L", (out.shape[1], out.shape[0]))
        img = img.convert("L")
        if img.size != (out.shape[1], out.shape[0]):
            img = img.resize((out.shape[1], out.shape[0]), Image.BILINEAR)
        out[..., 0] = np.asarray(img)
    except Exception as exc:  # noqa: BLE001 - decoders raise many types for bad bytes
        raise CorruptImageError(f"{what} cannot be decoded ({type(exc).__name__}: {exc})") from exc


def resize_nearest(values: np.ndarray, side: int) -> np.ndarray:
    """A label or depth map resized to side x side by nearest pixel centres (no mixing of classes, or of
    invalid zeros into valid depth)."""
    if values.shape == (side, side):
        return values
    return values[np.ix_(_nearest_index(values.shape[0], side), _nearest_index(values.shape[1], side))]


def normalize(images: torch.Tensor) -> torch.Tensor:
    """B x r x r x C uint8 (on the device) -> B x C x r x r float, (x / 255 - MEAN) / STD."""
    return images.permute(0, 3, 1, 2).float().mul_(1.0 / (255.0 * INPUT_STD)).sub_(INPUT_MEAN / INPUT_STD)


def image_batch(raw: tuple[torch.Tensor, torch.Tensor],
                device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
    """An ImageSamples batch on the device: normalized float images and the targets as stored."""
    images, targets = (t.to(device, non_blocking=True) for t in raw)
    return normalize(images), targets


def unnormalize(x: torch.Tensor) -> torch.Tensor:
    """The inverse of normalize, clamped to [0, 1], for pictures."""
    return (x * INPUT_STD + INPUT_MEAN).clamp(0, 1)


class ImageSamples(torch.utils.data.Dataset):
    """One chunk's (or the eval split's) samples of a single-image task.

    `target` names the target column; `decode_target(data, side) -> array` turns its stored
    value into what the batch holds (a label: a 0-d int64 array; a map: side x side). `hflip`
    and `shift` are the training augmentation (probability, max px), decided per sample.
    """

    def __init__(self, rows: dict[str, Any], resolution: int, channels: int, describe: Any, target: str,
                 decode_target: Any, hflip: float = 0.0, shift: int = 0, flip_key: tuple[int, ...] = ()) -> None:
        self.rows, self.resolution, self.channels = rows, resolution, channels
        self.describe, self.target, self.decode_target = describe, target, decode_target
        self.hflip, self.shift, self.flip_key = hflip, shift, flip_key

    def __len__(self) -> int:
        return len(self.rows["sample_id"])

    def __getitems__(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        r = self.resolution
        images = np.zeros((len(indices), r, r, self.channels), dtype=np.uint8)
        targets = []
        prefix = _mix(*self.flip_key)
        for j, i in enumerate(indices):
            sid = int(self.rows["sample_id"][i])
            try:
                decode_image_into(self.rows["image"][i], images[j], "image")
                target = self.decode_target(self.rows[self.target][i], r)
            except ImageSizeError as exc:
                raise DataError(f"{self.describe(sid)}: {exc}: does not match the image's size; re-pack this "
                                "dataset") from None
            except CorruptImageError as exc:
                raise DataError(f"{self.describe(sid)}: {exc}; re-pack this dataset") from None
            h = _mix_on(prefix, sid)
            if self.hflip > 0 and h / 2**64 < self.hflip:
                images[j] = images[j, :, ::-1]
                if target.ndim == 2:
                    target = target[:, ::-1]
            if self.shift:
                images[j] = _shifted(images[j], _mix_on(h, 1), self.shift)
            targets.append(np.ascontiguousarray(target) if target.ndim else target)
        return torch.from_numpy(images), torch.from_numpy(np.stack(targets))


def _shifted(img: np.ndarray, h: int, shift: int) -> np.ndarray:
    """img translated by (dy, dx) in [-shift, shift] (from the hash h), zero-filled."""
    span = 2 * shift + 1
    dy, dx = (h % span) - shift, ((h // span) % span) - shift
    out = np.zeros_like(img)
    H, W = img.shape[:2]
    out[max(dy, 0):H + min(dy, 0), max(dx, 0):W + min(dx, 0)] = img[max(-dy, 0):H - max(dy, 0),
                                                                    max(-dx, 0):W - max(dx, 0)]
    return out


__all__ = ["ImageSamples", "decode_image_into", "image_batch", "normalize", "resize_nearest", "unnormalize"]
