"""Which streamed piece lands next in a worker (Lander): one thread fetches the pieces of the
chunk training now and of the one prefetched, one piece at a time, choosing each time.

The policy, and why (bench.peer, 6,000 samples, 2-core machine, 2 DataLoader decode processes):
- The chunk training now comes first; the prefetched chunk's pieces land once it has landed whole.
  A prefetched chunk's first piece queued beside the training chunk's took the cores its first
  batches' decode needed, and its rest could queue ahead of the training chunk's own.
- A chunk that is needed at once (not prefetched: a start or a resume) lands only what its first
  batches need, one per decode process, until the loader has its first batch in hand
  (StreamingRows.first_batch_out). The rest landing beside that first decode took its cores: the
  first batch at 224 px came at 0.27 s, 0.24 s with this hold (medians of 6, in turns; the whole
  pass as long). A decode process waiting on its piece leaves its core to the landing, so the first
  pieces cost the first batch nothing; holding those too made the first batch 0.18 s but the pass
  7 % longer (docs/PERFORMANCE.md, issue 24's fourth pass).
- A chunk held so waits at most MAX_HOLD_S after its first piece, then lands the rest whatever
  happens: a reader that never reports its first batch (a task that reads outside its batch in a
  decode process) is slowed, never stalled.
One piece at a time: see workers/chunks.py PIECES_IN_FLIGHT.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, NamedTuple

MAX_HOLD_S = 2.0


class Due(NamedTuple):
    """What a chunk's rows say when asked for their next piece (StreamingRows.due)."""

    piece: int | None  # the piece to land now; None: none now
    done: bool  # no piece left to land (all started, or the rows were cancelled)
    hold_s: float = 0.0  # held: ask again after this long at the latest


class Lander:
    """The landing thread of a ChunkPrefetcher. Rows join with add() (the chunk training now
    first, training=True, or after those prefetched) and are asked for their next piece (due())
    each time the thread is free; they wake() it when something changed (a hold released, a
    cancel). The thread runs only while some piece is due or held, on a pool of one: an idle
    lander holds no thread. close() stops it after the piece it is landing; a lander never closed
    lands what is left at exit (the pool's own join), as the queued pieces of the pool before it did."""

    def __init__(self) -> None:
        self._cv = threading.Condition()
        self._queue: list[Any] = []  # StreamingRows with pieces still to land, the training chunk first
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="chunk-piece")
        self._running = False
        self._closed = False

    def add(self, rows: Any, training: bool) -> None:
        with self._cv:
            if self._closed:
                return
            self._queue = [r for r in self._queue if r is not rows]  # by identity: rows are Mappings
            if training:
                self._queue.insert(0, rows)
            else:
                self._queue.append(rows)
        self.wake()

    def wake(self) -> None:
        with self._cv:
            if self._closed:
                return
            self._cv.notify_all()
            if self._running:
                return
            self._running = True
        try:
            self._pool.submit(self._drain)
        except RuntimeError:  # the pool was shut down beside this call: nothing lands any more
            with self._cv:
                self._running = False

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._queue.clear()
            self._cv.notify_all()
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _next(self) -> tuple[Any, int] | float | None:
        """(rows, piece) to land now; or seconds to wait (the first chunk in line is held); or None
        (nothing to land). Under self._cv."""
        while self._queue:
            rows = self._queue[0]
            due = rows.due()
            if due.done:
                self._queue.pop(0)
                continue
            if due.piece is not None:
                return rows, due.piece
            return due.hold_s  # held: nothing behind it lands either (see the module's docstring)
        return None

    def _drain(self) -> None:
        while True:
            with self._cv:
                job = None if self._closed else self._next()
                if job is None:
                    self._running = False
                    return
                if isinstance(job, float):
                    self._cv.wait(job)
                    continue
            rows, k = job
            rows.land(k)
