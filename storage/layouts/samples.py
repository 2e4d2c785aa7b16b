"""One sample of a task kind: check its files and turn them into the packed dataset's column values.

Every function here raises BadSample naming the file to look at and the reason; none writes.

- image (every task): the source's JPEG or PNG bytes as they are when they decode and are gray (L)
  or RGB; anything else that decodes (BMP, palette, alpha, 16-bit gray, CMYK) is converted to L or
  RGB and stored as a lossless PNG.
- segmentation mask: a lossless class-index map (PNG: 8-bit gray, palette whose indices are the
  class ids, or 16-bit gray), every value < the number of classes or 255 (ignore); stored raw_u8.
- depth: a 16-bit PNG (`units_per_m` per metre: 1000 = millimetres, NYU; 256 = KITTI) or a .npy
  of float metres (NaN, inf, <= 0 -> invalid) or integers in the PNG's units; stored raw_u16 in
  millimetres, 0 = invalid.
"""

from __future__ import annotations

import io
import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image

from common.tasks import IGNORE_INDEX, MM_PER_M
from storage import codec
from storage.layouts.base import BadSample, check_pixels, open_image_checked

MAX_DEPTH_MM = 65535
_GRAY16 = ("I;16", "I;16B", "I;16L", "I")


@dataclass
class Prepared:
    """A sample ready to write: column values (encoded bytes, or ints), its size, its index values
    and what it adds to the dataset-wide stats (see merge_stats)."""

    values: dict[str, Any]
    height: int
    width: int
    index: dict[str, Any] = field(default_factory=dict)
    stats: dict[str, Any] = field(default_factory=dict)


def open_image(data: bytes, kind: str, path: str) -> Image.Image:
    try:
        img = open_image_checked(data, kind, path)  # over the pixel limit: BadSample, before any decode
        img.load()  # Pillow decodes lazily: a truncated file fails here, not in training
    except BadSample:
        raise
    except Exception as exc:  # noqa: BLE001 - Pillow raises many types for bad bytes
        text = re.sub(r"<_io\.BytesIO object at 0x[0-9a-fA-F]+>", "the file", str(exc))
        raise BadSample(path,
                        f"{kind} cannot be decoded ({type(exc).__name__}: {text}); corrupt or truncated "
                        "image") from None
    return img


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=codec.PNG_COMPRESS_LEVEL)
    return buf.getvalue()


def image_value(data: bytes, path: str, kind: str = "image") -> tuple[bytes, int, int, int]:
    """(bytes to store, height, width, channels) of an input image."""
    img = open_image(data, kind, path)
    if img.format in ("JPEG", "PNG") and img.mode in ("L", "RGB"):
        return bytes(data), img.height, img.width, 1 if img.mode == "L" else 3
    if img.mode in _GRAY16 or img.mode == "F":
        values = np.asarray(img, dtype=np.float64)
        top = 65535.0 if values.max(initial=0) > 255 else 255.0
        gray = np.clip(np.rint(values / top * 255.0), 0, 255).astype(np.uint8)
        out = Image.fromarray(gray)
    elif img.mode in ("1", "L", "LA"):
        out = img.convert("L")
    elif img.mode == "P":
        rgb = img.convert("RGB")
        arr = np.asarray(rgb)
        gray = bool(np.all(arr[..., 0] == arr[..., 1]) and np.all(arr[..., 1] == arr[..., 2]))
        out = rgb.convert("L") if gray else rgb
    else:
        try:
            out = img.convert("RGB")
        except (ValueError, OSError) as exc:
            raise BadSample(path,
                            f"{kind} has mode {img.mode}, which cannot be turned into gray or RGB ({exc})") from None
    return _png(out), out.height, out.width, 1 if out.mode == "L" else 3


def _same_size(image_hw: tuple[int, int], other_hw: tuple[int, int], other: str, image_path: str) -> None:
    if image_hw != other_hw:
        (ih, iw), (oh, ow) = image_hw, other_hw
        raise BadSample(image_path,
                        f"size mismatch: image {iw}x{ih}, {other} {ow}x{oh} (width x height); a sample's image and "
                        f"{other} must have one size")


# -- classification ---------------------------------------------------------------------------------


def prepare_classification(blobs: dict[str, bytes], paths: dict[str, str], extra: dict[str, Any],
                           options: dict[str, Any]) -> Prepared:
    data, h, w, channels = image_value(blobs["image"], paths["image"])
    label = int(extra["label"])
    if not 0 <= label < int(options["num_classes"]):
        raise BadSample(paths["image"], f"label {label} is not a class index (0..{int(options['num_classes']) - 1})")
    return Prepared({"image": data, "label": label}, h, w, {"label": label}, {"channels": [channels]})


# -- segmentation -----------------------------------------------------------------------------------


def mask_values(data: bytes, path: str) -> np.ndarray:
    """The class indices of a mask file (HxW uint8 or uint16)."""
    img = open_image(data, "mask", path)
    if img.format != "PNG":
        raise BadSample(path,
                        f"mask is {img.format}, expected a PNG class-index map (JPEG is lossy: its class ids would not "
                        "survive)")
    if img.mode in ("L", "P"):
        return np.asarray(img)  # palette PNGs: the indices are the class ids (Pascal VOC)
    if img.mode == "1":
        return np.asarray(img).astype(np.uint8)
    if img.mode in _GRAY16:
        return np.asarray(img).astype(np.int64)
    raise BadSample(path,
                    f"mask has mode {img.mode}, expected a class-index map (8-bit gray or palette PNG whose indices "
                    "are the class ids)")


def check_mask(values: np.ndarray, num_classes: int, path: str) -> np.ndarray:
    """The mask as uint8 after checking every value is a class id or IGNORE_INDEX."""
    uniq = np.unique(values)
    wrong = uniq[(uniq >= num_classes) & (uniq != IGNORE_INDEX)]
    if wrong.size or (uniq.size and uniq.min() < 0):
        shown = ", ".join(str(int(v)) for v in wrong[:8]) + (" ..." if wrong.size > 8 else "")
        raise BadSample(path,
                        f"mask has value(s) {shown}, not class ids: {num_classes} classes (0..{num_classes - 1}), and "
                        f"{IGNORE_INDEX} = ignore")
    return values.astype(np.uint8, copy=False)


def class_pixels(mask: np.ndarray, num_classes: int) -> list[int]:
    """Pixels of each class (IGNORE_INDEX left out), length num_classes."""
    flat = mask.reshape(-1)
    return np.bincount(flat[flat != IGNORE_INDEX], minlength=num_classes)[:num_classes].astype(np.int64).tolist()


def prepare_segmentation(blobs: dict[str, bytes], paths: dict[str, str], extra: dict[str, Any],
                         options: dict[str, Any]) -> Prepared:
    n = int(options["num_classes"])
    data, h, w, channels = image_value(blobs["image"], paths["image"])
    mask = check_mask(mask_values(blobs["mask"], paths["mask"]), n, paths["mask"])
    _same_size((h, w), mask.shape, "mask", paths["image"])
    return Prepared({"image": data, "mask": codec.encode_raw(mask)}, h, w, {"class_pixels": class_pixels(mask, n)},
                    {"channels": [channels]})


# -- depth --------------------------------------------------------------------------------------------


def metres_to_mm(depth_m: np.ndarray) -> np.ndarray:
    """uint16 millimetres of float metres; NaN, inf, <= 0 and beyond 65.535 m become 0 (invalid)."""
    d = np.asarray(depth_m, dtype=np.float64)
    mm = np.rint(np.where(np.isfinite(d), d, 0.0) * MM_PER_M)
    mm[(mm <= 0) | (mm > MAX_DEPTH_MM) | ~np.isfinite(d)] = 0
    return mm.astype(np.uint16)


def units_to_mm(values: np.ndarray, units_per_m: float) -> np.ndarray:
    if units_per_m == MM_PER_M:
        return values.astype(np.uint16)
    mm = np.rint(values.astype(np.float64) * (MM_PER_M / units_per_m))
    mm[mm > MAX_DEPTH_MM] = 0
    return mm.astype(np.uint16)


def depth_mm(data: bytes, path: str, units_per_m: float = MM_PER_M) -> np.ndarray:
    """HxW uint16 depth in millimetres (0 = invalid) from a 16-bit PNG or a .npy file."""
    if path.lower().endswith(".npy") or bytes(data[:6]) == b"\x93NUMPY":
        try:
            arr = np.load(io.BytesIO(data), allow_pickle=False)
        except Exception as exc:  # noqa: BLE001 - numpy raises several types for a bad file
            raise BadSample(path,
                            f"depth .npy cannot be read ({type(exc).__name__}: {exc}); corrupt or truncated "
                            "file") from None
        if arr.ndim == 3 and arr.shape[2] == 1:
            arr = arr[..., 0]
        if arr.ndim != 2 or arr.size == 0:
            raise BadSample(path, f"depth .npy has shape {arr.shape}, expected HxW")
        check_pixels(arr.shape[1], arr.shape[0], "depth", path)
        if arr.dtype.kind == "f":
            return metres_to_mm(arr)
        if arr.dtype.kind in "ui":
            if arr.min() < 0:
                raise BadSample(path, "depth .npy has negative integer values; integers are read as the depth PNGs' "
                                      "units (0 = invalid)")
            return units_to_mm(arr, units_per_m)
        raise BadSample(path,
                        f"depth .npy has dtype {arr.dtype}, expected float metres (or integers in the PNGs' units)")
    img = open_image(data, "depth", path)
    if img.format != "PNG":
        raise BadSample(path,
                        f"depth is {img.format}, expected a 16-bit PNG (millimetres, 0 = invalid) or a .npy of metres")
    if img.mode not in _GRAY16:
        raise BadSample(path,
                        f"depth PNG has mode {img.mode}, expected 16-bit grayscale in millimetres (the NYU Depth v2 "
                        "convention; 0 = invalid)")
    values = np.asarray(img).astype(np.int64)
    if values.min() < 0 or values.max() > 65535:
        raise BadSample(path, "depth PNG has values outside 0..65535")
    return units_to_mm(values, units_per_m)


def depth_stats(mm: np.ndarray) -> tuple[float, int, int, int]:
    """(sum of valid depths in metres, valid pixels, min and max valid mm (0, 0 when none))."""
    valid = mm[mm > 0]
    if not valid.size:
        return 0.0, 0, 0, 0
    return float(valid.sum(dtype=np.int64)) / MM_PER_M, int(valid.size), int(valid.min()), int(valid.max())


def prepare_depth(blobs: dict[str, bytes], paths: dict[str, str], extra: dict[str, Any],
                  options: dict[str, Any]) -> Prepared:
    data, h, w, channels = image_value(blobs["image"], paths["image"])
    mm = depth_mm(blobs["depth"], paths["depth"], float(options.get("units_per_m", MM_PER_M)))
    _same_size((h, w), mm.shape, "depth", paths["image"])
    total_m, valid, lo, hi = depth_stats(mm)
    stats: dict[str, Any] = {"channels": [channels]}
    if valid:
        stats.update(min_mm=lo, max_mm=hi)
    return Prepared({"image": data, "depth": codec.encode_raw(mm, codec.DEPTH_LAYOUT, codec.DEPTH_CODEC)}, h, w,
                    {"depth_sum_m": total_m, "depth_valid": valid}, stats)


PREPARE = {"classification": prepare_classification, "segmentation": prepare_segmentation, "depth": prepare_depth}


def merge_stats(into: dict[str, Any], more: dict[str, Any]) -> dict[str, Any]:
    """Dataset-wide stats from per-sample (or per-part) ones: channel sets, depth min/max."""
    for k, v in more.items():
        if k == "channels":
            into[k] = sorted(set(into.get(k, [])) | set(v))
        elif k == "min_mm":
            into[k] = min(into.get(k, v), v)
        elif k == "max_mm":
            into[k] = max(into.get(k, v), v)
    return into
