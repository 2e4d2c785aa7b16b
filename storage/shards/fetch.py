"""Fetching row groups of a dataset's shards: only the row groups that hold the wanted samples,
all requests in flight together, footers once per process, through the local cache
(storage/cache.py)."""

from __future__ import annotations

import io
import logging
import threading
from collections.abc import Mapping, MutableMapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.utils import merge_offset_ranges

from storage import fs as sfs
from storage.cache import ByteCache
from storage.errors import ShardFetchError
from storage.retry import is_transient, storage_retry

log = logging.getLogger(__name__)

# Adjacent row groups are fetched as one range up to this size: a whole shard's wanted groups
# (4,096 rows at 224 px are ~150 MB) in one GET. A piece of a chunk (workers/chunks.py,
# PIECE_BYTES, 64 MB of whole row groups) is then one request per shard it spans; at a 64 MB cap
# a piece a row group over 64 MB took two. Ranges are not copied into their row groups (memoryviews),
# so the cap bounds one request's size, not the memory a read holds (that is its row groups' bytes).
MERGE_MAX_BYTES = 256 * 2**20
# A gap of up to this many bytes between two wanted row groups of a shard is read rather than
# split into two requests: a GET costs ~20-50 ms on a bucket, 1 MB ~10 ms of one connection. Row
# groups bigger than this (at 224 px, 64 rows are ~2 MB) are never read when not wanted.
MERGE_GAP_BYTES = 2**20
# Footer bytes read when the manifest does not record the footer's length (older datasets).
FOOTER_GUESS_BYTES = 256 * 2**10

Group = tuple[int, int]  # (shard number, row group within the shard)
Buffer = bytes | memoryview


@dataclass
class PreloadStats:
    """What preloading cost, for benchmarks and logs."""

    requests: int = 0
    bytes_fetched: int = 0
    groups_fetched: int = 0
    groups_from_cache: int = 0
    refetches: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, **counts: int) -> None:
        with self.lock:
            for k, v in counts.items():
                setattr(self, k, getattr(self, k) + v)

    def as_dict(self) -> dict[str, int]:
        return {
            k: getattr(self, k)
            for k in ("requests", "bytes_fetched", "groups_fetched", "groups_from_cache", "refetches")
        }


class _RangesFile(io.RawIOBase):
    """A read-only file of known size whose bytes are known only in the fetched ranges.

    pyarrow reads a row group's column chunks through it; a read outside the fetched ranges is
    a bug in the range planning and fails loudly rather than returning zeros.
    """

    def __init__(self, size: int, parts: Mapping[int, bytes | memoryview]) -> None:
        self._size = size
        self._parts = sorted(parts.items())
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = 0) -> int:
        base = {0: 0, 1: self._pos, 2: self._size}[whence]
        self._pos = base + offset
        return self._pos

    def read(self, n: int = -1) -> bytes:
        if n is None or n < 0:
            n = self._size - self._pos
        for start, blob in self._parts:
            if start <= self._pos and self._pos + n <= start + len(blob):
                out = blob[self._pos - start : self._pos - start + n]
                self._pos += n
                return out
        raise OSError(f"read of {n} bytes at {self._pos} outside the fetched row groups")

    def readinto(self, b) -> int:
        data = self.read(len(b))
        b[: len(data)] = data
        return len(data)


def group_range(meta: pq.FileMetaData, group: int) -> tuple[int, int]:
    """Byte range [start, end) of one row group's column chunks in the shard file."""
    rg = meta.row_group(group)
    start, end = None, 0
    for i in range(rg.num_columns):
        col = rg.column(i)
        s = (
            col.dictionary_page_offset
            if col.has_dictionary_page and col.dictionary_page_offset
            else col.data_page_offset
        )
        start = s if start is None else min(start, s)
        end = max(end, s + col.total_compressed_size)
    assert start is not None
    return int(start), int(end)


# fsspec.parquet.open_parquet_files plans such ranged reads too, but it fetches each shard's
# footer again (a 1 MB tail by default) on every call and takes a parsed footer only from
# fastparquet: on a 1.2M-sample dataset (~430 shards) that is ~430 MB per chunk before any
# sample. Here a footer is fetched once per process (and kept in the local cache), and the
# manifest's footer length makes that one exact ranged read.
class ShardReader:
    """Fetches row groups of one dataset's shards, through a local cache when given one.

    A chunk costs one ranged GET per run of adjacent row groups (merged up to MERGE_MAX_BYTES),
    all in flight together: gcsfs's async cat_ranges, or a thread pool for local and mounted
    paths (storage.fs.cat_ranges).
    """

    def __init__(self, uri: str, manifest: dict[str, Any], cache: ByteCache | None,
                 copies: MutableMapping[str, tuple[int, bytes]] | None = None) -> None:
        self.uri = uri
        self.shards: list[dict[str, Any]] = manifest["shards"]
        self.cache = cache
        self.fs, _ = sfs.filesystem(uri)
        self.stats = PreloadStats()
        self._copies = copies if copies is not None else {}  # footers the index carried (storage/shards/footers.py)
        self._footers: dict[int, pq.FileMetaData] = {}
        self._paths: dict[int, str] = {}
        # Held while footers are found or fetched: pieces of a chunk read in parallel would each
        # fetch the footer the other is already fetching (two GETs per shard, bench.peer).
        self._lock = threading.Lock()

    def shard_uri(self, shard: int) -> str:
        return sfs.join(self.uri, self.shards[shard]["file"])

    def _cache_key(self, shard: int, what: str) -> str | None:
        sha = self.shards[shard].get("sha256")
        return f"{sha[:32]}-{what}" if sha else None

    # -- footers ---------------------------------------------------------------------------------

    def footers(self, shards: Sequence[int]) -> dict[int, pq.FileMetaData]:
        """Parsed footers of the given shards: from the copies the index carried, else the local
        cache, else fetched, the missing ones in one concurrent batch (once per process)."""
        known = self._footers
        if all(s in known for s in shards):  # the common case, no lock: entries are only ever added
            return {s: known[s] for s in shards}
        with self._lock:
            self._find_footers([s for s in shards if s not in self._footers])
            return {s: self._footers[s] for s in shards}

    def _find_footers(self, missing: list[int]) -> None:
        fetch: list[int] = []
        for s in missing:
            # Taken out once parsed: the parsed footer is kept, the copy's bytes need not be (16 MB
            # of them at 1.2M samples in 41-row groups).
            copy = self._copies.pop(self.shards[s]["file"], None)
            if copy is not None:
                self._footers[s] = self._parse_copy(s, *copy)
                continue
            blob = self._cache_get(s, "footer")
            if blob is not None:
                try:
                    self._footers[s] = _parse_footer(blob)
                    continue
                except (OSError, pa.ArrowException):
                    self._cache_discard(s, "footer")
            fetch.append(s)
        if fetch:
            ranges = []
            for s in fetch:
                size = int(self.shards[s]["bytes"])
                known = self.shards[s].get("footer_bytes")
                tail = int(known) + 8 if known else min(size, FOOTER_GUESS_BYTES)
                ranges.append((s, size - tail, size))
            blobs = self._fetch_ranges(ranges)
            for (s, _, size), blob in zip(ranges, blobs, strict=True):
                n = int.from_bytes(blob[-8:-4], "little")
                if blob[-4:] != b"PAR1":
                    raise ShardFetchError(
                        f"{self.shard_uri(s)}: not a Parquet file (no footer); the dataset is damaged, re-pack it"
                    )
                if n + 8 > len(blob):  # the guess was short: one more read of the exact footer
                    blob = self._fetch_ranges([(s, size - n - 8, size)])[0]
                footer = blob[-(n + 8) :]
                try:
                    meta = _parse_footer(footer)
                except (OSError, pa.ArrowException) as exc:
                    raise ShardFetchError(
                        f"{self.shard_uri(s)}: footer cannot be parsed ({exc}); the dataset is damaged, re-pack it"
                    ) from exc
                self._footers[s] = meta
                self._cache_put(s, "footer", footer)

    def _parse_copy(self, s: int, offset: int, tail: bytes) -> pq.FileMetaData:
        """A footer the index carried: it must end the shard as the manifest describes it."""
        size = int(self.shards[s]["bytes"])
        if offset + len(tail) != size or tail[-4:] != b"PAR1" or int.from_bytes(tail[-8:-4], "little") + 8 != len(
            tail
        ):
            raise ShardFetchError(
                f"{self.shard_uri(s)}: the footer copy in the index does not end this shard ({len(tail)} bytes at "
                f"{offset}, the shard has {size}); the dataset is damaged, re-pack it"
            )
        try:
            return _parse_footer(tail)
        except (OSError, pa.ArrowException) as exc:
            raise ShardFetchError(
                f"{self.shard_uri(s)}: the footer copy in the index cannot be parsed ({exc}); the dataset is "
                "damaged, re-pack it"
            ) from exc

    # -- row groups ------------------------------------------------------------------------------

    def fetch_groups(self, groups: Sequence[Group], use_cache: bool = True) -> dict[Group, tuple[int, Buffer]]:
        """{(shard, group): (offset in the shard, bytes)} for the given row groups (a group fetched
        with others is a memoryview of their range: no copy)."""
        metas = self.footers(sorted({s for s, _ in groups}))
        out: dict[Group, tuple[int, Buffer]] = {}
        todo: list[tuple[Group, int, int]] = []
        for s, g in groups:
            start, end = group_range(metas[s], g)
            blob = self._cache_get(s, f"{start}-{end}") if use_cache else None
            if blob is not None and len(blob) == end - start:
                out[(s, g)] = (start, blob)
            else:
                todo.append(((s, g), start, end))
        self.stats.add(groups_from_cache=len(out), groups_fetched=len(todo))
        if not todo:
            return out
        # Row groups are contiguous within a shard: runs of wanted ones become one range each.
        todo.sort(key=lambda t: (t[0][0], t[1]))
        paths, starts, ends = merge_offset_ranges(
            [str(s) for (s, _), _, _ in todo],
            [a for _, a, _ in todo],
            [b for _, _, b in todo],
            max_gap=MERGE_GAP_BYTES,
            max_block=MERGE_MAX_BYTES,
            sort=False,
        )
        merged = [(int(p), a, b) for p, a, b in zip(paths, starts, ends, strict=True)]
        blobs: list[memoryview | None] = [memoryview(b) for b in self._fetch_ranges(merged)]
        # The merged ranges follow the sorted groups, so one walk pairs them: a search per group
        # over every range cost O(groups x ranges), 19M steps (6.5 s on a loaded core) for a 100K
        # chunk of a 1.2M-sample dataset (bench.scale). A group is a view of its range, not a copy:
        # the peak is the ranges' bytes (the groups' plus any small gaps), not groups plus a range.
        i = 0
        for group, start, end in todo:
            s = group[0]
            while not (merged[i][0] == s and merged[i][1] <= start and end <= merged[i][2]):
                blobs[i] = None
                i += 1
            ma = merged[i][1]
            blob = blobs[i]
            assert blob is not None
            piece = blob[start - ma : end - ma]
            out[group] = (start, piece)
            self._cache_put(s, f"{start}-{end}", piece)
        return out

    def discard(self, groups: Sequence[Group]) -> None:
        """Drop cached copies of these row groups (they failed a checksum)."""
        metas = self.footers(sorted({s for s, _ in groups}))
        for s, g in groups:
            start, end = group_range(metas[s], g)
            self._cache_discard(s, f"{start}-{end}")

    def read_group(self, shard: int, group: int, fetched: tuple[int, Buffer], columns: Sequence[str]) -> pa.Table:
        start, blob = fetched
        f = _RangesFile(int(self.shards[shard]["bytes"]), {start: blob})
        return pq.ParquetFile(f, metadata=self.footers([shard])[shard]).read_row_group(group, columns=list(columns))

    # -- I/O -------------------------------------------------------------------------------------

    def _fetch_ranges(self, ranges: list[tuple[int, int, int]]) -> list[bytes]:
        """Bytes of each (shard, start, end), all requests in flight together; transient
        failures are retried (only the failed ranges), a permanent one names the shard URI."""
        done: dict[int, bytes] = {}

        @storage_retry
        def attempt() -> None:
            todo = [i for i in range(len(ranges)) if i not in done]
            results = self.cat_ranges([ranges[i] for i in todo])
            transient: BaseException | None = None
            for i, r in zip(todo, results, strict=True):
                if isinstance(r, BaseException):
                    if not is_transient(r):
                        raise _fetch_error(self.shard_uri(ranges[i][0]), r)
                    transient = transient or r
                else:
                    done[i] = bytes(r)
            if transient is not None:
                raise transient

        try:
            attempt()
        except ShardFetchError:
            raise
        except Exception as exc:  # noqa: BLE001 - transient faults that outlasted the retries
            first = next(i for i in range(len(ranges)) if i not in done)
            raise _fetch_error(self.shard_uri(ranges[first][0]), exc) from exc
        self.stats.add(requests=len(ranges), bytes_fetched=sum(len(b) for b in done.values()))
        return [done[i] for i in range(len(ranges))]

    def cat_ranges(self, ranges: list[tuple[int, int, int]]) -> list[Any]:
        for s, _, _ in ranges:
            if s not in self._paths:
                self._paths[s] = sfs.filesystem(self.shard_uri(s))[1]
        return sfs.cat_ranges(
            self.fs, [self._paths[s] for s, _, _ in ranges], [a for _, a, _ in ranges], [b for _, _, b in ranges]
        )

    def _cache_get(self, shard: int, what: str) -> bytes | None:
        key = self._cache_key(shard, what)
        return self.cache.get(key) if self.cache is not None and key else None

    def _cache_put(self, shard: int, what: str, data: Buffer) -> None:
        key = self._cache_key(shard, what)
        if self.cache is not None and key:
            self.cache.put(key, data)

    def _cache_discard(self, shard: int, what: str) -> None:
        key = self._cache_key(shard, what)
        if self.cache is not None and key:
            self.cache.discard(key)


def _parse_footer(footer: bytes) -> pq.FileMetaData:
    # A file of just "PAR1" + footer: pyarrow finds the footer from the end, as in the real shard.
    return pq.read_metadata(pa.BufferReader(b"PAR1" + footer))


def _fetch_error(uri: str, exc: BaseException) -> ShardFetchError:
    from common.redact import redact_text

    return ShardFetchError(redact_text(f"{uri}: cannot fetch: {sfs.describe_error(exc)}"))
