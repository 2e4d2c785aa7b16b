"""The packed dataset format (manifest + index + Parquet shards of encoded images): writer and reader.

Layout under a dataset URI:
  manifest.json          written last; a folder without it is not a dataset
  index.parquet          one row per sample: where it lives, its checksum, per-sample stats
  shards/shard-NNNNN.parquet   the encoded images, in row groups small enough to fetch one at a time
"""

from __future__ import annotations

import hashlib
import posixpath
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from storage import codec
from storage import fs as sfs
from storage.retry import storage_retry

FORMAT = "orchestrator.shards/1"
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

    def write(self, data) -> int:
        mv = memoryview(data)
        self.sha256.update(mv)
        self.nbytes += mv.nbytes
        self._f.write(mv)
        return mv.nbytes

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
        self._sink: _HashingSink | None = None
        self._pq: pq.ParquetWriter | None = None
        self._rows_in_shard = 0
        self._groups_in_shard = 0
        self._buffer: dict[str, list] = {c: [] for c in SAMPLE_COLUMNS}
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
                    value = codec.encode_mask_png(value)
                elif key == "depth":
                    value = codec.encode_depth_png(value)
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
                depth_mean = float(codec.decode_depth_png(images["depth"]).mean())

        extra_keys = tuple(sorted(k for k in sample if k not in SAMPLE_COLUMNS and k not in INDEX_COLUMNS))
        if self._extra_keys is None:
            self._extra_keys = extra_keys
            self._extra = {k: [] for k in extra_keys}
        elif extra_keys != self._extra_keys:
            raise ValueError(f"sample {sid}: extra index columns {extra_keys} differ from the first sample's {self._extra_keys}")

        if self._pq is None:
            self._open_shard()
        row_group, row = divmod(self._rows_in_shard, self.rows_per_group)
        buf = self._buffer
        buf["sample_id"].append(sid)
        for key in IMAGE_COLUMNS:
            buf[key].append(images[key])
        buf["height"].append(height)
        buf["width"].append(width)

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

        self._rows_in_shard += 1
        if len(buf["sample_id"]) >= self.rows_per_group:
            self._flush_group()
        if self._rows_in_shard >= self.rows_per_shard:
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

    # -- shards --------------------------------------------------------------------------------

    def _open_shard(self) -> None:
        uri = sfs.join(self.uri, shard_file(len(self._shards)))
        self._sink = _HashingSink(_open_for_write(uri))
        # The images are already compressed: compressing again or dictionary-encoding them costs
        # CPU for nothing, and min/max statistics of image bytes would only bloat the footer.
        self._pq = pq.ParquetWriter(
            self._sink,
            SHARD_SCHEMA,
            compression="none",
            use_dictionary=False,
            write_statistics=["sample_id", "height", "width"],
        )
        self._rows_in_shard = 0
        self._groups_in_shard = 0

    def _flush_group(self) -> None:
        buf = self._buffer
        if not buf["sample_id"] or self._pq is None:
            return
        table = pa.Table.from_pydict(buf, schema=SHARD_SCHEMA)
        self._pq.write_table(table, row_group_size=len(buf["sample_id"]))
        self._groups_in_shard += 1
        self._buffer = {c: [] for c in SAMPLE_COLUMNS}

    def _close_shard(self) -> None:
        if self._pq is None:
            return
        self._flush_group()
        self._pq.close()
        assert self._sink is not None
        self._sink.close()
        self._shards.append(
            {
                "file": shard_file(len(self._shards)),
                "rows": self._rows_in_shard,
                "row_groups": self._groups_in_shard,
                "bytes": self._sink.nbytes,
                "sha256": self._sink.sha256.hexdigest(),
            }
        )
        self._pq = None
        self._sink = None

    # -- finishing -----------------------------------------------------------------------------

    def _index_table(self) -> pa.Table:
        cols = {k: pa.array(v, type=_BASE_INDEX_TYPES[k]) for k, v in self._index.items()}
        for k, values in self._extra.items():
            cols[k] = pa.array(np.asarray(values)) if values else pa.array([], pa.null())
        return pa.table(cols)

    def close(self, extra_manifest: dict[str, Any] | None = None) -> dict[str, Any]:
        """Finish the last shard, write the index, then the manifest (the completion marker)."""
        if self._closed:
            raise RuntimeError("ShardWriter is already closed")
        self._close_shard()
        self._closed = True

        index_uri = sfs.join(self.uri, INDEX)
        with _open_for_write(index_uri) as f:
            pq.write_table(self._index_table(), f, compression="zstd")

        n = len(self._index["sample_id"])
        sizes = set(zip(self._index["height"], self._index["width"], strict=True))
        manifest: dict[str, Any] = {
            "format": FORMAT,
            "num_samples": n,
            "image_size": list(next(iter(sizes))) if len(sizes) == 1 else None,
            "seed": None,
            "source": None,
            "depth_mean": float(np.mean(self._index["depth_mean"], dtype=np.float64)) if n else None,
            "index": INDEX,
            "shards": self._shards,
        }
        manifest.update(extra_manifest or {})
        manifest["format"] = FORMAT
        sfs.write_json(sfs.join(self.uri, MANIFEST), manifest)
        return manifest

    def abort(self) -> None:
        """Drop what is open without writing a manifest: the folder stays a non-dataset."""
        self._closed = True
        try:
            if self._pq is not None:
                self._pq.close()
            if self._sink is not None:
                self._sink.close()
        finally:
            self._pq = None
            self._sink = None

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        # A clean exit still needs close(extra_manifest) called explicitly; an error only aborts.
        if exc_type is not None and not self._closed:
            self.abort()


# -- reading -------------------------------------------------------------------------------------


@storage_retry
def _read_table(uri: str, row_groups: list[int] | None = None, columns: Sequence[str] | None = None) -> pa.Table:
    fs, path = sfs.filesystem(uri)
    with fs.open(path, "rb") as f:
        pf = pq.ParquetFile(f)
        if row_groups is None:
            return pf.read(columns=list(columns) if columns else None)
        return pf.read_row_groups(row_groups, columns=list(columns) if columns else None)


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
        that hold the ids are fetched, one read per shard touched.
        """
        columns = tuple(columns)
        unknown = [c for c in columns if c not in SAMPLE_COLUMNS]
        if unknown:
            raise ValueError(f"unknown columns {unknown}; choose from {SAMPLE_COLUMNS}")
        pos = self.positions(ids)
        n = len(pos)
        out_cols: dict[str, list] = {c: [None] * n for c in columns}
        shards = self._shard[pos]
        for shard in np.unique(shards):
            want = np.nonzero(shards == shard)[0]
            groups_wanted = self._group[pos[want]]
            groups = np.unique(groups_wanted)
            shard_uri = sfs.join(self.uri, self.manifest["shards"][int(shard)]["file"])
            try:
                table = _read_table(shard_uri, [int(g) for g in groups], columns)
            except (OSError, pa.ArrowException) as exc:
                raise DatasetError(f"{shard_uri}: cannot read row groups {groups.tolist()}: {type(exc).__name__}: {exc}") from exc
            # Row (g, r) sits after all rows of the selected groups before g; groups are full
            # (rows_per_group) except possibly the last one of a shard, so use actual sizes.
            group_rows = self._group_sizes(int(shard))[groups]
            starts = np.concatenate([[0], np.cumsum(group_rows)[:-1]])
            offsets = starts[np.searchsorted(groups, groups_wanted)] + self._row[pos[want]]
            taken = table.take(pa.array(offsets, pa.int64()))
            for c in columns:
                values = taken.column(c).to_pylist()
                col = out_cols[c]
                for dst, v in zip(want.tolist(), values, strict=True):
                    col[dst] = v
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

    def _group_sizes(self, shard: int) -> np.ndarray:
        """Rows per row group of one shard, from the index (no extra read of the shard footer)."""
        cache = self.__dict__.setdefault("_group_sizes_cache", {})
        if shard not in cache:
            groups = self._group[self._shard == shard]
            cache[shard] = np.bincount(groups)
        return cache[shard]


def open_dataset(uri: str) -> ShardDataset:
    """Open a packed dataset; DatasetError says what is wrong with the URI and how to fix it."""
    uri = sfs.normalize(uri)
    manifest_uri = sfs.join(uri, MANIFEST)
    if not sfs.exists(manifest_uri):
        raise DatasetError(f"{uri}: no dataset here (manifest.json missing). Make one with `orchestrator data synth {uri}` or point data.uri at a packed dataset")
    try:
        manifest = sfs.read_json(manifest_uri)
    except ValueError as exc:  # json.JSONDecodeError, UnicodeDecodeError
        raise DatasetError(f"{uri}: manifest.json is not valid JSON ({exc}); the dataset is damaged, re-create it") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        got = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise DatasetError(f"{uri}: manifest.json has format {got!r}, expected {FORMAT!r}; re-create the dataset with `orchestrator data synth {uri}`")
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
