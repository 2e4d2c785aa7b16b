"""ShardWriter: samples in, shards + index + manifest out; SharedTableWriter: a /4 shared column's table.

What differs per column set (the encoder, the index's own columns, a per-sample stat, the shared
columns by default) comes from storage/shards/legacy.py's layout_for; this module treats every
column by its codec.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from storage import codec
from storage import fs as sfs
from storage.columns import Column, check_columns, encoded_size
from storage.dest_check import remove_packed_files
from storage.shards.files import ShardFileWriter, write_index_and_manifest, write_shared_index
from storage.shards.format import (
    BASE_INDEX_COLUMNS,
    CRC32,
    CRC32_FORMAT,
    INDEX,
    MANIFEST,
    ROWS_PER_GROUP,
    ROWS_PER_SHARD,
    SHARD_DIR,
    SHARED_DIR,
    WRITABLE_FORMATS,
    check_shared,
    checksum_of,
    columns_checksum,
    index_table,
    sample_columns,
    shard_file,
    shared_file,
    shared_key,
    stored_columns,
)
from storage.shards.legacy import DEFAULT_COLUMNS, DEFAULT_TASK, layout_for, write_format


class SharedTableWriter:
    """The table of one shared column (format /5, so CRC-32 checksums): each distinct value (by content) stored once,
    with a dense id (0, 1, ... in order of first appearance), in files of `rows_per_shard` rows."""

    def __init__(
        self, uri: str, column: Column, rows_per_shard: int = ROWS_PER_SHARD, rows_per_group: int = ROWS_PER_GROUP
    ) -> None:
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
            self._file = ShardFileWriter(
                self.uri, shared_file(self.column.name, len(self._files)), self.rows_per_group, (self.column,)
            )
        group, row = self._file.add(vid, {self.column.name: value}, *size)
        for k, v in (
            ("sample_id", int(vid)),
            ("shard", len(self._files)),
            ("row_group", group),
            ("row", row),
            ("height", int(size[0])),
            ("width", int(size[1])),
            ("checksum", columns_checksum((self.column,), {self.column.name: value}, CRC32)),
        ):
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

    Datasets are written as format /5 (CRC32_FORMAT: CRC-32 checksums). The fixed layout's columns
    (legacy.DEFAULT_COLUMNS, the default) have that layout's shared column stored once per distinct
    value, its encoder's checks and its per-sample index stat (storage/shards/legacy.py);
    `format=LEGACY_MASK_DEPTH_FORMAT` writes them as /2 instead, exactly as before columns were
    declared. `shared` names the shared columns of other column sets.

    Opening a writer on an existing dataset deletes its manifest first, so a crash mid-rewrite
    leaves a folder that is not a dataset rather than a manifest describing other files.
    """

    def __init__(
        self,
        uri: str,
        rows_per_shard: int = ROWS_PER_SHARD,
        rows_per_group: int = ROWS_PER_GROUP,
        columns: Sequence[Column] = DEFAULT_COLUMNS,
        task: str = DEFAULT_TASK,
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
        self._layout = layout_for(self.columns)
        if format is not None and format not in WRITABLE_FORMATS:
            raise ValueError(f"format {format!r}: choose one of {list(WRITABLE_FORMATS)}")
        if shared is None:
            shared = self._layout.default_shared if format in (None, CRC32_FORMAT) else ()
        self.shared = check_shared(self.columns, shared)
        self.format = write_format(self.columns, bool(self.shared))
        self.checksum = checksum_of(self.format)
        if format is not None and format != self.format:
            raise ValueError(
                f"format {format!r} cannot hold these columns (shared {list(self.shared)}); they are written as "
                f"{self.format}"
            )
        self.stored_columns = stored_columns(self.columns, self.shared)
        self._encode = self._layout.encode
        self._index_names = self._layout.index_names
        self.index_columns = self._check_index_columns(index_columns)
        declared = {c.name for c in self.columns}
        self._copied = frozenset(k for k in self.index_columns if k in declared)
        self._listed = tuple(k for k in self.index_columns if k not in declared)
        self._not_extra = frozenset(
            (
                *sample_columns(self.columns),
                *self._index_names,
                *self.index_columns,
                *(shared_key(n) for n in self.shared),
            )
        )
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
        self._tables = {
            n: SharedTableWriter(self.uri, by_name[n], self.rows_per_shard, self.rows_per_group) for n in self.shared
        }
        self._closed = False

    def _check_index_columns(self, names: Sequence[str]) -> tuple[str, ...]:
        names = (names,) if isinstance(names, str) else tuple(names)
        by_name = {c.name: c for c in self.columns}
        reserved = set(self._index_names) | {"sample_id", "height", "width"}
        for k in names:
            if not isinstance(k, str) or not k:
                raise ValueError(f"index_columns: {k!r} is not a column name")
            if k in reserved:
                raise ValueError(
                    f"index_columns: {k!r} is always in the index (the index's own columns are "
                    f"{list(self._index_names)})"
                )
            if k in by_name and by_name[k].is_bytes:
                raise ValueError(
                    f"index_columns: column {k!r} is {by_name[k].codec}; only int64 columns can be copied into the "
                    "index"
                )
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
            raise ValueError(
                f"sample {sid}: columns {missing} missing; this writer's columns are {[c.name for c in self.columns]}"
            )
        missing = [k for k in self._listed if k not in sample]
        if missing:
            raise ValueError(
                f"sample {sid}: index columns {missing} missing; this writer's index_columns are "
                f"{list(self.index_columns)}"
            )
        values: dict[str, bytes | int] = {}
        for c in self.columns:
            try:
                values[c.name] = self._encode(c, sample[c.name])
            except ValueError as exc:
                raise ValueError(f"sample {sid}, column {c.name!r}: {exc}") from exc
        height, width = self._size_of(sid, sample, values)
        for name, table in self._tables.items():  # the value's id in its place
            values[shared_key(name)] = table.id_of(
                values.pop(name), self._value_size(sample[name], by=name, default=(height, width))
            )
        stat_name, stat = self._layout.stat, None
        if stat_name is not None and self._layout.compute_stat is not None:
            stat = sample.get(stat_name)
            if stat is None:
                stat = self._layout.compute_stat(sample, values)

        extra_keys = tuple(sorted(k for k in sample if k not in self._not_extra))
        if self._extra_keys is None:
            self._extra_keys = extra_keys
            self._extra.update({k: [] for k in extra_keys})
        elif extra_keys != self._extra_keys:
            raise ValueError(
                f"sample {sid}: extra index columns {extra_keys} differ from the first sample's {self._extra_keys}"
            )

        if self._file is None:
            self._file = ShardFileWriter(
                self.uri, shard_file(len(self._shards)), self.rows_per_group, self.stored_columns
            )
        row_group, row = self._file.add(sid, values, height, width)

        idx = self._index
        idx["sample_id"].append(sid)
        idx["shard"].append(len(self._shards))
        idx["row_group"].append(row_group)
        idx["row"].append(row)
        idx["height"].append(height)
        idx["width"].append(width)
        if stat_name is not None:
            idx[stat_name].append(stat)
        idx["checksum"].append(columns_checksum(self.stored_columns, values, self.checksum))
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
        return write_index_and_manifest(
            self.uri,
            index_table(self._index, self._extra),
            self._shards,
            extra,
            columns=self.columns,
            task=self.task,
            shared=shared or None,
        )

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
