"""The packed dataset format (manifest + index + Parquet shards of encoded images): writer and reader.

Layout under a dataset URI:
  manifest.json          written last; a folder without it is not a dataset
  index.parquet          one row per sample: where it lives, its checksum, per-sample stats
  shards/shard-NNNNN.parquet   the encoded images, in row groups small enough to fetch one at a time
"""

from __future__ import annotations

import hashlib
import logging
import posixpath
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from storage import codec
from storage import fs as sfs

log = logging.getLogger(__name__)

# /2: masks and depth maps in storage.codec's raw format (new data); /1 held PNGs. Both read: the
# decoders tell the encodings apart per image. Code that only knows /1 refuses a /2 dataset here
# rather than failing on its masks at train time.
FORMAT = "orchestrator.shards/2"
READABLE_FORMATS = ("orchestrator.shards/1", FORMAT)
MANIFEST = "manifest.json"
INDEX = "index.parquet"
SHARD_DIR = "shards"
ROWS_PER_SHARD = 4096
ROWS_PER_GROUP = 256
CHECKSUM_DIGEST_BYTES = 8

IMAGE_COLUMNS = ("fg_bg", "bg", "mask", "depth")
SAMPLE_COLUMNS = ("sample_id", "fg_bg", "bg", "mask", "depth", "height", "width")
INDEX_COLUMNS = ("sample_id", "shard", "row_group", "row", "height", "width", "depth_mean", "checksum")

SHARD_SCHEMA = pa.schema(
    [
        ("sample_id", pa.int64()),
        ("fg_bg", pa.binary()),
        ("bg", pa.binary()),
        ("mask", pa.binary()),
        ("depth", pa.binary()),
        ("height", pa.int32()),
        ("width", pa.int32()),
    ]
)
_BASE_INDEX_TYPES = {
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


def sample_checksum(fg_bg: bytes, bg: bytes, mask: bytes, depth: bytes) -> str:
    """blake2b (8-byte digest, hex) over the four encoded images, in column order."""
    h = hashlib.blake2b(digest_size=CHECKSUM_DIGEST_BYTES)
    for part in (fg_bg, bg, mask, depth):
        h.update(part)
    return h.hexdigest()


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

    def __init__(self, dataset_uri: str, file: str, rows_per_group: int = ROWS_PER_GROUP):
        if rows_per_group < 1:
            raise ValueError("rows_per_group must be >= 1")
        self.file = file
        self.uri = sfs.join(dataset_uri, file)
        self.rows_per_group = int(rows_per_group)
        self.rows = 0
        self.groups = 0
        self._sink = _HashingSink(_open_for_write(self.uri))
        # The images are already compressed: compressing again or dictionary-encoding them costs
        # CPU for nothing, and min/max statistics of image bytes would only bloat the footer.
        self._pq: pq.ParquetWriter | None = pq.ParquetWriter(
            self._sink,
            SHARD_SCHEMA,
            compression="none",
            use_dictionary=False,
            write_statistics=["sample_id", "height", "width"],
        )
        self._buffer: dict[str, list] = {c: [] for c in SAMPLE_COLUMNS}

    def add(self, sample_id: int, images: dict[str, bytes], height: int, width: int) -> tuple[int, int]:
        """Append one sample (encoded images); returns its (row group, row within the group)."""
        place = divmod(self.rows, self.rows_per_group)
        buf = self._buffer
        buf["sample_id"].append(int(sample_id))
        for key in IMAGE_COLUMNS:
            buf[key].append(images[key])
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
        table = pa.Table.from_pydict(buf, schema=SHARD_SCHEMA)
        self._pq.write_table(table, row_group_size=len(buf["sample_id"]))
        self.groups += 1
        self._buffer = {c: [] for c in SAMPLE_COLUMNS}

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


def index_table(columns: dict[str, list], extra: dict[str, list] | None = None) -> pa.Table:
    """index.parquet's table: the INDEX_COLUMNS (typed) plus any extra per-sample columns."""
    cols = {k: pa.array(columns[k], type=_BASE_INDEX_TYPES[k]) for k in INDEX_COLUMNS}
    for k, values in (extra or {}).items():
        cols[k] = pa.array(np.asarray(values)) if len(values) else pa.array([], pa.null())
    return pa.table(cols)


def write_index_and_manifest(uri: str, index: pa.Table, shards: list[dict[str, Any]], extra_manifest: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write index.parquet, then manifest.json last: the manifest is the completion marker."""
    uri = sfs.normalize(uri)
    with _open_for_write(sfs.join(uri, INDEX)) as f:
        pq.write_table(index, f, compression="zstd")
    n = index.num_rows
    heights = index.column("height").to_numpy()
    widths = index.column("width").to_numpy()
    sizes = set(zip(heights.tolist(), widths.tolist(), strict=True))
    depth_means = index.column("depth_mean").to_numpy()
    manifest: dict[str, Any] = {
        "format": FORMAT,
        "num_samples": n,
        "image_size": list(next(iter(sizes))) if len(sizes) == 1 else None,
        "image_sizes": sorted([list(hw) for hw in sizes]),
        "seed": None,
        "source": None,
        "depth_mean": float(np.mean(depth_means, dtype=np.float64)) if n else None,
        "index": INDEX,
        "shards": shards,
    }
    manifest.update(extra_manifest or {})
    manifest["format"] = FORMAT
    sfs.write_json(sfs.join(uri, MANIFEST), manifest)
    return manifest


class ShardWriter:
    """Packs samples into Parquet shards, then writes index.parquet and, last, manifest.json.

    `add()` takes a dict with `sample_id` and the four images `fg_bg`, `bg`, `mask`, `depth`,
    each either encoded bytes (see storage.codec) or a numpy array (encoded here). Any other
    keys become extra index columns (the set of keys must be the same for every sample; numpy
    scalar types keep their dtype). With encoded depth, pass `depth_mean` too, or it is decoded
    to compute it. `height`/`width` default to the shape of the arrays, or are read from the
    encoded bg.

    Opening a writer on an existing dataset deletes its manifest first, so a crash mid-rewrite
    leaves a folder that is not a dataset rather than a manifest describing other files.
    """

    def __init__(self, uri: str, rows_per_shard: int = ROWS_PER_SHARD, rows_per_group: int = ROWS_PER_GROUP):
        if rows_per_group < 1 or rows_per_shard < 1:
            raise ValueError("rows_per_shard and rows_per_group must be >= 1")
        self.uri = sfs.normalize(uri)
        self.rows_per_shard = int(rows_per_shard)
        self.rows_per_group = min(int(rows_per_group), self.rows_per_shard)
        sfs.remove(sfs.join(self.uri, MANIFEST))
        sfs.remove(sfs.join(self.uri, INDEX))
        sfs.remove(sfs.join(self.uri, SHARD_DIR), recursive=True)

        self._shards: list[dict[str, Any]] = []
        self._file: ShardFileWriter | None = None
        self._index: dict[str, list] = {c: [] for c in INDEX_COLUMNS}
        self._extra_keys: tuple[str, ...] | None = None
        self._extra: dict[str, list] = {}
        self._closed = False

    # -- adding ------------------------------------------------------------------------------

    def add(self, sample: dict[str, Any]) -> None:
        if self._closed:
            raise RuntimeError("ShardWriter is closed")
        sid = int(sample["sample_id"])
        images = {}
        for key in IMAGE_COLUMNS:
            value = sample[key]
            if isinstance(value, np.ndarray):
                if key == "mask":
                    value = codec.encode_mask(value)
                elif key == "depth":
                    value = codec.encode_depth(value)
                else:
                    value = codec.encode_jpeg(value)
            images[key] = bytes(value)
        height, width = self._size_of(sample, images)
        depth_mean = sample.get("depth_mean")
        if depth_mean is None:
            depth = sample["depth"]
            if isinstance(depth, np.ndarray):
                depth_mean = float(codec.depth_to_uint16(depth).mean()) / codec.DEPTH_SCALE
            else:
                depth_mean = float(codec.decode_depth(images["depth"]).mean())

        extra_keys = tuple(sorted(k for k in sample if k not in SAMPLE_COLUMNS and k not in INDEX_COLUMNS))
        if self._extra_keys is None:
            self._extra_keys = extra_keys
            self._extra = {k: [] for k in extra_keys}
        elif extra_keys != self._extra_keys:
            raise ValueError(f"sample {sid}: extra index columns {extra_keys} differ from the first sample's {self._extra_keys}")

        if self._file is None:
            self._file = ShardFileWriter(self.uri, shard_file(len(self._shards)), self.rows_per_group)
        row_group, row = self._file.add(sid, images, height, width)

        idx = self._index
        idx["sample_id"].append(sid)
        idx["shard"].append(len(self._shards))
        idx["row_group"].append(row_group)
        idx["row"].append(row)
        idx["height"].append(height)
        idx["width"].append(width)
        idx["depth_mean"].append(depth_mean)
        idx["checksum"].append(sample_checksum(*(images[k] for k in IMAGE_COLUMNS)))
        for k in extra_keys:
            self._extra[k].append(sample[k])

        if self._file.rows >= self.rows_per_shard:
            self._close_shard()

    def add_many(self, samples: Iterable[dict[str, Any]]) -> None:
        for s in samples:
            self.add(s)

    @staticmethod
    def _size_of(sample: dict[str, Any], images: dict[str, bytes]) -> tuple[int, int]:
        if "height" in sample and "width" in sample:
            return int(sample["height"]), int(sample["width"])
        for key in IMAGE_COLUMNS:
            if isinstance(sample[key], np.ndarray):
                return int(sample[key].shape[0]), int(sample[key].shape[1])
        h, w = codec.decode_jpeg(images["bg"]).shape[:2]
        return int(h), int(w)

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
        extra = {"rows_per_group": self.rows_per_group, **(extra_manifest or {})}
        return write_index_and_manifest(self.uri, index_table(self._index, self._extra), self._shards, extra)

    def abort(self) -> None:
        """Drop what is open without writing a manifest: the folder stays a non-dataset."""
        self._closed = True
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

    `index` is the whole index.parquet as a pyarrow Table (columns as in INDEX_COLUMNS plus
    whatever extra columns the writer added, e.g. synth's bg_index/flipped/fg_x/...); readers
    must treat extra columns as optional. The object is picklable, so it can be sent to workers.
    """

    def __init__(self, uri: str, manifest: dict[str, Any], index: pa.Table):
        self.uri = uri
        self.manifest = manifest
        self.index = index
        self.sample_ids = index.column("sample_id").to_numpy().astype(np.int64, copy=False)
        self._shard = index.column("shard").to_numpy().astype(np.int32, copy=False)
        self._group = index.column("row_group").to_numpy().astype(np.int32, copy=False)
        self._row = index.column("row").to_numpy().astype(np.int64, copy=False)
        self._order = np.argsort(self.sample_ids, kind="stable")
        self._sorted_ids = self.sample_ids[self._order]
        self._reader = None

    @property
    def num_samples(self) -> int:
        return int(self.manifest["num_samples"])

    def __len__(self) -> int:
        return self.num_samples

    def __repr__(self) -> str:
        return f"ShardDataset({self.uri!r}, num_samples={self.num_samples})"

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

    def depth_means(self, ids: Sequence[int] | np.ndarray) -> np.ndarray:
        """Per-sample mean depth (float32, from the index; no shard reads), in the order of `ids`."""
        return self.index.column("depth_mean").to_numpy()[self.positions(ids)]

    def describe(self, sample_id: int) -> str:
        """Where a sample lives, for error messages: dataset URI, shard file, row group, sample id."""
        try:
            p = int(self.positions([sample_id])[0])
        except DatasetError:
            return f"{self.uri} sample {int(sample_id)} (not in the index)"
        shard = self.manifest["shards"][int(self._shard[p])]["file"]
        return f"{self.uri} {shard} row group {int(self._group[p])} sample {int(sample_id)}"

    def read_samples(self, ids: Sequence[int] | np.ndarray, columns: Sequence[str] = SAMPLE_COLUMNS) -> dict[str, Any]:
        """The given samples, in exactly the order of `ids` (repeats allowed).

        Returns `sample_id`, `height`, `width` as numpy arrays and the encoded images `fg_bg`,
        `bg`, `mask`, `depth` as lists of bytes (decode with storage.codec). Only the row groups
        that hold the ids are fetched (all at once, through the local cache; storage/preload.py),
        and each sample is checked against its checksum: a row group that fails is fetched once
        more, and a second failure raises DatasetError naming the shard URI.
        """
        columns = tuple(columns)
        unknown = [c for c in columns if c not in SAMPLE_COLUMNS]
        if unknown:
            raise ValueError(f"unknown columns {unknown}; choose from {SAMPLE_COLUMNS}")
        pos = self.positions(ids)
        n = len(pos)
        shard_of, group_of, row_of = self._shard[pos], self._group[pos], self._row[pos]
        wanted = sorted(set(zip(shard_of.tolist(), group_of.tolist(), strict=True)))
        groups = self._read_groups(wanted, pos, shard_of, group_of)

        out_cols: dict[str, list] = {c: [None] * n for c in columns}
        by_group: dict[tuple[int, int], list[int]] = {}
        for i, key in enumerate(zip(shard_of.tolist(), group_of.tolist(), strict=True)):
            by_group.setdefault(key, []).append(i)
        for key, where in by_group.items():
            rows = row_of[where].tolist()
            for c in columns:
                values, col = groups[key][c], out_cols[c]
                for dst, r in zip(where, rows, strict=True):
                    col[dst] = values[r]
        result: dict[str, Any] = {}
        for c in columns:
            if c == "sample_id":
                result[c] = np.asarray(out_cols[c], dtype=np.int64)
            elif c in ("height", "width"):
                result[c] = np.asarray(out_cols[c], dtype=np.int32)
            else:
                result[c] = out_cols[c]
        if "sample_id" in result and not np.array_equal(result["sample_id"], np.asarray(ids, dtype=np.int64).reshape(-1)):
            raise DatasetError(f"{self.uri}: index and shards disagree (read other sample ids than asked for); the dataset is damaged, re-create it")
        return result

    def _read_groups(self, wanted: list[tuple[int, int]], pos: np.ndarray, shard_of: np.ndarray, group_of: np.ndarray) -> dict[tuple[int, int], dict[str, list]]:
        """Fetch and parse the wanted row groups ({column: values} each), verifying every sample asked for."""
        reader = self.reader
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
                    table = reader.read_group(key[0], key[1], fetched[key], SAMPLE_COLUMNS)
                except (OSError, pa.ArrowException) as exc:
                    bad[key] = f"row group {key[1]} cannot be parsed ({type(exc).__name__}: {exc})"
                    continue
                values = {c: table.column(c).to_pylist() for c in SAMPLE_COLUMNS}
                reason = _verify_rows(values, checks[key])
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
            self._reader = ShardReader(self.uri, self.manifest, cache_for(self.uri))
        return self._reader

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_reader"] = None  # holds a filesystem, a lock and parsed footers: per process
        return state


def _verify_rows(values: dict[str, list], rows: list[tuple[int, int, str]]) -> str | None:
    """None when each (row, sample id, checksum) matches the row group's values; else what is wrong."""
    n = len(values["sample_id"])
    for r, sid, expected in rows:
        if r >= n or values["sample_id"][r] != sid:
            return f"sample {sid} is not at row {r} where the index puts it"
        got = sample_checksum(*(values[c][r] for c in IMAGE_COLUMNS))
        if got != expected:
            return f"sample {sid} fails its checksum (index {expected}, read {got})"
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


def open_dataset(uri: str) -> ShardDataset:
    """Open a packed dataset; DatasetError says what is wrong with the URI and how to fix it."""
    uri = sfs.normalize(uri)
    manifest_uri = sfs.join(uri, MANIFEST)
    if not sfs.exists(manifest_uri):
        hint = _missing_bucket_hint(uri)
        raise DatasetError(
            f"{uri}: no dataset here (manifest.json missing{hint}). Make one with `orchestrator data synth {uri}` "
            "(or `orchestrator data pack SOURCE DEST` from raw files), or point data.uri at a packed dataset"
        )
    try:
        manifest = sfs.read_json(manifest_uri)
    except ValueError as exc:  # json.JSONDecodeError, UnicodeDecodeError
        raise DatasetError(f"{uri}: manifest.json is not valid JSON ({exc}); the dataset is damaged, re-create it") from exc
    if not isinstance(manifest, dict) or manifest.get("format") not in READABLE_FORMATS:
        got = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise DatasetError(f"{uri}: manifest.json has format {got!r}, expected one of {list(READABLE_FORMATS)}; "
                           f"re-create the dataset with `orchestrator data synth {uri}`")
    if int(manifest.get("num_samples") or 0) == 0:
        raise DatasetError(f"{uri}: the dataset is empty (0 samples); re-create it with more samples")
    index_uri = sfs.join(uri, manifest.get("index", INDEX))
    try:
        index = _read_table(index_uri)
    except FileNotFoundError as exc:
        raise DatasetError(f"{uri}: {manifest.get('index', INDEX)} is missing although manifest.json is there; the dataset is damaged, re-create it") from exc
    if index.num_rows != manifest["num_samples"]:
        raise DatasetError(f"{uri}: index has {index.num_rows} rows but the manifest says {manifest['num_samples']} samples; the dataset is damaged, re-create it")
    return ShardDataset(uri, manifest, index)
