"""One driver per run, fenced (storage/lease.py, orchestrator/engine/lease.py): racing claims have exactly
one winner on a local disk and on GCS, a heartbeat that finds another holder or cannot renew past
the TTL gives the lease up and stops its run, and the chief's pre-commit check refuses a foreign token.

The GCS emulator (gcp-storage-emulator) ignores ifGenerationMatch altogether: the GCS tests reach it
through `PreconditionProxy`, which enforces GCS's documented precondition rule (a write or delete
with ifGenerationMatch=N succeeds only if the object's current generation is N, 0 meaning absent,
else 412), atomically per request. What is tested is therefore our client's use of preconditions
over real HTTP with real gcsfs, not GCS's own implementation of them.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import signal
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from urllib.parse import parse_qs, quote, unquote, urlsplit

import pytest

from common.errors import RunError
from orchestrator.engine import lease as driver_lease
from storage import fs as sfs
from storage import lease as slease
from tests import gcs_emulator as _emulator
from tests.fault_proxy import FaultProxy

gcs_emulator = _emulator.gcs_emulator  # fixture

ROUNDS = 100
RACE_PAUSE_S = 0.02


# ------------------------------------------------------------------------------ GCS preconditions
class PreconditionProxy(FaultProxy):
    """The fault proxy, plus GCS's ifGenerationMatch rule that the emulator lacks."""

    def __init__(self, upstream: str) -> None:
        super().__init__(upstream)
        self._cas = threading.Lock()
        self.refused_412 = 0

    def _generation(self, bucket: str, key: str) -> int:
        url = f"http://{self.upstream_host}:{self.upstream_port}/storage/v1/b/{bucket}/o/{quote(key, safe='')}"
        try:
            with urllib.request.urlopen(url, timeout=30) as r:
                return int(json.loads(r.read())["generation"])
        except urllib.error.HTTPError as exc:
            if exc.code == 404:
                return 0
            raise

    def _handle(self, h: BaseHTTPRequestHandler) -> None:
        u = urlsplit(h.path)
        q = parse_qs(u.query)
        if "ifGenerationMatch" not in q:
            return super()._handle(h)
        parts = u.path.split("/")  # .../b/<bucket>/o[/<key>]
        bucket = parts[parts.index("b") + 1]
        key = q["name"][0] if "name" in q else unquote(parts[parts.index("o") + 1])
        with self._cas:  # check and write as one step, as GCS does
            if self._generation(bucket, key) != int(q["ifGenerationMatch"][0]):
                length = int(h.headers.get("Content-Length") or 0)
                if length:
                    h.rfile.read(length)
                self.refused_412 += 1
                return self._reply(h, 412, {"error": {"code": 412, "message": "Precondition Failed"}})
            return super()._handle(h)


@pytest.fixture
def gcs_cas(gcs_emulator: str, monkeypatch: pytest.MonkeyPatch):
    """A fresh bucket behind a PreconditionProxy; yields gs://bucket."""
    import uuid

    bucket = f"lease-{uuid.uuid4().hex[:10]}"
    with PreconditionProxy(gcs_emulator) as proxy:
        monkeypatch.setenv("STORAGE_EMULATOR_HOST", proxy.url)
        monkeypatch.setenv("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
        sfs.reset_filesystems()
        _emulator.make_bucket(bucket)
        try:
            yield f"gs://{bucket}", proxy
        finally:
            sfs.reset_filesystems()


# ------------------------------------------------------------------------------ racing claims
def _claimer(run_dir: str, barrier, results, rounds: int) -> None:
    """One racing driver: at each round, after the barrier, claim the lease once.

    Two processes leaving a barrier start a millisecond or more apart, longer than a local claim
    takes; so that their claims interleave in every way (both read the same record before either
    writes, one writes between the other's read and write...), each read of the lease is followed
    by a random pause of up to RACE_PAUSE_S."""
    import random

    from storage import lease as proto

    rng = random.Random()
    for store in (proto._LocalStore, proto._GcsStore):
        def paused_read(self, _read=store.read):
            out = _read(self)
            time.sleep(rng.uniform(0, RACE_PAUSE_S))
            return out

        store.read = paused_read
    for i in range(rounds):
        barrier.wait(timeout=120)
        lease = proto.new_lease()
        try:
            proto.claim(run_dir, lease)
            results.put((i, lease.token, "won"))
        except proto.LeaseHeldError:
            results.put((i, lease.token, "refused"))
        except Exception as exc:  # noqa: BLE001 - reported to the parent, which fails the test
            results.put((i, lease.token, f"error {type(exc).__name__}: {exc}"))


def _lapsed(run_dir: str) -> None:
    """A lease left by a driver that died 10 minutes ago on another host."""
    then = time.time() - 600
    sfs.write_bytes(slease.lease_uri(run_dir), slease.Lease("elsewhere:1", "dead" * 8, then, then).encode())


def _remove(run_dir: str) -> None:
    """Clear the lease between rounds (one request on GCS, where fs.remove makes several)."""
    if sfs.is_local(run_dir):
        Path(slease.lease_uri(run_dir)).unlink(missing_ok=True)
        return
    store = slease._store(run_dir)
    try:
        store.fs.call("DELETE", "b/{}/o/{}", store.bucket, store.key)
    except FileNotFoundError:
        pass


def _race(run_dir: str, rounds: int = ROUNDS) -> dict[str, int]:
    """Two real processes claim together, `rounds` times: even rounds on no lease, odd ones on a
    lapsed one. Exactly one wins each round and the lease in storage is the winner's."""
    ctx = mp.get_context("spawn")
    barrier, results = ctx.Barrier(3), ctx.Queue()
    procs = [ctx.Process(target=_claimer, args=(run_dir, barrier, results, rounds), daemon=True) for _ in range(2)]
    for p in procs:
        p.start()
    tally = {"fresh": 0, "lapsed": 0}
    try:
        for i in range(rounds):
            _remove(run_dir)
            if i % 2:
                _lapsed(run_dir)
            barrier.wait(timeout=120)
            got = [results.get(timeout=120) for _ in range(2)]
            assert all(r[0] == i for r in got), got
            outcomes = sorted(r[2] for r in got)
            assert outcomes == ["refused", "won"], f"round {i}: {got}"
            winner = next(r[1] for r in got if r[2] == "won")
            assert slease.read(run_dir).token == winner, f"round {i}: the lease in storage is not the winner's"
            tally["lapsed" if i % 2 else "fresh"] += 1
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    return tally


def test_two_processes_claiming_one_local_lease_100_times_exactly_one_wins_each_time(tmp_path: Path):
    run_dir = str(tmp_path / "runs" / "r")
    sfs.makedirs(run_dir)
    assert _race(run_dir) == {"fresh": ROUNDS // 2, "lapsed": ROUNDS // 2}
    leftovers = [p.name for p in Path(run_dir).iterdir() if p.name != slease.LEASE_JSON]
    assert not leftovers, f"tombstones or temporary files left behind: {leftovers}"


def test_two_processes_claiming_one_gcs_lease_100_times_exactly_one_wins_each_time(gcs_cas):
    bucket, proxy = gcs_cas
    assert _race(f"{bucket}/runs/r") == {"fresh": ROUNDS // 2, "lapsed": ROUNDS // 2}
    assert proxy.refused_412 > 0  # the losers lost on the precondition, not only on a read


def test_a_late_gcs_write_cannot_overwrite_the_winner(gcs_cas):
    """Write-sleep-read let two claims both win when a write landed late; with a precondition the
    late one fails, and a renewal by a driver whose lease was taken over is refused too."""
    bucket, _ = gcs_cas
    run_dir = f"{bucket}/runs/r"
    _lapsed(run_dir)
    store = slease._store(run_dir)
    _, seen = store.read()  # both racers judged the same lapsed generation
    first, late = slease.new_lease(), slease.new_lease()
    store._write(first.encode(), seen)
    with pytest.raises(FileExistsError):
        store._write(late.encode(), seen)
    assert slease.read(run_dir).token == first.token
    # The winner's own renewals go on; a zombie holding an older generation is told it lost.
    held = slease.Held(run_dir, first, store.read()[1])
    held.renew()
    zombie = slease.Held(run_dir, late, seen)
    with pytest.raises(slease.LeaseLostError, match="lost its lease to"):
        zombie.renew()
    assert slease.read(run_dir).token == first.token
    zombie.release()  # a release conditioned on a generation not its own removes nothing
    assert slease.read(run_dir).token == first.token
    held.release()
    assert slease.read(run_dir) is None


# ------------------------------------------------------------------------------ the heartbeat
@pytest.fixture
def fast_lease(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(slease, "LEASE_TTL_S", 1.5)
    monkeypatch.setattr(driver_lease, "HEARTBEAT_S", 0.1)
    monkeypatch.setattr(driver_lease, "CHECK_S", 0.05)
    monkeypatch.setattr(driver_lease, "LOSS_MARGIN_S", 0.5)
    # The heartbeat interrupts with _thread.interrupt_main(), a no-op unless Python handles SIGINT:
    # whatever an earlier test left installed, these tests get the KeyboardInterrupt a driver gets.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def _wait_for_interrupt(seconds: float = 30) -> None:
    """Stand in for training: the heartbeat's interrupt (a KeyboardInterrupt) ends it."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        time.sleep(0.01)
    raise AssertionError("the heartbeat never stopped the run")


def _assert_interrupted(err: pytest.ExceptionInfo) -> None:
    """The lost-lease error replaced the heartbeat's KeyboardInterrupt, not _wait_for_interrupt's timeout
    (DriverLease.__exit__ turns either into the same RunError)."""
    assert isinstance(err.value.__context__, KeyboardInterrupt), repr(err.value.__context__)


def test_a_heartbeat_that_finds_another_holder_stops_the_run(tmp_path: Path, fast_lease):
    run_dir = str(tmp_path / "r")
    other = slease.new_lease()
    with pytest.raises(RunError, match="lost its lease to .*stopped without committing") as err:
        with driver_lease.DriverLease(run_dir, "r") as dl:
            assert slease.read(run_dir).token == dl.token
            # Another driver overwrote the lease (a Drive folder shared by two VMs, or a clock jump).
            sfs.write_bytes(slease.lease_uri(run_dir), other.encode())
            _wait_for_interrupt()
    _assert_interrupted(err)
    assert getattr(err.value, "lease_lost", False)
    assert slease.read(run_dir).token == other.token  # the loser's exit left the holder's lease alone
    with pytest.raises(slease.LeaseLostError):
        slease.check_holder(run_dir, dl.token)


def test_a_driver_whose_storage_stalls_past_the_ttl_stops_and_cannot_commit(tmp_path: Path, fast_lease, monkeypatch):
    """Driver A's renewals hang; after the TTL driver B takes the lapsed lease over; A gives the lease
    up on its own deadline, and when its storage comes back its stalled renewal does not overwrite B."""
    run_dir = str(tmp_path / "r")
    stalled, back, returned = threading.Event(), threading.Event(), threading.Event()
    renew = slease.Held.renew

    def hanging_renew(self):
        stalled.set()
        back.wait(60)
        try:
            return renew(self)
        finally:
            returned.set()

    with pytest.raises(RunError, match="could not renew its lease for .* stopped without committing") as err:
        with driver_lease.DriverLease(run_dir, "r") as a:
            monkeypatch.setattr(slease.Held, "renew", hanging_renew)
            assert stalled.wait(10)
            try:
                _wait_for_interrupt()
            finally:
                monkeypatch.setattr(slease.Held, "renew", renew)
    _assert_interrupted(err)
    assert a.lost and "could not renew" in a.lost
    # A's lease lapsed in storage: B takes it over, then A's storage comes back.
    deadline = time.monotonic() + 10
    while slease.is_live(slease.read(run_dir)) and time.monotonic() < deadline:
        time.sleep(0.05)
    b = slease.claim(run_dir)
    back.set()
    assert returned.wait(10), "A's stalled renewal never came back"
    assert slease.read(run_dir).token == b.lease.token  # A's late renewal found B and wrote nothing
    with pytest.raises(slease.LeaseLostError, match="lost its lease to"):
        slease.check_holder(run_dir, a.token)  # what A's chief would call before committing
    slease.check_holder(run_dir, b.lease.token)


def test_renewals_that_fail_past_the_ttl_stop_the_run(tmp_path: Path, fast_lease, monkeypatch):
    run_dir = str(tmp_path / "r")

    def failing_renew(self):
        raise OSError(5, "Input/output error (injected)")

    with pytest.raises(RunError, match="could not renew its lease .*OSError.*injected") as err:
        with driver_lease.DriverLease(run_dir, "r"):
            monkeypatch.setattr(slease.Held, "renew", failing_renew)
            _wait_for_interrupt()
    _assert_interrupted(err)


def test_renewals_that_meet_a_dropped_mount_stop_the_run_naming_the_remount(tmp_path: Path, fast_lease, monkeypatch):
    """Colab's Drive mount dropping under run storage: the driver stops with what to do, not an OSError."""
    run_dir = str(tmp_path / "r")

    def dropped(self):
        raise OSError(107, "Transport endpoint is not connected")

    with pytest.raises(RunError,
                       match=r"stopped: its run storage stopped answering .*force_remount=True.*same command") as err:
        with driver_lease.DriverLease(run_dir, "r"):
            monkeypatch.setattr(slease.Held, "renew", dropped)
            _wait_for_interrupt()
    _assert_interrupted(err)


def test_a_live_lease_refuses_a_second_driver_and_a_released_one_is_gone(tmp_path: Path, fast_lease):
    run_dir = str(tmp_path / "r")
    with driver_lease.DriverLease(run_dir, "r") as a:
        time.sleep(0.3)  # a few heartbeats
        assert slease.read(run_dir).heartbeat_at > a.lease.acquired_at
        with pytest.raises(RunError, match="is being driven by .*since"):
            driver_lease.DriverLease(run_dir, "r").acquire()
        a.verify()
    assert slease.read(run_dir) is None and a.lost is None


# ------------------------------------------------------------------------------ pre-commit check
def test_check_holder_refuses_a_foreign_token_a_missing_lease_and_a_lapsed_one(tmp_path: Path, monkeypatch):
    run_dir = str(tmp_path / "r")
    with pytest.raises(slease.LeaseLostError, match="gone"):
        slease.check_holder(run_dir, "mine")
    held = slease.claim(run_dir)
    slease.check_holder(run_dir, held.lease.token)
    with pytest.raises(slease.LeaseLostError, match="this driver lost its lease to"):
        slease.check_holder(run_dir, "someone-else")
    monkeypatch.setattr(slease, "LEASE_TTL_S", 0.0)
    time.sleep(0.01)
    with pytest.raises(slease.LeaseLostError, match="lapsed"):
        slease.check_holder(run_dir, held.lease.token)


def test_a_lapsed_lease_is_moved_aside_never_unlinked_blind(tmp_path: Path, monkeypatch):
    """If the record changed between the read and the rename, the rename caught a live lease: it goes back."""
    run_dir = str(tmp_path / "r")
    _lapsed(run_dir)
    path = Path(slease.lease_uri(run_dir))
    live = slease.new_lease()
    real_rename = slease.os.rename

    def renewed_just_before(src, dst):
        if dst.startswith(str(path) + ".lapsed-"):
            path.write_bytes(live.encode())  # the holder came back and renewed in between
        return real_rename(src, dst)

    monkeypatch.setattr(slease.os, "rename", renewed_just_before)
    with pytest.raises(slease.LeaseHeldError):
        slease.claim(run_dir)
    assert slease.read(run_dir).token == live.token
    assert [p.name for p in path.parent.iterdir()] == [slease.LEASE_JSON]
