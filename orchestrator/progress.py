"""Live progress on the driver: stage, chunk i/N, step, loss, samples/s, ETA.

The chief worker writes progress.json into run storage; the driver polls it. This works the
same whether the worker is in-process, on a local Ray cluster or on a remote node.
"""

from __future__ import annotations

import threading
import time
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

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
        f"stage {p['stage_index'] + 1}/{p['stages']} {p['stage']} | chunk {min(p['chunk'] + 1, p['chunks'])}/{p['chunks']} | "
        f"step {p['global_step']}/{p['total_steps']} | loss {loss} | {rate} samples/s | ETA {format_eta(p.get('eta_s'))} | {p['phase']}"
    )


class ProgressDisplay:
    """Context manager that follows a run's progress.json until the block exits."""

    def __init__(self, run_dir: str, console: Console | None = None) -> None:
        self.uri = fs.join(run_dir, PROGRESS_JSON)
        self.console = console or Console(stderr=True)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._follow, name="progress", daemon=True)
        self._started_at = time.time()
        self._last_rate: dict[str, Any] | None = None
        self._precision_shown = False

    def __enter__(self) -> ProgressDisplay:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _read(self) -> dict[str, Any] | None:
        try:
            p = fs.read_json(self.uri)
        except Exception:  # noqa: BLE001 - not written yet, or mid-write on an object store
            return None
        # A progress file left by an earlier attempt says nothing about this one.
        if p.get("updated_at", 0) < self._started_at - 1:
            return None
        if p.get("precision") and not self._precision_shown:  # once per attempt: what the worker resolved
            self._precision_shown = True
            self.console.print(p["precision"], highlight=False)
        return self._fill_rate(p)

    def _fill_rate(self, p: dict[str, Any]) -> dict[str, Any]:
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

    def _follow(self) -> None:
        if self.console.is_terminal:
            self._follow_live()
        else:
            self._follow_plain()

    def _follow_live(self) -> None:
        cols = (TextColumn("[bold]{task.description}"), BarColumn(bar_width=24))
        with Progress(*cols, console=self.console, transient=False) as bar:
            task = bar.add_task("starting workers...", total=None)
            while not self._stop.wait(POLL_S):
                p = self._read()
                if p:
                    bar.update(task, description=describe(p), completed=p["global_step"], total=p["total_steps"])
            p = self._read()
            if p:
                bar.update(task, description=describe(p), completed=p["global_step"], total=p["total_steps"])

    def _follow_plain(self) -> None:
        last = 0.0
        while not self._stop.wait(POLL_S):
            p = self._read()
            if p and time.monotonic() - last >= PLAIN_EVERY_S:
                last = time.monotonic()
                self.console.print(describe(p), highlight=False)


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
