"""One driver per run, fenced: the driver's side of the run lease (storage/lease.py holds the
file protocol, compare-and-swap on every store).

A second `orchestrator run` of a live run refuses and says who holds the lease and since when.
A lease whose heartbeat is older than LEASE_TTL_S, or whose holder is a dead process on this
same host, is taken over: that is how a re-run after a Colab expiry or a SIGKILL proceeds.

While the run trains, a heartbeat renews the lease every HEARTBEAT_S, each renewal conditional
on the lease still being this driver's. The driver gives up (records why in `.lost` and
interrupts the main thread, which stops the run without committing) when a renewal finds another
holder, or when renewals have failed for so long that the lease may have lapsed in another
driver's eyes (LEASE_TTL_S - LOSS_MARGIN_S since the last heartbeat written). The chief worker
checks the lease before each checkpoint commit (storage.lease.check_holder), so a driver that has
not noticed yet can at worst waste compute, never commit.

The heartbeat is a tick of the attempt's RunWatcher (orchestrator/engine/watcher.py): the one
thread that follows run storage. A lease used on its own starts a watcher of its own.
"""

from __future__ import annotations

import _thread
import os
import threading
import time
from typing import Any

from common.errors import RunError
from orchestrator.engine.watcher import RunWatcher
from storage import lease as _proto
from storage.errors import MountDropped
from storage.fs import mount_advice
from storage.lease import (
    LEASE_JSON,
    Lease,
    LeaseHeldError,
    LeaseLostError,
    check_holder,
    is_live,
    read,
)
from storage.retry import is_mount_drop

__all__ = ["LEASE_JSON", "LEASE_TTL_S", "HEARTBEAT_S", "LOSS_MARGIN_S", "DriverLease", "Lease", "LeaseLostError",
           "check_holder", "is_live", "read"]

LEASE_TTL_S = _proto.LEASE_TTL_S  # the protocol's (storage/lease.py); patch it there
HEARTBEAT_S = float(os.environ.get("ORCHESTRATOR_LEASE_HEARTBEAT_S", "10"))  # the variable: tests only
# Renewals failing for LEASE_TTL_S - LOSS_MARGIN_S: give the lease up before others may take it.
LOSS_MARGIN_S = 10.0
CHECK_S = 1.0  # how often the heartbeat looks at its deadline


class DriverLease:
    """Acquire on enter, heartbeat while inside, release on exit; `token` goes to the workers
    (the train config's "lease_token") for their pre-commit check. `what`: "run" or "study", for
    the refusal's words; `watcher`: the attempt's RunWatcher that beats the heart (else its own)."""

    def __init__(self, run_dir: str, run_name: str, what: str = "run", watcher: RunWatcher | None = None) -> None:
        self.run_dir = run_dir
        self.run_name = run_name
        self.what = what
        self.lease = _proto.new_lease()
        self.token = self.lease.token
        self.lost: str | None = None  # why the lease was lost, once it was
        self.mount_dropped = False  # lost because the mount under run storage dropped (not to another driver)
        self._held: _proto.Held | None = None
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._renewal: threading.Thread | None = None
        self._last_error: BaseException | None = None
        self._watcher = watcher
        self._own_watcher = watcher is None
        self._tick: Any = None
        self._last_try = 0.0

    def _refuse(self, other: Lease | None) -> RunError:
        who = other.describe() if other is not None else "another driver (its claim is being written)"
        if self.what == "study":
            return RunError(f"study '{self.run_name}' is being run by {who}; if that driver is gone, its lease "
                            "lapses a minute after its last heartbeat; then re-run this command")
        return RunError(
            f"run '{self.run_name}' is being driven by {who}; "
            f"`orchestrator status {self.run_name}` follows it. If that driver is gone, its lease lapses "
            f"{_proto.LEASE_TTL_S:.0f} s after its last heartbeat; then re-run this command"
        )

    def lost_error(self) -> RunError:
        if self.mount_dropped:
            err = RunError(f"run '{self.run_name}' stopped: {self.lost}")
            err.lease_lost = True  # type: ignore[attr-defined]
            return err
        err = RunError(
            f"run '{self.run_name}': {self.lost}; this driver stopped without committing (checkpoints are committed "
            f"only under the lease). `orchestrator status {self.run_name}` shows who drives it now; if nobody does, "
            "re-run the same command to resume from the last checkpoint"
        )
        err.lease_lost = True  # type: ignore[attr-defined]
        return err

    def acquire(self) -> None:
        try:
            self._held = _proto.claim(self.run_dir, self.lease)
        except LeaseHeldError as exc:
            raise self._refuse(exc.current) from None
        self.lease = self._held.lease

    # ---------------------------------------------------------------- heartbeat
    def _renew_once(self) -> None:
        try:
            assert self._held is not None
            self._held.renew()
            self.lease = self._held.lease
            self._last_error = None
        except LeaseLostError as exc:
            self._lose(f"{exc}")
        except Exception as exc:  # noqa: BLE001 - a failed renewal is retried at the next beat, within the TTL
            self._last_error = exc

    def beat(self) -> None:
        """One look at the deadline, and a renewal when one is due: a tick of the watcher's thread."""
        if self.lost is not None or self._stop.is_set():
            return
        since = time.time() - self.lease.heartbeat_at
        if since > _proto.LEASE_TTL_S - LOSS_MARGIN_S:
            if isinstance(self._last_error, MountDropped) or is_mount_drop(self._last_error):
                # Colab's Drive mount dropped: say what to do (storage/lease.py calls the OS directly).
                dropped = self._last_error if isinstance(self._last_error, MountDropped) else MountDropped(
                    f"{self.run_dir}: the mount is not answering ({self._last_error.strerror})", self.run_dir)
                self.mount_dropped = True
                self._lose(f"its run storage stopped answering for {since:.0f} s: {mount_advice(dropped)}")
                return
            why = f"last error {type(self._last_error).__name__}: {self._last_error}" if self._last_error else \
                "its storage did not answer"
            self._lose(f"could not renew its lease for {since:.0f} s ({why}), so another driver may take the run over")
            return
        if time.monotonic() - self._last_try < HEARTBEAT_S or (self._renewal is not None and self._renewal.is_alive()):
            return  # not due, or a renewal stalled in storage: the deadline above still runs
        self._last_try = time.monotonic()
        # Each renewal in its own thread, so a call that hangs cannot hold up the deadline.
        self._renewal = threading.Thread(target=self._renew_once, name="lease-renewal", daemon=True)
        self._renewal.start()

    def _lose(self, why: str) -> None:
        with self._lock:
            if self.lost is not None or self._stop.is_set():
                return
            self.lost = why
            # A first Ctrl-C asks the run for a checkpoint (orchestrator/interrupt.py); a lost lease
            # must stop it at once instead, as a second press does.
            from orchestrator import interrupt

            stop = interrupt.active()
            if stop is not None:
                stop.requested = True
            _thread.interrupt_main()

    def check(self) -> None:
        """Raise the lost-lease RunError if the heartbeat has given the lease up."""
        if self.lost is not None:
            raise self.lost_error()

    def verify(self) -> None:
        """check(), then read run storage: the lease must still be this driver's (before the driver's own
        last writes, e.g. marking the run completed)."""
        self.check()
        try:
            check_holder(self.run_dir, self.token)
        except LeaseLostError as exc:
            self.lost = str(exc)
            raise self.lost_error() from None

    # ---------------------------------------------------------------- release
    def release(self) -> None:
        with self._lock:
            self._stop.set()
        if self._watcher is not None and self._tick is not None:
            self._watcher.remove(self._tick)
            if self._own_watcher:
                self._watcher.stop()
        if self._held is not None and self.lost is None:
            try:
                self._held.release()
            except Exception:  # noqa: BLE001 - a lease left behind lapses after its TTL
                pass

    def __enter__(self) -> DriverLease:
        self.acquire()
        self._last_try = time.monotonic()
        if self._watcher is None:
            self._watcher = RunWatcher(self.run_dir, name="lease-heartbeat").start()
        self._tick = self._watcher.every(lambda: min(HEARTBEAT_S, CHECK_S), self.beat)
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        self.release()
        if self.lost is not None and exc_type is not None and not getattr(exc, "lease_lost", False):
            # The heartbeat's interrupt (a KeyboardInterrupt), or whatever the interrupted run raised.
            raise self.lost_error() from None
