"""The packed dataset format (manifest + index + Parquet shards of encoded values): writer and reader.

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

Formats: /1 and /2 hold the mask_depth columns (MASK_DEPTH_COLUMNS; /1 with PNG masks and depth)
and need no "columns" key; /2 is what mask_depth datasets were written as until /4, byte for byte
as before columns were declared (ShardWriter(format=LEGACY_MASK_DEPTH_FORMAT) still writes it, and
it reads as before). Any other columns are written as /3, which older code refuses rather than
misreads.

/4 (SHARED_FORMAT; what mask_depth datasets are written as now) adds shared columns: a value many
samples hold (mask_depth's background JPEG) is stored once, in its own table, and each shard row
holds its id instead (an int64 column `<name>_id` in the column's place):

  shared/bg/index.parquet          one row per distinct value: sample_id (the value's id), shard
                                   (file number), row_group, row, height, width, checksum
  shared/bg/part-NNNNN.parquet     the values (sample_id = id, the column, height, width)

The manifest's "shared" ({"bg": {"key", "codec", "num", "index", "index_bytes", "index_sha256",
"files": [shard entries]}}) lists them. A sample's index checksum covers its stored values (the
id in place of the value); each shared value has its own checksum in the shared index, checked
when it is read; `data verify` checks both, every file's sha256 and every value's decode.
read_samples returns the declared columns with shared values resolved (the same bytes object for
every sample that shares one), fetching each needed value once per read and keeping them in
memory (up to SHARED_CACHE_BYTES) for the next reads. Older code refuses /4 (unknown format).
"""

from __future__ import annotations

import hashlib
import io
import logging
import posixpath
import threading
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from storage import codec
from storage import fs as sfs
from storage.columns import (
    MASK_DEPTH_COLUMNS,
    MASK_DEPTH_TASK,
    Column,
    ColumnsError,
    check_columns,
    checksum_bytes,
    columns_from_manifest,
    columns_to_manifest,
    encode_mask_depth_value,
    encode_value,
    encoded_size,
    is_mask_depth,
    mask_depth_depth_mean,
)
from storage.dest_check import remove_packed_files

log = logging.getLogger(__name__)

# /2: masks and depth maps in storage.codec's raw format; /1 held PNGs (both read: the decoders
# tell the encodings apart per value). /3: declared columns other than the mask_depth ones.
# /4: declared columns, some of them shared (stored once per distinct value; see the docstring).
LEGACY_MASK_DEPTH_FORMAT = "orchestrator.shards/2"
COLUMNS_FORMAT = "orchestrator.shards/3"
SHARED_FORMAT = "orchestrator.shards/4"
MASK_DEPTH_FORMAT = SHARED_FORMAT  # what a mask_depth dataset is written as
FORMAT = MASK_DEPTH_FORMAT
READABLE_FORMATS = ("orchestrator.shards/1", LEGACY_MASK_DEPTH_FORMAT, COLUMNS_FORMAT, SHARED_FORMAT)
WRITABLE_FORMATS = (LEGACY_MASK_DEPTH_FORMAT, COLUMNS_FORMAT, SHARED_FORMAT)
# Formats whose columns are fixed: a manifest of these may omit "columns", and may only declare these.
_MASK_DEPTH_FORMATS = ("orchestrator.shards/1", LEGACY_MASK_DEPTH_FORMAT)
# The columns a mask_depth dataset shares (/4): the background, drawn on by many samples.
MASK_DEPTH_SHARED = ("bg",)
SHARED_DIR = "shared"
# Shared values a ShardDataset keeps in memory between reads (a background is ~13-30 KB).
SHARED_CACHE_BYTES = 64 * 2**20
MANIFEST = "manifest.json"
INDEX = "index.parquet"
SHARD_DIR = "shards"
ROWS_PER_SHARD = 4096
ROWS_PER_GROUP = 256
CHECKSUM_DIGEST_BYTES = 8

# Every index has these; writers add extra per-sample columns after them.
BASE_INDEX_COLUMNS = ("sample_id", "shard", "row_group", "row", "height", "width", "checksum")
# The index columns of a mask_depth dataset (BASE plus the per-sample depth_mean it always has), in
# their order on disk; storage/pack.py builds its mask_depth index rows from it.
INDEX_COLUMNS = ("sample_id", "shard", "row_group", "row", "height", "width", "depth_mean", "checksum")

_INDEX_TYPES = {
    "sample_id": pa.int64(),
    "shard": pa.int32(),
    "row_group": pa.int32(),
    "row": pa.int32(),
    "height": pa.int32(),
    "width": pa.int32(),
    "depth_mean": pa.float32(),
    "checksum": pa.string(),
}
# How many unknown ids an error message lists before it says "and N more".
_IDS_IN_MESSAGES = 5


class DatasetError(RuntimeError):
    """A dataset URI that cannot be used as one; the message names the URI and what to do."""


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


def _check_shared(columns: tuple[Column, ...], shared: Sequence[str]) -> tuple[str, ...]:
    shared = (shared,) if isinstance(shared, str) else tuple(shared)
    by_name = {c.name: c for c in columns}
    for name in shared:
        if name not in by_name:
            raise ColumnsError(f"shared column {name!r} is not declared (columns {list(by_name)})")
        if not by_name[name].is_bytes:
            raise ColumnsError(f"shared column {name!r} is {by_name[name].codec}; only byte columns can be shared")
        if shared_key(name) in by_name:
            raise ColumnsError(f"shared column {name!r} needs the name {shared_key(name)!r} for its ids, which a declared column has")
    if len(set(shared)) != len(shared):
        raise ColumnsError(f"shared columns {list(shared)} name a column twice")
    return shared


def sample_checksum(fg_bg: bytes, bg: bytes, mask: bytes, depth: bytes) -> str:
    """blake2b (8-byte digest, hex) over the four encoded values of a mask_depth sample, in column
    order: columns_checksum(MASK_DEPTH_COLUMNS, ...)."""
    h = hashlib.blake2b(digest_size=CHECKSUM_DIGEST_BYTES)
    for part in (fg_bg, bg, mask, depth):
        h.update(part)
    return h.hexdigest()


def columns_checksum(columns: Sequence[Column], values: Mapping[str, bytes | int]) -> str:
    """blake2b (8-byte digest, hex) over a sample's stored values in declared column order (int64
    values as 8 little-endian signed bytes): the index's per-sample checksum."""
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


class _HashingSink:
    """A write-only file wrapper that hashes and counts what passes through it.

    The manifest's sha256 and byte count then cost no second read of the shard (which on a
    bucket would be a second download).
    """

    def __init__(self, f):
        self._f = f
        self.sha256 = hashlib.sha256()
        self.nbytes = 0
        self.closed = False
        self._tail = b""  # the last 8 bytes: the footer length and magic, for the manifest

    def write(self, data) -> int:
        mv = memoryview(data).cast("B")
        self.sha256.update(mv)
        self.nbytes += mv.nbytes
        self._tail = (self._tail + bytes(mv[-8:]))[-8:]
        self._f.write(mv)
        return mv.nbytes

    @property
    def footer_bytes(self) -> int | None:
        """Length of the Parquet footer just written, or None when the file does not end like Parquet."""
        if len(self._tail) == 8 and self._tail[4:] == b"PAR1":
            return int.from_bytes(self._tail[:4], "little")
        return None

    def tell(self) -> int:
        return self.nbytes

    def flush(self) -> None:
        self._f.flush()

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return False

    def readable(self) -> bool:
        return False

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._f.close()


def _open_for_write(uri: str):
    fs, path = sfs.filesystem(uri)
    if sfs.is_local(uri):
        fs.makedirs(posixpath.dirname(path), exist_ok=True)
    return fs.open(path, "wb")


class ShardFileWriter:
    """One shard file: samples appended in row groups of `rows_per_group`; close() returns its
    manifest entry (file, rows, row_groups, bytes, sha256, footer_bytes)."""

    def __init__(self, dataset_uri: str, file: str, rows_per_group: int = ROWS_PER_GROUP, columns: Sequence[Column] = MASK_DEPTH_COLUMNS):
        if rows_per_group < 1:
            raise ValueError("rows_per_group must be >= 1")
        self.columns = check_columns(columns)
        self.schema = shard_schema(self.columns)
        self._names = sample_columns(self.columns)
        self.file = file
        self.uri = sfs.join(dataset_uri, file)
        self.rows_per_group = int(rows_per_group)
        self.rows = 0
        self.groups = 0
        self._sink = _HashingSink(_open_for_write(self.uri))
        # The values are already compressed: compressing again or dictionary-encoding them costs
        # CPU for nothing, and min/max statistics of image bytes would only bloat the footer.
        self._pq: pq.ParquetWriter | None = pq.ParquetWriter(
            self._sink,
            self.schema,
            compression="none",
            use_dictionary=False,
            write_statistics=["sample_id", "height", "width"],
        )
        self._buffer: dict[str, list] = {c: [] for c in self._names}

    def add(self, sample_id: int, values: Mapping[str, bytes | int], height: int, width: int) -> tuple[int, int]:
        """Append one sample (its stored values by column name: encoded bytes, or int for int64);
        returns its (row group, row within the group)."""
        place = divmod(self.rows, self.rows_per_group)
        buf = self._buffer
        buf["sample_id"].append(int(sample_id))
        for c in self.columns:
            buf[c.name].append(values[c.name])
        buf["height"].append(int(height))
        buf["width"].append(int(width))
        self.rows += 1
        if len(buf["sample_id"]) >= self.rows_per_group:
            self._flush_group()
        return place

    def _flush_group(self) -> None:
        buf = self._buffer
        if not buf["sample_id"] or self._pq is None:
            return
        table = pa.Table.from_pydict(buf, schema=self.schema)
        self._pq.write_table(table, row_group_size=len(buf["sample_id"]))
        self.groups += 1
        self._buffer = {c: [] for c in self._names}

    def close(self) -> dict[str, Any]:
        if self._pq is None:
            raise RuntimeError(f"{self.uri}: shard already closed")
        self._flush_group()
        self._pq.close()
        self._pq = None
        self._sink.close()
        return {
            "file": self.file,
            "rows": self.rows,
            "row_groups": self.groups,
            "bytes": self._sink.nbytes,
            "sha256": self._sink.sha256.hexdigest(),
            "footer_bytes": self._sink.footer_bytes,
        }

    def abort(self) -> None:
        try:
            if self._pq is not None:
                self._pq.close()
        finally:
            self._pq = None
            self._sink.close()


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
    order = [k for k in _INDEX_TYPES if k in columns] + [k for k in columns if k not in _INDEX_TYPES]
    cols = {k: pa.array(columns[k], type=_INDEX_TYPES[k]) if k in _INDEX_TYPES else _extra_array(columns[k]) for k in order}
    for k, values in (extra or {}).items():
        cols[k] = _extra_array(values)
    return pa.table(cols)


def write_shared_index(uri: str, column: Column, index: pa.Table, files: list[dict[str, Any]]) -> dict[str, Any]:
    """Write shared/<column>/index.parquet (one row per distinct value: BASE_INDEX_COLUMNS, the
    value's id as sample_id) and return the manifest's "shared" entry of the column."""
    missing = [k for k in BASE_INDEX_COLUMNS if k not in index.column_names]
    if missing:
        raise ValueError(f"shared index of {column.name!r}: columns {missing} missing")
    buf = io.BytesIO()
    pq.write_table(index, buf, compression="zstd")
    data = buf.getvalue()
    file = shared_index_file(column.name)
    sfs.write_bytes(sfs.join(sfs.normalize(uri), file), data)
    return {
        "key": shared_key(column.name),
        "codec": column.codec,
        "num": index.num_rows,
        "index": file,
        "index_bytes": len(data),
        "index_sha256": hashlib.sha256(data).hexdigest(),
        "files": files,
    }


def write_index_and_manifest(
    uri: str,
    index: pa.Table,
    shards: list[dict[str, Any]],
    extra_manifest: dict[str, Any] | None = None,
    columns: Sequence[Column] = MASK_DEPTH_COLUMNS,
    task: str | None = None,
    shared: Mapping[str, dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Write index.parquet, then manifest.json last: the manifest is the completion marker.

    The manifest records `columns` and `task` (default: extra_manifest's "task", else
    "mask_depth"); format /4 when `shared` is given (column name -> write_shared_index's entry,
    each table written before), else /2 for the mask_depth columns and /3 for others.
    `extra_manifest` adds keys (e.g. "meta", a dict storage does not interpret) but cannot change
    format, task, columns or shared.
    """
    columns = check_columns(columns)
    extra_manifest = dict(extra_manifest or {})
    task = task if task is not None else extra_manifest.get("task", MASK_DEPTH_TASK)
    if not isinstance(task, str) or not task:
        raise ValueError(f"task must be a non-empty string, got {task!r}")
    if not isinstance(extra_manifest.get("meta", {}), dict):
        raise ValueError(f"manifest meta must be a dict, got {type(extra_manifest['meta']).__name__}")
    shared = dict(shared or {})
    _check_shared(columns, list(shared))
    if shared:
        fmt = SHARED_FORMAT
    else:
        fmt = LEGACY_MASK_DEPTH_FORMAT if is_mask_depth(columns) else COLUMNS_FORMAT
    uri = sfs.normalize(uri)
    with _open_for_write(sfs.join(uri, INDEX)) as f:
        pq.write_table(index, f, compression="zstd")
    n = index.num_rows
    heights = index.column("height").to_numpy()
    widths = index.column("width").to_numpy()
    sizes = set(zip(heights.tolist(), widths.tolist(), strict=True))
    manifest: dict[str, Any] = {
        "format": fmt,
        "task": task,
        "columns": columns_to_manifest(columns),
        "num_samples": n,
        "image_size": list(next(iter(sizes))) if len(sizes) == 1 else None,
        "image_sizes": sorted([list(hw) for hw in sizes]),
        "seed": None,
        "source": None,
    }
    if "depth_mean" in index.column_names:  # the mean of the per-sample stat, when the index has one
        depth_means = index.column("depth_mean").to_numpy()
        manifest["depth_mean"] = float(np.mean(depth_means, dtype=np.float64)) if n else None
    manifest.update({"index": INDEX, "shards": shards})
    manifest.update(extra_manifest)
    manifest.pop("shared", None)
    manifest.update({"format": fmt, "task": task, "columns": columns_to_manifest(columns)})
    if shared:
        manifest["shared"] = shared
    sfs.write_json(sfs.join(uri, MANIFEST), manifest)
    return manifest


class SharedTableWriter:
    """The table of one shared column (format /4): each distinct value (by content) stored once,
    with a dense id (0, 1, ... in order of first appearance), in files of `rows_per_shard` rows."""

    def __init__(self, uri: str, column: Column, rows_per_shard: int = ROWS_PER_SHARD, rows_per_group: int = ROWS_PER_GROUP) -> None:
        self.uri = sfs.normalize(uri)
        self.column = column
        self.rows_per_shard = int(rows_per_shard)
        self.rows_per_group = min(int(rows_per_group), self.rows_per_shard)
        self._ids: dict[bytes, int] = {}
        self._file: ShardFileWriter | None = None
        self._files: list[dict[str, Any]] = []
        self._index: dict[str, list] = {c: [] for c in BASE_INDEX_COLUMNS}

    def __len__(self) -> int:
        return len(self._ids)

    def id_of(self, value: bytes, size: tuple[int, int]) -> int:
        """The id of `value` (encoded bytes), storing it if it is new; `size` is its (height, width)."""
        digest = hashlib.blake2b(value, digest_size=16).digest()
        vid = self._ids.get(digest)
        if vid is not None:
            return vid
        vid = self._ids[digest] = len(self._ids)
        self.add(vid, value, size)
        return vid

    def add(self, vid: int, value: bytes, size: tuple[int, int]) -> None:
        """Store `value` under id `vid` (ids are the caller's business: unique, any order)."""
        if self._file is None:
            self._file = ShardFileWriter(self.uri, shared_file(self.column.name, len(self._files)), self.rows_per_group, (self.column,))
        group, row = self._file.add(vid, {self.column.name: value}, *size)
        for k, v in (("sample_id", int(vid)), ("shard", len(self._files)), ("row_group", group), ("row", row), ("height", int(size[0])),
                     ("width", int(size[1])), ("checksum", columns_checksum((self.column,), {self.column.name: value}))):
            self._index[k].append(v)
        if self._file.rows >= self.rows_per_shard:
            self._files.append(self._file.close())
            self._file = None

    def close(self) -> dict[str, Any]:
        """Finish the last file and write the table's index; returns its manifest entry."""
        if self._file is not None:
            self._files.append(self._file.close())
            self._file = None
        return write_shared_index(self.uri, self.column, index_table(self._index), self._files)

    def abort(self) -> None:
        if self._file is not None:
            try:
                self._file.abort()
            finally:
                self._file = None


class ShardWriter:
    """Packs samples into Parquet shards, then writes index.parquet and, last, manifest.json.

    `columns` declares what a sample holds (storage/columns.py); `task` is recorded in the
    manifest for the training code (storage does not interpret it). `add()` takes a dict with
    `sample_id` and every declared column, each either its stored value (encoded bytes; an int
    for int64) or a numpy array (encoded here, see columns.encode_value). `height`/`width`
    default to the shape of the first array, else to the size of the first image column (else
    the first raw one). Any other keys become extra index columns (the set of keys must be the
    same for every sample; numpy scalar types keep their dtype; lists become list columns).

    `index_columns` names index columns the writer puts first after the base ones, in that order:
    a declared int64 column named there is stored in the shard as usual and its value copied into
    the index too (e.g. classification's `label`, so its counts need no shard reads); any other
    name is an extra key every sample must bring. Extra keys it does not name follow, sorted.

    The mask_depth columns (the default) are written as format /4 (SHARED_FORMAT): each distinct
    background (`bg`, told apart by content) is stored once, in shared/bg/, and shard rows hold
    its id; arrays are checked as storage.codec's mask/depth encoders check them, and the index has
    a `depth_mean` column (computed from the depth when a sample does not bring one).
    `format=LEGACY_MASK_DEPTH_FORMAT` writes them as /2 instead, exactly as before columns were
    declared (every row holding its own background). `shared` names the shared columns of other
    column sets (format /4); without, they are written as /3.

    Opening a writer on an existing dataset deletes its manifest first, so a crash mid-rewrite
    leaves a folder that is not a dataset rather than a manifest describing other files.
    """

    def __init__(
        self,
        uri: str,
        rows_per_shard: int = ROWS_PER_SHARD,
        rows_per_group: int = ROWS_PER_GROUP,
        columns: Sequence[Column] = MASK_DEPTH_COLUMNS,
        task: str = MASK_DEPTH_TASK,
        index_columns: Sequence[str] = (),
        shared: Sequence[str] | None = None,
        format: str | None = None,
    ):
        if rows_per_group < 1 or rows_per_shard < 1:
            raise ValueError("rows_per_shard and rows_per_group must be >= 1")
        if not isinstance(task, str) or not task:
            raise ValueError(f"task must be a non-empty string, got {task!r}")
        self.columns = check_columns(columns)
        self.task = task
        self._mask_depth = is_mask_depth(self.columns)
        if format is not None and format not in WRITABLE_FORMATS:
            raise ValueError(f"format {format!r}: choose one of {list(WRITABLE_FORMATS)}")
        if shared is None:
            shared = MASK_DEPTH_SHARED if self._mask_depth and format in (None, SHARED_FORMAT) else ()
        self.shared = _check_shared(self.columns, shared)
        self.format = SHARED_FORMAT if self.shared else LEGACY_MASK_DEPTH_FORMAT if self._mask_depth else COLUMNS_FORMAT
        if format is not None and format != self.format:
            raise ValueError(f"format {format!r} cannot hold these columns (shared {list(self.shared)}); they are written as {self.format}")
        self.stored_columns = stored_columns(self.columns, self.shared)
        self._encode = encode_mask_depth_value if self._mask_depth else encode_value
        self._index_names = INDEX_COLUMNS if self._mask_depth else BASE_INDEX_COLUMNS
        self.index_columns = self._check_index_columns(index_columns)
        declared = {c.name for c in self.columns}
        self._copied = frozenset(k for k in self.index_columns if k in declared)
        self._listed = tuple(k for k in self.index_columns if k not in declared)
        self._not_extra = frozenset((*sample_columns(self.columns), *self._index_names, *self.index_columns,
                                     *(shared_key(n) for n in self.shared)))
        self.uri = sfs.normalize(uri)
        self.rows_per_shard = int(rows_per_shard)
        self.rows_per_group = min(int(rows_per_group), self.rows_per_shard)
        sfs.remove(sfs.join(self.uri, MANIFEST))
        sfs.remove(sfs.join(self.uri, INDEX))
        # Only the files a packed dataset has: a user's file under shards/ or shared/ stays (storage.dest_check).
        remove_packed_files(self.uri, SHARD_DIR)
        remove_packed_files(self.uri, SHARED_DIR)

        self._shards: list[dict[str, Any]] = []
        self._file: ShardFileWriter | None = None
        self._index: dict[str, list] = {c: [] for c in self._index_names}
        self._extra_keys: tuple[str, ...] | None = None
        self._extra: dict[str, list] = {k: [] for k in self.index_columns}
        by_name = {c.name: c for c in self.columns}
        self._tables = {n: SharedTableWriter(self.uri, by_name[n], self.rows_per_shard, self.rows_per_group) for n in self.shared}
        self._closed = False

    def _check_index_columns(self, names: Sequence[str]) -> tuple[str, ...]:
        names = (names,) if isinstance(names, str) else tuple(names)
        by_name = {c.name: c for c in self.columns}
        reserved = set(self._index_names) | {"sample_id", "height", "width"}
        for k in names:
            if not isinstance(k, str) or not k:
                raise ValueError(f"index_columns: {k!r} is not a column name")
            if k in reserved:
                raise ValueError(f"index_columns: {k!r} is always in the index (the index's own columns are {list(self._index_names)})")
            if k in by_name and by_name[k].is_bytes:
                raise ValueError(f"index_columns: column {k!r} is {by_name[k].codec}; only int64 columns can be copied into the index")
        if len(set(names)) != len(names):
            raise ValueError(f"index_columns: {list(names)} names a column twice")
        return names

    # -- adding ------------------------------------------------------------------------------

    def add(self, sample: dict[str, Any]) -> None:
        if self._closed:
            raise RuntimeError("ShardWriter is closed")
        sid = int(sample["sample_id"])
        missing = [c.name for c in self.columns if c.name not in sample]
        if missing:
            raise ValueError(f"sample {sid}: columns {missing} missing; this writer's columns are {[c.name for c in self.columns]}")
        missing = [k for k in self._listed if k not in sample]
        if missing:
            raise ValueError(f"sample {sid}: index columns {missing} missing; this writer's index_columns are {list(self.index_columns)}")
        values: dict[str, bytes | int] = {}
        for c in self.columns:
            try:
                values[c.name] = self._encode(c, sample[c.name])
            except ValueError as exc:
                raise ValueError(f"sample {sid}, column {c.name!r}: {exc}") from exc
        height, width = self._size_of(sid, sample, values)
        for name, table in self._tables.items():  # the value's id in its place
            values[shared_key(name)] = table.id_of(values.pop(name), self._value_size(sample[name], by=name, default=(height, width)))
        depth_mean = None
        if self._mask_depth:
            depth_mean = sample.get("depth_mean")
            if depth_mean is None:
                depth_mean = mask_depth_depth_mean(sample, values)

        extra_keys = tuple(sorted(k for k in sample if k not in self._not_extra))
        if self._extra_keys is None:
            self._extra_keys = extra_keys
            self._extra.update({k: [] for k in extra_keys})
        elif extra_keys != self._extra_keys:
            raise ValueError(f"sample {sid}: extra index columns {extra_keys} differ from the first sample's {self._extra_keys}")

        if self._file is None:
            self._file = ShardFileWriter(self.uri, shard_file(len(self._shards)), self.rows_per_group, self.stored_columns)
        row_group, row = self._file.add(sid, values, height, width)

        idx = self._index
        idx["sample_id"].append(sid)
        idx["shard"].append(len(self._shards))
        idx["row_group"].append(row_group)
        idx["row"].append(row)
        idx["height"].append(height)
        idx["width"].append(width)
        if self._mask_depth:
            idx["depth_mean"].append(depth_mean)
        idx["checksum"].append(columns_checksum(self.stored_columns, values))
        for k in self.index_columns:
            self._extra[k].append(np.int64(values[k]) if k in self._copied else sample[k])
        for k in extra_keys:
            self._extra[k].append(sample[k])

        if self._file.rows >= self.rows_per_shard:
            self._close_shard()

    def add_many(self, samples: Iterable[dict[str, Any]]) -> None:
        for s in samples:
            self.add(s)

    def _size_of(self, sid: int, sample: dict[str, Any], values: dict[str, bytes | int]) -> tuple[int, int]:
        if "height" in sample and "width" in sample:
            return int(sample["height"]), int(sample["width"])
        sized = [c for c in self.columns if c.is_bytes]
        for c in sized:
            if isinstance(sample[c.name], np.ndarray):
                return int(sample[c.name].shape[0]), int(sample[c.name].shape[1])
        problems = []
        # Image columns first, then raw ones; bytes that do not read are left to verify (tests
        # write such datasets on purpose), as long as another column gives the size.
        for c in sorted(sized, key=lambda c: c.codec != "image"):
            try:
                return encoded_size(c, values[c.name])
            except codec.CorruptImageError as exc:
                problems.append(str(exc))
        why = f" ({'; '.join(problems)})" if problems else f" (columns {[c.name for c in self.columns]})"
        raise ValueError(f"sample {sid}: no column gives a size{why}; pass height and width")

    def _value_size(self, value: Any, by: str, default: tuple[int, int]) -> tuple[int, int]:
        """(height, width) of one value (a shared one has its own index row); `default` (the
        sample's) when its bytes do not read: verify then names it."""
        if isinstance(value, np.ndarray):
            return int(value.shape[0]), int(value.shape[1])
        column = next(c for c in self.columns if c.name == by)
        try:
            return encoded_size(column, value)
        except codec.CorruptImageError:
            return default

    def _close_shard(self) -> None:
        if self._file is None:
            return
        self._shards.append(self._file.close())
        self._file = None

    # -- finishing -----------------------------------------------------------------------------

    def close(self, extra_manifest: dict[str, Any] | None = None) -> dict[str, Any]:
        """Finish the last shard, write the index, then the manifest (the completion marker)."""
        if self._closed:
            raise RuntimeError("ShardWriter is already closed")
        self._close_shard()
        self._closed = True
        shared = {name: table.close() for name, table in self._tables.items()}
        extra = {"rows_per_group": self.rows_per_group, **(extra_manifest or {})}
        return write_index_and_manifest(self.uri, index_table(self._index, self._extra), self._shards, extra, columns=self.columns,
                                        task=self.task, shared=shared or None)

    def abort(self) -> None:
        """Drop what is open without writing a manifest: the folder stays a non-dataset."""
        self._closed = True
        try:
            for table in self._tables.values():
                table.abort()
        finally:
            if self._file is not None:
                try:
                    self._file.abort()
                finally:
                    self._file = None

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        # A clean exit still needs close(extra_manifest) called explicitly; an error only aborts.
        if exc_type is not None and not self._closed:
            self.abort()


# -- reading -------------------------------------------------------------------------------------


def _read_table(uri: str) -> pa.Table:
    """A whole (small) Parquet file, e.g. index.parquet: one read, then parsed in memory."""
    return pq.read_table(pa.BufferReader(sfs.read_bytes(uri)))


def _describe_ids(ids: np.ndarray) -> str:
    shown = ", ".join(str(int(i)) for i in ids[:_IDS_IN_MESSAGES])
    more = f" and {len(ids) - _IDS_IN_MESSAGES} more" if len(ids) > _IDS_IN_MESSAGES else ""
    return f"{shown}{more}"


class ShardDataset:
    """A packed dataset opened for random access by sample id.

    `columns` are the manifest's declared columns (MASK_DEPTH_COLUMNS for /1 and /2 datasets that
    declare none), `task` its task (default "mask_depth"), `meta` its opaque "meta" dict (default
    {}). `index` is the whole index.parquet as a pyarrow Table (BASE_INDEX_COLUMNS plus whatever
    extra columns the writer added, e.g. depth_mean, synth's bg_index/flipped/fg_x/..., a label);
    readers must treat extra columns as optional (index_values names what there is). The object
    is picklable, so it can be sent to workers.

    A /4 dataset's `shared` maps each shared column to the ShardDataset of its table (the value's
    id as sample_id); `stored_columns` are what shard rows hold (a shared column's int64 id in its
    place); `sample_columns` are the declared ones, which read_samples resolves.
    """

    def __init__(self, uri: str, manifest: dict[str, Any], index: pa.Table, shared: Mapping[str, ShardDataset] | None = None,
                 item: str = "sample", disk_cache: bool = True):
        self.uri = uri
        self.manifest = manifest
        self.index = index
        self.columns: tuple[Column, ...] = columns_from_manifest(manifest)
        self.task: str = manifest.get("task") or MASK_DEPTH_TASK
        self.meta: dict[str, Any] = manifest.get("meta") or {}
        self.format: str = manifest.get("format") or LEGACY_MASK_DEPTH_FORMAT
        self.shared: dict[str, ShardDataset] = dict(shared or {})
        self.stored_columns = stored_columns(self.columns, tuple(self.shared))
        self.sample_columns = sample_columns(self.columns)
        self._stored_names = sample_columns(self.stored_columns)
        self.item = item  # what a row is called in error messages
        self.disk_cache = disk_cache
        self.sample_ids = index.column("sample_id").to_numpy().astype(np.int64, copy=False)
        self._shard = index.column("shard").to_numpy().astype(np.int32, copy=False)
        self._group = index.column("row_group").to_numpy().astype(np.int32, copy=False)
        self._row = index.column("row").to_numpy().astype(np.int64, copy=False)
        self._order = np.argsort(self.sample_ids, kind="stable")
        self._sorted_ids = self.sample_ids[self._order]
        self._reader = None
        self._init_shared_cache()

    def _init_shared_cache(self) -> None:
        self._shared_cache: OrderedDict[tuple[str, int], bytes] = OrderedDict()
        self._shared_cache_bytes = 0
        self._shared_lock = threading.Lock()

    @property
    def num_samples(self) -> int:
        return int(self.manifest["num_samples"])

    def __len__(self) -> int:
        return self.num_samples

    def __repr__(self) -> str:
        return f"ShardDataset({self.uri!r}, num_samples={self.num_samples}, task={self.task!r})"

    def positions(self, ids: Sequence[int] | np.ndarray) -> np.ndarray:
        """Row numbers in `index` of the given sample ids; DatasetError names unknown ones."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        pos = np.searchsorted(self._sorted_ids, ids)
        pos_clipped = np.minimum(pos, len(self._sorted_ids) - 1)
        found = self._sorted_ids[pos_clipped] == ids
        if not np.all(found):
            missing = ids[~found]
            raise DatasetError(f"{self.uri}: unknown sample ids {_describe_ids(missing)} ({len(missing)} of {len(ids)} requested are not in this dataset of {self.num_samples})")
        return self._order[pos_clipped]

    def index_values(self, name: str, ids: Sequence[int] | np.ndarray) -> np.ndarray:
        """One index column's values (no shard reads), in the order of `ids`: a numpy array of its
        type; a list column gives an object array of numpy arrays. DatasetError when the index has
        no such column."""
        if name not in self.index.column_names:
            raise DatasetError(
                f"{self.uri}: index.parquet has no column {name!r} (task {self.task!r}); its columns are {self.index.column_names}. "
                "Re-pack the dataset with it, or use a column it has"
            )
        pos = self.positions(ids)
        return self.index.column(name).take(pa.array(pos, pa.int64())).to_numpy()

    def depth_means(self, ids: Sequence[int] | np.ndarray) -> np.ndarray:
        """index_values("depth_mean", ids): per-sample mean depth (float32), as mask_depth datasets have."""
        return self.index_values("depth_mean", ids)

    def describe(self, sample_id: int) -> str:
        """Where a sample lives, for error messages: dataset URI, shard file, row group, sample id."""
        try:
            p = int(self.positions([sample_id])[0])
        except DatasetError:
            return f"{self.uri} sample {int(sample_id)} (not in the index)"
        shard = self.manifest["shards"][int(self._shard[p])]["file"]
        return f"{self.uri} {shard} row group {int(self._group[p])} sample {int(sample_id)}"

    def read_samples(self, ids: Sequence[int] | np.ndarray, columns: Sequence[str] | None = None) -> dict[str, Any]:
        """The given samples, in exactly the order of `ids` (repeats allowed).

        Returns `sample_id`, every declared column (or just the `columns` asked for, from
        `sample_columns`, or a shared column's id column `<name>_id`), `height`, `width`:
        sample_id/height/width and int64 columns as numpy arrays, the other columns as lists of
        encoded bytes (decode with storage.columns or storage.codec). Only the row groups that
        hold the ids are fetched (all at once, through the local cache; storage/preload.py), and
        each sample is checked against its checksum: a row group that fails is fetched once more,
        and a second failure raises DatasetError naming the shard URI. Shared values (/4) are
        resolved after: each distinct one needed is fetched once (only the row groups of its
        table that hold it), checked against its own checksum the same way, and kept in memory
        for the next reads; samples that share one get the same bytes object.
        """
        columns = self.sample_columns if columns is None else ((columns,) if isinstance(columns, str) else tuple(columns))
        keys = {shared_key(n): n for n in self.shared}
        unknown = [c for c in columns if c not in self.sample_columns and c not in keys]
        if unknown:
            raise ValueError(f"unknown columns {unknown}; choose from {[*self.sample_columns, *keys]}")
        stored = list(dict.fromkeys(shared_key(c) if c in self.shared else c for c in columns))
        pos = self.positions(ids)
        n = len(pos)
        shard_of, group_of, row_of = self._shard[pos], self._group[pos], self._row[pos]
        wanted = sorted(set(zip(shard_of.tolist(), group_of.tolist(), strict=True)))
        groups = self._read_groups(wanted, pos, shard_of, group_of)

        out_cols: dict[str, list] = {c: [None] * n for c in stored}
        by_group: dict[tuple[int, int], list[int]] = {}
        for i, key in enumerate(zip(shard_of.tolist(), group_of.tolist(), strict=True)):
            by_group.setdefault(key, []).append(i)
        for key, where in by_group.items():
            rows = row_of[where].tolist()
            for c in stored:
                values, col = groups[key][c], out_cols[c]
                for dst, r in zip(where, rows, strict=True):
                    col[dst] = values[r]
        scalars = {"sample_id": np.int64, "height": np.int32, "width": np.int32, **{c.name: np.int64 for c in self.stored_columns if not c.is_bytes}}
        result: dict[str, Any] = {}
        for c in columns:
            if c in self.shared:
                result[c] = self._resolve_shared(c, np.asarray(out_cols[shared_key(c)], dtype=np.int64))
            else:
                result[c] = np.asarray(out_cols[c], dtype=scalars[c]) if c in scalars else out_cols[c]
        if "sample_id" in result and not np.array_equal(result["sample_id"], np.asarray(ids, dtype=np.int64).reshape(-1)):
            raise DatasetError(f"{self.uri}: index and shards disagree (read other sample ids than asked for); the dataset is damaged, re-create it")
        return result

    def _resolve_shared(self, name: str, vids: np.ndarray) -> list[bytes]:
        """The values of shared column `name` for these ids (one per sample), each distinct one
        fetched once (or taken from memory)."""
        got: dict[int, bytes] = {}
        missing: list[int] = []
        with self._shared_lock:
            for v in np.unique(vids).tolist():
                hit = self._shared_cache.get((name, v))
                if hit is None:
                    missing.append(v)
                else:
                    self._shared_cache.move_to_end((name, v))
                    got[v] = hit
        if missing:
            table = self.shared[name]
            pos = np.searchsorted(table._sorted_ids, missing)
            absent = [v for v, p in zip(missing, pos.tolist(), strict=True) if p >= len(table._sorted_ids) or table._sorted_ids[p] != v]
            if absent:
                raise DatasetError(f"{self.uri}: samples refer to shared {name} ids {_describe_ids(np.asarray(absent))}, which "
                                   f"{shared_index_file(name)} does not list; the dataset is damaged, re-pack it")
            rows = table.read_samples(missing, columns=("sample_id", name))
            with self._shared_lock:
                for v, value in zip(rows["sample_id"].tolist(), rows[name], strict=True):
                    got[v] = value
                    if (name, v) not in self._shared_cache:
                        self._shared_cache[(name, v)] = value
                        self._shared_cache_bytes += len(value)
                while self._shared_cache_bytes > SHARED_CACHE_BYTES and self._shared_cache:
                    _, old = self._shared_cache.popitem(last=False)
                    self._shared_cache_bytes -= len(old)
        return [got[v] for v in vids.tolist()]

    def _read_groups(self, wanted: list[tuple[int, int]], pos: np.ndarray, shard_of: np.ndarray, group_of: np.ndarray) -> dict[tuple[int, int], dict[str, list]]:
        """Fetch and parse the wanted row groups ({column: values} each), verifying every sample asked for."""
        reader = self.reader
        names = self._stored_names
        checks: dict[tuple[int, int], list[tuple[int, int, str]]] = {}
        # Taken per read, not held as a Python list: 1.2M checksum strings would cost ~80 MB per worker.
        sums = self.index.column("checksum").take(pa.array(pos, pa.int64())).to_pylist()
        for p, s, g, expected in zip(pos.tolist(), shard_of.tolist(), group_of.tolist(), sums, strict=True):
            checks.setdefault((s, g), []).append((int(self._row[p]), int(self.sample_ids[p]), expected))

        def parse(groups: list[tuple[int, int]], use_cache: bool) -> tuple[dict, dict]:
            fetched = reader.fetch_groups(groups, use_cache=use_cache)
            good, bad = {}, {}
            for key in groups:
                try:
                    table = reader.read_group(key[0], key[1], fetched[key], names)
                except (OSError, KeyError, pa.ArrowException) as exc:
                    bad[key] = f"row group {key[1]} cannot be parsed ({type(exc).__name__}: {exc})"
                    continue
                values = {c: table.column(c).to_pylist() for c in names}
                reason = _verify_rows(values, checks[key], self.stored_columns, self.item)
                if reason:
                    bad[key] = f"row group {key[1]}: {reason}"
                else:
                    good[key] = values
            return good, bad

        tables, bad = parse(wanted, use_cache=True)
        if bad:
            # Once more from the store, past the cache: a flipped bit in flight or on the cache
            # disk heals here; a shard that is damaged at the source fails the same way again.
            log.warning("%d row groups failed their checksums (%s); fetching them again", len(bad), "; ".join(bad.values()))
            reader.stats.add(refetches=len(bad))
            reader.discard(list(bad))
            again, still_bad = parse(list(bad), use_cache=False)
            tables.update(again)
            if still_bad:
                key, reason = next(iter(still_bad.items()))
                raise DatasetError(
                    f"{reader.shard_uri(key[0])}: {reason}, again after a re-fetch; the shard is damaged. "
                    f"Run `orchestrator data verify {self.uri}` and re-pack the dataset"
                )
        return tables

    @property
    def reader(self):
        """The shard reader (footers, cache) of this process; made on first use, never pickled."""
        from storage.cache import cache_for
        from storage.preload import ShardReader

        if self._reader is None:
            self._reader = ShardReader(self.uri, self.manifest, cache_for(self.uri) if self.disk_cache else None)
        return self._reader

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_reader"] = None  # holds a filesystem, a lock and parsed footers: per process
        for k in ("_shared_cache", "_shared_cache_bytes", "_shared_lock"):  # per process too
            state.pop(k, None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._init_shared_cache()


def _verify_rows(values: dict[str, list], rows: list[tuple[int, int, str]], columns: Sequence[Column], item: str = "sample") -> str | None:
    """None when each (row, sample id, checksum) matches the row group's values; else what is wrong."""
    n = len(values["sample_id"])
    # columns_checksum, inlined: this runs for every sample of every chunk.
    parts = [(values[c.name], not c.is_bytes) for c in columns]
    for r, sid, expected in rows:
        if r >= n or values["sample_id"][r] != sid:
            return f"{item} {sid} is not at row {r} where the index puts it"
        h = hashlib.blake2b(digest_size=CHECKSUM_DIGEST_BYTES)
        try:
            for col, is_int in parts:
                h.update(col[r].to_bytes(8, "little", signed=True) if is_int else col[r])
        except (TypeError, ValueError, AttributeError, OverflowError) as exc:  # a null where a value must be
            return f"{item} {sid} has a missing or malformed value ({type(exc).__name__}: {exc})"
        got = h.hexdigest()
        if got != expected:
            return f"{item} {sid} fails its checksum (index {expected}, read {got})"
    return None


def _missing_bucket_hint(uri: str) -> str:
    """', and bucket X does not exist' when that is why, so nobody hunts for a path typo."""
    if "://" not in uri or uri.startswith(("file://", "memory://")):
        return ""
    scheme, rest = uri.split("://", 1)
    bucket = rest.split("/", 1)[0]
    try:
        return "" if sfs.exists(f"{scheme}://{bucket}") else f", and bucket {bucket!r} does not exist or is not visible with these credentials"
    except Exception:  # noqa: BLE001 - only a hint; the main message stands without it
        return ""


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _manifest_problem(manifest: Any) -> str | None:
    """What makes a parsed manifest.json unusable (beyond its format), or None."""
    if not isinstance(manifest, dict):
        return f"holds a JSON {type(manifest).__name__}, not an object"
    missing = [k for k in ("num_samples", "index", "shards") if k not in manifest]
    if missing:
        return f"keys {missing} missing"
    if not _is_int(manifest["num_samples"]) or manifest["num_samples"] < 0:
        return f"num_samples is {manifest['num_samples']!r}, not a count"
    if not isinstance(manifest["index"], str) or not manifest["index"]:
        return f"index is {manifest['index']!r}, not a file name"
    shards = manifest["shards"]
    if not isinstance(shards, list):
        return f"shards is a {type(shards).__name__}, not a list"
    problem = _file_entries_problem(shards, "shards")
    if problem:
        return problem
    if "task" in manifest and (not isinstance(manifest["task"], str) or not manifest["task"]):
        return f"task is {manifest['task']!r}, not a name"
    if manifest.get("meta") is not None and not isinstance(manifest["meta"], dict):
        return f"meta is a {type(manifest['meta']).__name__}, not an object"
    if manifest["format"] == COLUMNS_FORMAT and manifest.get("columns") is None:
        return f'format {COLUMNS_FORMAT} without "columns"'
    try:
        columns = columns_from_manifest(manifest)
    except ColumnsError as exc:
        return str(exc)
    if manifest["format"] in _MASK_DEPTH_FORMATS and not is_mask_depth(columns):
        return f"format {manifest['format']} declares columns {[c.as_dict() for c in columns]}, but it holds only {[c.as_dict() for c in MASK_DEPTH_COLUMNS]}"
    shared = manifest.get("shared")
    if manifest["format"] != SHARED_FORMAT:
        return f'format {manifest["format"]} with "shared" (only {SHARED_FORMAT} has shared columns)' if shared else None
    if manifest.get("columns") is None:
        return f'format {SHARED_FORMAT} without "columns"'
    if not isinstance(shared, dict) or not shared:
        return f'format {SHARED_FORMAT} without "shared" (an object: column name -> its table)'
    try:
        _check_shared(columns, list(shared))
    except ColumnsError as exc:
        return str(exc)
    by_name = {c.name: c for c in columns}
    for name, entry in shared.items():
        if not isinstance(entry, dict):
            return f'shared[{name!r}] is a {type(entry).__name__}, not an object'
        wrong = [k for k, ok in (("key", entry.get("key") == shared_key(name)), ("codec", entry.get("codec") == by_name[name].codec),
                                 ("num", _is_int(entry.get("num")) and entry["num"] >= 0), ("index", isinstance(entry.get("index"), str) and entry["index"]),
                                 ("index_sha256", isinstance(entry.get("index_sha256"), str)), ("files", isinstance(entry.get("files"), list))) if not ok]
        if wrong:
            return f"shared[{name!r}] has no valid {', '.join(wrong)}"
        problem = _file_entries_problem(entry["files"], f"shared[{name!r}].files")
        if problem:
            return problem
    return None


def _file_entries_problem(entries: list, where: str) -> str | None:
    """What is wrong with a list of shard-file entries ({file, rows, bytes, sha256[, footer_bytes]}), or None."""
    for i, sh in enumerate(entries):
        if not isinstance(sh, dict):
            return f"{where}[{i}] is a {type(sh).__name__}, not an object"
        wrong = [k for k, ok in (("file", isinstance(sh.get("file"), str)), ("rows", _is_int(sh.get("rows"))),
                                 ("bytes", _is_int(sh.get("bytes"))), ("sha256", isinstance(sh.get("sha256"), str))) if not ok]
        if sh.get("footer_bytes") is not None and not _is_int(sh["footer_bytes"]):
            wrong.append("footer_bytes")
        if wrong:
            return f"{where}[{i}] has no valid {', '.join(wrong)}"
    return None


def shared_table(uri: str, manifest: dict[str, Any], name: str, index: pa.Table) -> ShardDataset:
    """The ShardDataset of a /4 dataset's shared column `name` (the value's id as sample_id)."""
    entry = manifest["shared"][name]
    column = next(c for c in columns_from_manifest(manifest) if c.name == name)
    sub = {"format": COLUMNS_FORMAT, "task": f"shared {name}", "columns": [column.as_dict()], "num_samples": entry["num"],
           "index": entry["index"], "shards": entry["files"]}
    # Its values are kept in memory by the dataset that reads them (ShardDataset._resolve_shared):
    # the disk cache holds the samples' row groups only.
    return ShardDataset(uri, sub, index, item=f"shared {name}", disk_cache=False)


def _open_shared(uri: str, manifest: dict[str, Any]) -> dict[str, ShardDataset]:
    """The shared tables of a /4 dataset, their indexes read and checked against the manifest."""
    out = {}
    for name, entry in (manifest.get("shared") or {}).items():
        index_uri = sfs.join(uri, entry["index"])
        try:
            data = sfs.read_bytes(index_uri)
        except FileNotFoundError as exc:
            raise DatasetError(f"{uri}: {entry['index']} (the table of shared column {name!r}) is missing although manifest.json is there; "
                               "the dataset is damaged, re-pack it") from exc
        if hashlib.sha256(data).hexdigest() != entry["index_sha256"]:
            raise DatasetError(f"{index_uri}: sha256 differs from the manifest's (the file changed after packing); the dataset is damaged, re-pack it")
        try:
            index = pq.read_table(pa.BufferReader(data))
        except (OSError, pa.ArrowException) as exc:
            raise DatasetError(_one_line(f"{index_uri}: cannot be read as Parquet ({type(exc).__name__}: {exc}); the dataset is damaged, re-pack it")) from exc
        missing = [c for c in BASE_INDEX_COLUMNS if c not in index.column_names]
        if missing or index.num_rows != entry["num"]:
            what = f"columns {missing} missing" if missing else f"{index.num_rows} rows, the manifest says {entry['num']}"
            raise DatasetError(f"{index_uri}: {what}; the dataset is damaged, re-pack it")
        out[name] = shared_table(uri, manifest, name, index)
    return out


def open_dataset(uri: str) -> ShardDataset:
    """Open a packed dataset; DatasetError says what is wrong with the URI and how to fix it.

    A manifest.json that is not JSON, not an object, lacks keys, has values of the wrong type or
    declares unknown codecs is a one-line DatasetError naming the manifest's URI.
    """
    uri = sfs.normalize(uri)
    manifest_uri = sfs.join(uri, MANIFEST)
    if not sfs.exists(manifest_uri):
        hint = _missing_bucket_hint(uri)
        raise DatasetError(
            f"{uri}: no dataset here (manifest.json missing{hint}). Make one with `orchestrator data synth {uri}` "
            "(or `orchestrator data pack SOURCE DEST` from raw files), or point data.uri at a packed dataset"
        )
    damaged = "the dataset is damaged or was not written by this code: re-pack it, or restore its manifest.json"
    try:
        manifest = sfs.read_json(manifest_uri)
    except ValueError as exc:  # json.JSONDecodeError, UnicodeDecodeError
        raise DatasetError(_one_line(f"{manifest_uri}: not valid JSON ({exc}); {damaged}")) from exc
    if isinstance(manifest, dict) and manifest.get("format") not in READABLE_FORMATS:
        raise DatasetError(_one_line(f"{manifest_uri}: format {manifest.get('format')!r}, expected one of {list(READABLE_FORMATS)}; "
                                     f"re-create the dataset (`orchestrator data pack`, or `orchestrator data synth {uri}`) with this code"))
    problem = _manifest_problem(manifest)
    if problem:
        raise DatasetError(_one_line(f"{manifest_uri}: {problem}; {damaged}"))
    if manifest["num_samples"] == 0:
        raise DatasetError(f"{uri}: the dataset is empty (0 samples); re-create it with more samples")
    index_uri = sfs.join(uri, manifest["index"])
    try:
        index = _read_table(index_uri)
    except FileNotFoundError as exc:
        raise DatasetError(f"{uri}: {manifest['index']} is missing although manifest.json is there; the dataset is damaged, re-create it") from exc
    except (OSError, pa.ArrowException) as exc:
        raise DatasetError(_one_line(f"{index_uri}: cannot be read as Parquet ({type(exc).__name__}: {exc}); the dataset is damaged, re-create it")) from exc
    if index.num_rows != manifest["num_samples"]:
        raise DatasetError(f"{uri}: index has {index.num_rows} rows but the manifest says {manifest['num_samples']} samples; the dataset is damaged, re-create it")
    missing = [c for c in BASE_INDEX_COLUMNS if c not in index.column_names]
    if missing:
        raise DatasetError(f"{index_uri}: columns {missing} missing (it has {index.column_names}); the dataset is damaged, re-create it")
    return ShardDataset(uri, manifest, index, _open_shared(uri, manifest))


def _one_line(message: str) -> str:
    return " ".join(message.split())
