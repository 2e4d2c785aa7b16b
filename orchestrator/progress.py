"""Live progress on the driver: stage, chunk i/N, step, loss, samples/s, ETA.

The chief worker writes progress.json into run storage; the driver's RunWatcher reads it. This works the
same whether the worker is in-process, on a local Ray cluster or on a remote node.
"""

from __future__ import annotations

import time
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from orchestrator.engine.watcher import RunWatcher
from storage import fs
from storage.layout import PROGRESS_JSON

POLL_S = 1.0
PLAIN_EVERY_S = 15.0  # without a terminal (CI, logs, notebooks' captured output): one line per interval


def format_eta(seconds: float | None) -> str:
    if seconds is None:
        return "--:--"
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


def describe(p: dict[str, Any]) -> str:
    loss = f"{p['loss']:.4f}" if p.get("loss") is not None else "-"
    rate = f"{p['samples_per_s']:.1f}" if p.get("samples_per_s") else "-"
    return (
        f"stage {p['stage_index'] + 1}/{p['stages']} {p['stage']} | "
        f"chunk {min(p['chunk'] + 1, p['chunks'])}/{p['chunks']} | step {p['global_step']}/{p['total_steps']} | "
        f"loss {loss} | {rate} samples/s | ETA {format_eta(p.get('eta_s'))} | {p['phase']}"
    )


class ProgressDisplay:
    """Context manager that shows a run's progress.json, as the attempt's RunWatcher reads it, until
    the block exits: a live bar on a terminal, a line every PLAIN_EVERY_S otherwise."""

    def __init__(self, run_dir: str, console: Console | None = None, watcher: RunWatcher | None = None) -> None:
        self.uri = fs.join(run_dir, PROGRESS_JSON)
        self.console = console or Console(stderr=True)
        self.watcher = watcher
        self._entry: Any = None
        self._started_at = time.time()
        self._last_rate: dict[str, Any] | None = None
        self._precision_shown = False
        self._bar: Progress | None = None
        self._task: Any = None
        self._last_plain = 0.0

    def __enter__(self) -> ProgressDisplay:
        if self.console.is_terminal:
            self._bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(bar_width=24), console=self.console,
                                 transient=False)
            self._bar.start()
            self._task = self._bar.add_task("starting workers...", total=None)
        if self.watcher is not None:
            self._entry = self.watcher.watch_json(PROGRESS_JSON, POLL_S, self.seen)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.watcher is not None:
            self.watcher.remove(self._entry)
        if self._bar is not None:
            try:  # the last reading, so the bar ends where the run did
                self.seen(fs.read_json(self.uri))
            except Exception:  # noqa: BLE001 - not written, or mid-write: the bar keeps what it showed
                pass
            self._bar.stop()

    def seen(self, raw: dict[str, Any] | None) -> None:
        """The watcher's callback: progress.json's content, or None while there is none."""
        p = self._accept(raw)
        if not p:
            return
        if self._bar is not None:
            self._bar.update(self._task, description=describe(p), completed=p["global_step"], total=p["total_steps"])
        elif time.monotonic() - self._last_plain >= PLAIN_EVERY_S:
            self._last_plain = time.monotonic()
            self.console.print(describe(p), highlight=False)

    def _accept(self, p: dict[str, Any] | None) -> dict[str, Any] | None:
        if not isinstance(p, dict):
            return None
        # A progress file left by an earlier attempt says nothing about this one.
        if p.get("updated_at", 0) < self._started_at - 1:
            return None
        if p.get("precision") and not self._precision_shown:  # once per attempt: what the worker resolved
            self._precision_shown = True
            self.console.print(p["precision"], highlight=False)
        return self.fill_rate(p)

    def fill_rate(self, p: dict[str, Any]) -> dict[str, Any]:
        """A reading without a rate (the first step after a restart, a phase change) shows the
        last one this display saw, with its ETA scaled to the steps left, rather than '-'."""
        if p.get("samples_per_s") and p.get("eta_s") is not None:
            self._last_rate = p
            return p
        last = self._last_rate
        if last is None or last.get("total_steps") != p.get("total_steps"):
            return p
        left, left_then = p["total_steps"] - p["global_step"], last["total_steps"] - last["global_step"]
        eta = last["eta_s"] * left / left_then if left_then > 0 else None
        return {**p, "samples_per_s": p.get("samples_per_s") or last["samples_per_s"],
                "eta_s": p.get("eta_s") if p.get("eta_s") is not None else eta}


class count_progress:  # noqa: N801 - used as a context manager
    """A bar for counted work (synthesis, packing); silent when stderr is not a terminal."""

    def __init__(self, console: Console, what: str, total: int) -> None:
        from rich.progress import (
            BarColumn,
            Progress,
            TextColumn,
        )

        self.bar = Progress(TextColumn(what), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(), console=console,
                            disable=not console.is_terminal)
        self.total = total

    def __enter__(self):
        self.bar.start()
        task = self.bar.add_task("", total=self.total)
        return lambda n=1: self.bar.advance(task, n)

    def __exit__(self, *exc: object) -> None:
        self.bar.stop()
