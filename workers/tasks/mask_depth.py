"""The mask + depth task: the source's workload (fg_bg + bg in, mask and depth out).

A batch leaves the decode step as integers (`RawBatch`: the two RGB images and the mask as
uint8, depth as the two byte planes of its 16-bit values) and becomes float inputs and targets
in `prepare_batch`, on the training device: the per-sample work is the decodes, each written
straight into the batch, and nothing else. Horizontal flips are decided per sample here and
applied there.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np
import torch

from storage.codec import (
    DEPTH_SCALE,
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
    _resize_into,
    decode_rgb_into,
)
from workers.losses import build_loss
from workers.metrics import EvalAccumulator
from workers.tasks.base import Batch, Task
from workers.viz import prediction_grid


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


class MaskDepthTask(Task):
    name = "mask_depth"
    columns = ("fg_bg", "bg", "mask", "depth")
    loss_sections = ("mask", "depth")
    train_keys = ("train/loss", "train/mask_loss", "train/depth_loss")
    eval_keys = ("eval/mask_iou", "eval/depth_rmse", "eval/depth_rmse_baseline")
    compare_columns = (("mIoU", "eval/mask_iou", "max"), ("mRMSE", "eval/depth_rmse", "min"))

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
