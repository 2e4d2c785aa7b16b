"""The mask + depth task: the source's workload (fg_bg + bg in, mask and depth out).

A batch leaves the decode step as integers (`RawBatch`: the two RGB images and the mask as
uint8, depth as the two byte planes of its 16-bit values) and becomes float inputs and targets
in `prepare_batch`, on the training device: the per-sample work is the decodes, each written
straight into the batch, and nothing else. Horizontal flips are decided per sample here and
applied there.

Below the stored size the decode does only what the device cannot: JPEGs are decoded at
libjpeg-turbo's DCT-scaled size (M/8 of the stored one) and, when the stage's side is at most
half the stored one and that size is not exactly the stage's, the final bilinear resize is one
batched op on the device (`prepare_batch`); depth maps cross at their stored size and are resized
there too (the same arithmetic as per sample on the CPU: the same values). Masks are picked by
nearest pixel centres on the CPU (cheap, and exact). A background that many samples share is
decoded once per ChunkSamples (they hold the same bytes; /4 datasets the same bytes object).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from common.tasks import MASK_DEPTH
from storage.codec import (
    DEPTH_U16_MAX,
    CorruptImageError,
    ImageSizeError,
    decode_depth_planes,
    decode_depth_uint16,
    decode_mask,
)
from workers.data import (
    INPUT_MEAN,
    INPUT_STD,
    DataError,
    _mix,
    _mix_on,
    decode_rgb_into,
    is_jpeg,
    jpeg_scaled_size,
    resize_into,
)
from workers.losses import build_loss
from workers.metrics import EvalAccumulator
from workers.tasks.base import Batch, Task
from workers.viz import prediction_grid

# Decoded backgrounds a ChunkSamples keeps (a source dataset has ~100; 200 px RGB is 120 KB).
BG_CACHE_ENTRIES = 256


class RawBatch(NamedTuple):
    """What the decode step hands to the training loop (the batch dimension first).

    mask: B x r x r uint8 (0/255) at the stage's side r: what the others are resized to.
    rgb: B x 2 x h x w x 3 uint8 (fg_bg, bg), as decoded: r x r, or the JPEGs' DCT-scaled size
    when the stage is at most half the stored size (prepare_batch resizes them).
    depth: B x 2 x h x w uint8, the low and high bytes of round(depth * 65535) (the layout the
    raw format stores, so decoding copies instead of interleaving), at r x r or at the stored size.
    flip: B bool, the samples to mirror left-right.
    """

    rgb: torch.Tensor
    mask: torch.Tensor
    depth: torch.Tensor
    flip: torch.Tensor


class ChunkSamples(torch.utils.data.Dataset):
    """Encoded samples of one chunk (or the eval split), decoded and resized on access.

    Batches come from `__getitems__` (the DataLoader calls it with a batch's indices; build the
    loader with `make_loader`) as a RawBatch; `prepare_batch` turns one into model tensors.
    """

    def __init__(self, rows: dict[str, Any], resolution: int, describe: Any, hflip: float = 0.0,
                 flip_key: tuple[int, ...] = ()) -> None:
        self.rows = rows
        self.resolution = resolution
        self.describe = describe  # sample_id -> "dataset shard ... sample ..." for error messages
        self.hflip = hflip
        self.flip_key = flip_key
        self._bg: dict[tuple[Any, tuple[int, ...]], np.ndarray] = {}  # (bg bytes, shape) -> decoded
        self._scratch: dict[tuple[int, int], np.ndarray] = {}

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_bg"], state["_scratch"] = {}, {}  # per process, filled as it decodes
        return state

    def __len__(self) -> int:
        return len(self.rows["sample_id"])

    def __getitem__(self, i: int) -> RawBatch:
        """One sample as a RawBatch without the batch dimension (default_collate stacks these)."""
        return RawBatch(*(t[0] for t in self.__getitems__([i])))

    def _sizes(self, indices: list[int]) -> tuple[tuple[int, int] | None, tuple[int, int], tuple[int, int]]:
        """(the batch's stored size when all share one, else None; the RGB size it is decoded at;
        the depth size it crosses at)."""
        rows, r = self.rows, self.resolution
        heights, widths = rows["height"], rows["width"]
        h, w = int(heights[indices[0]]), int(widths[indices[0]])
        if any(int(heights[i]) != h or int(widths[i]) != w for i in indices):
            return None, (r, r), (r, r)  # mixed sizes: everything resized here, to r
        rgb = (r, r)
        # The DCT-scaled size only where scaling is needed (the stage at most half the stored
        # size), so larger stages keep their pixels; only JPEGs (PNG inputs resize here).
        if 2 * r <= h and 2 * r <= w and all(is_jpeg(rows[k][i]) for i in indices for k in ("fg_bg", "bg")):
            rgb = jpeg_scaled_size(rows["fg_bg"][indices[0]], r, r) or rgb
        return (h, w), rgb, (h, w)

    def __getitems__(self, indices: list[int]) -> RawBatch:
        n, r = len(indices), self.resolution
        stored, rgb_hw, depth_hw = self._sizes(indices)
        rgb = np.empty((n, 2, *rgb_hw, 3), dtype=np.uint8)
        mask = np.empty((n, r, r), dtype=np.uint8)
        depth = np.empty((n, 2, *depth_hw), dtype=np.uint8)
        flip = np.zeros(n, dtype=np.bool_)
        prefix = _mix(*self.flip_key)  # flip_decision(hflip, *flip_key, sid), the key's part hashed once
        for j, i in enumerate(indices):
            sid = self._decode_into(int(i), rgb[j], mask[j], depth[j], stored)
            flip[j] = self.hflip > 0 and _mix_on(prefix, sid) / 2**64 < self.hflip
        return RawBatch(torch.from_numpy(rgb), torch.from_numpy(mask), torch.from_numpy(depth), torch.from_numpy(flip))

    def _bg_into(self, data: bytes, out: np.ndarray) -> None:
        """The background decoded into `out`, once per distinct bytes and size (samples share it)."""
        key = (data, out.shape)
        hit = self._bg.get(key)
        if hit is not None:
            out[...] = hit
            return
        decode_rgb_into(data, out, "bg")
        if len(self._bg) >= BG_CACHE_ENTRIES:
            del self._bg[next(iter(self._bg))]
        self._bg[key] = out.copy()

    def _decode_into(self, i: int, rgb: np.ndarray, mask: np.ndarray, depth: np.ndarray,
                     stored: tuple[int, int] | None) -> int:
        rows, r = self.rows, self.resolution
        sid = int(rows["sample_id"][i])
        h, w = int(rows["height"][i]), int(rows["width"][i])
        try:
            decode_rgb_into(rows["fg_bg"][i], rgb[0], "fg_bg")
            self._bg_into(rows["bg"][i], rgb[1])
            if stored is not None:  # depth crosses at the stored size; the mask is picked to r here
                decode_depth_planes(rows["depth"][i], out=depth)
                if (h, w) == (r, r):
                    decode_mask(rows["mask"][i], out=mask)
                else:
                    m = self._scratch.get((h, w))
                    if m is None:
                        m = self._scratch[(h, w)] = np.empty((h, w), np.uint8)
                    decode_mask(rows["mask"][i], out=m)
                    resize_into(mask, m, nearest=True)
            else:
                m = decode_mask(rows["mask"][i])
                d = decode_depth_uint16(rows["depth"][i])
                if m.shape != (h, w) or d.shape != (h, w):
                    raise ImageSizeError(f"mask {m.shape} / depth {d.shape}")
                resize_into(mask, m, nearest=True)
                small = np.empty((r, r), np.uint16)
                resize_into(small, d, nearest=False)
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


# Devices whose torch has antialiased bilinear resizing; on others (XLA) the resize runs on the
# host before the transfer (the same arithmetic as on the CPU).
RESIZE_DEVICES = ("cpu", "cuda")


def _resize(t: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear with antialiasing (as the CPU decode path's resize_into), float, batched."""
    return F.interpolate(t, size=size, mode="bilinear", antialias=True, align_corners=False)


def prepare_batch(batch: RawBatch, device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A RawBatch -> (inputs B x 6 x r x r normalized, mask B x 1 x r x r in {0, 1}, depth B x 1 x r x r
    in [0, 1]) as float32 on `device`, r the mask's side, mirrored where `batch.flip` says.

    The integers cross to the device (4x fewer bytes than floats), are resized there when they
    came at another size than the mask's (one batched op), flipped, and become floats last: on a
    GPU all of it costs next to nothing.
    """
    rgb, mask, depth, flip = batch
    on_host = torch.device(device).type not in RESIZE_DEVICES
    if not on_host:
        rgb, mask, depth = (t.to(device, non_blocking=True) for t in (rgb, mask, depth))
    n, _, h, w, _ = rgb.shape
    size = tuple(mask.shape[-2:])
    x = rgb.permute(0, 1, 4, 2, 3).reshape(n, 6, h, w)  # uint8 still: a quarter of the bytes to move
    if (h, w) != size:
        x = _resize(x.float(), size)  # a new float tensor, ours to change
    depth_resized = tuple(depth.shape[-2:]) != size
    if depth_resized:
        # 16-bit values as floats (exact), resized, rounded and clamped as the CPU path did per sample.
        depth = _resize(_depth16(depth), size).round_().clamp_(0, DEPTH_U16_MAX)
    if on_host:
        x, mask, depth = (t.to(device, non_blocking=True) for t in (x, mask, depth))
    if bool(flip.any()):  # flip is still on the CPU: no device sync
        if x.data_ptr() == rgb.data_ptr():
            x = x.clone()  # mirror may write into x: never into the batch (reshape copies but for 1x1 images)
        x, mask, depth = mirror(x, mask, depth, flip, static_shapes=x.device.type != "cpu")
    x = x.float().mul_(1.0 / (255.0 * INPUT_STD)).sub_(INPUT_MEAN / INPUT_STD)  # (x / 255 - MEAN) / STD
    m = mask.unsqueeze(1).float().div_(255.0)
    if depth_resized:
        d = depth.div_(float(DEPTH_U16_MAX))
    else:
        d = _depth16(depth).div_(float(DEPTH_U16_MAX))
    return x, m, d


def _depth16(planes: torch.Tensor) -> torch.Tensor:
    """B x 2 x H x W uint8 depth planes (low byte, high byte) -> B x 1 x H x W float 16-bit values
    (exact: below 2**24)."""
    return planes[:, 1:2].float().mul_(256.0).add_(planes[:, 0:1])


def mirror(x: torch.Tensor, mask: torch.Tensor, depth: torch.Tensor, flip: torch.Tensor,
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


class MaskDepthTask(Task, spec=MASK_DEPTH):
    eval_keys = ("eval/mask_iou", "eval/depth_rmse", "eval/depth_rmse_baseline")

    def __init__(self, recipe: Any, info: dict[str, Any]) -> None:
        super().__init__(recipe, info)
        self.mask_loss = build_loss(recipe.loss.mask)
        self.depth_loss = build_loss(recipe.loss.depth)
        self.baseline_depth = float(info["baseline_depth"])

    @classmethod
    def data_info(cls, dataset: Any, train_ids: np.ndarray) -> dict[str, Any]:
        # The constant the baseline RMSE predicts: the training split's mean depth (index only, no shard reads).
        return {"baseline_depth": float(np.mean(dataset.depth_means(train_ids)))}

    @classmethod
    def metric_keys(cls, info: dict[str, Any]) -> set[str]:
        return {*cls.train_keys, *cls.eval_keys}

    def samples(self, rows: dict[str, Any], resolution: int, describe: Any, train: bool,
                flip_key: tuple[int, ...] = ()) -> ChunkSamples:
        return ChunkSamples(rows, resolution, describe, self.recipe.data.hflip if train else 0.0, flip_key)

    def to_device(self, raw: RawBatch, device: torch.device | str) -> Batch:
        x, m, d = prepare_batch(raw, device)
        return Batch(x, (m, d))

    def losses(self, out: torch.Tensor, batch: Batch) -> Sequence[torch.Tensor]:
        m, d = batch.targets
        mask_loss = self.mask_loss(out[:, 0:1], m)
        depth_loss = self.depth_loss(out[:, 1:2], d)
        return mask_loss + self.recipe.loss.depth_weight * depth_loss, mask_loss, depth_loss

    def evaluator(self) -> _MaskDepthEval:
        return _MaskDepthEval(self.baseline_depth)

    def picture(self, batch: Batch, out: torch.Tensor, path: str) -> None:

        m, d = batch.targets
        prediction_grid(batch.x, m, d, out, path)


class _MaskDepthEval:
    def __init__(self, baseline_depth: float) -> None:
        self.acc = EvalAccumulator()
        self.baseline_depth = baseline_depth

    def update(self, out: torch.Tensor, batch: Batch) -> None:
        m, d = batch.targets
        self.acc.update(out[:, 0:1], m, out[:, 1:2], d, self.baseline_depth)

    def compute(self) -> dict[str, float]:
        return self.acc.compute()
