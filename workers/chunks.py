"""A chunk's rows inside a worker: read in pieces (read_chunk), streamed in the order its batches
take them (StreamingRows), the next chunk fetched in the background (ChunkPrefetcher).

At most two chunks' encoded bytes are held in memory at any time (the one training, the next one
prefetched); a streamed chunk lets training start when its first batch's row groups have landed.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from storage.errors import DatasetError

# A chunk is read in pieces of about this many bytes of row groups, PIECES_IN_FLIGHT at a time
# (one fetches while another is parsed): a worker holds the chunk's own samples plus a few pieces,
# not every row group the chunk touches. A random chunk of a big dataset touches nearly all of
# them (a 100K chunk of 1.2M samples in 41-row groups: 97 %), so reading it whole held ~3x the
# dataset's bytes at once (fetched ranges, their row groups, the parsed rows): bench.scale.
PIECE_BYTES = 64 * 2**20  # litdata's chunk size: fewer, larger requests (bench.peer)
PIECES_IN_FLIGHT = 2


def _group_bytes(manifest: dict[str, Any]) -> np.ndarray:
    """Each shard's bytes per row group (its mean): what a piece's size is reckoned in."""
    per_group = int(manifest.get("rows_per_group") or 256)
    out = np.empty(len(manifest["shards"]), dtype=np.float64)
    for i, sh in enumerate(manifest["shards"]):
        groups = int(sh.get("row_groups") or 0) or max(1, -(-int(sh["rows"]) // per_group))
        out[i] = int(sh["bytes"]) / groups
    return out


def chunk_pieces(dataset: Any, ids: np.ndarray, piece_bytes: int = PIECE_BYTES) -> list[np.ndarray]:
    """Positions in `ids` of each piece: runs of whole row groups (in shard and file order, so
    adjacent ones still merge into one request) of about piece_bytes each. Index only, no reads."""
    n = len(ids)
    if n == 0:
        return []
    shard = np.asarray(dataset.index_values("shard", ids), dtype=np.int64)
    group = np.asarray(dataset.index_values("row_group", ids), dtype=np.int64)
    order = np.lexsort((group, shard))
    s, g = shard[order], group[order]
    new_group = np.ones(n, dtype=bool)
    new_group[1:] = (s[1:] != s[:-1]) | (g[1:] != g[:-1])
    starts = np.flatnonzero(new_group)
    size = _group_bytes(dataset.manifest)[s[starts]]
    before = np.cumsum(size) - size  # bytes of the row groups ahead of each one
    piece_of_group = (before // max(1, int(piece_bytes))).astype(np.int64)
    piece_of = np.repeat(piece_of_group, np.diff(np.append(starts, n)))
    cuts = np.flatnonzero(np.diff(piece_of)) + 1
    return [np.sort(p) for p in np.split(order, cuts)]


def read_chunk(dataset: Any, ids: np.ndarray, piece_bytes: int = PIECE_BYTES,
               in_flight: int = PIECES_IN_FLIGHT) -> dict[str, Any]:
    """dataset.read_samples(ids), read in pieces (chunk_pieces) so that memory holds the chunk's
    samples and a few pieces' row groups: the same result, in the order of `ids`, every sample
    checked as read_samples checks it. A chunk of one piece is one read_samples call."""
    ids = np.asarray(ids, dtype=np.int64).reshape(-1)
    if not hasattr(dataset, "index_values"):  # a dataset without an index to plan pieces from
        return dataset.read_samples(ids)
    pieces = chunk_pieces(dataset, ids, piece_bytes)
    if len(pieces) <= 1:
        return dataset.read_samples(ids)
    n = len(ids)
    out: dict[str, Any] = {}
    lists: set[str] = set()  # the columns read_samples gives as lists (encoded bytes)
    getattr(dataset, "reader", None)  # made here, once: the pieces' threads share it (footers, counts)
    pool = ThreadPoolExecutor(max_workers=max(1, in_flight), thread_name_prefix="chunk-piece")
    try:
        futures = [pool.submit(dataset.read_samples, ids[sel]) for sel in pieces]
        for sel, fut in zip(pieces, futures, strict=True):
            part = fut.result()
            for c, values in part.items():
                if isinstance(values, np.ndarray):
                    if c not in out:
                        out[c] = np.empty(n, dtype=values.dtype)
                    out[c][sel] = values
                else:
                    if c not in out:
                        out[c] = np.empty(n, dtype=object)
                        lists.add(c)
                    col = np.empty(len(values), dtype=object)
                    col[:] = values
                    out[c][sel] = col
            del part
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    return {c: v.tolist() if c in lists else v for c, v in out.items()}


# A streamed chunk's first piece holds the row groups its first batch needs; the rest follow in
# file order, in pieces of PIECE_BYTES (adjacent row groups merging into one request as in
# read_chunk). The first piece's row groups are scattered (a shuffled batch), one request each,
# and they split the rest's runs: about twice its row groups in extra requests. So a chunk whose
# first batch needs more than STREAM_MAX_SHARE of its row-group bytes is read whole, as before:
# the first batch would wait on most of it anyway.
STREAM_MAX_SHARE = 0.25


def stream_pieces(dataset: Any, ids: np.ndarray, order: np.ndarray, batch: int,
                  piece_bytes: int = PIECE_BYTES) -> list[np.ndarray]:
    """Positions in `ids` of each piece of a streamed chunk, in the order training needs them.

    `order` holds positions in `ids` in the order the batches take them (`batch` per batch). The
    first piece is every position whose row group the first batch needs (whole row groups: their
    other samples come along); the rest are chunk_pieces of what is left. Index only, no reads.
    Without a first piece worth streaming (STREAM_MAX_SHARE) it is chunk_pieces of the chunk.
    """
    n = len(ids)
    if n == 0:
        return []
    ids = np.asarray(ids, dtype=np.int64)
    shard = np.asarray(dataset.index_values("shard", ids), dtype=np.int64)
    group = np.asarray(dataset.index_values("row_group", ids), dtype=np.int64)
    key = (shard << 32) | group
    first_batch = np.asarray(order, dtype=np.int64)[: max(1, int(batch))]
    first = np.isin(key, key[first_batch])
    uniq, starts = np.unique(key, return_index=True)
    size = _group_bytes(dataset.manifest)[(uniq >> 32).astype(np.int64)]
    share = float(size[first[starts]].sum()) / max(float(size.sum()), 1.0)
    if share > STREAM_MAX_SHARE or first.all():
        return chunk_pieces(dataset, ids, piece_bytes)
    head = np.flatnonzero(first)
    rest = np.flatnonzero(~first)
    return [head, *(rest[p] for p in chunk_pieces(dataset, ids[rest], piece_bytes))]


def stream_order(ids: np.ndarray, batches: list[np.ndarray]) -> tuple[np.ndarray | None, int | None]:
    """(positions in `ids` in the order `batches` of sample ids take them, the largest batch's
    size): what ChunkPrefetcher streams a chunk by. (None, None) when there are no batches."""
    if not batches:
        return None, None
    ids = np.asarray(ids, dtype=np.int64).reshape(-1)
    wanted = np.concatenate([np.asarray(b, dtype=np.int64) for b in batches])
    sorter = np.argsort(ids, kind="stable")
    where = np.searchsorted(ids, wanted, sorter=sorter)
    return sorter[np.minimum(where, len(ids) - 1)], max(len(b) for b in batches)


class StreamingRows(Mapping):
    """A chunk's rows (as read_samples gives them) that arrive piece by piece, in the order of
    stream_pieces: `sample_id`, `height` and `width` at once (from the index), every other column
    per position, a read of a position waiting until its piece has landed (and raising its piece's
    error, if it failed). The values are read_samples' own, each sample checked as it checks them;
    only when they are there changes. Pickling waits for the whole chunk (a DataLoader worker
    process gets plain lists)."""

    def __init__(self, dataset: Any, ids: np.ndarray, pieces: list[np.ndarray], pool: ThreadPoolExecutor) -> None:
        self.ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        n = len(self.ids)
        self._piece_of = np.empty(n, dtype=np.int64)
        for k, sel in enumerate(pieces):
            self._piece_of[sel] = k
        self._pieces = pieces
        self._landed = [threading.Event() for _ in pieces]
        self._errors: list[BaseException | None] = [None] * len(pieces)
        self._cols: dict[str, np.ndarray] = {}
        self._lists: set[str] = set()
        self._lock = threading.Lock()
        self._pid = os.getpid()
        self._all_landed = False
        names = getattr(dataset, "sample_columns", None) or ()
        self._names = tuple(c for c in names if c not in ("sample_id", "height", "width"))
        self._index = {
            "sample_id": self.ids,
            "height": np.asarray(dataset.index_values("height", self.ids), dtype=np.int32),
            "width": np.asarray(dataset.index_values("width", self.ids), dtype=np.int32),
        }
        getattr(dataset, "reader", None)  # made here, once: the pieces' threads share it
        self._futures = [pool.submit(self._land, dataset, k) for k in range(len(pieces))]

    def _land(self, dataset: Any, k: int) -> None:
        sel = self._pieces[k]
        try:
            part = dataset.read_samples(self.ids[sel])
            for c in ("height", "width"):  # the index said so; the shard row must agree
                if not np.array_equal(np.asarray(part[c], dtype=np.int32), self._index[c][sel]):
                    raise DatasetError(f"{getattr(dataset, 'uri', 'dataset')}: index and shards disagree on {c} "
                                       "(the dataset is damaged, re-create it)")
            with self._lock:
                for c, values in part.items():
                    if c in self._index:
                        continue
                    if c not in self._cols:
                        if isinstance(values, np.ndarray):
                            self._cols[c] = np.zeros(len(self.ids), dtype=values.dtype)
                        else:
                            self._cols[c] = np.empty(len(self.ids), dtype=object)
                            self._lists.add(c)
                    if c in self._lists:
                        col = np.empty(len(values), dtype=object)
                        col[:] = values
                        self._cols[c][sel] = col
                    else:
                        self._cols[c][sel] = values
        except BaseException as exc:  # noqa: BLE001 - handed to the reader of the piece's positions
            self._errors[k] = exc
        finally:
            self._landed[k].set()

    def wait(self, positions: Any = None) -> None:
        """Block until the pieces holding these positions (all of them when None) have landed."""
        if self._all_landed:
            return
        if isinstance(positions, (int, np.integer)):
            pieces = [int(self._piece_of[positions])]
        elif positions is None:
            pieces = list(range(len(self._pieces)))
        else:
            pieces = np.unique(self._piece_of[positions]).tolist()
        for k in pieces:
            if not self._landed[k].is_set():
                if os.getpid() != self._pid:  # a forked copy: the threads that land pieces are not here
                    raise RuntimeError("rows still streaming in were forked into another process; "
                                       "call materialize() before handing them to DataLoader workers")
                self._landed[k].wait()
            if self._errors[k] is not None:
                raise self._errors[k]
        if positions is None:
            self._all_landed = True

    def failure(self) -> BaseException | None:
        for k, ev in enumerate(self._landed):
            if ev.is_set() and self._errors[k] is not None:
                return self._errors[k]
        return None

    def cancel(self) -> None:
        for f in self._futures:
            f.cancel()

    def __getitem__(self, name: str) -> Any:
        if name in self._index:
            return self._index[name]
        if name not in self._names and name not in self._cols:
            raise KeyError(name)
        return _StreamingColumn(self, name)

    def column(self, name: str, positions: Any) -> Any:
        self.wait(positions)
        # No lock: a piece's values are written before its event is set, and never after.
        return self._cols[name][positions]

    def __iter__(self):
        return iter((*self._index, *[c for c in self._names if c not in self._index]))

    def __len__(self) -> int:
        return len(self._index) + len([c for c in self._names if c not in self._index])

    def materialize(self) -> dict[str, Any]:
        """The whole chunk as read_chunk gives it (waits for every piece)."""
        self.wait()
        out: dict[str, Any] = dict(self._index)
        for c, v in self._cols.items():
            out[c] = v.tolist() if c in self._lists else v
        return out

    def __reduce__(self):
        return (dict, (self.materialize(),))


class _StreamingColumn:
    """One column of StreamingRows: `col[i]` waits for position i's piece only."""

    def __init__(self, rows: StreamingRows, name: str) -> None:
        self._rows, self._name = rows, name

    def __getitem__(self, i: Any) -> Any:
        return self._rows.column(self._name, i)

    def __len__(self) -> int:
        return len(self._rows.ids)

    def __iter__(self):
        return iter(self._rows.column(self._name, slice(None)).tolist())

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        out = self._rows.column(self._name, slice(None))
        return out if dtype is None else out.astype(dtype)

    def __reduce__(self):
        values = self._rows.materialize()[self._name]
        return (list, (list(values),)) if isinstance(values, list) else (np.asarray, (values,))


class ChunkPrefetcher:
    """Fetches the encoded rows of the next chunk in the background while this one trains.

    With `order` (the positions of `ids` in the order the chunk's batches take them, `batch` per
    batch), a chunk streams: get() returns StreamingRows at once and training starts when the
    first batch's row groups have landed, while the rest arrive (stream_pieces). Without, get()
    returns the whole chunk read as read_chunk reads it.
    """

    def __init__(self, dataset: Any, stream: bool = True) -> None:
        self.dataset = dataset
        self.stream = stream and hasattr(dataset, "index_values")
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="prefetch")
        # Pieces of streamed chunks; more than one in flight: one fetches while another is parsed.
        self._pieces = ThreadPoolExecutor(max_workers=PIECES_IN_FLIGHT, thread_name_prefix="chunk-piece")
        self._pending: dict[tuple, Any] = {}

    def _start(self, ids: np.ndarray, order: np.ndarray | None, batch: int | None) -> Any:
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        if not self.stream or order is None or not batch:
            return self._pool.submit(read_chunk, self.dataset, ids)
        pieces = stream_pieces(self.dataset, ids, order, batch)
        return StreamingRows(self.dataset, ids, pieces, self._pieces)

    def prefetch(self, key: tuple, ids: np.ndarray, order: np.ndarray | None = None, batch: int | None = None) -> None:
        # One slot: a newer prefetch replaces an older one, so memory holds at most two chunks.
        if key not in self._pending:
            for old in self._pending.values():
                if isinstance(old, StreamingRows):
                    old.cancel()
            self._pending = {key: self._start(ids, order, batch)}

    def failure(self) -> BaseException | None:
        """The error of a background fetch that has already failed (its retries spent), if any."""
        for fut in self._pending.values():
            if isinstance(fut, StreamingRows):
                if fut.failure() is not None:
                    return fut.failure()
            elif fut.done() and not fut.cancelled() and fut.exception() is not None:
                return fut.exception()
        return None

    def get(self, key: tuple, ids: np.ndarray, order: np.ndarray | None = None, batch: int | None = None) -> Any:
        fut = self._pending.pop(key, None)
        if fut is None:
            fut = self._start(ids, order, batch)
        return fut if isinstance(fut, StreamingRows) else fut.result()

    def close(self) -> None:
        for old in self._pending.values():
            if isinstance(old, StreamingRows):
                old.cancel()
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._pieces.shutdown(wait=False, cancel_futures=True)
