"""Preemption notices: a node drained for preemption (Ray), GCE's metadata server saying the VM is
preempted (workers/gce_notice.py, the earliest on GCE) or SIGTERM to the worker (what GCE sends).

Either one makes the loop take a just-in-time checkpoint and stop with `PreemptedError`, so
the steps trained before the notice are all kept and Ray Train restarts the worker group on a
node that is not going away. A user's interrupt (Ctrl-C on the driver) takes the same
just-in-time checkpoint and ends the run there (`StopRequested`), resumable by the same command.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from typing import Any

log = logging.getLogger(__name__)

SIGTERM_RECEIVED = threading.Event()
TRAINING_ACTIVE = threading.Event()
# Ctrl-C on `orchestrator run` (a notebook's interrupt button): the driver asks the run to stop
# (orchestrator/interrupt.py). In-process it sets this event; on Ray it writes STOP_JSON into the
# run's directory, which the chief worker looks for every STOP_POLL_S seconds.
INTERRUPT_RECEIVED = threading.Event()
STOP_JSON = "stop.json"
STOP_POLL_S_LOCAL = 0.5
STOP_POLL_S_REMOTE = 5.0  # an object store bills and throttles per request
_previous_handler: Any = signal.SIG_DFL


class PreemptedError(RuntimeError):
    """Raised after the just-in-time checkpoint; the run resumes from it."""


class StopRequested(PreemptedError):
    """Raised after the checkpoint a user's interrupt asked for: the run stops there (it is not
    restarted), and the same command resumes it."""

    def __init__(self, step: int) -> None:
        super().__init__(f"interrupted at step {step}: checkpoint saved")
        self.step = step


def _on_sigterm(signum: int, frame: Any) -> None:
    if TRAINING_ACTIVE.is_set():
        SIGTERM_RECEIVED.set()
        return
    # Not a training process (or not training yet): behave as before this handler existed.
    signal.signal(signal.SIGTERM, _previous_handler)
    if callable(_previous_handler):
        _previous_handler(signum, frame)
    else:
        os.kill(os.getpid(), signal.SIGTERM)


def install_sigterm_handler() -> None:
    """Run in a process's main thread: by Ray as the job's worker_process_setup_hook, or by the
    in-process backend. Ray runs the training function in a thread, which cannot set handlers."""
    global _previous_handler
    if threading.current_thread() is not threading.main_thread():
        return
    current = signal.getsignal(signal.SIGTERM)
    if current is not _on_sigterm:
        _previous_handler = current
        signal.signal(signal.SIGTERM, _on_sigterm)
    _chain_ray_worker_handler()


def _chain_ray_worker_handler() -> None:
    """Ray's worker main loop installs its own SIGTERM handler (exit at once) after the setup
    hook has run, which would undo ours. Ray sets it through one helper; wrap that helper so
    Ray's handler becomes the one we fall back to when no training is under way. Checked by
    tests/test_fault_tolerance.py's SIGTERM test: if a Ray upgrade moves the helper, it fails."""
    try:
        import ray._private.utils as ray_utils
    except ImportError:
        return
    if getattr(ray_utils.set_sigterm_handler, "_orchestrator_chained", False):
        return

    def set_sigterm_handler(handler: Any) -> None:
        global _previous_handler
        _previous_handler = handler
        signal.signal(signal.SIGTERM, _on_sigterm)

    set_sigterm_handler._orchestrator_chained = True  # type: ignore[attr-defined]
    ray_utils.set_sigterm_handler = set_sigterm_handler


# A rank's background fetch of the next chunk failed in a way no restart fixes (a 403, a shard
# that fails its checksum twice): every rank checkpoints now and the run stops, instead of
# training on to the chunk's end and failing there.
FATAL = "fatal"

# The user asked the run to stop (Ctrl-C): a checkpoint, then the run ends instead of restarting.
INTERRUPT = "interrupt"

# GCE's metadata server said this VM is preempted (workers/gce_notice.py).
GCE = "gce"

# What ranks all-reduce (MAX) to agree on one answer: a higher code outranks a lower one. An
# interrupt outranks a preemption notice: the user wants the run stopped, not moved.
_CODES = {None: 0, "drain": 1, GCE: 2, "sigterm": 3, INTERRUPT: 4, FATAL: 5}
_BY_CODE = {v: k for k, v in _CODES.items()}


class StopRequestWatch:
    """The chief's look for the driver's stop request (STOP_JSON in the run's directory), at most
    every STOP_POLL_S seconds, so a step costs nothing on an object store."""

    def __init__(self, run_dir: str | None, attempt: int) -> None:
        from storage import fs

        self.uri = fs.join(run_dir, STOP_JSON) if run_dir else None
        self.attempt = attempt
        self.every_s = STOP_POLL_S_LOCAL if run_dir is None or fs.is_local(run_dir) else STOP_POLL_S_REMOTE
        self._next = 0.0
        self._seen = False

    def requested(self) -> bool:
        if INTERRUPT_RECEIVED.is_set() or self._seen:
            return True
        if self.uri is None or time.monotonic() < self._next:
            return False
        self._next = time.monotonic() + self.every_s
        from storage import fs

        try:
            req = fs.read_json(self.uri)
        except Exception:  # noqa: BLE001 - absent (the normal case), mid-write, or storage trouble
            return False
        # A request left by an earlier attempt (the driver removes it at start) is not this one's.
        self._seen = int(req.get("attempt", self.attempt)) == self.attempt
        return self._seen


class PreemptionMonitor:
    """Asks, every `every_steps` steps (the same steps on every rank), whether a notice came."""

    def __init__(self, backend: str, world_size: int, device: Any, every_steps: int = 1,
                 stop: StopRequestWatch | None = None) -> None:
        self.backend = backend
        self.world_size = world_size
        self.device = device
        self.every_steps = every_steps
        self.stop = stop
        # Each worker watches its own VM's metadata server (a thread; none off GCE).
        from workers import gce_notice

        gce_notice.start()

    def notice(self, global_step: int, fatal: bool = False) -> str | None:
        """"drain", GCE or "sigterm" for a preemption notice, INTERRUPT when the user asked the run to
        stop; FATAL when some rank reports (`fatal`) that it cannot go on, which outranks a
        notice: no restart will get further."""
        if global_step % self.every_steps:
            return None
        stop = self.stop is not None and self.stop.requested()
        from workers.gce_notice import PREEMPTED

        reason = (FATAL if fatal else INTERRUPT if stop else "sigterm" if SIGTERM_RECEIVED.is_set()
                  else GCE if PREEMPTED.is_set() else None)
        if self.backend == "ray":
            import ray.train

            # A collective: every rank calls it at the same steps, and they agree on one answer.
            info = ray.train.get_preemption_info()
            if info is not None and reason is None:
                reason = "drain"
        if self.world_size > 1:
            import torch
            import torch.distributed as dist

            flag = torch.tensor([_CODES[reason]], device=self.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            reason = _BY_CODE[int(flag.item())]
        return reason
