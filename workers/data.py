"""A chunk's samples inside a worker: encoded bytes preloaded once, decoded per batch.

The next chunk is fetched in a background thread while the current one trains, so at most
two chunks' encoded bytes are held in memory at any time.

A batch leaves the decode step as integers (`RawBatch`: the two RGB images and the mask as
uint8, depth as the two byte planes of its 16-bit values) and becomes float inputs and targets
in `prepare_batch`, on the training device: the per-sample work is the decodes, each written
straight into the batch, and nothing else. Horizontal flips are decided per sample here and
applied there.
"""

from __future__ import annotations

import functools
import io
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from storage.codec import (
    DEPTH_SCALE,
    CorruptImageError,
    ImageSizeError,
    decode_depth_planes,
    decode_depth_uint16,
    decode_mask,
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


class RawBatch(NamedTuple):
    """What the decode step hands to the training loop (the batch dimension first).

    rgb: B x 2 x H x W x 3 uint8 (fg_bg, bg), as decoded; mask: B x H x W uint8 (0/255);
    depth: B x 2 x H x W uint8, the low and high bytes of round(depth * 65535) (the layout the
    raw format stores, so decoding copies instead of interleaving); flip: B bool, the samples to
    mirror left-right.
    """

    rgb: torch.Tensor
    mask: torch.Tensor
    depth: torch.Tensor
    flip: torch.Tensor


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


def _resize_into(out: np.ndarray, img: np.ndarray, nearest: bool) -> None:
    """Resize an HxW(xC) uint8/uint16 image into `out` (same dtype): bilinear with antialiasing
    (as Pillow's), or nearest (pixel centres, as Pillow's); torch's kernels beat Pillow's here."""
    size = out.shape[:2]
    if img.dtype == np.uint16:  # no 16-bit kernels: through float, rounded back
        t = torch.from_numpy(img.astype(np.float32))[None, None]
        t = F.interpolate(t, size=size, mode="bilinear", antialias=True, align_corners=False)
        out[...] = t[0, 0].round_().clamp_(0, DEPTH_SCALE).numpy()
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
    is_jpeg = isinstance(data, (bytes, bytearray, memoryview)) and bytes(data[:2]) == _JPEG_SOI
    try:
        if simplejpeg is not None and is_jpeg:
            r_h, r_w = out.shape[:2]
            try:  # the usual case: the (DCT-scaled) image is out's size, decoded in place
                if simplejpeg.decode_jpeg(data, colorspace="RGB", min_height=r_h, min_width=r_w, buffer=out).shape == out.shape:
                    return
            except ValueError:
                pass  # larger than out (or corrupt: then the decode below raises again)
            img = simplejpeg.decode_jpeg(data, colorspace="RGB", min_height=r_h, min_width=r_w)
            _resize_into(out, img, nearest=False)
        else:
            _decode_rgb_pillow(data, out)
    except Exception as exc:  # noqa: BLE001 - decoders raise many types for bad bytes
        raise CorruptImageError(f"{what} {'JPEG' if is_jpeg else 'image'} cannot be decoded ({type(exc).__name__}: {exc})") from exc


class ChunkSamples(torch.utils.data.Dataset):
    """Encoded samples of one chunk (or the eval split), decoded and resized on access.

    Batches come from `__getitems__` (the DataLoader calls it with a batch's indices; build the
    loader with `make_loader`) as a RawBatch; `prepare_batch` turns one into model tensors.
    """

    def __init__(self, rows: dict[str, Any], resolution: int, describe: Any, hflip: float = 0.0, flip_key: tuple[int, ...] = ()) -> None:
        self.rows = rows
        self.resolution = resolution
        self.describe = describe  # sample_id -> "dataset shard ... sample ..." for error messages
        self.hflip = hflip
        self.flip_key = flip_key

    def __len__(self) -> int:
        return len(self.rows["sample_id"])

    def __getitem__(self, i: int) -> RawBatch:
        """One sample as a RawBatch without the batch dimension (default_collate stacks these)."""
        return RawBatch(*(t[0] for t in self.__getitems__([i])))

    def __getitems__(self, indices: list[int]) -> RawBatch:
        n, r = len(indices), self.resolution
        rgb = np.empty((n, 2, r, r, 3), dtype=np.uint8)
        mask = np.empty((n, r, r), dtype=np.uint8)
        depth = np.empty((n, 2, r, r), dtype=np.uint8)
        flip = np.zeros(n, dtype=np.bool_)
        prefix = _mix(*self.flip_key)  # flip_decision(hflip, *flip_key, sid), the key's part hashed once
        for j, i in enumerate(indices):
            sid = self._decode_into(int(i), rgb[j], mask[j], depth[j])
            flip[j] = self.hflip > 0 and _mix_on(prefix, sid) / 2**64 < self.hflip
        return RawBatch(torch.from_numpy(rgb), torch.from_numpy(mask), torch.from_numpy(depth), torch.from_numpy(flip))

    def _decode_into(self, i: int, rgb: np.ndarray, mask: np.ndarray, depth: np.ndarray) -> int:
        rows, r = self.rows, self.resolution
        sid = int(rows["sample_id"][i])
        h, w = int(rows["height"][i]), int(rows["width"][i])
        full = (h, w) == (r, r)
        try:
            decode_rgb_into(rows["fg_bg"][i], rgb[0], "fg_bg")
            decode_rgb_into(rows["bg"][i], rgb[1], "bg")
            if full:  # straight into the batch
                decode_mask(rows["mask"][i], out=mask)
                decode_depth_planes(rows["depth"][i], out=depth)
            else:
                m = decode_mask(rows["mask"][i])
                d = decode_depth_uint16(rows["depth"][i])
                if m.shape != (h, w) or d.shape != (h, w):
                    raise ImageSizeError(f"mask {m.shape} / depth {d.shape}")
                _resize_into(mask, m, nearest=True)
                small = np.empty((r, r), np.uint16)
                _resize_into(small, d, nearest=False)
                np.bitwise_and(small, 0xFF, out=depth[0], casting="unsafe")
                np.right_shift(small, 8, out=depth[1], casting="unsafe")
        except ImageSizeError as exc:
            raise DataError(
                f"{self.describe(sid)}: {exc}: does not match the recorded image size {h}x{w}; "
                "every image of a sample must have the same size"
            ) from None
        except CorruptImageError as exc:
            raise DataError(f"{self.describe(sid)}: {exc}; re-pack or re-synthesize this dataset") from None
        return sid


def _collate(batch: RawBatch) -> RawBatch:
    return batch  # ChunkSamples.__getitems__ already returns whole batches


def make_loader(samples: ChunkSamples, *, batch_size: int | None = None, batch_sampler: Any = None,
                num_workers: int = 0, pin_memory: bool = False) -> torch.utils.data.DataLoader:
    """A DataLoader of RawBatches over `samples` (in order with batch_size, or as batch_sampler says)."""
    if batch_sampler is not None:
        return torch.utils.data.DataLoader(samples, batch_sampler=batch_sampler, collate_fn=_collate,
                                           num_workers=num_workers, pin_memory=pin_memory)
    return torch.utils.data.DataLoader(samples, batch_size=batch_size, collate_fn=_collate,
                                       num_workers=num_workers, pin_memory=pin_memory)


def prepare_batch(batch: RawBatch, device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A RawBatch -> (inputs B x 6 x H x W normalized, mask B x 1 x H x W in {0, 1}, depth B x 1 x H x W
    in [0, 1]) as float32 on `device`, mirrored where `batch.flip` says.

    The integers cross to the device (4x fewer bytes than floats), are flipped there, and
    become floats last: on a GPU all of it costs next to nothing.
    """
    rgb, mask, depth, flip = batch
    rgb, mask, depth = (t.to(device, non_blocking=True) for t in (rgb, mask, depth))
    n, _, h, w, _ = rgb.shape
    x = rgb.permute(0, 1, 4, 2, 3).reshape(n, 6, h, w)  # uint8 still: a quarter of the bytes to move
    if bool(flip.any()):  # flip is still on the CPU: no device sync
        if x.data_ptr() == rgb.data_ptr():
            x = x.clone()  # _mirror may write into x: never into the batch (reshape copies but for 1x1 images)
        x, mask, depth = _mirror(x, mask, depth, flip, static_shapes=x.device.type != "cpu")
    x = x.float().mul_(1.0 / (255.0 * INPUT_STD)).sub_(INPUT_MEAN / INPUT_STD)  # (x / 255 - MEAN) / STD
    m = mask.unsqueeze(1).float().div_(255.0)
    d = depth[:, 1:2].float().mul_(256.0).add_(depth[:, 0:1]).div_(float(DEPTH_SCALE))  # exact below 2**24
    return x, m, d


def _mirror(x: torch.Tensor, mask: torch.Tensor, depth: torch.Tensor, flip: torch.Tensor,
            static_shapes: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mirror left-right (the last dimension) the samples `flip` (a CPU bool tensor) marks.

    With static_shapes, one select per tensor: shapes that do not change with the number flipped
    (XLA compiles a graph per shape), no host sync. Without (the CPU's way: a select over whole
    batches costs ~4x more there), only the marked samples are rewritten, in place in `x` (which
    must be the caller's own tensor) and in copies of mask and depth.
    """
    if static_shapes:
        f = flip.to(x.device, non_blocking=True)
        x, mask, depth = (torch.where(f.view(-1, *[1] * (t.ndim - 1)), t.flip(-1), t) for t in (x, mask, depth))
        return x, mask, depth
    mask, depth = mask.clone(), depth.clone()
    for j in flip.nonzero().view(-1).tolist():
        for t in (x, mask, depth):
            t[j] = t[j].flip(-1)
    return x, mask, depth


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

    def failure(self) -> BaseException | None:
        """The error of a background fetch that has already failed (its retries spent), if any."""
        for fut in self._pending.values():
            if fut.done() and not fut.cancelled() and fut.exception() is not None:
                return fut.exception()
        return None

    def get(self, key: tuple, ids: np.ndarray) -> dict[str, Any]:
        fut = self._pending.pop(key, None)
        if fut is None:
            return self.dataset.read_samples(ids)
        return fut.result()

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
