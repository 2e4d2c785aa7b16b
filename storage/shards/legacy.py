"""The one fixed column layout storage still knows by name: the first datasets' (formats /1, /2).

Those manifests declare no columns (storage.columns gives MASK_DEPTH_COLUMNS for them), so reading
them needs the layout; and ShardWriter's defaults still write it, byte for byte as before columns
were declared, so that its datasets and their Recipe hashes stay as they are. Everything the
writer does differently for that layout comes from `layout_for(columns)`: a generic column set gets
the generic encoder, the base index columns and no per-sample stat.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from storage.columns import (
    MASK_DEPTH_COLUMNS,
    MASK_DEPTH_TASK,
    Column,
    encode_mask_depth_value,
    encode_value,
    is_mask_depth,
    mask_depth_depth_mean,
)
from storage.shards.format import (
    BASE_INDEX_COLUMNS,
    CHECKSUM_DIGEST_BYTES,
    CRC32_FORMAT,
    FIXED_COLUMN_FORMATS,
    LEGACY_MASK_DEPTH_FORMAT,
)

# What ShardWriter writes when a caller names no columns (storage.synth, older callers).
DEFAULT_COLUMNS = MASK_DEPTH_COLUMNS
DEFAULT_TASK = MASK_DEPTH_TASK
MASK_DEPTH_FORMAT = CRC32_FORMAT  # what a dataset of the fixed layout is written as now
FORMAT = MASK_DEPTH_FORMAT
# The columns the fixed layout shares (/4): the background, drawn on by many samples.
MASK_DEPTH_SHARED = ("bg",)
# The index columns of the fixed layout (BASE plus the per-sample depth_mean it always has), in
# their order on disk; storage/pack/ builds its rows of that layout from it.
INDEX_STAT = "depth_mean"  # its per-sample stat; the manifest records its mean too
INDEX_COLUMNS = ("sample_id", "shard", "row_group", "row", "height", "width", "depth_mean", "checksum")


@dataclass(frozen=True)
class WriterLayout:
    """What ShardWriter does per column set: how values are encoded, the index's own columns, a
    per-sample stat it computes when a sample does not bring it, and the shared columns by default."""

    fixed: bool  # the fixed layout: written as /2 without shared columns
    encode: Callable[[Column, Any], bytes | int]
    index_names: tuple[str, ...]
    stat: str | None  # an index column computed per sample (None: none)
    compute_stat: Callable[[Mapping[str, Any], Mapping[str, Any]], float] | None
    default_shared: tuple[str, ...]


_FIXED = WriterLayout(
    True, encode_mask_depth_value, INDEX_COLUMNS, INDEX_STAT, mask_depth_depth_mean, MASK_DEPTH_SHARED
)
_GENERIC = WriterLayout(False, encode_value, BASE_INDEX_COLUMNS, None, None, ())


def layout_for(columns: Sequence[Column]) -> WriterLayout:
    return _FIXED if is_mask_depth(tuple(columns)) else _GENERIC


def unshared_format(columns: Sequence[Column]) -> str | None:
    """The format of these columns without shared ones when it is the fixed /2, else None (/3)."""
    return LEGACY_MASK_DEPTH_FORMAT if is_mask_depth(tuple(columns)) else None


def write_format(columns: Sequence[Column], shared: bool) -> str:
    """The format a new dataset of these columns is written as: /2 for the fixed layout without
    shared columns (its frozen layout, on request), else /5. The writers' checksums follow it
    (format.checksum_of), so a writer and its manifest agree."""
    return (unshared_format(columns) if not shared else None) or CRC32_FORMAT


def fixed_columns_problem(fmt: str, columns: Sequence[Column]) -> str | None:
    """What is wrong when a manifest of a fixed-layout format declares other columns, or None."""
    if fmt in FIXED_COLUMN_FORMATS and not is_mask_depth(tuple(columns)):
        return (f"format {fmt} declares columns {[c.as_dict() for c in columns]}, "
                f"but it holds only {[c.as_dict() for c in MASK_DEPTH_COLUMNS]}")
    return None


def sample_checksum(fg_bg: bytes, bg: bytes, mask: bytes, depth: bytes) -> str:
    """blake2b (8-byte digest, hex) over the four encoded values of a sample of the fixed layout,
    in column order: columns_checksum(MASK_DEPTH_COLUMNS, ...)."""
    h = hashlib.blake2b(digest_size=CHECKSUM_DIGEST_BYTES)
    for part in (fg_bg, bg, mask, depth):
        h.update(part)
    return h.hexdigest()
