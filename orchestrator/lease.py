"""One driver per run: a lease file in run storage, renewed by a heartbeat, that lapses when its driver dies.

A second `orchestrator run` of a live run refuses and says who holds the lease and since when.
A lease whose heartbeat is older than LEASE_TTL_S, or whose holder is a dead process on this
same host, is taken over: that is how a re-run after a Colab expiry or a SIGKILL proceeds.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from dataclasses import asdict, dataclass

from common.errors import RunError
from storage import fs

LEASE_JSON = "lease.json"
LEASE_TTL_S = 60.0
HEARTBEAT_S = 10.0
# After writing a claim, wait and read it back: on stores without exclusive create (GCS through
# fsspec), two drivers writing at once both read back, and only the last writer sees its own token.
SETTLE_S = 1.0


@dataclass
class Lease:
    holder: str  # host:pid
    token: str
    acquired_at: float
    heartbeat_at: float

    def describe(self) -> str:
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.acquired_at))
        return f"{self.holder} since {since} (last heartbeat {time.time() - self.heartbeat_at:.0f} s ago)"


def _me() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def is_live(lease: Lease, now: float | None = None) -> bool:
    """A lease counts while its heartbeat is fresh and, on this host, while its process lives."""
    now = time.time() if now is None else now
    if now - lease.heartbeat_at > LEASE_TTL_S:
        return False
    host, _, pid = lease.holder.rpartition(":")
    if host == socket.gethostname() and pid.isdigit():
        return _pid_alive(int(pid))
    return True


def read(run_dir: str) -> Lease | None:
    uri = fs.join(run_dir, LEASE_JSON)
    try:
        return Lease(**json.loads(fs.read_bytes(uri)))
    except FileNotFoundError:
        return None
    except (ValueError, TypeError):
        return None  # a torn write from a dying driver is no lease


def _write_exclusive_local(path: str, data: bytes) -> bool:
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    return True


class DriverLease:
    """Acquire on enter, heartbeat while inside, release on exit."""

    def __init__(self, run_dir: str, run_name: str) -> None:
        self.run_dir = run_dir
        self.run_name = run_name
        self.uri = fs.join(run_dir, LEASE_JSON)
        self.lease = Lease(_me(), uuid.uuid4().hex, time.time(), time.time())
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="lease-heartbeat", daemon=True)

    def _refuse(self, other: Lease) -> RunError:
        return RunError(
            f"run '{self.run_name}' is being driven by {other.describe()}; "
            f"`orchestrator status {self.run_name}` follows it. If that driver is gone, its lease lapses "
            f"{LEASE_TTL_S:.0f} s after its last heartbeat; then re-run this command"
        )

    def acquire(self) -> None:
        current = read(self.run_dir)
        if current is not None and is_live(current):
            raise self._refuse(current)
        data = json.dumps(asdict(self.lease)).encode()
        if fs.is_local(self.uri):
            path = fs.normalize(self.uri)
            if current is not None:
                # Taking over a lapsed lease: remove it, then race for the exclusive create.
                try:
                    os.unlink(path)
                except FileNotFoundError:
                    pass
            os.makedirs(os.path.dirname(path), exist_ok=True)
            if not _write_exclusive_local(path, data):
                raise self._refuse(read(self.run_dir) or current or self.lease)
            return
        fs.write_bytes(self.uri, data)
        time.sleep(SETTLE_S)
        back = read(self.run_dir)
        if back is None or back.token != self.lease.token:
            raise self._refuse(back or self.lease)

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            self.lease.heartbeat_at = time.time()
            try:
                fs.write_bytes(self.uri, json.dumps(asdict(self.lease)).encode())
            except Exception:  # noqa: BLE001 - a missed beat is retried at the next one
                pass

    def release(self) -> None:
        self._stop.set()
        current = read(self.run_dir)
        if current is not None and current.token == self.lease.token:
            fs.remove(self.uri)

    def __enter__(self) -> DriverLease:
        self.acquire()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
