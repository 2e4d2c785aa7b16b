"""The packed dataset format: file names, formats, schemas and checksums (no I/O).

Layout under a dataset URI:
  manifest.json          written last; a folder without it is not a dataset
  index.parquet          one row per sample: where it lives, its checksum, per-sample stats
  shards/shard-NNNNN.parquet   the encoded values, in row groups small enough to fetch one at a time

What a sample holds is declared in the manifest: `"columns": [{"name", "codec"}, ...]` (see
storage/columns.py for the codecs) and an opaque `"task"` string, plus an optional opaque `"meta"`
dict (class names, scales, ... whatever the packer wrote). Every shard row is `sample_id`, the
declared columns in declared order, `height`, `width`; every index row is BASE_INDEX_COLUMNS plus
the writer's extra per-sample columns. Storage encodes, checksums, reads and verifies columns by
their codec; it does not know what they mean.

Formats: /1 and /2 are the fixed layout of the first datasets (the columns storage.columns
declares for manifests without "columns"; /1 with PNG masks and depth), byte for byte as before
columns were declared; storage/shards/legacy.py keeps what only that layout needs. Any other
columns are written as /3, which older code refuses rather than misreads.

/4 (SHARED_FORMAT) adds shared columns: a value many samples hold (a background image drawn on by
many samples) is stored once, in its own table, and each shard row holds its id instead (an int64
column `<name>_id` in the column's place):

  shared/<name>/index.parquet        one row per distinct value: sample_id (the value's id), shard
                                     (file number), row_group, row, height, width, checksum
  shared/<name>/part-NNNNN.parquet   the values (sample_id = id, the column, height, width)

The manifest's "shared" ({name: {"key", "codec", "num", "index", "index_bytes", "index_sha256",
"files": [shard entries]}}) lists them. A sample's index checksum covers its stored values (the
id in place of the value); each shared value has its own checksum in the shared index, checked
when it is read; `data verify` checks both, every file's sha256 and every value's decode.
Older code refuses /4 (unknown format).

/5 (CRC32_FORMAT) is /3 or /4 (shared columns optional) with each checksum (the index's and the
shared indexes') a CRC-32 (zlib's, 8 hex digits) instead of an 8-byte blake2b: the loader checks
every sample of every chunk, and on a 2-core notebook blake2b was the largest part of a streamed
chunk's landing (0.13 s of CPU for 6,000 samples, 96 MB; CRC-32 0.025 s: docs/PERFORMANCE.md).
Its job is to catch damage (a flipped bit, a torn or misplaced value), not tampering: each file's
sha256 in the manifest, checked by `data verify`, is there for that. New datasets are /5 (the
fixed layout written as /2 on request excepted); older code refuses /5 rather than reporting
every sample as damaged.
"""

from __future__ import annotations

import hashlib
import zlib
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from storage.columns import Column, ColumnsError, checksum_bytes

# /2: the fixed layout's masks and depth maps in storage.codec's raw format; /1 held PNGs (both
# read: the decoders tell the encodings apart per value). /3: declared columns. /4: declared
# columns, some of them shared (stored once per distinct value; see the docstring).
LEGACY_FORMAT_1 = "orchestrator.shards/1"
LEGACY_MASK_DEPTH_FORMAT = "orchestrator.shards/2"
COLUMNS_FORMAT = "orchestrator.shards/3"
SHARED_FORMAT = "orchestrator.shards/4"
CRC32_FORMAT = "orchestrator.shards/5"
READABLE_FORMATS = (LEGACY_FORMAT_1, LEGACY_MASK_DEPTH_FORMAT, COLUMNS_FORMAT, SHARED_FORMAT, CRC32_FORMAT)
WRITABLE_FORMATS = (LEGACY_MASK_DEPTH_FORMAT, CRC32_FORMAT)
# Formats whose datasets may have shared columns (/4 must; /5 may).
SHARED_FORMATS = (SHARED_FORMAT, CRC32_FORMAT)
# The per-sample checksums: "blake2b" (8-byte digest) up to /4, "crc32" from /5.
BLAKE2B, CRC32 = "blake2b", "crc32"
# Formats whose columns are fixed: a manifest of these may omit "columns", and may only declare those.
FIXED_COLUMN_FORMATS = (LEGACY_FORMAT_1, LEGACY_MASK_DEPTH_FORMAT)
SHARED_DIR = "shared"
MANIFEST = "manifest.json"
INDEX = "index.parquet"
SHARD_DIR = "shards"
ROWS_PER_SHARD = 4096
ROWS_PER_GROUP = 256
CHECKSUM_DIGEST_BYTES = 8

# Every index has these; writers add extra per-sample columns after them.
BASE_INDEX_COLUMNS = ("sample_id", "shard", "row_group", "row", "height", "width", "checksum")

# The on-disk types of the index columns storage writes (a per-sample float32 stat a layout adds,
# storage/shards/legacy.py's depth_mean, goes before the checksum as it always has).
INDEX_TYPES = {
    "sample_id": pa.int64(),
    "shard": pa.int32(),
    "row_group": pa.int32(),
    "row": pa.int32(),
    "height": pa.int32(),
    "width": pa.int32(),
    "depth_mean": pa.float32(),
    "checksum": pa.string(),
}


def shard_file(i: int) -> str:
    return f"{SHARD_DIR}/shard-{i:05d}.parquet"


def shared_key(name: str) -> str:
    """The int64 column a /4 shard row holds in place of shared column `name`: the value's id."""
    return f"{name}_id"


def shared_file(name: str, i: int) -> str:
    return f"{SHARED_DIR}/{name}/part-{i:05d}.parquet"


def shared_index_file(name: str) -> str:
    return f"{SHARED_DIR}/{name}/index.parquet"


def stored_columns(columns: Sequence[Column], shared: Sequence[str] = ()) -> tuple[Column, ...]:
    """What a shard row holds: the declared columns, each shared one replaced by its int64 id."""
    return tuple(Column(shared_key(c.name), "int64") if c.name in shared else c for c in columns)


def check_shared(columns: tuple[Column, ...], shared: Sequence[str]) -> tuple[str, ...]:
    """The shared column names, checked against the declared columns (ColumnsError says why not)."""
    shared = (shared,) if isinstance(shared, str) else tuple(shared)
    by_name = {c.name: c for c in columns}
    for name in shared:
        if name not in by_name:
            raise ColumnsError(f"shared column {name!r} is not declared (columns {list(by_name)})")
        if not by_name[name].is_bytes:
            raise ColumnsError(f"shared column {name!r} is {by_name[name].codec}; only byte columns can be shared")
        if shared_key(name) in by_name:
            raise ColumnsError(
                f"shared column {name!r} needs the name {shared_key(name)!r} for its ids, which a declared column has"
            )
    if len(set(shared)) != len(shared):
        raise ColumnsError(f"shared columns {list(shared)} name a column twice")
    return shared


def checksum_of(fmt: str) -> str:
    """The checksum a dataset of format `fmt` holds: CRC32 for /5, BLAKE2B before."""
    return CRC32 if fmt == CRC32_FORMAT else BLAKE2B


def columns_checksum(columns: Sequence[Column], values: Mapping[str, bytes | int], kind: str) -> str:
    """The index's per-sample checksum (hex) of `kind` (checksum_of the dataset's format) over a
    sample's stored values in declared column order (int64 values as 8 little-endian signed bytes):
    blake2b with an 8-byte digest, or zlib's CRC-32 as 8 hex digits."""
    if kind == CRC32:
        crc = 0
        for c in columns:
            crc = zlib.crc32(checksum_bytes(c, values[c.name]), crc)
        return f"{crc:08x}"
    if kind != BLAKE2B:
        raise ValueError(f"unknown checksum {kind!r}; choose {BLAKE2B!r} or {CRC32!r}")
    h = hashlib.blake2b(digest_size=CHECKSUM_DIGEST_BYTES)
    for c in columns:
        h.update(checksum_bytes(c, values[c.name]))
    return h.hexdigest()


def sample_columns(columns: Sequence[Column]) -> tuple[str, ...]:
    """The column names of a shard row: sample_id, the declared columns in order, height, width."""
    return ("sample_id", *(c.name for c in columns), "height", "width")


def shard_schema(columns: Sequence[Column]) -> pa.Schema:
    """A shard file's Parquet schema: sample_id int64, a binary column per bytes codec (int64 for
    int64), height/width int32."""
    return pa.schema(
        [
            ("sample_id", pa.int64()),
            *((c.name, pa.binary() if c.is_bytes else pa.int64()) for c in columns),
            ("height", pa.int32()),
            ("width", pa.int32()),
        ]
    )


def _extra_array(values: Sequence[Any]) -> pa.Array:
    """An extra index column: numpy scalars keep their dtype; lists (or arrays) per sample become
    a Parquet list column (list<int64> for integers)."""
    if not len(values):
        return pa.array([], pa.null())
    if any(isinstance(v, (list, tuple, np.ndarray)) for v in values):
        arr = pa.array([None if v is None else np.asarray(v).tolist() for v in values])
        if pa.types.is_list(arr.type) and pa.types.is_null(arr.type.value_type):  # only empty lists
            arr = arr.cast(pa.list_(pa.int64()))
        return arr
    return pa.array(np.asarray(values))


def index_table(columns: dict[str, list], extra: dict[str, list] | None = None) -> pa.Table:
    """index.parquet's table: the BASE_INDEX_COLUMNS (and depth_mean when given), typed and in
    their order, then any other per-sample columns of `columns` and `extra`."""
    missing = [k for k in BASE_INDEX_COLUMNS if k not in columns]
    if missing:
        raise ValueError(f"index columns {missing} missing")
    order = [k for k in INDEX_TYPES if k in columns] + [k for k in columns if k not in INDEX_TYPES]
    cols = {
        k: pa.array(columns[k], type=INDEX_TYPES[k]) if k in INDEX_TYPES else _extra_array(columns[k]) for k in order
    }
    for k, values in (extra or {}).items():
        cols[k] = _extra_array(values)
    return pa.table(cols)


def parse_parquet(data: bytes, drop_key: str | None = None) -> tuple[pa.Table, dict[bytes, bytes]]:
    """A whole Parquet file held in memory (an index): its table and its footer's key-value
    metadata, `drop_key` kept out of the table's schema.

    Through ParquetFile, not pq.read_table: read_table imports pyarrow.dataset on its first call,
    0.3-0.8 s of a worker's wait for its first batch on this 2-core machine (py-spy of bench.peer's
    streamed arm: 9 % of its samples), for nothing a single in-memory file needs.
    """
    pf = pq.ParquetFile(pa.BufferReader(data))
    kv = dict(pf.metadata.metadata or {})
    table = pf.read()
    meta = table.schema.metadata
    if drop_key is not None and meta and drop_key.encode() in meta:
        table = table.replace_schema_metadata({k: v for k, v in meta.items() if k != drop_key.encode()} or None)
    return table, kv
