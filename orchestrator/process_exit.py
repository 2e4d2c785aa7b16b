"""How an `orchestrator` process ends: what the interpreter's own exit does that we keep, and the
teardown we skip.

Why not the interpreter's exit: after the last line of a command, CPython tears down every module and
then libc runs the C++ libraries' static destructors. pyarrow's thread pools (and other native pools:
OpenBLAS, jemalloc's background thread) are still alive then, and a pool torn down under a live worker
calls std::terminate: the process dies with SIGABRT ("terminate called without an active exception")
after its work is done and reported (apache/arrow#34314, #39862, both open). CI's run of 2026-12-07
failed on it: `data pack` printed "packed 24 samples ..." and exited -6 instead of 0.

So a finished command does what the interpreter's exit does up to that teardown and then leaves:
  1. join the threads that are not daemons (threading._shutdown: what Py_FinalizeEx does first; it
     also stops idle ThreadPoolExecutor workers), so no upload or write of ours is cut short;
  2. run the atexit handlers (Ray's shutdown of a local cluster, MLflow's async logging, logging's
     flush, tempfile's and multiprocessing's clean-up);
  3. flush stdout and stderr;
  4. os._exit: no module teardown, no static destructors, so nothing left to abort in.
"""

from __future__ import annotations

import atexit
import logging
import os
import sys
import threading
from typing import NoReturn


def exit_code(code: object) -> int:
    """sys.exit's argument as the process's exit status: None is 0, a message is printed and is 1."""
    if code is None:
        return 0
    if isinstance(code, int):
        return code & 0xFF
    print(code, file=sys.stderr)
    return 1


def leave(code: int) -> NoReturn:
    """End a process whose command has finished: threads joined, atexit handlers run, output
    flushed, and no interpreter teardown (see the module's docstring)."""
    shutdown = getattr(threading, "_shutdown", None)  # CPython 3.8-3.14; elsewhere the handlers still run
    try:
        if shutdown is not None:
            shutdown()
        atexit._run_exitfuncs()
    except KeyboardInterrupt:  # Ctrl-C while a thread finishes: stop now, as asked, without a traceback
        print("interrupted while finishing; re-run the same command to resume from the last checkpoint",
              file=sys.stderr)
        code = 130
    _flush()
    os._exit(code)


def leave_at_once(code: int) -> NoReturn:
    """A driver that lost its lease stops here and writes nothing more: unlike `leave`, it neither
    waits for the threads it abandoned (a checkpoint's upload, the MLflow store's copy) nor runs
    the handlers that would let them go on writing. Only the local Ray cluster this driver started
    is stopped, as Ray's own exit handler would."""
    _flush()
    logging.shutdown()
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        ray.shutdown()
    os._exit(code)


def _flush() -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe or stream: nothing more can reach it anyway
            pass
