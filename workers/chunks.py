"""A chunk's rows inside a worker: read in pieces (read_chunk), streamed in the order its batches
take them (StreamingRows), the next chunk fetched in the background (ChunkPrefetcher).

At most two chunks' encoded bytes are fetched at a time (the one training, the next one
prefetched), and of these no more than a memory budget is held in RAM: landed pieces beyond it go
to a spool on local disk (workers/spool.py), read back per value. A streamed chunk lets training
start when its first batch's row groups have landed, in this process or, through the spool, in
DataLoader decode processes forked while the rest of the chunk lands.
"""

from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import numpy.ma  # noqa: F401 - numpy 2's np.unique imports it on first use: ~10 ms of a worker's first batch

from workers.landing import Lander
from workers.spool import CHUNK_MEMORY_ENV, MemoryBudget, Spool, default_budget, trim_memory
from workers.streaming import StreamingRows
from workers.windows import stored_group_bytes

log = logging.getLogger(__name__)

# A chunk is read in pieces of about this many bytes of row groups, PIECES_IN_FLIGHT at a time:
# a worker holds the chunk's own samples plus a piece being fetched and parsed, not every row
# group the chunk touches. A random chunk of a big dataset touches nearly all of them (a 100K
# chunk of 1.2M samples in 41-row groups: 97 %), so reading it whole held ~3x the dataset's bytes
# at once (fetched ranges, their row groups, the parsed rows): bench.scale.
PIECE_BYTES = 64 * 2**20  # litdata's chunk size: fewer, larger requests (bench.peer)
# One piece at a time: a piece parsed beside another took the cores the decode processes need and
# held twice the transient bytes. bench.peer, 6,000 samples at 56 px, idle 2-core machine, 2 vs 1:
# local peak PSS 560 -> 429 MB, steady 3,470 -> 3,975 samples/s; GCS at 20 ms 621 -> 531 MB,
# second-half 5,815 -> 6,265 samples/s (steady 3,156 -> 2,832: the first pieces land one by one).
PIECES_IN_FLIGHT = 1


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
    size = stored_group_bytes(dataset.manifest)[s[starts]]
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
# pieces of PIECE_BYTES, in the order training first needs their row groups when that costs few
# more requests than file order (the plan's window shuffle: a window is a run of adjacent row
# groups, so the second window lands second, not wherever it sits in the file), else in file order
# (a whole-chunk shuffle needs every row group within a few batches: by need, each piece would be
# scattered row groups, one request each). Within a piece adjacent row groups merge into one
# request, as in read_chunk.
# Under a whole-chunk shuffle the first piece's row groups are scattered too, and they split the
# rest's runs: about twice its row groups in extra requests. So such a chunk whose first batch
# needs more than STREAM_MAX_SHARE of its row-group bytes is read whole, as before: the first batch
# would wait on most of it anyway. A first piece that costs at most STREAM_EXTRA_RANGES more
# requests than a whole read (a window of adjacent row groups) streams whatever its share.
STREAM_MAX_SHARE = 0.25
STREAM_EXTRA_RANGES = 2
# PIECE_RAMP: pieces by need start at twice the first piece's bytes and double up to PIECE_BYTES,
# never splitting a window or a tier of one (see _pieces_by_need). A new plan's leading windows
# train in tiers that grow so (common/plan.py HEAD_GROWTH): each tier lands as its own piece while
# the one before it trains. One 64 MB piece after the first left the decode processes waiting for
# all of it (bench.peer at 56 px: ~0.4 s idle after the first batches).
# Pieces by need are taken when they cost at most this many times file order's requests (plus
# STREAM_EXTRA_RANGES, and one per piece the ramp adds): windows cost about as many; a whole-chunk
# shuffle costs several times more.
NEED_ORDER_MAX_RANGES = 1.25


def _ranges(group_key: np.ndarray, pieces: list[np.ndarray]) -> int:
    """Requests a list of pieces costs: per piece, its runs of adjacent row groups of one shard
    (the reader merges those into one ranged read)."""
    total = 0
    for sel in pieces:
        keys = np.unique(group_key[sel])
        total += 1 + int(np.count_nonzero(np.diff(keys) != 1)) if len(keys) else 0
    return total


def _pieces_by_need(group_key: np.ndarray, need: np.ndarray, size: np.ndarray, positions: np.ndarray,
                    piece_bytes: int, ramp_from: float = 0.0) -> list[np.ndarray]:
    """`positions` cut into pieces of whole row groups in the order training first needs them
    (`need`: the batch of each position). `size`: the stored bytes of each position's row group.

    The row groups come in units: runs, in need order, whose first needs follow each other within a
    batch (a window, or a tier of one, shuffled inside: all its row groups are first needed within
    its first batches; the next unit's only when it starts). A unit is never split among pieces
    unless it is larger than piece_bytes (then in file order, so each part is one run of adjacent
    row groups, as a window is); units merge into pieces up to piece_bytes, or with `ramp_from`, up
    to twice that for the first piece, doubling to piece_bytes (see PIECE_RAMP)."""
    keys, inverse = np.unique(group_key[positions], return_inverse=True)
    inverse = inverse.reshape(-1)
    first_need = np.full(len(keys), np.iinfo(np.int64).max, dtype=np.int64)
    np.minimum.at(first_need, inverse, need[positions])
    group_size = np.empty(len(keys), dtype=np.float64)
    group_size[inverse] = size[positions]
    by_need = np.lexsort((keys, first_need))
    fn = first_need[by_need]
    unit_of = np.cumsum(np.r_[True, np.diff(fn) > 1]) - 1  # a new unit where first needs jump
    cap, limit = (2.0 * ramp_from if ramp_from > 0 else float(piece_bytes)), float(max(1, int(piece_bytes)))
    piece_of_group = np.empty(len(keys), dtype=np.int64)
    piece, held = 0, 0.0
    for members in np.split(by_need, np.flatnonzero(np.diff(unit_of)) + 1):
        members = np.sort(members)  # file order: a unit split below is split into runs of adjacent groups
        unit = float(group_size[members].sum())
        if held > 0 and held + unit > min(cap, limit):  # this piece is full: the unit starts the next
            piece, held, cap = piece + 1, 0.0, cap * 2
        if unit <= limit:
            piece_of_group[members] = piece
            held += unit
            continue
        before = np.cumsum(group_size[members]) - group_size[members]
        part = (before // limit).astype(np.int64)
        piece_of_group[members] = piece + part
        piece, held, cap = piece + int(part[-1]) + 1, 0.0, cap * 2
    piece_of = piece_of_group[inverse]
    order = np.argsort(piece_of, kind="stable")
    cuts = np.flatnonzero(np.diff(piece_of[order])) + 1
    return [np.sort(positions[p]) for p in np.split(order, cuts)]


def stream_pieces(dataset: Any, ids: np.ndarray, order: np.ndarray, batch: int,
                  piece_bytes: int = PIECE_BYTES) -> list[np.ndarray]:
    """Positions in `ids` of each piece of a streamed chunk, in the order training needs them.

    `order` holds positions in `ids` in the order the batches take them (`batch` per batch). The
    first piece is every position whose row group the first batch needs (whole row groups: their
    other samples come along); the rest are pieces of what is left, by need or in file order (see
    above). Index only, no reads. Without a first piece worth streaming it is chunk_pieces of the
    chunk.
    """
    n = len(ids)
    if n == 0:
        return []
    ids = np.asarray(ids, dtype=np.int64)
    shard = np.asarray(dataset.index_values("shard", ids), dtype=np.int64)
    group = np.asarray(dataset.index_values("row_group", ids), dtype=np.int64)
    key = (shard << 32) | group
    order = np.asarray(order, dtype=np.int64)
    first_batch = order[: max(1, int(batch))]
    first = np.isin(key, key[first_batch])
    whole = chunk_pieces(dataset, ids, piece_bytes)
    if first.all():
        return whole
    uniq, starts = np.unique(key, return_index=True)
    per_group = stored_group_bytes(dataset.manifest)
    size = per_group[(uniq >> 32).astype(np.int64)]
    share = float(size[first[starts]].sum()) / max(float(size.sum()), 1.0)
    head = np.flatnonzero(first)
    rest = np.flatnonzero(~first)
    in_file_order = [rest[p] for p in chunk_pieces(dataset, ids[rest], piece_bytes)]
    need = _first_need(n, order, batch)
    by_need = _pieces_by_need(key, need, per_group[(key >> 32).astype(np.int64)], rest, piece_bytes,
                              ramp_from=float(size[first[starts]].sum()))
    file_ranges, need_ranges = _ranges(key, in_file_order), _ranges(key, by_need)
    # The ramp's smaller pieces cost a request each beyond file order's: allowed for.
    ramp = max(0, len(by_need) - len(in_file_order))
    tail = by_need if need_ranges <= NEED_ORDER_MAX_RANGES * file_ranges + STREAM_EXTRA_RANGES + ramp else in_file_order
    extra = _ranges(key, [head, *tail]) - _ranges(key, whole)
    if share > STREAM_MAX_SHARE and extra > STREAM_EXTRA_RANGES:
        return whole
    return [head, *tail]


def _first_need(n: int, order: np.ndarray, batch: int) -> np.ndarray:
    """The batch (of `batch` positions of `order`) each of n positions is first needed in;
    positions the order does not reach (trained earlier in a resumed epoch) are needed last."""
    need = np.full(n, np.iinfo(np.int64).max, dtype=np.int64)
    order = np.asarray(order, dtype=np.int64)
    need[order[::-1]] = (np.arange(len(order)) // max(1, int(batch)))[::-1]
    return need


def first_needs(pieces: list[np.ndarray], n: int, order: np.ndarray, batch: int) -> np.ndarray:
    """The first batch that needs each piece (stream_pieces' pieces of n positions)."""
    need = _first_need(n, order, batch)
    return np.array([need[p].min() if len(p) else np.iinfo(np.int64).max for p in pieces], dtype=np.int64)


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


class ChunkPrefetcher:
    """Fetches the encoded rows of the next chunk in the background while this one trains.

    With `order` (the positions of `ids` in the order the chunk's batches take them, `batch` per
    batch), a chunk streams: get() returns StreamingRows at once and training starts when the
    first batch's row groups have landed, while the rest arrive (stream_pieces). Without, get()
    returns the whole chunk read as read_chunk reads it.

    The streamed chunks' landed pieces share one memory budget (`budget_bytes`; default from
    workers/spool.py default_budget: ORCHESTRATOR_CHUNK_MEMORY, else a share of the memory
    available); pieces beyond it go to the spool on local disk. The rows get() returned stay
    readable until the next get() or close(), which let them go (RAM and spool files).
    """

    def __init__(self, dataset: Any, stream: bool = True, budget_bytes: int | None = None,
                 spool_dir: str | None = None, piece_bytes: int = PIECE_BYTES) -> None:
        self.dataset = dataset
        self.piece_bytes = int(piece_bytes)
        self.stream = stream and hasattr(dataset, "index_values")
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="prefetch")
        self._lander = Lander()  # lands the streamed chunks' pieces: which one next is its policy
        self._pending: dict[tuple, Any] = {}
        self._current: Any = None
        self.budget = MemoryBudget(default_budget() if budget_bytes is None else budget_bytes)
        self.spool = Spool(spool_dir)
        log.info("chunk rows: at most %.0f MB of encoded pieces in memory (%s), the rest spooled under %s",
                 self.budget.budget_bytes / 2**20,
                 "set" if budget_bytes is not None or os.environ.get(CHUNK_MEMORY_ENV) else "from available memory",
                 self.spool.root)

    @property
    def budget_bytes(self) -> int:
        return self.budget.budget_bytes

    def memory(self) -> dict[str, int]:
        """budget_bytes, ram_bytes (held now), peak_ram_bytes, spilled_bytes (written to the spool)."""
        return self.budget.as_dict()

    def _start(self, ids: np.ndarray, order: np.ndarray | None, batch: int | None, training: bool) -> Any:
        """A chunk's read begun: `training` when it is needed at once (not prefetched), so its
        pieces beyond the first batches' wait for the first batch (workers/landing.py)."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        if not self.stream or order is None or not batch:
            return self._pool.submit(_read_whole, self.dataset, ids)
        pieces = stream_pieces(self.dataset, ids, order, batch, self.piece_bytes)
        needs = first_needs(pieces, len(ids), order, batch) if training else None
        return StreamingRows(self.dataset, ids, pieces, self._lander, self.budget, self.spool, first_needs=needs)

    def prefetch(self, key: tuple, ids: np.ndarray, order: np.ndarray | None = None, batch: int | None = None) -> None:
        # One slot: a newer prefetch replaces an older one, so memory holds at most two chunks.
        if key not in self._pending:
            for old in self._pending.values():
                _let_go(old)
            self._pending = {key: self._start(ids, order, batch, training=False)}

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
            fut = self._start(ids, order, batch, training=True)
        elif isinstance(fut, StreamingRows):
            self._lander.add(fut, training=True)  # prefetched: it trains now, its pieces first
        rows = fut if isinstance(fut, StreamingRows) else fut.result()
        if self._current is not None and self._current is not rows:
            _let_go(self._current)  # the chunk before this one is over: its RAM and spool files go
        self._current = rows
        return rows

    def close(self) -> None:
        for old in [*self._pending.values(), self._current]:
            _let_go(old)
        self._current = None
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._lander.close()
        self.spool.remove()


def _read_whole(dataset: Any, ids: np.ndarray) -> dict[str, Any]:
    try:
        return read_chunk(dataset, ids)
    finally:
        trim_memory()  # the pieces' fetched and parsed bytes are free now: back to the OS


def _let_go(rows: Any) -> None:
    if isinstance(rows, StreamingRows):
        rows.close()
