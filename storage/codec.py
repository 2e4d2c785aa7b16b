"""Byte encodings of the four per-sample images: JPEG inputs, 8-bit PNG mask, 16-bit PNG depth."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, UnidentifiedImageError

JPEG_QUALITY = 90
# Depth is stored as round(depth * DEPTH_SCALE) in a 16-bit PNG: a step of 1/65535 of the range.
DEPTH_SCALE = 65535
# zlib level 3 is ~1.5x faster than the default 6 for ~1.5x bigger depth PNGs; both are lossless.
PNG_COMPRESS_LEVEL = 3
# Float error tolerated outside [0, 1] before a depth map counts as out of range.
_DEPTH_RANGE_SLACK = 1e-6

_DECODE_ERRORS = (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError)


class CorruptImageError(ValueError):
    """Bytes that do not decode to the expected image; callers add the sample id and shard URI."""


def _save(img: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def _open(data: bytes, what: str, fmt: str) -> Image.Image:
    if not isinstance(data, (bytes, bytearray, memoryview)) or len(data) == 0:
        raise CorruptImageError(f"could not decode {what}: empty or not bytes ({type(data).__name__})")
    try:
        img = Image.open(io.BytesIO(data))
        # Pillow decodes lazily; load() now so truncated data fails here and not later.
        img.load()
    except _DECODE_ERRORS as exc:
        raise CorruptImageError(f"could not decode {what} ({len(data)} bytes): {exc}") from exc
    if img.format != fmt:
        raise CorruptImageError(f"could not decode {what}: expected {fmt}, got {img.format}")
    return img


def encode_jpeg(rgb: np.ndarray, quality: int = JPEG_QUALITY) -> bytes:
    """JPEG bytes of an HxWx3 uint8 RGB image."""
    rgb = np.asarray(rgb)
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"encode_jpeg wants HxWx3 uint8, got {rgb.shape} {rgb.dtype}")
    return _save(Image.fromarray(np.ascontiguousarray(rgb)), "JPEG", quality=quality)


def decode_jpeg(data: bytes) -> np.ndarray:
    """HxWx3 uint8 RGB from JPEG bytes; raises CorruptImageError."""
    img = _open(data, "JPEG image", "JPEG")
    if img.mode != "RGB":
        img = img.convert("RGB")
    return np.asarray(img)


def encode_mask_png(mask: np.ndarray) -> bytes:
    """Lossless 8-bit grayscale PNG of an HxW mask with values 0/255 (bool masks become 0/255)."""
    mask = np.asarray(mask)
    if mask.dtype == np.bool_:
        mask = mask.astype(np.uint8) * 255
    if mask.dtype != np.uint8 or mask.ndim != 2:
        raise ValueError(f"encode_mask_png wants HxW uint8 0/255 (or bool), got {mask.shape} {mask.dtype}")
    if np.any((mask != 0) & (mask != 255)):
        raise ValueError("encode_mask_png: mask has values other than 0 and 255")
    return _save(Image.fromarray(np.ascontiguousarray(mask)), "PNG", compress_level=PNG_COMPRESS_LEVEL)


def decode_mask_png(data: bytes) -> np.ndarray:
    """HxW uint8 (0/255) from mask PNG bytes; raises CorruptImageError."""
    img = _open(data, "mask PNG", "PNG")
    if img.mode != "L":
        img = img.convert("L")
    return np.asarray(img)


def depth_to_uint16(depth: np.ndarray) -> np.ndarray:
    """The exact 16-bit values encode_depth_png stores for a float depth map in [0, 1]."""
    depth = np.asarray(depth, dtype=np.float32)
    if depth.ndim != 2:
        raise ValueError(f"depth must be HxW, got shape {depth.shape}")
    if not np.all(np.isfinite(depth)):
        raise ValueError("depth has NaN or infinite values")
    lo, hi = float(depth.min()), float(depth.max())
    if lo < -_DEPTH_RANGE_SLACK or hi > 1 + _DEPTH_RANGE_SLACK:
        raise ValueError(f"depth must lie in [0, 1], got [{lo:.6g}, {hi:.6g}]")
    return np.rint(np.clip(depth, 0.0, 1.0) * DEPTH_SCALE).astype(np.uint16)


def encode_depth_png(depth: np.ndarray) -> bytes:
    """16-bit grayscale PNG of an HxW float depth map in [0, 1] (stored as round(depth * 65535))."""
    return encode_depth_uint16(depth_to_uint16(depth))


def encode_depth_uint16(depth_u16: np.ndarray) -> bytes:
    """16-bit grayscale PNG of already-quantized depth (see depth_to_uint16)."""
    depth_u16 = np.ascontiguousarray(depth_u16, dtype=np.uint16)
    return _save(Image.fromarray(depth_u16), "PNG", compress_level=PNG_COMPRESS_LEVEL)


def decode_depth_png(data: bytes) -> np.ndarray:
    """HxW float32 depth in [0, 1] from PNG bytes; raises CorruptImageError.

    16-bit PNGs are read as value/65535; 8-bit ones (the source dataset's depth maps) as value/255.
    """
    img = _open(data, "depth PNG", "PNG")
    if img.mode == "L":
        return np.asarray(img, dtype=np.float32) / np.float32(255)
    if img.mode not in ("I;16", "I;16B", "I;16L", "I"):
        raise CorruptImageError(f"could not decode depth PNG: expected 16-bit grayscale, got mode {img.mode}")
    values = np.asarray(img)
    if values.min() < 0 or values.max() > DEPTH_SCALE:
        raise CorruptImageError(f"could not decode depth PNG: values outside 0..{DEPTH_SCALE}")
    return values.astype(np.float32) / np.float32(DEPTH_SCALE)
