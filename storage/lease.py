"""The run lease's file protocol: one record in run storage, claimed, renewed and released by
compare-and-swap, so that two drivers never both hold it, and `check_holder` for the chief worker
to call before it commits a checkpoint.

Torch-free and free of policy (the heartbeat thread and what to do on a loss live in
orchestrator/engine/lease.py), so that workers can import it.

How each store gives the compare-and-swap:

* GCS (`gs://`): generation preconditions. A fresh claim writes with `ifGenerationMatch=0` (the
  object must not exist); taking over a lapsed lease writes with `ifGenerationMatch=<the generation
  read>`; a renewal with `ifGenerationMatch=<our last generation>`; a release deletes with it. GCS
  answers 412 to all but one of any racers, whatever the timing, so a write that lands late loses
  instead of overwriting the winner. A 412 after a retried request may be our own first attempt,
  landed: the record is read back and, if it holds our token, the claim stands.
* Local disks and mounts: `O_CREAT|O_EXCL` for a fresh claim. A lapsed lease is never unlinked
  blind: it is renamed to a unique tombstone name (of several racers renaming one inode, one
  succeeds), the tombstone is checked to be the very record judged lapsed (else it is put back
  and the claim refused), and then the exclusive create races again. A renewal writes a temporary
  file, checks the current holder's token, and replaces: a POSIX filesystem has no compare-and-swap
  for a replace, so a window remains between the check and the replace. Another driver can only
  enter it by judging our lease lapsed, i.e. after LEASE_TTL_S without a renewal, and the heartbeat
  gives the lease up (orchestrator/engine/lease.py) before that; whatever slips through anyway (a clock
  jump, a renewal stalled inside the window) is caught by `check_holder` before the next commit.
  Likewise with three or more racers on one lapsed lease: a racer whose rename caught the winner's
  fresh record puts it back, and a fourth that created one in that instant holds the lease too
  until the winner's next heartbeat finds it and stops (two racers: exactly one wins, tested).
* A Drive folder mounted on two VMs: the FUSE mount's exclusive create and rename are atomic on
  one machine only; across machines both can succeed. See the README ("When machines vanish").
"""

from __future__ import annotations

import json
import os
import socket
import time
import uuid
from dataclasses import asdict, dataclass
from typing import Any

from storage import fs

LEASE_JSON = "lease.json"
# A lease whose heartbeat is older than this has lapsed: anyone may take it over.
LEASE_TTL_S = float(os.environ.get("ORCHESTRATOR_LEASE_TTL_S", "60"))  # the variable: tests only


class LeaseLostError(RuntimeError):
    """The lease in run storage is not (or no longer) the caller's: it must not commit anything."""


class LeaseHeldError(RuntimeError):
    """A claim found the lease live in another holder's hands; `.current` is that lease."""

    def __init__(self, current: Lease | None) -> None:
        super().__init__(f"the lease is held by {current.describe() if current else 'another driver'}")
        self.current = current


@dataclass
class Lease:
    holder: str  # host:pid
    token: str
    acquired_at: float
    heartbeat_at: float

    def describe(self) -> str:
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.acquired_at))
        return f"{self.holder} since {since} (last heartbeat {time.time() - self.heartbeat_at:.0f} s ago)"

    def encode(self) -> bytes:
        return json.dumps(asdict(self)).encode()


def new_lease() -> Lease:
    now = time.time()
    return Lease(f"{socket.gethostname()}:{os.getpid()}", uuid.uuid4().hex, now, now)


def _decode(data: bytes | None) -> Lease | None:
    if data is None:
        return None
    try:
        return Lease(**json.loads(data))
    except (ValueError, TypeError):
        return None  # a torn write from a dying driver is no lease


def pid_alive(pid: int) -> bool:
    """Whether a process of this pid runs on this host (one we may not signal counts as running)."""
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
        return pid_alive(int(pid))
    return True


def lease_uri(run_dir: str) -> str:
    return fs.join(run_dir, LEASE_JSON)


def read(run_dir: str) -> Lease | None:
    """The lease in run storage; None when there is none (or only a torn one)."""
    try:
        return _decode(fs.read_bytes(lease_uri(run_dir)))
    except FileNotFoundError:
        return None


def check_holder(run_dir: str, token: str) -> None:
    """Raise LeaseLostError unless the lease in run storage is `token`'s and has not lapsed.

    The chief worker calls this right before it commits a checkpoint: a driver that lost its lease
    (a stall past the TTL, a second driver that took over) can at worst waste compute, never commit.
    """
    current = read(run_dir)
    if current is None:
        raise LeaseLostError(f"{lease_uri(run_dir)}: the run's lease is gone (released or being taken over); "
                             "this driver no longer holds it")
    if current.token != token:
        raise LeaseLostError(f"{lease_uri(run_dir)}: this driver {_lost_to(current)}")
    age = time.time() - current.heartbeat_at
    if age > LEASE_TTL_S:
        raise LeaseLostError(f"{lease_uri(run_dir)}: this driver's lease lapsed (last heartbeat {age:.0f} s ago, "
                             f"the limit is {LEASE_TTL_S:.0f} s); another driver may take it over at any moment")


# ------------------------------------------------------------------------------------ the store
class _Store:
    """One backend's compare-and-swap. `version` is what the next conditional write is checked
    against: a GCS generation, or the bytes last written (local)."""

    def read(self) -> tuple[Lease | None, Any]:
        raise NotImplementedError

    def claim(self, lease: Lease) -> Any:
        raise NotImplementedError

    def renew(self, lease: Lease, version: Any) -> Any:
        raise NotImplementedError

    def release(self, lease: Lease, version: Any) -> None:
        raise NotImplementedError


class _LocalStore(_Store):
    """A local disk or a mount (one machine): exclusive create, rename-to-tombstone takeover."""

    def __init__(self, uri: str) -> None:
        self.path = fs.normalize(uri)

    def _read_raw(self, path: str) -> bytes | None:
        try:
            with open(path, "rb") as f:
                return f.read()
        except FileNotFoundError:
            return None

    def read(self) -> tuple[Lease | None, Any]:
        raw = self._read_raw(self.path)
        return _decode(raw), raw

    def _create(self, data: bytes) -> bool:
        """Exclusive create of a complete record: written under a temporary name, then hard-linked
        into place (link fails if the name exists), so no racer ever sees it half-written. Where
        the filesystem has no hard links (some FUSE mounts), O_CREAT|O_EXCL, then the write."""
        tmp = f"{self.path}.new-{uuid.uuid4().hex[:12]}"
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, self.path)
            return True
        except FileExistsError:
            return False
        except OSError:
            pass
        finally:
            _unlink_quietly(tmp)
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        return True

    def _fresh_torn(self) -> bool:
        """An unreadable record written within the TTL: a claim being written (no hard links), or a
        driver that died mid-write moments ago. Either way not yet ours to take."""
        try:
            return time.time() - os.stat(self.path).st_mtime <= LEASE_TTL_S
        except FileNotFoundError:
            return False

    def _tombstone(self) -> str:
        return f"{self.path}.lapsed-{uuid.uuid4().hex[:12]}"

    def _put_back(self, tomb: str) -> None:
        """Undo a rename that moved a record we did not judge: link it back unless someone created a new one."""
        try:
            os.link(tomb, self.path)
        except FileExistsError:
            pass
        except OSError:  # a filesystem without hard links (some FUSE mounts)
            data = self._read_raw(tomb)
            if data is not None:
                self._create(data)
        _unlink_quietly(tomb)

    def claim(self, lease: Lease) -> Any:
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        data = lease.encode()
        for _ in range(3):  # a record that vanishes under us (a release) is looked at again
            current, raw = self.read()
            if raw is not None:
                if current is not None and is_live(current):
                    raise LeaseHeldError(current)
                if current is None and self._fresh_torn():
                    raise LeaseHeldError(None)
                # Lapsed (or torn): move exactly this record aside, never unlink whatever is there.
                tomb = self._tombstone()
                try:
                    os.rename(self.path, tomb)
                except FileNotFoundError:
                    continue  # another racer moved it first; look again
                if self._read_raw(tomb) != raw:
                    # Between our read and our rename the record changed (renewed, or replaced by a
                    # racer that won): it was not the one judged lapsed. Put it back and refuse.
                    moved = _decode(self._read_raw(tomb))
                    self._put_back(tomb)
                    raise LeaseHeldError(moved or self.read()[0])
                _unlink_quietly(tomb)
            if self._create(data):
                return data
            # Another racer created it first: it holds the lease.
            raise LeaseHeldError(self.read()[0])
        raise LeaseHeldError(self.read()[0])

    def renew(self, lease: Lease, version: Any) -> Any:
        data = lease.encode()
        tmp = f"{self.path}.tmp-{uuid.uuid4().hex[:8]}"
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        try:
            current, _ = self.read()
            if current is None:
                # A racer that judged an older record lapsed may have it renamed aside for a moment
                # before putting it back (claim): look once more before calling it lost.
                time.sleep(0.2)
                current, _ = self.read()
            if current is None or current.token != lease.token:
                raise LeaseLostError(_lost_to(current))
            # The window: between this check and the replace, no compare-and-swap (module doc).
            os.replace(tmp, self.path)
        finally:
            _unlink_quietly(tmp)
        return data

    def release(self, lease: Lease, version: Any) -> None:
        tomb = self._tombstone()
        try:
            os.rename(self.path, tomb)
        except FileNotFoundError:
            return
        moved = _decode(self._read_raw(tomb))
        if moved is None or moved.token != lease.token:
            self._put_back(tomb)  # not ours any more: leave the holder's record where it was
            return
        _unlink_quietly(tomb)


class _GcsStore(_Store):
    """GCS: every write and delete carries an ifGenerationMatch precondition."""

    def __init__(self, uri: str) -> None:
        self.fs, path = fs.filesystem(uri)
        self.bucket, self.key, _ = self.fs.split_path(path)

    def read(self) -> tuple[Lease | None, Any]:
        # The generation first, then the bytes: if the object changes in between, the bytes are
        # newer than the generation, and a write conditioned on that generation fails (412).
        try:
            meta = self.fs.call("GET", "b/{}/o/{}", self.bucket, self.key, json_out=True)
            _, data = self.fs.call("GET", "b/{}/o/{}", self.bucket, self.key, alt="media")
        except FileNotFoundError:
            return None, 0
        return _decode(data), int(meta["generation"])

    def _write(self, data: bytes, if_generation: int) -> int:
        out = self.fs.call(
            "POST", f"{self.fs._location}/upload/storage/v1/b/{self.bucket}/o",
            uploadType="media", name=self.key, ifGenerationMatch=str(if_generation),
            headers={"Content-Type": "application/octet-stream"}, data=data, json_out=True,
        )
        return int(out["generation"])

    def _ours_after_412(self, lease: Lease) -> int | None:
        """A 412 after a retried request may be our own first attempt, landed: our token says so."""
        current, gen = self.read()
        return gen if current is not None and current.token == lease.token else None

    def claim(self, lease: Lease) -> Any:
        current, gen = self.read()
        if current is not None and is_live(current):
            raise LeaseHeldError(current)
        try:
            return self._write(lease.encode(), gen)  # 0: must not exist; else: exactly the lapsed one
        except FileExistsError:  # 412
            ours = self._ours_after_412(lease)
            if ours is not None:
                return ours
            raise LeaseHeldError(self.read()[0]) from None

    def renew(self, lease: Lease, version: Any) -> Any:
        try:
            return self._write(lease.encode(), version)
        except FileExistsError:  # 412: someone replaced or removed our record
            ours = self._ours_after_412(lease)
            if ours is not None:
                return ours
            raise LeaseLostError(_lost_to(self.read()[0])) from None

    def release(self, lease: Lease, version: Any) -> None:
        try:
            self.fs.call("DELETE", "b/{}/o/{}", self.bucket, self.key, ifGenerationMatch=str(version))
        except (FileNotFoundError, FileExistsError):
            pass  # gone, or not ours any more: either way nothing of ours to remove


class _PlainStore(_Store):
    """Any other fsspec store (no compare-and-swap): write, settle, read back. Best effort only;
    run storage on GCS or a local disk gets the guarantees above."""

    SETTLE_S = 1.0

    def __init__(self, uri: str) -> None:
        self.uri = uri

    def read(self) -> tuple[Lease | None, Any]:
        try:
            return _decode(fs.read_bytes(self.uri)), None
        except FileNotFoundError:
            return None, None

    def claim(self, lease: Lease) -> Any:
        current, _ = self.read()
        if current is not None and is_live(current):
            raise LeaseHeldError(current)
        fs.write_bytes(self.uri, lease.encode())
        time.sleep(self.SETTLE_S)
        back, _ = self.read()
        if back is None or back.token != lease.token:
            raise LeaseHeldError(back)
        return None

    def renew(self, lease: Lease, version: Any) -> Any:
        current, _ = self.read()
        if current is None or current.token != lease.token:
            raise LeaseLostError(_lost_to(current))
        fs.write_bytes(self.uri, lease.encode())
        return None

    def release(self, lease: Lease, version: Any) -> None:
        current, _ = self.read()
        if current is not None and current.token == lease.token:
            fs.remove(self.uri)


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _lost_to(current: Lease | None) -> str:
    return (f"lost its lease to {current.describe()}" if current is not None
            else "lost its lease (the lease file is gone)")


def _store(run_dir: str) -> _Store:
    uri = lease_uri(run_dir)
    if fs.is_local(uri):
        return _LocalStore(uri)
    if uri.startswith(("gs://", "gcs://")):
        return _GcsStore(uri)
    return _PlainStore(uri)


@dataclass
class Held:
    """A lease this process holds: renew() and release() are conditional on `version`."""

    run_dir: str
    lease: Lease
    version: Any

    def renew(self, now: float | None = None) -> None:
        """Write a new heartbeat if, and only if, the lease is still ours; else LeaseLostError."""
        beat = Lease(**{**asdict(self.lease), "heartbeat_at": time.time() if now is None else now})
        self.version = _store(self.run_dir).renew(beat, self.version)
        self.lease = beat

    def release(self) -> None:
        _store(self.run_dir).release(self.lease, self.version)


def claim(run_dir: str, lease: Lease | None = None) -> Held:
    """Take the lease when it is free or lapsed; LeaseHeldError (naming the holder) when it is live
    or another claimant won the race."""
    lease = lease or new_lease()
    return Held(run_dir, lease, _store(run_dir).claim(lease))
