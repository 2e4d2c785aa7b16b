"""ShardDataset: a packed dataset opened for random access by sample id, every sample checked.

Reads go through storage/shards/fetch.py's ShardReader (footers once per process, ranged reads of
the wanted row groups, the local cache); shared values (/4) are resolved after, each distinct one
fetched once and kept in memory (up to SHARED_CACHE_BYTES) for the next reads.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pyarrow as pa

from storage import fs as sfs
from storage.cache import cache_for
from storage.columns import Column, columns_from_manifest
from storage.errors import DatasetError
from storage.shards.fetch import ShardReader
from storage.shards.format import (
    BASE_INDEX_COLUMNS,
    COLUMNS_FORMAT,
    CRC32_FORMAT,
    LEGACY_MASK_DEPTH_FORMAT,
    checksum_of,
    parse_parquet,
    sample_columns,
    shared_index_file,
    shared_key,
    stored_columns,
)
from storage.shards.groups import GroupColumns, gather, verify_rows
from storage.shards.legacy import DEFAULT_TASK, INDEX_STAT
from storage.shards.manifest import one_line, read_index_and_footers, read_manifest

log = logging.getLogger(__name__)

# Shared values a ShardDataset keeps in memory between reads (a background is ~13-30 KB).
SHARED_CACHE_BYTES = 64 * 2**20
# How many unknown ids an error message lists before it says "and N more".
_IDS_IN_MESSAGES = 5


# Index columns of a fixed-width type viewed as numpy without pyarrow's to_numpy, which imports
# pandas on its first call: 0.2-0.3 s of a worker's first open, before its first batch (bench.peer).
_FIXED = {pa.int8(): np.int8, pa.int16(): np.int16, pa.int32(): np.int32, pa.int64(): np.int64,
          pa.uint8(): np.uint8, pa.uint16(): np.uint16, pa.uint32(): np.uint32, pa.uint64(): np.uint64,
          pa.float32(): np.float32, pa.float64(): np.float64}


def _arrow_positions(pos: np.ndarray) -> pa.Array:
    """Positions for Table.take as an Arrow array over the numpy bytes: pa.array(numpy) asks
    whether it was given a pandas object, which imports pandas (see _FIXED)."""
    data = np.ascontiguousarray(pos, dtype=np.int64)
    return pa.Array.from_buffers(pa.int64(), len(data), [None, pa.py_buffer(data)])


def _numpy(column: pa.ChunkedArray) -> np.ndarray:
    """An index column as numpy (read-only, as pyarrow's zero-copy view is); other types and
    columns with nulls through to_numpy."""
    whole = column.chunk(0) if column.num_chunks == 1 else pa.concat_arrays(column.chunks)
    dtype = _FIXED.get(whole.type)
    if dtype is None or whole.null_count or len(whole) == 0:
        return whole.to_numpy(zero_copy_only=False)
    item = np.dtype(dtype).itemsize
    return np.frombuffer(whole.buffers()[1], dtype=dtype, count=len(whole), offset=whole.offset * item)


def _fixed_width_strings(column: pa.ChunkedArray) -> np.ndarray | None:
    """A string index column whose values all have one length (the checksums' hex) as a numpy view
    of its bytes (dtype S<length>, no copy); None for any other column. Taking values from it is
    numpy's: ChunkedArray.take imports pyarrow.compute on first use, 55 ms of a worker's first read."""
    whole = column.chunk(0) if column.num_chunks == 1 else pa.concat_arrays(column.chunks)
    if not pa.types.is_string(whole.type) or whole.null_count or len(whole) == 0:
        return None
    offsets = np.frombuffer(whole.buffers()[1], dtype=np.int32, count=len(whole) + 1, offset=whole.offset * 4)
    width = int(offsets[1] - offsets[0])
    if width <= 0 or not np.array_equal(np.diff(offsets), np.full(len(whole), width, dtype=np.int32)):
        return None
    return np.frombuffer(whole.buffers()[2], dtype=f"S{width}", count=len(whole), offset=int(offsets[0]))


def _describe_ids(ids: np.ndarray) -> str:
    shown = ", ".join(str(int(i)) for i in ids[:_IDS_IN_MESSAGES])
    more = f" and {len(ids) - _IDS_IN_MESSAGES} more" if len(ids) > _IDS_IN_MESSAGES else ""
    return f"{shown}{more}"


class ShardDataset:
    """A packed dataset opened for random access by sample id.

    `columns` are the manifest's declared columns (the fixed layout's for /1 and /2 datasets that
    declare none), `task` its task (default legacy.DEFAULT_TASK), `meta` its opaque "meta" dict (default
    {}). `index` is the whole index.parquet as a pyarrow Table (BASE_INDEX_COLUMNS plus whatever
    extra columns the writer added, e.g. depth_mean, synth's bg_index/flipped/fg_x/..., a label);
    readers must treat extra columns as optional (index_values names what there is). The object
    is picklable, so it can be sent to workers.

    A /4 dataset's `shared` maps each shared column to the ShardDataset of its table (the value's
    id as sample_id); `stored_columns` are what shard rows hold (a shared column's int64 id in its
    place); `sample_columns` are the declared ones, which read_samples resolves.
    """

    def __init__(
        self,
        uri: str,
        manifest: dict[str, Any],
        index: pa.Table,
        shared: Mapping[str, ShardDataset] | None = None,
        item: str = "sample",
        disk_cache: bool = True,
        footers: Mapping[str, tuple[int, bytes]] | None = None,
    ):
        self.uri = uri
        self.manifest = manifest
        self.index = index
        self.columns: tuple[Column, ...] = columns_from_manifest(manifest)
        self.task: str = manifest.get("task") or DEFAULT_TASK
        self.meta: dict[str, Any] = manifest.get("meta") or {}
        self.format: str = manifest.get("format") or LEGACY_MASK_DEPTH_FORMAT
        self.checksum = checksum_of(self.format)  # of the index's per-sample checksums
        self.shared: dict[str, ShardDataset] = dict(shared or {})
        self.stored_columns = stored_columns(self.columns, tuple(self.shared))
        self.sample_columns = sample_columns(self.columns)
        self._stored_names = sample_columns(self.stored_columns)
        self.item = item  # what a row is called in error messages
        self.disk_cache = disk_cache
        self.sample_ids = _numpy(index.column("sample_id")).astype(np.int64, copy=False)
        self._shard = _numpy(index.column("shard")).astype(np.int32, copy=False)
        self._group = _numpy(index.column("row_group")).astype(np.int32, copy=False)
        self._row = _numpy(index.column("row")).astype(np.int64, copy=False)
        self._order = np.argsort(self.sample_ids, kind="stable")
        self._sorted_ids = self.sample_ids[self._order]
        self._reader = None
        self._index_arrays: dict[str, np.ndarray] = {}
        self.open_requests = 0  # what opening it cost (open_dataset sets it): manifest, index, shared indexes
        # The shards' footers the index carried ({} for older datasets): no request per shard.
        mine = {sh["file"] for sh in manifest["shards"]}
        self._footer_copies = {f: c for f, c in (footers or {}).items() if f in mine}
        self._init_shared_cache()

    def _init_shared_cache(self) -> None:
        self._shared_cache: OrderedDict[tuple[str, int], bytes] = OrderedDict()
        self._shared_cache_bytes = 0
        self._shared_lock = threading.Lock()
        # Held while shared values are fetched: pieces of a chunk read in parallel would each fetch
        # the values the other is already fetching; the second waits, then finds them in memory.
        self._shared_fetch_lock = threading.Lock()

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
            raise DatasetError(
                f"{self.uri}: unknown sample ids {_describe_ids(missing)} ({len(missing)} of {len(ids)} requested are "
                f"not in this dataset of {self.num_samples})"
            )
        return self._order[pos_clipped]

    def requests(self) -> int:
        """Reads this dataset has cost this process so far: opening it, its shards' footers and
        ranges, its shared tables' (benchmarks count GETs with it)."""
        own = self._reader.stats.requests if self._reader is not None else 0
        return self.open_requests + own + sum(t.requests() for t in self.shared.values())

    def index_values(self, name: str, ids: Sequence[int] | np.ndarray) -> np.ndarray:
        """One index column's values (no shard reads), in the order of `ids`: a numpy array of its
        type; a list column gives an object array of numpy arrays. DatasetError when the index has
        no such column."""
        if name not in self.index.column_names:
            raise DatasetError(
                f"{self.uri}: index.parquet has no column {name!r} (task {self.task!r}); its columns are "
                f"{self.index.column_names}. "
                "Re-pack the dataset with it, or use a column it has"
            )
        pos = self.positions(ids)
        column = self.index.column(name)
        if column.type in _FIXED and not column.null_count:
            if name not in self._index_arrays:  # a view of the column, made once: a take is then numpy's
                self._index_arrays[name] = _numpy(column)
            return self._index_arrays[name][pos]
        return _numpy(column.take(_arrow_positions(pos)))

    def depth_means(self, ids: Sequence[int] | np.ndarray) -> np.ndarray:
        """index_values of the fixed layout's per-sample stat (legacy.INDEX_STAT: mean depth, float32)."""
        return self.index_values(INDEX_STAT, ids)

    def describe(self, sample_id: int) -> str:
        """Where a sample lives, for error messages: dataset URI, shard file, row group, sample id."""
        try:
            p = int(self.positions([sample_id])[0])
        except DatasetError:
            return f"{self.uri} sample {int(sample_id)} (not in the index)"
        shard = self.manifest["shards"][int(self._shard[p])]["file"]
        return f"{self.uri} {shard} row group {int(self._group[p])} sample {int(sample_id)}"

    def read_samples(self, ids: Sequence[int] | np.ndarray, columns: Sequence[str] | None = None,
                     packed: bool = False) -> dict[str, Any]:
        """The given samples, in exactly the order of `ids` (repeats allowed).

        Returns `sample_id`, every declared column (or just the `columns` asked for, from
        `sample_columns`, or a shared column's id column `<name>_id`), `height`, `width`:
        sample_id/height/width and int64 columns as numpy arrays, the other columns as lists of
        encoded bytes (decode with storage.columns or storage.codec); with `packed`, each unshared
        bytes column as a Packed (storage/shards/groups.py: one blob and an index, indexed like the
        list). Only the row groups that hold the ids are fetched (all at once, through the local
        cache; storage/shards/fetch.py), and each sample is checked against its checksum: a row group
        that fails is fetched once more, and a second failure raises DatasetError naming the shard
        URI. Shared values (/4) are resolved after: each distinct one needed is fetched once (only
        the row groups of its table that hold it), checked against its own checksum the same way,
        and kept in memory for the next reads; samples that share one get the same bytes object.
        """
        columns = (
            self.sample_columns if columns is None else ((columns,) if isinstance(columns, str) else tuple(columns))
        )
        keys = {shared_key(n): n for n in self.shared}
        unknown = [c for c in columns if c not in self.sample_columns and c not in keys]
        if unknown:
            raise ValueError(f"unknown columns {unknown}; choose from {[*self.sample_columns, *keys]}")
        pos = self.positions(ids)
        n = len(pos)
        shard_of, group_of, row_of = self._shard[pos], self._group[pos], self._row[pos]
        wanted = sorted(set(zip(shard_of.tolist(), group_of.tolist(), strict=True)))
        groups = self._read_groups(wanted, pos, shard_of, group_of)

        by_group: dict[tuple[int, int], list[int]] = {}
        for i, key in enumerate(zip(shard_of.tolist(), group_of.tolist(), strict=True)):
            by_group.setdefault(key, []).append(i)
        where = {key: (dst, row_of[dst]) for key, dst in by_group.items()}
        ints = {"sample_id", "height", "width", *(c.name for c in self.stored_columns if not c.is_bytes)}
        result: dict[str, Any] = {}
        for c in columns:
            name = shared_key(c) if c in self.shared else c
            kind = "int" if name in ints else "packed" if packed and c not in self.shared else "list"
            values = gather(groups, where, n, name, kind)
            if c in self.shared:
                result[c] = self._resolve_shared(c, values)
            else:
                result[c] = values.astype(np.int32) if c in ("height", "width") else values
        if "sample_id" in result and not np.array_equal(
            result["sample_id"], np.asarray(ids, dtype=np.int64).reshape(-1)
        ):
            raise DatasetError(
                f"{self.uri}: index and shards disagree (read other sample ids than asked for); the dataset is "
                "damaged, re-create it"
            )
        return result

    def _checksums(self, pos: np.ndarray) -> list[str]:
        """The index's checksums of these positions (a fixed-width view of the column, made once;
        else a take)."""
        if "checksum" not in self._index_arrays:
            self._index_arrays["checksum"] = _fixed_width_strings(self.index.column("checksum"))
        view = self._index_arrays["checksum"]
        if view is None:
            return self.index.column("checksum").take(_arrow_positions(pos)).to_pylist()
        return [v.decode() for v in view[pos].tolist()]

    def _resolve_shared(self, name: str, vids: np.ndarray) -> list[bytes]:
        """The values of shared column `name` for these ids (one per sample), each distinct one
        fetched once (or taken from memory)."""
        got: dict[int, bytes] = {}
        missing = self._shared_hits(name, np.unique(vids).tolist(), got)
        if missing:
            with self._shared_fetch_lock:
                missing = self._shared_hits(name, missing, got)  # what another thread fetched meanwhile
                if missing:
                    self._fetch_shared(name, missing, got)
        return [got[v] for v in vids.tolist()]

    def _shared_hits(self, name: str, vids: list[int], got: dict[int, bytes]) -> list[int]:
        """Put the values of `vids` held in memory into `got`; returns the ids that are not."""
        missing: list[int] = []
        with self._shared_lock:
            for v in vids:
                hit = self._shared_cache.get((name, v))
                if hit is None:
                    missing.append(v)
                else:
                    self._shared_cache.move_to_end((name, v))
                    got[v] = hit
        return missing

    def _fetch_shared(self, name: str, missing: list[int], got: dict[int, bytes]) -> None:
        """Fetch shared column `name`'s values of these ids (each checked), keep them in memory, put them in `got`."""
        table = self.shared[name]
        pos = np.searchsorted(table._sorted_ids, missing)
        absent = [
            v
            for v, p in zip(missing, pos.tolist(), strict=True)
            if p >= len(table._sorted_ids) or table._sorted_ids[p] != v
        ]
        if absent:
            raise DatasetError(
                f"{self.uri}: samples refer to shared {name} ids {_describe_ids(np.asarray(absent))}, which "
                f"{shared_index_file(name)} does not list; the dataset is damaged, re-pack it"
            )
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

    def _read_groups(
        self, wanted: list[tuple[int, int]], pos: np.ndarray, shard_of: np.ndarray, group_of: np.ndarray
    ) -> dict[tuple[int, int], GroupColumns]:
        """Fetch and parse the wanted row groups, verifying every sample asked for."""
        reader = self.reader
        names = self._stored_names
        checks: dict[tuple[int, int], list[tuple[int, int, str]]] = {}
        # Taken per read, not held as a Python list: 1.2M checksum strings would cost ~80 MB per worker.
        sums = self._checksums(pos)
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
                group = GroupColumns(table)
                reason = verify_rows(group, checks[key], self.stored_columns, self.checksum, self.item)
                if reason:
                    bad[key] = f"row group {key[1]}: {reason}"
                else:
                    good[key] = group
            return good, bad

        tables, bad = parse(wanted, use_cache=True)
        if bad:
            # Once more from the store, past the cache: a flipped bit in flight or on the cache
            # disk heals here; a shard that is damaged at the source fails the same way again.
            log.warning(
                "%d row groups failed their checksums (%s); fetching them again", len(bad), "; ".join(bad.values())
            )
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
        if self._reader is None:
            self._reader = ShardReader(self.uri, self.manifest, cache_for(self.uri) if self.disk_cache else None,
                                       self._footer_copies)
        return self._reader

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_reader"] = None  # holds a filesystem, a lock and parsed footers: per process
        state["_index_arrays"] = {}  # views of the index, made again on use: not worth their bytes
        for k in ("_shared_cache", "_shared_cache_bytes", "_shared_lock", "_shared_fetch_lock"):  # per process too
            state.pop(k, None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._init_shared_cache()


def shared_table(uri: str, manifest: dict[str, Any], name: str, index: pa.Table,
                 footers: Mapping[str, tuple[int, bytes]] | None = None) -> ShardDataset:
    """The ShardDataset of a /4 dataset's shared column `name` (the value's id as sample_id)."""
    entry = manifest["shared"][name]
    column = next(c for c in columns_from_manifest(manifest) if c.name == name)
    sub = {
        # Its checksums are of the dataset's kind: /5's shared tables are /5 (without shared columns).
        "format": CRC32_FORMAT if manifest["format"] == CRC32_FORMAT else COLUMNS_FORMAT,
        "task": f"shared {name}",
        "columns": [column.as_dict()],
        "num_samples": entry["num"],
        "index": entry["index"],
        "shards": entry["files"],
    }
    # Its values are kept in memory by the dataset that reads them (ShardDataset._resolve_shared):
    # the disk cache holds the samples' row groups only.
    return ShardDataset(uri, sub, index, item=f"shared {name}", disk_cache=False, footers=footers)


def _open_shared(
    uri: str, manifest: dict[str, Any], copies: Mapping[str, tuple[int, bytes]] | None = None
) -> dict[str, ShardDataset]:
    """The shared tables of a /4 dataset, their indexes (the copies the dataset's index carried,
    else read) checked against the manifest."""
    out = {}
    for name, entry in (manifest.get("shared") or {}).items():
        index_uri = sfs.join(uri, entry["index"])
        try:
            copy = (copies or {}).get(entry["index"])
            data = copy[1] if copy is not None else sfs.read_bytes(index_uri)
        except FileNotFoundError as exc:
            raise DatasetError(
                f"{uri}: {entry['index']} (the table of shared column {name!r}) is missing although manifest.json is "
                "there; "
                "the dataset is damaged, re-pack it"
            ) from exc
        if hashlib.sha256(data).hexdigest() != entry["index_sha256"]:
            raise DatasetError(
                f"{index_uri}: sha256 differs from the manifest's (the file changed after packing); the dataset is "
                "damaged, re-pack it"
            )
        try:
            index = parse_parquet(data)[0]
        except (OSError, pa.ArrowException) as exc:
            raise DatasetError(
                one_line(
                    f"{index_uri}: cannot be read as Parquet ({type(exc).__name__}: {exc}); the dataset is damaged, "
                    "re-pack it"
                )
            ) from exc
        missing = [c for c in BASE_INDEX_COLUMNS if c not in index.column_names]
        if missing or index.num_rows != entry["num"]:
            what = (
                f"columns {missing} missing" if missing else f"{index.num_rows} rows, the manifest says {entry['num']}"
            )
            raise DatasetError(f"{index_uri}: {what}; the dataset is damaged, re-pack it")
        out[name] = shared_table(uri, manifest, name, index, copies)
    return out


def open_dataset(uri: str, own_files: bool = False) -> ShardDataset:
    """Open a packed dataset; DatasetError says what is wrong with the URI and how to fix it.

    A manifest.json that is not JSON, not an object, lacks keys, has values of the wrong type or
    declares unknown codecs is a one-line DatasetError naming the manifest's URI.

    The footers and shared indexes index.parquet carries (storage/shards/footers.py) are checked
    and used; `own_files` reads each shared index from its own file instead (`data verify`, which
    checks every file), at one request per shared column.
    """
    uri = sfs.normalize(uri)
    manifest = read_manifest(uri)
    index, footers = read_index_and_footers(uri, manifest)
    copies = None if own_files else footers
    shared = _open_shared(uri, manifest, copies)
    ds = ShardDataset(uri, manifest, index, shared, footers=footers)
    ds.open_requests = 2 + sum(1 for e in (manifest.get("shared") or {}).values() if e["index"] not in (copies or {}))
    return ds
