"""Many `orchestrator` CLI calls for the price of one interpreter start (a fork server, or "zygote").

A bad-input case through the real CLI spends about a second starting Python and importing the CLI, and
two more importing torch for the recipe check, to print one line: the tables of such cases
(tests/test_bad_input_everywhere.py, tests/test_no_secrets.py) cost minutes on two cores. Here one
interpreter imports the CLI and torch once, then forks a child per call. Each child is a process of its
own, as `python -m orchestrator.cli ARGS` would be: its cwd, its stdout and stderr (the file
descriptors themselves, so whatever writes to them, logging, rich, C code, lands in that call's
files), stdin from /dev/null, the CLI module run as __main__ by runpy, and the CLI's own exit
(orchestrator/process_exit.py: threads joined, atexit handlers run, no teardown; an uncaught exception
prints its traceback and exits 1). Nothing one call does
(environment, caches, module state) reaches another: each starts from the zygote's state after the
imports, never from a sibling's.

    python -m tests.cli_batch SPEC.json
    SPEC: {"calls": [{"args": [...], "cwd": DIR, "stdout": FILE, "stderr": FILE}, ...],
           "parallel": N, "timeout": SECONDS, "preload": [MODULE, ...], "results": FILE}
    results: [{"returncode": int, "timed_out": bool, "seconds": float}, ...] in the order of the calls
"""

from __future__ import annotations

import gc
import importlib
import json
import os
import runpy
import signal
import sys
import time
from typing import Any

from orchestrator.process_exit import exit_code, leave


def _child(call: dict[str, Any]) -> None:
    """Become `python -m orchestrator.cli ARGS` in call's cwd; never returns."""
    for fd, path, flags in ((0, os.devnull, os.O_RDONLY),
                            (1, call["stdout"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC),
                            (2, call["stderr"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)):
        opened = os.open(path, flags, 0o644)
        os.dup2(opened, fd)
        os.close(opened)
    os.chdir(call["cwd"])
    sys.path[0] = os.getcwd()  # what `python -m` puts first on the path: the directory it started in
    sys.argv = ["orchestrator", *call["args"]]  # runpy sets argv[0] to the module's file, as -m does
    # As under `python -m`, the CLI module runs as __main__ only: the zygote's imported copy (kept for the
    # modules it pulled in) leaves sys.modules, or runpy would warn about running a module imported before.
    sys.modules.pop("orchestrator.cli", None)
    try:
        runpy.run_module("orchestrator.cli", run_name="__main__", alter_sys=True)  # ends in process_exit.leave
        code = 0
    except SystemExit as exc:
        code = exit_code(exc.code)
    except BaseException:  # what the interpreter does with an uncaught exception: its traceback, exit 1
        sys.excepthook(*sys.exc_info())
        code = 1
    leave(code)


def main() -> None:
    with open(sys.argv[1]) as f:
        spec = json.load(f)
    for module in spec.get("preload", []):
        try:
            importlib.import_module(module)
        except ImportError:
            pass  # the child imports it itself, if it needs it: slower, same result
    # The preloaded objects move to the collector's permanent generation: a child's collections then leave
    # them alone instead of touching (and so copying, page by page) the whole inherited heap.
    gc.freeze()
    calls: list[dict[str, Any]] = spec["calls"]
    results: list[dict[str, Any] | None] = [None] * len(calls)
    running: dict[int, tuple[int, float]] = {}  # pid -> (call index, started)
    pending = list(range(len(calls)))
    sys.stdout.flush()
    sys.stderr.flush()
    while pending or running:
        while pending and len(running) < spec.get("parallel", 2):
            index = pending.pop(0)
            pid = os.fork()
            if pid == 0:
                _child(calls[index])  # ends with os._exit: a child never resumes this loop
            running[pid] = (index, time.monotonic())
        pid, status = os.waitpid(-1, os.WNOHANG)
        if pid:
            index, started = running.pop(pid)
            results[index] = {"returncode": os.waitstatus_to_exitcode(status), "timed_out": False,
                              "seconds": round(time.monotonic() - started, 3)}
            continue
        for pid, (index, started) in list(running.items()):
            if time.monotonic() - started > spec["timeout"]:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                running.pop(pid)
                results[index] = {"returncode": -signal.SIGKILL, "timed_out": True, "seconds": spec["timeout"]}
        time.sleep(0.01)
    with open(spec["results"], "w") as f:
        json.dump(results, f)


if __name__ == "__main__":
    main()
