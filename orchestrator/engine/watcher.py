"""ONE thread that follows run storage while an attempt runs: the lease's heartbeat, the
progress file, the error file, each at its own interval, each result handed to its callback.

Reads run in short-lived reader threads (at most one in flight per file) and come back through
a queue: a read that hangs on a dropped mount or a slow bucket must not hold up the lease's
deadline, which is checked here without touching storage. Every callback runs on the watcher's
own thread, so callbacks never race each other.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from storage import fs

log = logging.getLogger(__name__)

MAX_WAIT_S = 0.5  # the longest the thread sleeps between looks at its schedule


@dataclass(eq=False)
class _Entry:
    every_s: Callable[[], float]  # read at each look: tests patch the intervals while a run is live
    callback: Callable[..., None]
    uri: str | None = None  # a JSON file to read (callback(data or None)); None: a tick (callback())
    due: float = 0.0
    reading: threading.Thread | None = field(default=None, repr=False)
    warned: bool = False  # its callback raised once: said once, not at every look


def _interval(every_s: float | Callable[[], float]) -> Callable[[], float]:
    return every_s if callable(every_s) else (lambda: float(every_s))


class RunWatcher:
    """`every()` registers a tick, `watch_json()` a file; both return a handle for `remove()`.
    Entries may be added and removed while the thread runs."""

    def __init__(self, run_dir: str, name: str = "run-watcher") -> None:
        self.run_dir = run_dir
        self._entries: list[_Entry] = []
        self._lock = threading.Lock()
        self._results: queue.SimpleQueue[tuple[_Entry, Any] | None] = queue.SimpleQueue()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)

    # ------------------------------------------------------------------ registration
    def every(self, every_s: float | Callable[[], float], callback: Callable[[], None]) -> _Entry:
        return self._add(_Entry(_interval(every_s), callback))

    def watch_json(self, name: str, every_s: float | Callable[[], float],
                   callback: Callable[[dict[str, Any] | None], None]) -> _Entry:
        """callback(the file's JSON, or None while it is absent or mid-write) every every_s."""
        return self._add(_Entry(_interval(every_s), callback, fs.join(self.run_dir, name)))

    def _add(self, entry: _Entry) -> _Entry:
        entry.due = time.monotonic() + entry.every_s()
        with self._lock:
            self._entries.append(entry)
        self._results.put(None)  # wake the thread: the new entry may be due sooner than its sleep
        return entry

    def remove(self, entry: _Entry) -> None:
        with self._lock:
            if entry in self._entries:
                self._entries.remove(entry)

    # ------------------------------------------------------------------ the thread
    @property
    def thread(self) -> threading.Thread:
        return self._thread

    def start(self) -> RunWatcher:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._results.put(None)
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)

    def __enter__(self) -> RunWatcher:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _loop(self) -> None:
        while not self._stop.is_set():
            now = time.monotonic()
            with self._lock:
                entries = list(self._entries)
            for entry in entries:
                if now < entry.due:
                    continue
                entry.due = now + entry.every_s()
                if entry.uri is None:
                    self._call(entry)
                elif entry.reading is None or not entry.reading.is_alive():
                    entry.reading = threading.Thread(target=self._read, args=(entry,), name="run-watcher-read",
                                                     daemon=True)
                    entry.reading.start()
            wait = min((e.due for e in entries), default=now + MAX_WAIT_S) - time.monotonic()
            try:
                got = self._results.get(timeout=min(max(wait, 0.0), MAX_WAIT_S))
            except queue.Empty:
                continue
            while got is not None or not self._results.empty():
                if got is not None and not self._stop.is_set():
                    entry, data = got
                    with self._lock:
                        live = entry in self._entries
                    if live:
                        self._call(entry, data)
                try:
                    got = self._results.get_nowait()
                except queue.Empty:
                    break

    def _call(self, entry: _Entry, *data: Any) -> None:
        # One callback's bug (a progress file of an unexpected shape) must not stop the others:
        # the lease's heartbeat shares this thread.
        try:
            entry.callback(*data)
        except Exception:  # noqa: BLE001 - logged once; the entry is called again at its next time
            if not entry.warned:
                entry.warned = True
                name = getattr(entry.callback, "__qualname__", entry.callback)
                log.warning("run watcher: %s failed", name, exc_info=True)

    def _read(self, entry: _Entry) -> None:
        assert entry.uri is not None
        try:
            data = fs.read_json(entry.uri)
        except Exception:  # noqa: BLE001 - absent (the usual case) or mid-write on an object store
            data = None
        self._results.put((entry, data))
