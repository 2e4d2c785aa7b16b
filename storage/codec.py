"""Byte encodings of the four per-sample images: JPEG inputs, a lossless 8-bit mask, lossless depth.

Masks and depth maps are written in the raw format: the array's bytes behind a small
self-describing header (see RAW_MAGIC), compressed; 16-bit depth is stored as two byte planes
(low bytes, then high bytes), which compresses 4-7x better and is what the training batch takes
as it is. Masks and 16-bit depth use LZ4 (a decompress and a copy: ~9x less than PNG); 8-bit depth
(the source's depth maps, what `data pack` stores) uses zstd, which makes it smaller than the
source's PNGs at a fifth of PNG's decode time (bench/data.py measures PNG and the raw format's
variants). PNG masks and depth maps (datasets packed before, the source's depth files) still
decode: each decoder tells the encodings apart by their first bytes.
"""

from __future__ import annotations

import io
import struct

import numpy as np
import pyarrow as pa
from PIL import Image, UnidentifiedImageError

JPEG_QUALITY = 90
# mask_depth's depth (a fraction of the range, in [0, 1]) is stored as round(depth * DEPTH_U16_MAX) in
# 16 bits: a step of 1/65535 of the range. (The other tasks store millimetres: common.tasks.MM_PER_M.)
DEPTH_U16_MAX = 65535
# zlib level 3 is ~1.5x faster than the default 6 for ~1.5x bigger depth PNGs; both are lossless.
PNG_COMPRESS_LEVEL = 3
# Float error tolerated outside [0, 1] before a depth map counts as out of range.
_DEPTH_RANGE_SLACK = 1e-6

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# The raw format: RAW_MAGIC, then <version u8, dtype u8, layout u8, codec u8, height u32, width u32,
# payload bytes u32> (little-endian), then the payload: height * width values of dtype, laid out as
# `layout` says, compressed by `codec`. The payload length catches truncated or padded bytes before
# any decompressing. Like PNG's, the magic has a high-bit byte and CR/LF, so text-mode mangling
# shows; it cannot be mistaken for a PNG or a JPEG (FF D8).
RAW_MAGIC = b"\x89RAW\r\n\x1a\n"
RAW_VERSION = 1
_RAW_HEADER = struct.Struct("<BBBBIII")
RAW_HEADER_BYTES = len(RAW_MAGIC) + _RAW_HEADER.size
_DTYPES = {1: np.dtype(np.uint8), 2: np.dtype("<u2")}
_DTYPE_CODES = {np.dtype(np.uint8): 1, np.dtype("<u2"): 2}
# Layouts: the values as they are, or (16-bit only) the low bytes of all values, then the high
# bytes: smooth depth maps compress 4-7x better that way (the high plane is nearly constant).
LAYOUT_PLAIN, LAYOUT_BYTE_PLANES = 0, 1
# Codecs: pyarrow's (a dependency already), so nothing new to install. zstd frames record their
# content size, so one that decompresses to another size is caught; LZ4 blocks do not (pyarrow
# returns the size asked for), which the payload length and the shard index's per-sample
# checksums, checked on every read, make up for.
CODEC_NONE, CODEC_ZSTD, CODEC_LZ4 = 0, 1, 2
_CODEC_NAMES = {CODEC_ZSTD: "zstd", CODEC_LZ4: "lz4_raw"}
RAW_ZSTD_LEVEL = 3
# What new data is written with, chosen by bench/data.py's figures (maskdepth_*): pyarrow's zstd
# costs ~20 us a call before any work and decompresses at ~1.5 GB/s, LZ4 ~2 us and several GB/s,
# but compresses smooth 16-bit maps ~2x worse. Masks: LZ4 (a few hundred bytes either way, ~10x
# faster than zstd's call). Depth: byte planes + LZ4, ~35 us a sample where zstd takes ~75 us
# (that difference alone is ~0.1 of the decode-vs-JPEG-limit ratio) for ~7 KB more than zstd's
# (~2x PNG's ~7 KB on the synthetic 16-bit ramps, ~8 KB vs PNG's ~2 KB for 8-bit depth; JPEG inputs
# are ~28 KB a sample). Either codec reads back: switching DEPTH_CODEC changes only new data.
MASK_LAYOUT, MASK_CODEC = LAYOUT_PLAIN, CODEC_LZ4
DEPTH_LAYOUT, DEPTH_CODEC = LAYOUT_BYTE_PLANES, CODEC_LZ4
# 8-bit depth (the source's PNG depth maps, as `data pack` stores them): zstd at level 9. On the
# source layout's maps (bench/data.py, 200 px): LZ4 8.0 KB, zstd-3 2.4 KB, zstd-9 1.9 KB, PNG 2.2 KB;
# decode ~30 us (zstd) vs ~15 (LZ4) vs ~230 (PNG). Level 9 costs ~0.3 ms a map to encode, once, at
# pack time; decode speed does not depend on the level. It keeps a packed dataset no bigger than
# the source's zips (shards/4), where LZ4 made depth ~3.7x its PNG.
DEPTH8_LAYOUT, DEPTH8_CODEC, DEPTH8_ZSTD_LEVEL = LAYOUT_PLAIN, CODEC_ZSTD, 9
# Sizes a raw header may claim (a guard against allocating garbage-sized buffers).
_MAX_SIDE = 1 << 16

_DECODE_ERRORS = (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError)
_codecs: dict[tuple[int, int | None], pa.Codec] = {}


class CorruptImageError(ValueError):
    """Bytes that do not decode to the expected image; callers add the sample id and shard URI."""


class ImageSizeError(CorruptImageError):
    """An image that decodes, but not to the size its caller's `out` array has."""


def _codec(code: int, level: int | None = None) -> pa.Codec:
    """pyarrow's codec for `code` (zstd at `level`, default RAW_ZSTD_LEVEL; the level only matters
    for compressing), made once per process."""
    key = (code, (level or RAW_ZSTD_LEVEL) if code == CODEC_ZSTD else None)
    c = _codecs.get(key)
    if c is None:
        kwargs = {"compression_level": key[1]} if code == CODEC_ZSTD else {}
        c = _codecs[key] = pa.Codec(_CODEC_NAMES[code], **kwargs)
    return c


def _save(img: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def _check_bytes(data: object, what: str) -> None:
    if not isinstance(data, (bytes, bytearray, memoryview)) or len(data) == 0:
        raise CorruptImageError(f"could not decode {what}: empty or not bytes ({type(data).__name__})")


def _open(data: bytes, what: str, fmt: str) -> Image.Image:
    _check_bytes(data, what)
    try:
        img = Image.open(io.BytesIO(data))
        # Pillow decodes lazily; load() now so truncated data fails here and not later.
        img.load()
    except _DECODE_ERRORS as exc:
        raise CorruptImageError(f"could not decode {what} ({len(data)} bytes): {exc}") from exc
    if img.format != fmt:
        raise CorruptImageError(f"could not decode {what}: expected {fmt}, got {img.format}")
    return img


# -- raw arrays ---------------------------------------------------------------------------------------


def encode_raw(values: np.ndarray, layout: int = LAYOUT_PLAIN, codec: int = CODEC_LZ4,
               level: int | None = None) -> bytes:
    """The raw format's bytes of an HxW uint8 or uint16 array (see RAW_MAGIC); `level` is zstd's
    (default RAW_ZSTD_LEVEL), ignored by the other codecs."""
    values = np.asarray(values)
    if values.ndim != 2 or values.dtype.kind != "u" or values.dtype.itemsize not in (1, 2):
        raise ValueError(f"encode_raw wants an HxW uint8 or uint16 array, got {values.shape} {values.dtype}")
    values = np.ascontiguousarray(values, dtype=values.dtype.newbyteorder("<"))
    if layout == LAYOUT_BYTE_PLANES and values.dtype.itemsize == 2:
        b = values.reshape(-1).view(np.uint8)
        payload = np.concatenate([b[0::2], b[1::2]]).tobytes()
    elif layout == LAYOUT_PLAIN or values.dtype.itemsize == 1:
        layout, payload = LAYOUT_PLAIN, values.tobytes()
    else:
        raise ValueError(f"unknown raw layout {layout}")
    if codec != CODEC_NONE:
        payload = _codec(codec, level).compress(payload, asbytes=True)
    h, w = values.shape
    header = _RAW_HEADER.pack(RAW_VERSION, _DTYPE_CODES[values.dtype], layout, codec, h, w, len(payload))
    return RAW_MAGIC + header + payload


def raw_header(data: bytes, what: str) -> tuple[np.dtype, int, int, int, int]:
    """(dtype, layout, codec, height, width) from the raw format's header; raises CorruptImageError."""
    if len(data) < RAW_HEADER_BYTES or bytes(data[: len(RAW_MAGIC)]) != RAW_MAGIC:
        raise CorruptImageError(f"could not decode {what}: raw header missing or truncated ({len(data)} bytes)")
    version, dtype, layout, codec, h, w, payload = _RAW_HEADER.unpack_from(data, len(RAW_MAGIC))
    if version != RAW_VERSION:
        raise CorruptImageError(f"could not decode {what}: raw format version {version}, this code reads {RAW_VERSION}")
    if (dtype not in _DTYPES or layout not in (LAYOUT_PLAIN, LAYOUT_BYTE_PLANES)
            or codec not in (CODEC_NONE, *_CODEC_NAMES)):
        raise CorruptImageError(f"could not decode {what}: raw header has dtype {dtype}, layout {layout}, codec "
                                f"{codec}")
    if not (0 < h <= _MAX_SIDE and 0 < w <= _MAX_SIDE):
        raise CorruptImageError(f"could not decode {what}: raw header claims {h}x{w} pixels")
    if len(data) - RAW_HEADER_BYTES != payload:
        raise CorruptImageError(f"could not decode {what}: {len(data) - RAW_HEADER_BYTES} payload bytes, the header "
                                f"says {payload} (truncated?)")
    return _DTYPES[dtype], layout, codec, h, w


def _raw_payload(data: bytes, what: str, header: tuple) -> np.ndarray:
    """The decompressed payload of raw-format bytes, as a flat uint8 array (read-only)."""
    dtype, _, codec, h, w = header
    size = h * w * dtype.itemsize
    payload = memoryview(data)[RAW_HEADER_BYTES:]
    if codec != CODEC_NONE:
        try:
            payload = _codec(codec).decompress(payload, decompressed_size=size)
        except (OSError, ValueError) as exc:
            raise CorruptImageError(f"could not decode {what} ({len(data)} bytes, {h}x{w}): {exc}") from exc
    flat = np.frombuffer(payload, dtype=np.uint8)
    if flat.size != size:
        raise CorruptImageError(f"could not decode {what}: {flat.size} bytes of values, {h}x{w} {dtype} needs {size}")
    return flat


def _check_out(out: np.ndarray, shape: tuple[int, ...], dtype: np.dtype, what: str) -> None:
    if out.shape != shape:
        raise ImageSizeError(f"{what} is {shape[-2]}x{shape[-1]}, expected {out.shape[-2]}x{out.shape[-1]}")
    if out.dtype != dtype or not out.flags.c_contiguous:
        raise ValueError(f"{what}: out must be a C-contiguous {dtype} array, got {out.dtype}")


def decode_raw(data: bytes, what: str, out: np.ndarray | None = None, header: tuple | None = None) -> np.ndarray:
    """The HxW array in raw-format bytes (uint8, or little-endian uint16); raises CorruptImageError.

    With `out` (an HxW array of the same dtype), the values are written there and `out` returned.
    `header` is raw_header(data, what) when the caller has it already.
    """
    header = header or raw_header(data, what)
    dtype, layout, _, h, w = header
    flat = _raw_payload(data, what, header)
    if out is None:
        out = np.empty((h, w), dtype)
    else:
        _check_out(out, (h, w), dtype, what)
    dst = out.reshape(-1).view(np.uint8)  # out is contiguous: reshape(-1) is a view
    if layout == LAYOUT_BYTE_PLANES and dtype.itemsize == 2:
        n = h * w
        dst[0::2] = flat[:n]
        dst[1::2] = flat[n:]
    else:
        dst[:] = flat
    return out


def _raw_or_png(data: bytes, what: str) -> tuple | None:
    """raw_header(data) for raw-format bytes, None for a PNG; raises CorruptImageError otherwise."""
    _check_bytes(data, what)
    head = bytes(data[:8])
    if head == RAW_MAGIC:
        return raw_header(data, what)
    if head == PNG_SIGNATURE:
        return None
    raise CorruptImageError(f"could not decode {what}: neither the raw format nor PNG (starts with {head!r})")


# -- JPEG -------------------------------------------------------------------------------------------


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


# -- mask -------------------------------------------------------------------------------------------


def _mask_u8(mask: np.ndarray, who: str) -> np.ndarray:
    mask = np.asarray(mask)
    if mask.dtype == np.bool_:
        mask = mask.astype(np.uint8) * 255
    if mask.dtype != np.uint8 or mask.ndim != 2:
        raise ValueError(f"{who} wants HxW uint8 0/255 (or bool), got {mask.shape} {mask.dtype}")
    if np.any((mask != 0) & (mask != 255)):
        raise ValueError(f"{who}: mask has values other than 0 and 255")
    return mask


def encode_mask(mask: np.ndarray) -> bytes:
    """Lossless raw-format bytes of an HxW mask with values 0/255 (bool masks become 0/255)."""
    return encode_raw(_mask_u8(mask, "encode_mask"), MASK_LAYOUT, MASK_CODEC)


def encode_mask_png(mask: np.ndarray) -> bytes:
    """Lossless 8-bit grayscale PNG of an HxW 0/255 mask: the format before encode_mask."""
    return _save(Image.fromarray(np.ascontiguousarray(_mask_u8(mask, "encode_mask_png"))), "PNG",
                 compress_level=PNG_COMPRESS_LEVEL)


def decode_mask(data: bytes, out: np.ndarray | None = None) -> np.ndarray:
    """HxW uint8 (0/255) from mask bytes (the raw format, or PNG); raises CorruptImageError."""
    header = _raw_or_png(data, "mask")
    if header is not None:
        if header[0] != np.uint8:
            raise CorruptImageError(f"could not decode mask: raw values are {header[0]}, expected uint8")
        return decode_raw(data, "mask", out, header)
    img = _open(data, "mask PNG", "PNG")
    if img.mode != "L":
        img = img.convert("L")
    values = np.asarray(img)
    if out is None:
        return values
    if out.shape != values.shape:
        raise ImageSizeError(f"mask is {values.shape[0]}x{values.shape[1]}, expected {out.shape[0]}x{out.shape[1]}")
    out[...] = values
    return out


# -- depth ------------------------------------------------------------------------------------------


def depth_to_uint16(depth: np.ndarray) -> np.ndarray:
    """The exact 16-bit values encode_depth stores for a float depth map in [0, 1]."""
    depth = np.asarray(depth, dtype=np.float32)
    if depth.ndim != 2:
        raise ValueError(f"depth must be HxW, got shape {depth.shape}")
    if not np.all(np.isfinite(depth)):
        raise ValueError("depth has NaN or infinite values")
    lo, hi = float(depth.min()), float(depth.max())
    if lo < -_DEPTH_RANGE_SLACK or hi > 1 + _DEPTH_RANGE_SLACK:
        raise ValueError(f"depth must lie in [0, 1], got [{lo:.6g}, {hi:.6g}]")
    return np.rint(np.clip(depth, 0.0, 1.0) * DEPTH_U16_MAX).astype(np.uint16)


def encode_depth(depth: np.ndarray) -> bytes:
    """Raw-format bytes of an HxW float depth map in [0, 1] (stored as round(depth * 65535))."""
    return encode_depth_uint16(depth_to_uint16(depth))


def encode_depth_uint16(depth_u16: np.ndarray) -> bytes:
    """Raw-format bytes of already-quantized depth (see depth_to_uint16)."""
    return encode_raw(np.asarray(depth_u16, dtype=np.uint16), DEPTH_LAYOUT, DEPTH_CODEC)


def encode_depth_8bit(depth_u8: np.ndarray) -> bytes:
    """Raw-format bytes of 8-bit depth (value / 255), as the source dataset's depth maps are:
    zstd (DEPTH8_CODEC), PNG-sized; datasets packed before hold LZ4 and read the same."""
    return encode_raw(np.asarray(depth_u8, dtype=np.uint8), DEPTH8_LAYOUT, DEPTH8_CODEC, DEPTH8_ZSTD_LEVEL)


def encode_depth_png(depth: np.ndarray) -> bytes:
    """16-bit grayscale PNG of an HxW float depth map in [0, 1]: the format before encode_depth."""
    return _save(Image.fromarray(np.ascontiguousarray(depth_to_uint16(depth))), "PNG",
                 compress_level=PNG_COMPRESS_LEVEL)


def depth_values(data: bytes) -> np.ndarray:
    """The stored integers of depth bytes: HxW uint8 (value / 255) or uint16 (value / 65535).

    Reads the raw format and 8- or 16-bit grayscale PNGs; raises CorruptImageError.
    """
    header = _raw_or_png(data, "depth")
    if header is not None:
        return decode_raw(data, "depth", None, header)
    return depth_image_values(_open(data, "depth PNG", "PNG"))


def depth_image_values(img: Image.Image) -> np.ndarray:
    """The integers of a loaded 8- or 16-bit grayscale depth image (see depth_values)."""
    if img.mode == "L":
        return np.asarray(img)
    if img.mode not in ("I;16", "I;16B", "I;16L", "I"):
        raise CorruptImageError(f"could not decode depth PNG: expected 8- or 16-bit grayscale, got mode {img.mode}")
    values = np.asarray(img)
    if values.min() < 0 or values.max() > DEPTH_U16_MAX:
        raise CorruptImageError(f"could not decode depth PNG: values outside 0..{DEPTH_U16_MAX}")
    return values.astype(np.uint16)


def decode_depth_uint16(data: bytes, out: np.ndarray | None = None) -> np.ndarray:
    """HxW uint16 depth (depth * 65535) from depth bytes; 8-bit depth v becomes v * 257, so
    value / 65535 equals the stored v / 255 exactly. Raises CorruptImageError."""
    header = _raw_or_png(data, "depth")
    if header is not None:
        if header[0] == np.uint16:
            return decode_raw(data, "depth", out, header)
        values = decode_raw(data, "depth", None, header)
    else:
        values = depth_values(data)
    if out is None:
        out = np.empty(values.shape, np.uint16)
    elif out.shape != values.shape:
        raise ImageSizeError(f"depth is {values.shape[0]}x{values.shape[1]}, expected {out.shape[0]}x{out.shape[1]}")
    if values.dtype == np.uint8:
        np.multiply(values, np.uint16(257), out=out, dtype=np.uint16)
    else:
        out[...] = values
    return out


def decode_depth(data: bytes) -> np.ndarray:
    """HxW float32 depth in [0, 1] from depth bytes; raises CorruptImageError.

    16-bit values are read as value/65535; 8-bit ones (the source dataset's depth maps) as value/255.
    """
    values = depth_values(data)
    scale = 255 if values.dtype == np.uint8 else DEPTH_U16_MAX
    return values.astype(np.float32) / np.float32(scale)


def decode_depth_planes(data: bytes, out: np.ndarray) -> np.ndarray:
    """Depth's 16-bit values (as decode_depth_uint16) split into byte planes: out[0] the low
    bytes, out[1] the high bytes, `out` a C-contiguous 2 x H x W uint8 array.

    Byte-plane raw data (what encode_depth writes) is copied as it is, so no interleave is paid;
    the training device recombines high * 256 + low. 8-bit depth v gives v in both planes (v * 257).
    """
    header = _raw_or_png(data, "depth")
    if header is not None:
        dtype, layout, _, h, w = header
        _check_out(out, (2, h, w), np.dtype(np.uint8), "depth")
        flat = _raw_payload(data, "depth", header)
        dst = out.reshape(2, -1)
        if dtype == np.uint8:
            dst[0] = flat
            dst[1] = flat
        elif layout == LAYOUT_BYTE_PLANES:
            out.reshape(-1)[:] = flat
        else:
            dst[0] = flat[0::2]
            dst[1] = flat[1::2]
        return out
    values = decode_depth_uint16(data)
    _check_out(out, (2, *values.shape), np.dtype(np.uint8), "depth")
    np.bitwise_and(values, 0xFF, out=out[0], casting="unsafe")
    np.right_shift(values, 8, out=out[1], casting="unsafe")
    return out


# The names before the raw format; they read both encodings.
decode_mask_png = decode_mask
decode_depth_png = decode_depth
