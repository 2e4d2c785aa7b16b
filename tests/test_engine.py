"""The driver's run engine (orchestrator/engine/): the state table, one end per attempt, and the
one thread that follows run storage."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest

from orchestrator.engine import (
    ALLOWED,
    MLFLOW_STATUS,
    Attempt,
    IllegalTransition,
    RunState,
    RunWatcher,
    check_move,
)
from orchestrator.engine import lease as driver_lease
from orchestrator.engine.record import RunRecord, load, save
from storage import lease as slease


def test_the_values_are_the_documented_state_strings():
    assert [s.value for s in RunState] == ["pending", "running", "interrupted", "completed", "failed", "damaged"]
    assert json.dumps({"state": RunState.RUNNING}) == '{"state": "running"}'
    assert f"{RunState.COMPLETED}" == "completed" and RunState("failed") is RunState.FAILED


@pytest.mark.parametrize("current", list(RunState))
@pytest.mark.parametrize("new", list(RunState))
def test_every_move_outside_the_table_raises(current: RunState, new: RunState):
    if new in ALLOWED[current]:
        assert check_move(current, new) is new
    else:
        with pytest.raises(IllegalTransition, match=f"{current.value} -> {new.value}"):
            check_move(current, new)


def test_the_table_has_the_moves_a_run_makes_and_no_others():
    assert ALLOWED[RunState.COMPLETED] == {RunState.RUNNING}
    assert ALLOWED[RunState.DAMAGED] == frozenset()
    assert RunState.PENDING not in set().union(*ALLOWED.values())  # nothing goes back to pending
    assert set(MLFLOW_STATUS) == {RunState.COMPLETED, RunState.FAILED, RunState.INTERRUPTED}


class _Calls:
    def __init__(self) -> None:
        self.ended: list[tuple[str, str | None, str]] = []
        self.copies = 0


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> _Calls:
    from orchestrator import tracking
    from workers import tracking_store

    c = _Calls()
    monkeypatch.setattr(tracking, "end_run", lambda uri, run_id, status: c.ended.append((uri, run_id, status)))

    def copy(uri, run_id, run_dir):
        c.copies += 1

    monkeypatch.setattr(tracking_store, "save_copy", copy)
    return c


def _record() -> RunRecord:
    return RunRecord(run_name="r", recipe={}, recipe_sha256="x", mlflow_run_id="abc", tracking_uri="sqlite:///m.db")


def test_finish_saves_ends_mlflow_and_copies_once(tmp_path: Path, calls: _Calls):
    rdir = str(tmp_path / "r")
    rec = _record()
    attempt = Attempt(rec, lambda: save(rdir, rec), store_copy_dir=rdir)
    attempt.begin()
    assert load(rdir).state == RunState.RUNNING and calls.copies == 1
    assert attempt.finish(RunState.FAILED, "boom")
    assert not attempt.finish(RunState.COMPLETED)  # a second end changes nothing
    assert not attempt.finish(RunState.FAILED, "again")
    on_disk = load(rdir)
    assert on_disk.state == RunState.FAILED and on_disk.error == "boom"
    assert json.loads((tmp_path / "r" / "run.json").read_text())["state"] == "failed"
    assert calls.ended == [("sqlite:///m.db", "abc", "FAILED")] and calls.copies == 2


@pytest.mark.parametrize(("state", "status"), [(RunState.COMPLETED, "FINISHED"), (RunState.INTERRUPTED, "KILLED")])
def test_finish_sets_the_matching_mlflow_status(tmp_path: Path, calls: _Calls, state: RunState, status: str):
    rec = _record()
    attempt = Attempt(rec, lambda: save(str(tmp_path), rec))
    attempt.begin()
    attempt.finish(state)
    assert calls.ended[-1][2] == status and calls.copies == 0  # no store_copy_dir: no copy


def test_finish_is_best_effort_when_storage_and_mlflow_are_down(tmp_path: Path, calls: _Calls, monkeypatch):
    from orchestrator import tracking
    from storage.errors import StorageError

    rec = _record()
    rec.state = RunState.RUNNING

    def down(*_):
        raise StorageError("gs://b/r/run.json: unavailable (test)")

    def mlflow_down(*_):
        raise ConnectionError("refused (test)")

    monkeypatch.setattr(tracking, "end_run", mlflow_down)
    attempt = Attempt(rec, down)
    assert attempt.finish(RunState.INTERRUPTED, "storage stopped answering")
    assert rec.state == RunState.INTERRUPTED and attempt.ended == RunState.INTERRUPTED


def test_an_attempt_cannot_end_in_a_state_that_is_not_an_end(tmp_path: Path, calls: _Calls):
    rec = _record()
    attempt = Attempt(rec, lambda: None)
    attempt.begin()
    with pytest.raises(IllegalTransition):
        attempt.finish(RunState.RUNNING)
    with pytest.raises(IllegalTransition):
        attempt.finish(RunState.PENDING)
    rec2 = _record()  # pending: never began
    with pytest.raises(IllegalTransition):
        Attempt(rec2, lambda: None).finish(RunState.COMPLETED)
    assert calls.ended == []


def test_a_record_with_an_unknown_state_is_named_damaged(tmp_path: Path):
    from common.errors import RunError

    (tmp_path / "run.json").write_text(json.dumps({**_record().__dict__, "state": "exploded"}))
    with pytest.raises(RunError, match="run.json: not a run record"):
        load(str(tmp_path))


def test_the_watcher_dispatches_progress_error_and_lease_from_one_thread(tmp_path: Path, monkeypatch):
    """Real files in a run folder: progress.json and error.json written as a worker would, the
    lease held and renewed; every callback runs on the watcher's one thread."""
    monkeypatch.setattr(driver_lease, "HEARTBEAT_S", 0.05)
    monkeypatch.setattr(driver_lease, "CHECK_S", 0.02)
    rdir = tmp_path / "r"
    seen: dict[str, list[tuple[str, object]]] = {"progress": [], "error": [], "lease": []}
    beat = driver_lease.DriverLease.beat

    def lease_tick(self: driver_lease.DriverLease) -> None:
        seen["lease"].append((threading.current_thread().name, None))
        beat(self)

    monkeypatch.setattr(driver_lease.DriverLease, "beat", lease_tick)
    with RunWatcher(str(rdir)) as watcher:
        with driver_lease.DriverLease(str(rdir), "r", watcher=watcher) as dl:
            watcher.watch_json("progress.json", 0.02,
                               lambda p: seen["progress"].append((threading.current_thread().name, p)))
            watcher.watch_json("error.json", 0.02,
                               lambda e: seen["error"].append((threading.current_thread().name, e)))
            (rdir / "progress.json").write_text(json.dumps({"global_step": 3}))
            (rdir / "error.json").write_text(json.dumps({"kind": "data", "error": "bad shard"}))
            first = slease.read(str(rdir)).heartbeat_at
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and not (
                    any(p == {"global_step": 3} for _, p in seen["progress"])
                    and any(e and e.get("kind") == "data" for _, e in seen["error"])
                    and slease.read(str(rdir)).heartbeat_at > first):
                time.sleep(0.02)
        assert dl.lost is None
    threads = {name for calls in seen.values() for name, _ in calls}
    assert threads == {watcher.thread.name}, threads
    assert all(seen.values())
    assert slease.read(str(rdir)) is None  # released on exit
    assert not watcher.thread.is_alive()


def test_a_hung_read_does_not_hold_up_the_other_entries(tmp_path: Path, monkeypatch):
    """A progress read stuck on a dropped mount: ticks (the lease's deadline) still run."""
    from storage import fs

    release, hung, ticked = threading.Event(), threading.Event(), threading.Event()
    real = fs.read_json

    def hanging(uri: str):
        if uri.endswith("progress.json"):
            hung.set()
            release.wait(10)
        return real(uri)

    def tick() -> None:
        if hung.is_set() and not release.is_set():  # only the ticks while the read hangs count
            ticks.append(1)
            if len(ticks) > 10:
                ticked.set()

    monkeypatch.setattr(fs, "read_json", hanging)
    ticks: list[int] = []
    with RunWatcher(str(tmp_path)) as watcher:
        watcher.watch_json("progress.json", 0.01, lambda p: None)
        watcher.every(0.01, tick)
        assert hung.wait(5), "the progress read never started"
        ticked.wait(5)
        release.set()
    assert len(ticks) > 10, "the hung read held up the other entries"


def test_a_removed_entry_is_not_called_again(tmp_path: Path):
    calls: list[int] = []
    with RunWatcher(str(tmp_path)) as watcher:
        entry = watcher.every(0.01, lambda: calls.append(1))
        time.sleep(0.2)
        watcher.remove(entry)
        n = len(calls)
        time.sleep(0.2)
    assert n > 0 and len(calls) in (n, n + 1)  # at most the tick already under way


def test_a_failing_callback_does_not_stop_the_others(tmp_path: Path):
    """A progress file of an unexpected shape breaks its callback; the lease's tick goes on."""
    (tmp_path / "progress.json").write_text("[1, 2]")
    ticks: list[int] = []

    def broken(p: object) -> None:
        raise KeyError("stage_index")

    with RunWatcher(str(tmp_path)) as watcher:
        watcher.watch_json("progress.json", 0.01, broken)
        watcher.every(0.01, lambda: ticks.append(1))
        time.sleep(0.3)
        assert watcher.thread.is_alive()
    assert len(ticks) > 5
