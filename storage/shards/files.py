"""Writing shard files, shared-value indexes, index.parquet and (last) manifest.json.

A shard file is written through a hashing sink, so its manifest entry (bytes, sha256, footer
length) costs no second read; the manifest is written last and is the completion marker.
"""

from __future__ import annotations

import hashlib
import io
import posixpath
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from storage import fs as sfs
from storage.columns import Column, check_columns, columns_to_manifest
from storage.shards.footers import MANIFEST_KEY as FOOTERS_KEY
from storage.shards.footers import collect, index_metadata, manifest_entry
from storage.shards.format import (
    BASE_INDEX_COLUMNS,
    INDEX,
    LEGACY_MASK_DEPTH_FORMAT,
    MANIFEST,
    ROWS_PER_GROUP,
    check_shared,
    sample_columns,
    shard_schema,
    shared_index_file,
    shared_key,
)
from storage.shards.legacy import DEFAULT_COLUMNS, DEFAULT_TASK, INDEX_STAT, write_format


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

    def __init__(
        self,
        dataset_uri: str,
        file: str,
        rows_per_group: int = ROWS_PER_GROUP,
        columns: Sequence[Column] = DEFAULT_COLUMNS,
    ):
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
    columns: Sequence[Column] = DEFAULT_COLUMNS,
    task: str | None = None,
    shared: Mapping[str, dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Write index.parquet, then manifest.json last: the manifest is the completion marker.

    The manifest records `columns` and `task` (default: extra_manifest's "task", else
    legacy.DEFAULT_TASK); format legacy.write_format's: /2 for the fixed layout's columns without
    `shared` (column name -> write_shared_index's entry, each table written before), else /5. The
    index's checksums must be of that format's kind (format.checksum_of).
    `extra_manifest` adds keys (e.g. "meta", a dict storage does not interpret) but cannot change
    format, task, columns or shared.
    """
    columns = check_columns(columns)
    extra_manifest = dict(extra_manifest or {})
    task = task if task is not None else extra_manifest.get("task", DEFAULT_TASK)
    if not isinstance(task, str) or not task:
        raise ValueError(f"task must be a non-empty string, got {task!r}")
    if not isinstance(extra_manifest.get("meta", {}), dict):
        raise ValueError(f"manifest meta must be a dict, got {type(extra_manifest['meta']).__name__}")
    shared = dict(shared or {})
    check_shared(columns, list(shared))
    fmt = write_format(columns, bool(shared))
    uri = sfs.normalize(uri)
    # The shards' footers (and shared indexes) ride in the index: a reader then fetches no footer
    # per shard (storage/shards/footers.py says why there and not in a file of their own).
    # Not for /2, which is written on request byte for byte as before (its frozen layout).
    copies = None if fmt == LEGACY_MASK_DEPTH_FORMAT else collect(uri, shards, shared)
    with _open_for_write(sfs.join(uri, INDEX)) as f:
        if copies is None:
            pq.write_table(index, f, compression="zstd")
        else:
            with pq.ParquetWriter(f, index.schema, compression="zstd") as w:
                w.write_table(index)
                w.add_key_value_metadata(index_metadata(copies))
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
    if INDEX_STAT in index.column_names:  # the mean of the per-sample stat, when the index has one
        stats = index.column(INDEX_STAT).to_numpy()
        manifest[INDEX_STAT] = float(np.mean(stats, dtype=np.float64)) if n else None
    manifest.update({"index": INDEX, "shards": shards})
    manifest.update(extra_manifest)
    manifest.pop("shared", None)
    manifest.pop(FOOTERS_KEY, None)
    manifest.update({"format": fmt, "task": task, "columns": columns_to_manifest(columns)})
    if shared:
        manifest["shared"] = shared
    if copies is not None:
        files = len(shards) + sum(len(e["files"]) + 1 for e in shared.values())
        manifest[FOOTERS_KEY] = manifest_entry(copies, files)
    sfs.write_json(sfs.join(uri, MANIFEST), manifest)
    return manifest
