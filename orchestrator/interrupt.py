"""Ctrl-C on `orchestrator run` (a notebook's interrupt button): save a checkpoint, then stop.

Colab and Jupyter stop a running `!orchestrator run` cell by sending SIGINT to that process
alone (Colab sends SIGTERM, then SIGKILL, on a second press). While training runs, the first
SIGINT asks the run to stop: in-process the loop sees it at its next step, on Ray the chief
worker finds the request in run storage (workers/preemption.py, STOP_JSON); either way the loop
takes a just-in-time checkpoint, as for a preemption notice, and ends. The driver then records
the run as interrupted and names the step and the command that resumes it. A second SIGINT
stops at once, as before: training resumes from the last checkpoint saved.
"""

from __future__ import annotations

import signal
import threading
import time
from typing import Any

from rich.console import Console

from storage import fs
from workers.preemption import INTERRUPT_RECEIVED, STOP_JSON

_active: StopOnInterrupt | None = None


def active() -> StopOnInterrupt | None:
    """The handler of the run this process drives, for the Ray launcher to hand SIGINT back to."""
    return _active


class StopOnInterrupt:
    """While the block runs, SIGINT asks the run to stop at its next step; `requested` says
    whether it did. `fatal_watch`: a FatalErrorWatch, whose own interrupt of the main thread
    (also a SIGINT) must go on to the previous handler."""

    def __init__(self, run_dir: str, attempt: int, console: Console, fatal_watch: Any = None) -> None:
        self.uri = fs.join(run_dir, STOP_JSON)
        self.attempt = attempt
        self.console = console
        self.fatal_watch = fatal_watch
        self.requested = False
        self._fallback: Any = signal.default_int_handler
        self._installed = False

    def __enter__(self) -> StopOnInterrupt:
        global _active
        INTERRUPT_RECEIVED.clear()
        fs.remove(self.uri)  # a request left by an earlier attempt
        if threading.current_thread() is threading.main_thread():
            self.take_over(signal.getsignal(signal.SIGINT))
        _active = self
        return self

    def __exit__(self, *exc: object) -> None:
        global _active
        _active = None
        INTERRUPT_RECEIVED.clear()
        if self._installed and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, self._previous)
            self._installed = False

    def take_over(self, fallback: Any) -> None:
        """Make this the SIGINT handler; `fallback` (Ray Train's abort, or Python's
        KeyboardInterrupt) handles a second press and the fatal-error watch's interrupt."""
        if not self._installed:
            self._previous = signal.getsignal(signal.SIGINT)
        self._fallback = fallback if callable(fallback) else signal.default_int_handler
        signal.signal(signal.SIGINT, self._on_sigint)
        self._installed = True

    def _on_sigint(self, signum: int, frame: Any) -> None:
        if self.requested or (self.fatal_watch is not None and self.fatal_watch.fatal is not None):
            self._fallback(signum, frame)
            return
        self.request()

    def request(self) -> None:
        self.requested = True
        INTERRUPT_RECEIVED.set()  # the in-process loop, at its next step
        try:
            fs.write_json(self.uri, {"attempt": self.attempt, "at": time.time(), "by": "SIGINT"})  # a Ray worker
        except Exception as exc:  # noqa: BLE001 - in-process the event alone suffices
            self.console.print(f"could not write the stop request to run storage ({exc})", highlight=False,
                               markup=False)
        self.console.print("interrupt: saving a checkpoint at the next step, then stopping "
                           "(interrupt again to stop at once; the run then resumes from its last checkpoint)",
                           highlight=False, markup=False)
