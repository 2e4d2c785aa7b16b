"""A chunk's samples inside a worker: encoded bytes preloaded once, decoded per batch.

The next chunk is fetched in a background thread while the current one trains, so at most
two chunks' encoded bytes are held in memory at any time.
"""

from __future__ import annotations

import io
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np
import torch
from PIL import Image

from storage.codec import CorruptImageError, decode_depth_png, decode_mask_png

# Inputs are scaled to roughly zero mean, unit variance (the source's dataset stats sit near 0.5/0.21).
INPUT_MEAN = 0.5
INPUT_STD = 0.25


class DataError(RuntimeError):
    """Bad data met at train time; the message names the dataset, shard and sample."""


def _mix(*keys: int) -> int:
    """A 64-bit hash of integers (splitmix64 steps): cheap per-sample randomness that needs no RNG state."""
    h = 0x9E3779B97F4A7C15
    for k in keys:
        h = (h ^ (int(k) & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 31
    return h


def flip_decision(p: float, *keys: int) -> bool:
    return p > 0 and (_mix(*keys) / 2**64) < p


def _decode_rgb(data: bytes, size: int) -> np.ndarray:
    try:
        img = Image.open(io.BytesIO(data))
        # draft() lets libjpeg decode at 1/2, 1/4 or 1/8 scale: the 56-px stage never pays for full-size decodes.
        img.draft("RGB", (size, size))
        img = img.convert("RGB")
        if img.size != (size, size):
            img = img.resize((size, size), Image.BILINEAR)
        return np.asarray(img)
    except Exception as exc:  # noqa: BLE001 - Pillow raises many types for bad bytes
        raise CorruptImageError(f"JPEG cannot be decoded ({type(exc).__name__}: {exc})") from exc


def _resize_plane(plane: np.ndarray, size: int, nearest: bool) -> np.ndarray:
    if plane.shape == (size, size):
        return plane
    img = Image.fromarray(plane)
    return np.asarray(img.resize((size, size), Image.NEAREST if nearest else Image.BILINEAR))


class ChunkSamples(torch.utils.data.Dataset):
    """Encoded samples of one chunk (or the eval split), decoded and resized on access."""

    def __init__(self, rows: dict[str, Any], resolution: int, describe: Any, hflip: float = 0.0, flip_key: tuple[int, ...] = ()) -> None:
        self.rows = rows
        self.resolution = resolution
        self.describe = describe  # sample_id -> "dataset shard ... sample ..." for error messages
        self.hflip = hflip
        self.flip_key = flip_key

    def __len__(self) -> int:
        return len(self.rows["sample_id"])

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        r = self.resolution
        sid = int(self.rows["sample_id"][i])
        h, w = int(self.rows["height"][i]), int(self.rows["width"][i])
        try:
            fg_bg = _decode_rgb(self.rows["fg_bg"][i], r)
            bg = _decode_rgb(self.rows["bg"][i], r)
            mask = decode_mask_png(self.rows["mask"][i])
            depth = decode_depth_png(self.rows["depth"][i])
        except CorruptImageError as exc:
            raise DataError(f"{self.describe(sid)}: {exc}; re-pack or re-synthesize this dataset") from None
        if mask.shape != (h, w) or depth.shape != (h, w):
            raise DataError(
                f"{self.describe(sid)}: mask {mask.shape} / depth {depth.shape} do not match the recorded "
                f"image size {(h, w)}; every image of a sample must have the same size"
            )
        mask = _resize_plane(mask, r, nearest=True)
        depth = _resize_plane(depth.astype(np.float32), r, nearest=False)
        x = np.concatenate([fg_bg, bg], axis=2)  # H, W, 6
        if flip_decision(self.hflip, *self.flip_key, sid):
            x, mask, depth = x[:, ::-1], mask[:, ::-1], depth[:, ::-1]
        # np.array copies: decoded/flipped views may be read-only, which torch warns about.
        xt = torch.from_numpy(np.array(x)).permute(2, 0, 1).float().div_(255.0)
        xt = (xt - INPUT_MEAN) / INPUT_STD
        mt = torch.from_numpy(np.array(mask)).float().div_(255.0).unsqueeze(0)
        dt = torch.from_numpy(np.array(depth)).float().unsqueeze(0)
        return xt, mt, dt


def check_sizes(rows: dict[str, Any], expected: tuple[int, int] | None, describe: Any) -> None:
    """Fail on images whose recorded size is not the recipe's data.image_size."""
    if expected is None:
        return
    for sid, h, w in zip(rows["sample_id"], rows["height"], rows["width"], strict=True):
        if (int(h), int(w)) != tuple(expected):
            raise DataError(
                f"{describe(int(sid))}: image is {int(h)}x{int(w)}, the recipe's data.image_size is "
                f"{expected[0]}x{expected[1]}; resize the data or set data.image_size"
            )


class ChunkPrefetcher:
    """Fetches the encoded rows of the next chunk in the background while this one trains."""

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="prefetch")
        self._pending: dict[tuple, Future] = {}

    def prefetch(self, key: tuple, ids: np.ndarray) -> None:
        # One slot: a newer prefetch replaces an older one, so memory holds at most two chunks.
        if key not in self._pending:
            self._pending = {key: self._pool.submit(self.dataset.read_samples, ids)}

    def get(self, key: tuple, ids: np.ndarray) -> dict[str, Any]:
        fut = self._pending.pop(key, None)
        if fut is None:
            return self.dataset.read_samples(ids)
        return fut.result()

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
