"""What every task's data path shares inside a worker: image decode, resize, per-sample
randomness without RNG state, the DataLoader and size checks. Reading chunks (in pieces,
streamed, prefetched) is workers/chunks.py's, re-exported here. What a sample's columns mean is
the task's business (workers/tasks/).
"""

from __future__ import annotations

import functools
import io
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from storage.codec import DEPTH_U16_MAX, CorruptImageError
from workers.chunks import (  # noqa: F401 - re-exported: where the loop and the tests import them
    PIECE_BYTES,
    PIECES_IN_FLIGHT,
    ChunkPrefetcher,
    StreamingRows,
    chunk_pieces,
    read_chunk,
    stream_order,
    stream_pieces,
)

try:  # libjpeg-turbo straight into a numpy buffer, with DCT scaling: ~1.7x Pillow's decode+convert
    import simplejpeg
except ImportError:  # pragma: no cover - a dependency; Pillow decodes the same pixels, slower
    simplejpeg = None

# Inputs are scaled to roughly zero mean, unit variance (the source's dataset stats sit near 0.5/0.21).
INPUT_MEAN = 0.5
INPUT_STD = 0.25
_JPEG_SOI = b"\xff\xd8"


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


def _mix_on(h: int, k: int) -> int:
    """One more key into a _mix hash: _mix_on(_mix(*keys), k) == _mix(*keys, k)."""
    h = (h ^ (int(k) & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
    return h ^ (h >> 31)


def resize_into(out: np.ndarray, img: np.ndarray, nearest: bool) -> None:
    """Resize an HxW(xC) uint8/uint16 image into `out` (same dtype): bilinear with antialiasing
    (as Pillow's), or nearest (pixel centres, as Pillow's); torch's kernels beat Pillow's here."""
    size = out.shape[:2]
    if img.dtype == np.uint16:  # no 16-bit kernels: through float, rounded back
        t = torch.from_numpy(img.astype(np.float32))[None, None]
        t = F.interpolate(t, size=size, mode="bilinear", antialias=True, align_corners=False)
        out[...] = t[0, 0].round_().clamp_(0, DEPTH_U16_MAX).numpy()
        return
    if nearest:
        out[...] = img[np.ix_(_nearest_index(img.shape[0], size[0]), _nearest_index(img.shape[1], size[1]))]
        return
    t = torch.from_numpy(img)
    t = (t.permute(2, 0, 1) if t.ndim == 3 else t[None])[None]  # 1 x C x H x W (channels-last strides)
    t = F.interpolate(t, size=size, mode="bilinear", antialias=True, align_corners=False)
    torch.from_numpy(out).copy_(t[0].permute(1, 2, 0) if out.ndim == 3 else t[0, 0])


@functools.lru_cache(maxsize=64)
def _nearest_index(n_in: int, n_out: int) -> np.ndarray:
    return np.minimum(((np.arange(n_out) + 0.5) * (n_in / n_out)).astype(np.intp), n_in - 1)


def _decode_rgb_pillow(data: bytes, out: np.ndarray) -> None:
    img = Image.open(io.BytesIO(data))
    # draft() lets libjpeg decode at 1/2, 1/4 or 1/8 scale: a small stage never pays for full-size decodes.
    img.draft("RGB", (out.shape[1], out.shape[0]))
    img = img.convert("RGB")
    if img.size != (out.shape[1], out.shape[0]):
        img = img.resize((out.shape[1], out.shape[0]), Image.BILINEAR)
    out[...] = np.asarray(img)


def decode_rgb_into(data: bytes, out: np.ndarray, what: str = "input") -> None:
    """Decode image bytes into `out` (r x r x 3 uint8, C-contiguous), resized to it if need be.

    JPEGs go through simplejpeg, scaled in the DCT to the smallest size not below `out`'s (so a
    small stage never pays for full-size decodes) and written straight into `out` when that is
    its size; anything else (PNG inputs, which `data pack` keeps) through Pillow. Raises
    CorruptImageError naming `what`.
    """
    jpeg = is_jpeg(data)
    try:
        if simplejpeg is not None and jpeg:
            r_h, r_w = out.shape[:2]
            try:  # the usual case: the (DCT-scaled) image is out's size, decoded in place
                got = simplejpeg.decode_jpeg(data, colorspace="RGB", min_height=r_h, min_width=r_w, buffer=out)
                if got.shape == out.shape:
                    return
            except ValueError:
                pass  # larger than out (or corrupt: then the decode below raises again)
            img = simplejpeg.decode_jpeg(data, colorspace="RGB", min_height=r_h, min_width=r_w)
            resize_into(out, img, nearest=False)
        else:
            _decode_rgb_pillow(data, out)
    except Exception as exc:  # noqa: BLE001 - decoders raise many types for bad bytes
        kind = "JPEG" if jpeg else "image"
        raise CorruptImageError(f"{what} {kind} cannot be decoded ({type(exc).__name__}: {exc})") from exc


def is_jpeg(data: Any) -> bool:
    return isinstance(data, (bytes, bytearray, memoryview)) and bytes(data[:2]) == _JPEG_SOI


def jpeg_scaled_size(data: bytes, min_height: int, min_width: int) -> tuple[int, int] | None:
    """(height, width) decode_rgb_into's DCT-scaled decode of these JPEG bytes has for a target of
    at least min_height x min_width (libjpeg-turbo's M/8 scales: 200 px for 56 gives 75); None
    when they are not a JPEG simplejpeg reads (Pillow, or no simplejpeg: no such decode)."""
    if simplejpeg is None or not is_jpeg(data):
        return None
    try:
        h, w = simplejpeg.decode_jpeg_header(data, min_height=min_height, min_width=min_width)[:2]
    except Exception:  # noqa: BLE001 - a corrupt header: the decode itself then names the sample
        return None
    return int(h), int(w)


def _collate(batch: Any) -> Any:
    return batch  # a task's samples.__getitems__ already returns whole batches


def make_loader(samples: torch.utils.data.Dataset, *, batch_size: int | None = None, batch_sampler: Any = None,
                num_workers: int = 0, pin_memory: bool = False) -> torch.utils.data.DataLoader:
    """A DataLoader of a task's raw batches over `samples` (in order with batch_size, or as batch_sampler says).

    Rows still streaming in (StreamingRows) are shared with the worker processes through the
    spool: the pieces still to land are written there, and a worker's read of a position waits
    for its piece's file, so the first batches decode while the rest of the chunk lands (the
    threads that fetch it stay in this process). Without a usable spool they are waited for whole."""
    rows = getattr(samples, "rows", None)
    if num_workers > 0 and isinstance(rows, StreamingRows) and not rows.share():
        samples.rows = rows = rows.materialize()
    loader = torch.utils.data.DataLoader
    if isinstance(rows, StreamingRows) and rows.held:  # a chunk needed at once: see workers/landing.py
        rows.decoders(num_workers)
        loader = functools.partial(_FirstBatchLoader, rows=rows)
    if batch_sampler is not None:
        return loader(samples, batch_sampler=batch_sampler, collate_fn=_collate, num_workers=num_workers,
                      pin_memory=pin_memory)
    return loader(samples, batch_size=batch_size, collate_fn=_collate, num_workers=num_workers,
                  pin_memory=pin_memory)


class _FirstBatchLoader(torch.utils.data.DataLoader):
    """A DataLoader that tells the rows it reads when its first batch is out: the rest of a chunk
    needed at once lands from then on, not beside the first batch's decode (workers/landing.py)."""

    def __init__(self, *args: Any, rows: StreamingRows, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._rows = rows

    def __iter__(self):
        for i, batch in enumerate(super().__iter__()):
            if i == 0:
                self._rows.first_batch_out()
            yield batch
        self._rows.first_batch_out()  # no batch at all: nothing stays held


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
