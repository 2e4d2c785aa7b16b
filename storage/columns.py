"""The columns a packed dataset declares, and their codecs: what storage knows about a sample.

A dataset's manifest lists its per-sample columns (`"columns": [{"name", "codec"}, ...]`) and its
task (`"task"`, a string storage does not interpret). Storage encodes, checksums, reads and verifies
each column by its codec alone; what a column means (a mask, a depth map, a class label) is for
the packers and the training code. Codecs:

  image    JPEG or PNG bytes, gray or RGB; arrays are encoded as JPEG (HxWx3 uint8) or PNG (HxW)
  raw_u8   storage.codec's raw format, 8-bit (plain layout, LZ4); PNG also reads (older datasets)
  raw_u16  storage.codec's raw format, 16-bit (byte planes, LZ4) or 8-bit values as they are;
           8- and 16-bit grayscale PNG also read (older datasets)
  int64    a scalar integer (a Parquet int64 column, not bytes)

Datasets of format /1 and /2 carry no "columns": they hold MASK_DEPTH_COLUMNS, the one layout
storage knew before columns were declared. That layout keeps a few habits of its own (binary
masks checked on encode, float depth quantized, a per-sample `depth_mean` in the index); they live
in the mask_depth section at the end of this module, and only apply to exactly those columns.
"""

from __future__ import annotations

import io
from collections.abc import Mapping
from dataclasses import dataclass
from numbers import Integral
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from common.tasks import MASK_DEPTH
from storage import codec

CODECS = ("image", "raw_u8", "raw_u16", "int64")
# Codecs whose values are encoded bytes (a Parquet binary column); the rest are scalars.
BYTES_CODECS = ("image", "raw_u8", "raw_u16")
# Names every shard row has besides the declared columns; a declared column cannot take them.
RESERVED_NAMES = ("sample_id", "height", "width")

_DECODE_ERRORS = (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError)
_INT64_RANGE = (-(2**63), 2**63 - 1)


class ColumnsError(ValueError):
    """A manifest's "columns" (or a writer's columns) that cannot be used; the message says why."""


@dataclass(frozen=True)
class Column:
    """One declared per-sample column: its name in the shards and how its values are encoded."""

    name: str
    codec: str  # one of CODECS

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ColumnsError(f"column name must be a non-empty string, got {self.name!r}")
        if self.codec not in CODECS:
            raise ColumnsError(f"column {self.name!r}: unknown codec {self.codec!r}; choose from {list(CODECS)}")

    @property
    def is_bytes(self) -> bool:
        return self.codec in BYTES_CODECS

    def as_dict(self) -> dict[str, str]:
        return {"name": self.name, "codec": self.codec}


MASK_DEPTH_TASK = MASK_DEPTH.name
MASK_DEPTH_COLUMNS = tuple(Column(name, codec_name) for name, codec_name in MASK_DEPTH.columns)


def check_columns(columns: Any) -> tuple[Column, ...]:
    """`columns` as a tuple of Column; ColumnsError when empty, duplicated or using a reserved name."""
    try:
        cols = tuple(columns)
    except TypeError:
        raise ColumnsError(f"columns must be a sequence of Column, got {type(columns).__name__}") from None
    if not cols:
        raise ColumnsError("a dataset needs at least one column")
    for c in cols:
        if not isinstance(c, Column):
            raise ColumnsError(f"columns must be Column objects, got {c!r}")
    names = [c.name for c in cols]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ColumnsError(f"column names {dup} appear more than once")
    reserved = [n for n in names if n in RESERVED_NAMES]
    if reserved:
        raise ColumnsError(f"column names {reserved} are reserved (every shard row has {list(RESERVED_NAMES)})")
    return cols


def columns_from_manifest(manifest: Mapping[str, Any]) -> tuple[Column, ...]:
    """The declared columns of a manifest; MASK_DEPTH_COLUMNS when it has no "columns" key (/1, /2).

    Raises ColumnsError (a ValueError) when "columns" is not a list of {"name", "codec"} objects
    with known codecs and distinct, unreserved names.
    """
    raw = manifest.get("columns")
    if raw is None:
        return MASK_DEPTH_COLUMNS
    if not isinstance(raw, list):
        raise ColumnsError(f'"columns" must be a list of {{"name", "codec"}} objects, got {type(raw).__name__}')
    cols = []
    for i, entry in enumerate(raw):
        if (not isinstance(entry, dict) or not isinstance(entry.get("name"), str)
                or not isinstance(entry.get("codec"), str)):
            raise ColumnsError(f'"columns"[{i}] must be an object with string "name" and "codec", got {entry!r}')
        cols.append(Column(entry["name"], entry["codec"]))
    return check_columns(cols)


def columns_to_manifest(columns: tuple[Column, ...]) -> list[dict[str, str]]:
    return [c.as_dict() for c in columns]


# -- encoding ---------------------------------------------------------------------------------------


def _u8_from_bool(values: np.ndarray) -> np.ndarray:
    # Binary arrays are stored as 0/255, as storage.codec stores binary masks.
    return values.astype(np.uint8) * 255 if values.dtype == np.bool_ else values


def _encode_image(column: Column, values: np.ndarray) -> bytes:
    values = _u8_from_bool(values)
    if values.ndim == 3 and values.shape[2] == 1:
        values = values[:, :, 0]
    if values.ndim == 3 and values.shape[2] == 3 and values.dtype == np.uint8:
        return codec.encode_jpeg(values)
    if values.ndim == 2 and values.dtype.kind == "u" and values.dtype.itemsize in (1, 2):
        img = Image.fromarray(np.ascontiguousarray(values, dtype=np.uint8 if values.dtype.itemsize == 1 else np.uint16))
        buf = io.BytesIO()
        img.save(buf, format="PNG", compress_level=codec.PNG_COMPRESS_LEVEL)
        return buf.getvalue()
    raise ValueError(f"column {column.name!r} (image): wants HxWx3 uint8 (JPEG) or HxW uint8/uint16 (PNG), got "
                     f"{values.shape} {values.dtype}")


def _encode_raw(column: Column, values: np.ndarray) -> bytes:
    values = _u8_from_bool(values)
    if values.ndim != 2:
        raise ValueError(f"column {column.name!r} ({column.codec}): wants an HxW array, got shape {values.shape}")
    if column.codec == "raw_u8":
        if values.dtype != np.uint8:
            raise ValueError(f"column {column.name!r} (raw_u8): wants HxW uint8 (or bool), got {values.dtype}")
        return codec.encode_raw(values, codec.LAYOUT_PLAIN, codec.CODEC_LZ4)
    if values.dtype.kind == "f":
        # Floats are fractions in [0, 1], stored as round(v * 65535) (range-checked, like depth).
        try:
            values = codec.depth_to_uint16(values)
        except ValueError as exc:
            raise ValueError(f"column {column.name!r} (raw_u16): float values must be fractions in [0, 1] "
                             f"({exc})") from None
    if values.dtype == np.uint8:
        return codec.encode_raw(values, codec.LAYOUT_PLAIN, codec.CODEC_LZ4)  # 8-bit values stay 8-bit
    if values.dtype.kind == "u" and values.dtype.itemsize == 2:
        return codec.encode_raw(values, codec.LAYOUT_BYTE_PLANES, codec.CODEC_LZ4)
    raise ValueError(f"column {column.name!r} (raw_u16): wants HxW uint16, uint8 or float in [0, 1], got "
                     f"{values.dtype}")


def _as_int64(column: Column, value: Any) -> int:
    if isinstance(value, np.ndarray) and value.ndim == 0:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise ValueError(f"column {column.name!r} (int64): wants an integer, got {value!r} ({type(value).__name__})")
    v = int(value)
    if not _INT64_RANGE[0] <= v <= _INT64_RANGE[1]:
        raise ValueError(f"column {column.name!r} (int64): {v} does not fit in 64 bits")
    return v


def encode_value(column: Column, value: Any) -> bytes | int:
    """The stored value of one sample's `column`: bytes for image/raw codecs, an int for int64.

    numpy arrays are encoded (image: JPEG for HxWx3 uint8, PNG for HxW (or HxWx1) uint8/uint16;
    raw_u8: storage.codec's raw format, plain, LZ4; raw_u16: byte planes, LZ4, with uint8 arrays
    kept 8-bit and floats in [0, 1] quantized to round(v * 65535)); bool arrays become 0/255.
    Bytes are passed through as they are (already encoded). Raises ValueError on what the codec
    cannot store.
    """
    if column.codec == "int64":
        return _as_int64(column, value)
    if isinstance(value, np.ndarray):
        return _encode_image(column, value) if column.codec == "image" else _encode_raw(column, value)
    if isinstance(value, (bytes, bytearray, memoryview)):
        if len(value) == 0:
            raise ValueError(f"column {column.name!r} ({column.codec}): empty bytes")
        return bytes(value)
    raise ValueError(f"column {column.name!r} ({column.codec}): wants encoded bytes or a numpy array, got "
                     f"{type(value).__name__}")


def checksum_bytes(column: Column, value: bytes | int) -> bytes:
    """What the sample checksum hashes of a stored value: the bytes, or int64 as 8 little-endian bytes."""
    if column.codec == "int64":
        return int(value).to_bytes(8, "little", signed=True)
    return value


# -- decoding ---------------------------------------------------------------------------------------


def _open_image(data: bytes, what: str, formats: tuple[str, ...]) -> Image.Image:
    if not isinstance(data, (bytes, bytearray, memoryview)) or len(data) == 0:
        raise codec.CorruptImageError(f"could not decode {what}: empty or not bytes ({type(data).__name__})")
    try:
        img = Image.open(io.BytesIO(data))
        img.load()  # Pillow decodes lazily: truncated data fails here, not later
    except _DECODE_ERRORS as exc:
        raise codec.CorruptImageError(f"could not decode {what} ({len(data)} bytes): {exc}") from exc
    if img.format not in formats:
        raise codec.CorruptImageError(f"could not decode {what}: is {img.format}, expected {' or '.join(formats)}")
    return img


def _image_array(img: Image.Image) -> np.ndarray:
    if img.mode in ("L", "RGB"):
        return np.asarray(img)
    if img.mode.startswith("I;16"):
        return np.asarray(img).astype(np.uint16)
    return np.asarray(img.convert("L" if img.mode in ("1", "LA") else "RGB"))


def _decode_raw_or_png(column: Column, data: bytes) -> np.ndarray:
    what = f"column {column.name!r} ({column.codec})"
    if not isinstance(data, (bytes, bytearray, memoryview)) or len(data) == 0:
        raise codec.CorruptImageError(f"could not decode {what}: empty or not bytes ({type(data).__name__})")
    head = bytes(data[:8])
    if head == codec.RAW_MAGIC:
        header = codec.raw_header(data, what)
        if column.codec == "raw_u8" and header[0] != np.uint8:
            raise codec.CorruptImageError(f"could not decode {what}: raw values are {header[0]}, expected uint8")
        return codec.decode_raw(data, what, None, header)
    if head != codec.PNG_SIGNATURE:
        raise codec.CorruptImageError(f"could not decode {what}: neither the raw format nor PNG (starts with {head!r})")
    img = _open_image(data, what, ("PNG",))
    if column.codec == "raw_u8":
        return np.asarray(img if img.mode == "L" else img.convert("L"))  # as storage.codec.decode_mask
    if img.mode == "L":
        return np.asarray(img)
    if img.mode not in ("I;16", "I;16B", "I;16L", "I"):
        raise codec.CorruptImageError(f"could not decode {what}: PNG mode {img.mode}, expected 8- or 16-bit grayscale")
    values = np.asarray(img)
    if values.min() < 0 or values.max() > 0xFFFF:
        raise codec.CorruptImageError(f"could not decode {what}: PNG values outside 0..65535")
    return values.astype(np.uint16)


def decode_value(column: Column, value: Any) -> np.ndarray | int:
    """A stored value decoded: image -> HxWx3 uint8 (RGB) or HxW (gray, uint8 or uint16);
    raw_u8 -> HxW uint8; raw_u16 -> HxW of the stored integers (uint16, or uint8 for 8-bit data);
    int64 -> int. Raises codec.CorruptImageError saying what is wrong."""
    if column.codec == "int64":
        if value is None or isinstance(value, bool) or not isinstance(value, Integral):
            raise codec.CorruptImageError(f"column {column.name!r} (int64): no integer value ({value!r})")
        return int(value)
    if column.codec == "image":
        return _image_array(_open_image(value, f"column {column.name!r} (image)", ("JPEG", "PNG")))
    return _decode_raw_or_png(column, value)


def decode_check(column: Column, value: Any, height: int, width: int) -> None:
    """For verify: `value` decodes per its column's codec at height x width (int64: is an integer).

    Raises codec.CorruptImageError with the reason; codec.ImageSizeError (a subclass) when it
    decodes, but to another size.
    """
    decoded = decode_value(column, value)
    if column.codec == "int64":
        return
    h, w = decoded.shape[:2]
    if (h, w) != (int(height), int(width)):
        raise codec.ImageSizeError(f"column {column.name!r} is {h}x{w}, the index says {int(height)}x{int(width)}")


def encoded_size(column: Column, value: bytes) -> tuple[int, int]:
    """(height, width) of an encoded image/raw value, reading as little as its format allows."""
    what = f"column {column.name!r} ({column.codec})"
    if column.codec == "int64":
        raise ValueError(f"{what} has no size")
    if bytes(value[:8]) == codec.RAW_MAGIC:
        _, _, _, h, w = codec.raw_header(value, what)
        return int(h), int(w)
    try:
        with Image.open(io.BytesIO(value)) as img:
            w, h = img.size
    except _DECODE_ERRORS as exc:
        raise codec.CorruptImageError(f"could not read the size of {what} ({len(value)} bytes): {exc}") from exc
    return int(h), int(w)


# -- the mask_depth layout (formats /1 and /2) ------------------------------------------------------
# Written exactly as before columns were declared, so that its datasets stay byte-identical.


def is_mask_depth(columns: tuple[Column, ...]) -> bool:
    return tuple(columns) == MASK_DEPTH_COLUMNS


def encode_mask_depth_value(column: Column, value: Any) -> bytes:
    """encode_value for MASK_DEPTH_COLUMNS, keeping that layout's checks: images must be RGB
    (JPEG), masks 0/255 (or bool), depth floats in [0, 1]. The bytes equal encode_value's for
    values that pass."""
    if isinstance(value, np.ndarray):
        return {"mask": codec.encode_mask, "depth": codec.encode_depth}.get(column.name, codec.encode_jpeg)(value)
    return encode_value(column, value)


def mask_depth_depth_mean(sample: Mapping[str, Any], encoded: Mapping[str, bytes]) -> float:
    """The index's `depth_mean` of a mask_depth sample that does not bring one: the mean depth in [0, 1]."""
    depth = sample["depth"]
    if isinstance(depth, np.ndarray):
        return float(codec.depth_to_uint16(depth).mean()) / codec.DEPTH_U16_MAX
    return float(codec.decode_depth(encoded["depth"]).mean())
