"""A streamed chunk's rows inside a worker (StreamingRows): pieces landing in the order the
batches need them, held in RAM within the memory budget or in the spool on local disk
(workers/spool.py), readable in DataLoader decode processes while the rest of the chunk lands.
Which pieces a chunk is read in, and the prefetcher that starts them, are workers/chunks.py's.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import shutil
import threading
import time
import weakref
from collections.abc import Mapping
from typing import Any

import numpy as np

from storage.errors import DatasetError
from workers.landing import MAX_HOLD_S, Due, Lander
from workers.spool import (
    FilePiece,
    MemoryBudget,
    RamPiece,
    Spool,
    piece_nbytes,
    trim_memory,
    wait_for_piece,
    write_error,
    write_piece,
)

log = logging.getLogger(__name__)


class _Holding:
    """What a StreamingRows holds outside itself (its bytes counted in the budget, its spool
    directory), let go once: on close, or when the rows are collected; only by the process that
    made them (a forked decode process's copy lets go of nothing)."""

    def __init__(self, budget: MemoryBudget | None, owner: int) -> None:
        self.budget, self.owner = budget, owner
        self.held = 0
        self.dir: str | None = None
        self.lock = threading.Lock()

    def hold(self, n: int) -> None:
        with self.lock:
            self.held += n

    def release(self) -> None:
        if os.getpid() != self.owner:
            return
        with self.lock:
            held, self.held = self.held, 0
            folder, self.dir = self.dir, None
        if self.budget is not None and held:
            self.budget.give_back(held)
        if folder is not None:
            shutil.rmtree(folder, ignore_errors=True)


class StreamingRows(Mapping):
    """A chunk's rows (as read_samples gives them) that arrive piece by piece, in the order of
    stream_pieces: `sample_id`, `height` and `width` at once (from the index), every other column
    per position, a read of a position waiting until its piece has landed (and raising its piece's
    error, if it failed). The values are read_samples' own, each sample checked as it checks them;
    only when and where they are held changes.

    A landed piece is held in RAM while the budget (MemoryBudget, shared with the prefetched chunk)
    has room, else written to the spool (workers/spool.py) and read back per value. After share()
    every piece still to land goes to the spool, so DataLoader decode processes forked then (or
    started by pickling these rows) read the pieces as they land: a read there waits for its piece's
    file (or its error file). close() gives the RAM back and removes the chunk's spool files.
    """

    def __init__(self, dataset: Any, ids: np.ndarray, pieces: list[np.ndarray], lander: Lander,
                 budget: MemoryBudget | None = None, spool: Spool | None = None,
                 first_needs: np.ndarray | None = None) -> None:
        self.ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        n = len(self.ids)
        self._piece_of = np.empty(n, dtype=np.int64)
        self._local = np.empty(n, dtype=np.int64)  # a position's row within its piece
        for k, sel in enumerate(pieces):
            self._piece_of[sel] = k
            self._local[sel] = np.arange(len(sel))
        self._pieces = pieces
        self._landed = [threading.Event() for _ in pieces]
        self._errors: list[BaseException | None] = [None] * len(pieces)
        self._data: list[RamPiece | FilePiece | None] = [None] * len(pieces)
        self._lock = threading.Lock()
        self._owner = os.getpid()
        self._copy = False  # an unpickled copy (a decode process started by spawn): reads only the spool
        self._shared = False
        self._closed = False
        self._all_landed = False
        self._spool = spool
        self._hold = _Holding(budget, self._owner)
        self._finalizer = weakref.finalize(self, self._hold.release)
        self._what = str(getattr(dataset, "uri", "dataset"))
        names = getattr(dataset, "sample_columns", None) or ()
        self._names = tuple(c for c in names if c not in ("sample_id", "height", "width"))
        self._seen: dict[str, None] = {}  # columns of the landed pieces (a dataset without sample_columns)
        self._index = {
            "sample_id": self.ids,
            "height": np.asarray(dataset.index_values("height", self.ids), dtype=np.int32),
            "width": np.asarray(dataset.index_values("width", self.ids), dtype=np.int32),
        }
        getattr(dataset, "reader", None)  # made here, once: the landing thread uses it
        # Which piece lands when is the lander's (workers/landing.py): one at a time, in order. With
        # first_needs (the first batch each piece is needed in: a chunk needed at once, so it lands
        # ahead of a prefetched one), pieces beyond the first batches' wait for the loader's first
        # batch (first_batch_out).
        self._dataset, self._lander = dataset, lander
        self._next, self._cancelled = 0, False
        self._first_needs = None if first_needs is None else np.asarray(first_needs, dtype=np.int64)
        self._decoders = 1  # batches decoded at once (make_loader says): the pieces they need land while held
        self._held_since: float | None = None  # when the first piece landed (a hold ends MAX_HOLD_S after)
        lander.add(self, training=first_needs is not None)

    # -- landing (threads of the process that made the rows) -------------------------------------

    def _folder(self) -> str | None:
        """The chunk's spool directory (made on first use); None when there is no usable spool.
        Called under self._lock."""
        if self._hold.dir is None and self._spool is not None:
            self._hold.dir = self._spool.chunk_dir()
        return self._hold.dir

    def due(self) -> Due:
        """The piece to land next, for the lander (called on its thread, one piece at a time)."""
        with self._lock:
            if self._cancelled or self._closed or self._next >= len(self._pieces):
                return Due(None, True)
            k = self._next
            if k > 0 and self._first_needs is not None and self._first_needs[k] >= self._decoders:
                left = (self._held_since or time.monotonic()) + MAX_HOLD_S - time.monotonic()
                if left > 0:
                    return Due(None, False, left)
                self._first_needs = None  # held long enough: see workers/landing.py MAX_HOLD_S
            self._next += 1
            return Due(k, False)

    def land(self, k: int) -> None:
        """Piece k fetched, checked and held (in RAM or the spool); on the lander's thread."""
        self._land(self._dataset, k)
        if k == 0:
            with self._lock:
                self._held_since = time.monotonic()
        trim_memory()  # the piece's fetched, parsed (and, spilled, its values) bytes are free now: to the OS

    @property
    def held(self) -> bool:
        """Pieces beyond the first batches' wait for first_batch_out()."""
        return self._first_needs is not None

    def decoders(self, n: int) -> None:
        """n decode processes are about to take the first n batches: the pieces those need land
        while the rest is held."""
        with self._lock:
            self._decoders = max(1, int(n))
        self._lander.wake()

    def first_batch_out(self) -> None:
        """The loader has its first batch: the rest of the chunk lands from now on."""
        if os.getpid() != self._owner or self._copy or self._first_needs is None:
            return
        with self._lock:
            self._first_needs = None
        self._lander.wake()

    def _land(self, dataset: Any, k: int) -> None:
        sel = self._pieces[k]
        try:
            # Packed: each bytes column as one blob and an index, no bytes object per value (groups.py).
            part = dataset.read_samples(self.ids[sel], packed=True)
            for c in ("height", "width"):  # the index said so; the shard row must agree
                if not np.array_equal(np.asarray(part[c], dtype=np.int32), self._index[c][sel]):
                    raise DatasetError(f"{self._what}: index and shards disagree on {c} "
                                       "(the dataset is damaged, re-create it)")
            values = {c: v for c, v in part.items() if c not in self._index}
            del part
            nbytes = piece_nbytes(values)
            budget = self._hold.budget
            with self._lock:
                if self._closed:
                    return
                counted = not self._shared and (budget is None or budget.take(nbytes))
                folder = None if counted else self._folder()
                if folder is None:  # in the budget, or no spool to go to: held here, as before the budget
                    self._keep_here(k, values, nbytes, counted)
                    return
            try:
                piece = write_piece(os.path.join(folder, f"piece-{k}"), values)
            except OSError as exc:
                with self._lock:
                    if self._closed:
                        return
                    if not self._shared:  # a full or failing disk must not stop training: RAM, as before
                        log.warning("chunk spool: cannot write a piece to %s (%s); it stays in memory", folder, exc)
                        self._keep_here(k, values, nbytes, counted=False)
                        return
                raise  # a decode process waits for this file: it gets the error instead
            if budget is not None:
                budget.spilled(nbytes)
            with self._lock:
                if self._closed:  # closed while it was written: its folder is going, so is it
                    piece.close()
                    with contextlib.suppress(OSError):
                        os.remove(piece.path)
                    return
                self._data[k] = piece
                self._seen.update(dict.fromkeys(values))
        except BaseException as exc:  # noqa: BLE001 - handed to the reader of the piece's positions
            self._fail(k, exc)
        finally:
            self._landed[k].set()

    def _keep_here(self, k: int, values: dict[str, Any], nbytes: int, counted: bool) -> None:
        """Piece k held in RAM (`counted`: its bytes already taken from the budget). Under self._lock."""
        if not counted and self._hold.budget is not None:
            self._hold.budget.take(nbytes, force=True)
        self._hold.hold(nbytes)
        self._data[k] = RamPiece(values, nbytes)
        self._seen.update(dict.fromkeys(values))
        # Set under the lock: share() orders after it, so a decode process forked after share()
        # sees this piece landed, or finds its file later.
        self._landed[k].set()

    def _fail(self, k: int, exc: BaseException) -> None:
        with self._lock:
            self._errors[k] = exc
            folder = self._hold.dir if self._shared and not self._closed else None
            if folder is None:  # not shared yet: a decode process forked later sees the event set
                self._landed[k].set()
                return
        try:  # shared: a decode process waiting on this piece reads the error from its file
            write_error(os.path.join(folder, f"piece-{k}.err"), exc)
        except OSError:
            pass  # the chunk's spool is gone: so is whoever would wait on it

    def share(self) -> bool:
        """From now on, pieces land in the spool, where decode processes (forked after this call,
        or given these rows pickled) read them as they land. False when no spool can be written:
        then only the whole chunk (materialize()) can cross into another process."""
        with self._lock:
            if not self._shared and self._folder() is not None:
                self._shared = True
            return self._shared

    # -- reading ---------------------------------------------------------------------------------

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
        here = os.getpid() == self._owner and not self._copy
        if here and self._first_needs is not None and any(k > 0 and k >= self._next for k in pieces):
            self.first_batch_out()  # a read here of a piece still held: it would wait for the hold
        for k in pieces:
            if not here:
                self._piece_elsewhere(k)
                continue
            self._landed[k].wait()
            if self._errors[k] is not None:
                raise self._errors[k]
        if positions is None:
            self._all_landed = True

    def _piece_elsewhere(self, k: int) -> None:
        """In a decode process (a forked or unpickled copy): piece k from what the copy holds, or
        from its spool file once it lands. Never takes the copy's locks or events: a fork may have
        copied them held."""
        if self._errors[k] is not None:
            raise self._errors[k]
        if self._data[k] is not None:
            return
        if not self._shared or self._hold.dir is None:
            raise RuntimeError("rows still streaming in were forked into another process; "
                               "call share() (make_loader does) or materialize() before handing them to "
                               "DataLoader workers")
        path = os.path.join(self._hold.dir, f"piece-{k}")
        self._data[k] = wait_for_piece(path, f"{path}.err", self._owner, f"{self._what}: piece {k} of a chunk")

    def _piece(self, k: int) -> RamPiece | FilePiece:
        got = self._data[k]
        if got is None:
            raise RuntimeError(f"{self._what}: a chunk's rows read after the chunk was closed")
        return got

    def failure(self) -> BaseException | None:
        for k, ev in enumerate(self._landed):
            if ev.is_set() and self._errors[k] is not None:
                return self._errors[k]
        return None

    def cancel(self) -> None:
        """Pieces not started are not landed (one landing now finishes)."""
        with self._lock:
            self._cancelled = True
        self._lander.wake()

    def close(self) -> None:
        """The chunk is over: pieces not started are dropped, the RAM given back to the budget and
        the spool files removed. A read after this raises."""
        if os.getpid() != self._owner or self._copy:
            return
        with self._lock:
            self._closed = True
            data, self._data = self._data, [None] * len(self._data)
        self.cancel()
        for d in data:
            if isinstance(d, FilePiece):
                d.close()
        for ev in self._landed:  # a reader blocked on a cancelled piece gets the error above, not a hang
            ev.set()
        self._finalizer()

    @property
    def held_bytes(self) -> int:
        """Bytes of this chunk's landed pieces held in RAM (counted in the budget)."""
        return self._hold.held

    def __getitem__(self, name: str) -> Any:
        if name in self._index:
            return self._index[name]
        if name not in self._names and name not in self._seen:
            raise KeyError(name)
        return _StreamingColumn(self, name)

    def column(self, name: str, positions: Any) -> Any:
        self.wait(positions)
        if isinstance(positions, (int, np.integer)):
            p = int(positions) + (len(self.ids) if positions < 0 else 0)
            return self._piece(int(self._piece_of[p])).value(name, int(self._local[p]))
        pos = np.arange(len(self.ids))[positions]
        of = self._piece_of[pos]
        out: np.ndarray | None = None
        for k in np.unique(of).tolist():
            m = of == k
            got = self._piece(k).take(name, self._local[pos[m]])
            if out is None:
                out = np.empty(len(pos), dtype=got.dtype)
            out[m] = got
        return np.empty(0, dtype=object) if out is None else out

    def __iter__(self):
        return iter((*self._index, *[c for c in self._names if c not in self._index]))

    def __len__(self) -> int:
        return len(self._index) + len([c for c in self._names if c not in self._index])

    def materialize(self) -> dict[str, Any]:
        """The whole chunk as read_chunk gives it (waits for every piece)."""
        self.wait()
        out: dict[str, Any] = dict(self._index)
        if not len(self._data):
            return out
        for c in self._piece(0).names():
            v = self.column(c, slice(None))
            out[c] = v.tolist() if v.dtype == object else v
        return out

    def _spill_all(self) -> None:
        """Pieces held in RAM written to the spool too, for a process that cannot see this one's
        memory (a decode process started by pickling, not forking); the RAM is given back."""
        with self._lock:
            folder = self._hold.dir
            ram = [(k, d) for k, d in enumerate(self._data) if isinstance(d, RamPiece)]
        for k, d in ram:
            piece = write_piece(os.path.join(folder, f"piece-{k}"), d.values)
            with self._lock:
                if self._closed:
                    return
                self._data[k] = piece
            self._hold.hold(-d.nbytes)
            if self._hold.budget is not None:
                self._hold.budget.give_back(d.nbytes)
                self._hold.budget.spilled(d.nbytes)

    def __reduce__(self):
        # Pickled for a decode process started by spawn/forkserver: it gets the spool's layout and
        # reads the pieces from there as they land; the whole chunk only when there is no spool.
        if os.getpid() != self._owner or self._copy:
            raise RuntimeError("a chunk's rows are pickled only by the process that fetches them")
        if not self.share():
            return (dict, (self.materialize(),))
        self._spill_all()
        keep = ("ids", "_piece_of", "_local", "_pieces", "_index", "_names", "_seen", "_owner", "_what")
        state = {k: self.__dict__[k] for k in keep}
        state["_data"] = [d if isinstance(d, FilePiece) else None for d in self._data]
        state["_errors"] = [None if e is None else _portable(e) for e in self._errors]
        state["_dir"] = self._hold.dir
        return (_rows_elsewhere, (state,))


def _portable(exc: BaseException) -> BaseException:
    try:
        return pickle.loads(pickle.dumps(exc))
    except Exception:  # noqa: BLE001 - its type and message still cross as text
        return RuntimeError(f"{type(exc).__name__}: {exc}")


def _rows_elsewhere(state: dict[str, Any]) -> StreamingRows:
    """StreamingRows in a decode process started by pickling (StreamingRows.__reduce__)."""
    rows = StreamingRows.__new__(StreamingRows)
    folder = state.pop("_dir")
    rows.__dict__.update(state)
    rows._landed = [threading.Event() for _ in rows._pieces]
    rows._lock = threading.Lock()
    rows._shared, rows._closed, rows._all_landed, rows._copy = True, False, False, True
    rows._spool, rows._first_needs = None, None
    rows._hold = _Holding(None, rows._owner)
    rows._hold.dir = folder
    rows._finalizer = weakref.finalize(rows, lambda: None)
    return rows


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
