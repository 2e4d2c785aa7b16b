"""A background checkpoint upload with at most one in flight.

The training thread takes a snapshot of its state at the step (`CheckpointWriter.snapshot`: every
tensor copied to CPU memory, into buffers reused from the previous checkpoint, everything else
deep-copied), hands the writer the work that turns the snapshot into a committed checkpoint
(serialize, write, upload, then the completion marker), and goes on training.
The writer runs that work on its own thread; what must follow the commit on the training thread
(metrics to MLflow, which the training thread also uses) runs there, at the next `poll` or `wait`.

Rules it keeps:
- at most one job in flight: `submit` first waits for the previous job and runs its completion;
- a job's completion runs on the thread that calls `poll`/`wait`, never on the writer's, and only
  once its work returned: a checkpoint counts only once it is committed;
- an error in the work is raised on the training thread at the next `poll`/`wait`, as a failed
  synchronous save would have been;
- `background=False` runs every job inline in `submit`: the synchronous save, as before.
"""

from __future__ import annotations

import copy
import logging
import sys
import threading
from collections.abc import Callable
from typing import Any

import torch

from storage.errors import StorageError

log = logging.getLogger(__name__)

WAIT_SLICE_S = 0.5


def snapshot(obj: Any, buffer: Callable[[torch.Tensor], torch.Tensor] | None = None) -> Any:
    """A copy of a state_dict-like tree that training can no longer change: tensors copied to CPU
    memory (a copy even for CPU tensors, which the next optimizer step mutates in place), containers
    rebuilt, anything else deep-copied. `buffer(t)` gives the CPU tensor to copy `t` into (a
    reused one, see SnapshotPool); by default a new one."""
    if isinstance(obj, torch.Tensor):
        t = obj.detach()
        if buffer is None or t.device.type not in ("cpu", "cuda"):
            return t.clone() if t.device.type == "cpu" else t.to("cpu", copy=True)
        return buffer(t).copy_(t, non_blocking=t.device.type == "cuda")
    if isinstance(obj, dict):
        out = {k: snapshot(v, buffer) for k, v in obj.items()}
        if type(obj) is dict:
            return out
        out = type(obj)(out)  # a module's state_dict is an OrderedDict...
        if hasattr(obj, "_metadata"):
            out._metadata = copy.deepcopy(obj._metadata)  # ...whose versions load_state_dict reads
        return out
    if isinstance(obj, list):
        return [snapshot(v, buffer) for v in obj]
    if isinstance(obj, tuple) and not hasattr(obj, "_fields"):
        return tuple(snapshot(v, buffer) for v in obj)
    return copy.deepcopy(obj)


class SnapshotPool:
    """CPU buffers for snapshots, reused from one checkpoint to the next. A fresh 200 MB
    allocation costs page faults on first touch (0.3-0.4 s on the bench machine, more than the
    copy itself); reused buffers make a snapshot one memcpy. Buffers for CUDA tensors are pinned, so
    the device-to-host copies run at full speed (non-blocking, then one synchronize). The pool holds
    at most one snapshot's worth: what the newest snapshot did not use is freed."""

    def __init__(self) -> None:
        self._free: dict[tuple, list[torch.Tensor]] = {}

    @staticmethod
    def _key(t: torch.Tensor) -> tuple:
        return (tuple(t.shape), t.stride(), t.dtype, t.device.type == "cuda")

    def take(self, obj: Any) -> tuple[Any, list[torch.Tensor]]:
        """(snapshot of obj, the pooled buffers it uses: give them back once it is written)."""
        used: list[torch.Tensor] = []
        cuda: list[torch.device] = []

        def buffer(t: torch.Tensor) -> torch.Tensor:
            free = self._free.get(self._key(t))
            if free:
                buf = free.pop()
            else:
                pin = t.device.type == "cuda"
                buf = torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device="cpu", pin_memory=pin)
            if t.device.type == "cuda" and t.device not in cuda:
                cuda.append(t.device)
            used.append(buf)
            return buf

        snap = snapshot(obj, buffer)
        for device in cuda:
            torch.cuda.synchronize(device)  # the non-blocking device-to-host copies have landed
        self._free.clear()  # buffers of shapes this snapshot did not need (another stage's optimizer)
        return snap, used

    def give_back(self, buffers: list[torch.Tensor]) -> None:
        for buf in buffers:
            self._free.setdefault(self._key(buf), []).append(buf)


class _Job:
    def __init__(self, work: Callable[[], Any], done: Callable[[Any], None] | None, name: str,
                 buffers: list[torch.Tensor] | None = None) -> None:
        self.work = work
        self.buffers = buffers or []
        self.done = done
        self.name = name
        self.result: Any = None
        self.error: BaseException | None = None
        self.finished = threading.Event()

    def run(self) -> None:
        try:
            self.result = self.work()
        except BaseException as exc:  # noqa: BLE001 - handed to the training thread, raised there
            self.error = exc
        finally:
            self.work = None  # type: ignore[assignment] - drop the snapshot as soon as it is written
            self.finished.set()


class CheckpointWriter:
    """`submit(work, done)`: run `work()` in the background (at most one job at a time), then
    `done(result)` on the training thread at its next `poll()` or `wait()`."""

    def __init__(self, background: bool = True) -> None:
        self.background = background
        self._job: _Job | None = None
        self._thread: threading.Thread | None = None
        self._pool = SnapshotPool()
        self._taken: list[torch.Tensor] = []

    def snapshot(self, obj: Any) -> Any:
        """`snapshot(obj)` into reused buffers; the next `submit` owns them until its job lands."""
        self.wait()  # the buffers in the pool are free only once the job that wrote them has landed
        snap, self._taken = self._pool.take(obj)
        return snap

    @property
    def in_flight(self) -> str | None:
        """The name of the job under way, or None."""
        return self._job.name if self._job is not None else None

    def submit(self, work: Callable[[], Any], done: Callable[[Any], None] | None = None,
               name: str = "checkpoint") -> None:
        """Start `work` once the previous job has landed (its completion runs first, here)."""
        self.wait()
        job = _Job(work, done, name, self._taken)
        self._taken = []
        self._job = job
        if not self.background:
            job.run()
            self.wait()
            return
        self._thread = threading.Thread(target=job.run, name=f"orchestrator-{name}", daemon=True)
        self._thread.start()

    def poll(self) -> bool:
        """Non-blocking, on the training thread: run the completion of a job whose work has ended
        (raising its error, if it failed). True when nothing is in flight afterwards."""
        job = self._job
        if job is None:
            return True
        if not job.finished.is_set():
            return False
        self._land(job)
        return self._job is None

    def wait(self) -> None:
        """Block until nothing is in flight, running each landed job's completion here (a
        completion may start a follow-up job: that one is waited for too)."""
        while self._job is not None:
            job = self._job
            # In slices: the driver's own stop (a lost lease, interrupt_main) is a flag that Python
            # only acts on between bytecodes, and a write riding out a long outage may wait minutes.
            while not job.finished.wait(WAIT_SLICE_S):
                pass
            self._land(job)

    def close(self) -> None:
        """On the way out (an error, or the end of the process): let the job under way land and
        complete; its failure is logged, not raised, so it does not hide the error being raised.
        Called while a KeyboardInterrupt unwinds (a second Ctrl-C: stop at once), it does not wait:
        the job is left to its daemon thread, and a checkpoint cut short has no meta.json."""
        if isinstance(sys.exc_info()[1], KeyboardInterrupt):
            if self._job is not None:
                log.warning("stopping at once: the upload of %s is abandoned", self._job.name)
            self._job = self._thread = None
            return
        try:
            self.wait()
        except StorageError as exc:
            # storage that stopped answering: the message says which; the previous checkpoint stands
            log.warning("the last checkpoint upload failed: %s", exc)
        except Exception:  # noqa: BLE001 - the caller is already failing or finished; the previous checkpoint stands
            log.warning("the last checkpoint upload failed", exc_info=True)

    def _land(self, job: _Job) -> None:
        self._job = None
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self._pool.give_back(job.buffers)  # written (or failed): the next snapshot may reuse them
        job.buffers = []
        if job.error is not None:
            raise job.error
        if job.done is not None:
            job.done(job.result)
