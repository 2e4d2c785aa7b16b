"""An MLflow server that goes down mid-run: training goes on, the points wait in the chief's
buffer (workers/mlflow_sink.py) and land once the server is back, one per (metric, step)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import (
    kill_group,
    run_cli,
    slow_recipe,
    start_cli,
    status_json,
    wait_for_cursor,
    write_recipe,
)
from tests.gcs_emulator import free_port


class MlflowServer:
    """A real `mlflow server` on loopback over one sqlite file; stop() is a SIGKILL."""

    def __init__(self, root: Path) -> None:
        self.root, self.port, self.proc = root, free_port(), None
        self.uri = f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 120) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(self.port), "--workers",
             "1",
             "--backend-store-uri", f"sqlite:///{self.root / 'server.db'}",
             "--artifacts-destination", str(self.root / "server-artifacts")],
            cwd=self.root, stdout=(self.root / "server.log").open("a"), stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, (self.root / "server.log").read_text()[-3000:]
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.2)
        raise AssertionError("mlflow server did not start")

    def stop(self) -> None:
        if self.proc is not None:
            kill_group(self.proc)
            self.proc = None


@pytest.fixture(scope="session")
def migrated_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An empty MLflow sqlite store with every migration applied, made once per session: a server
    given a copy of it starts without migrating (about 5 s less per server on 2 cores)."""
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    d = tmp_path_factory.mktemp("mlflow-migrated")
    store = SqlAlchemyStore(f"sqlite:///{d / 'server.db'}", str(d / "artifacts"))
    store.engine.dispose()
    return d / "server.db"


@pytest.fixture
def server(tmp_path, migrated_db):
    import shutil

    shutil.copy(migrated_db, tmp_path / "server.db")
    srv = MlflowServer(tmp_path)
    srv.start()
    yield srv
    srv.stop()


def test_an_mlflow_outage_mid_run_loses_no_point_and_stops_no_training(tmp_path, tiny_dataset, reference_sha, server,
                                                                       monkeypatch):
    monkeypatch.setenv("ORCHESTRATOR_MLFLOW_RETRY_S", "0.5")
    # The run may reach its end before the server is back (a restart took over a minute on a loaded
    # 2-core machine): its end waits for MLflow, here long enough for any restart.
    monkeypatch.setenv("ORCHESTRATOR_MLFLOW_FINAL_WAIT_S", "200")
    recipe = slow_recipe(tiny_dataset)
    recipe["tracking"]["uri"] = server.uri
    path = write_recipe(tmp_path / "r.yaml", recipe)
    proc = start_cli("run", path, cwd=tmp_path, log=tmp_path / "run.log")
    run_dir = tmp_path / "runs" / "tiny"
    try:
        down_at = wait_for_cursor(run_dir, lambda c: c["global_step"] >= 10, proc)["global_step"]
        server.stop()
        # Training goes on without MLflow for a few checkpoints (or to its end: the run then waits for it).
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                if wait_for_cursor(run_dir, lambda c: c["global_step"] >= down_at + 20 or c["done"], proc, timeout=1):
                    break
            except AssertionError:
                continue
        server.start()
        assert proc.wait(timeout=240) == 0, (tmp_path / "run.log").read_text()[-4000:]
    finally:
        kill_group(proc)
    log = (tmp_path / "run.log").read_text()
    assert log.count("unreachable") >= 1 and "buffering metrics, training goes on" in log, log[-4000:]
    assert "reachable again after" in log and "Traceback" not in log, log[-4000:]
    assert "still unreachable at the end" not in log, log[-4000:]

    st = status_json(tmp_path)
    assert st["state"] == "completed" and st["interruptions"] == 0
    assert st["final"]["weights_sha256"] == reference_sha, "an MLflow outage changed the training"

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=server.uri)
    run_id = st["mlflow_run_id"]
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["orchestrator.weights_sha256"] == reference_sha
    steps = sorted(m.step for m in client.get_metric_history(run_id, "train/loss"))
    assert steps == list(range(1, st["global_step"] + 1)), "not exactly one train/loss point per step"
    for key in run.data.metrics:
        steps = [m.step for m in client.get_metric_history(run_id, key)]
        assert len(steps) == len(set(steps)), f"{key}: a step logged twice"
    top = {a.path for a in client.list_artifacts(run_id)}
    assert {"model", "predictions", "final.json"} <= top
    assert len(client.list_artifacts(run_id, "predictions")) == 3  # one grid per stage
    from workers.mlflow_sink import has_leftovers

    assert not has_leftovers(str(run_dir))




def test_a_run_killed_during_an_outage_resumes_and_ends_with_mlflow_down_then_delivers_everything(
        tmp_path, tiny_dataset, reference_sha, server, monkeypatch):
    """The points MLflow did not take stay pending in every checkpoint: a process lost while
    MLflow is down loses none of them. The resumed one (MLflow still down) completes the run and
    leaves what it could not send in run storage; the next `orchestrator run`, MLflow back,
    sends it: one point per (metric, step), the artifacts, and the run FINISHED."""
    monkeypatch.setenv("ORCHESTRATOR_MLFLOW_RETRY_S", "0.5")
    monkeypatch.setenv("ORCHESTRATOR_MLFLOW_FINAL_WAIT_S", "1")
    recipe = slow_recipe(tiny_dataset)
    recipe["tracking"]["uri"] = server.uri
    path = write_recipe(tmp_path / "r.yaml", recipe)
    proc = start_cli("run", path, cwd=tmp_path, log=tmp_path / "run.log")
    run_dir = tmp_path / "runs" / "tiny"
    try:
        down_at = wait_for_cursor(run_dir, lambda c: c["global_step"] >= 10, proc)["global_step"]
        server.stop()
        wait_for_cursor(run_dir, lambda c: c["global_step"] >= down_at + 15, proc)  # three checkpoints with MLflow down
    finally:
        kill_group(proc)
    assert "buffering metrics, training goes on" in (tmp_path / "run.log").read_text()

    res = run_cli("run", path, cwd=tmp_path)  # MLflow still down: the run resumes and completes
    assert res.returncode == 0, res.stderr[-4000:]
    assert "still unreachable at the end of the run" in res.stderr and "Traceback" not in res.stderr, res.stderr[-4000:]
    assert (run_dir / "mlflow-spill").is_dir()

    server.start()
    res = run_cli("run", path, cwd=tmp_path)  # already completed: sends what was left
    assert res.returncode == 0 and "already completed" in res.stdout + res.stderr, res.stderr[-4000:]
    from workers.mlflow_sink import has_leftovers

    assert not has_leftovers(str(run_dir))

    st = status_json(tmp_path)
    assert st["state"] == "completed" and st["interruptions"] == 1
    assert st["final"]["weights_sha256"] == reference_sha
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=server.uri)
    run = client.get_run(st["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.tags["orchestrator.weights_sha256"] == reference_sha
    steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, "train/loss"))
    assert steps == list(range(1, st["global_step"] + 1)), "not exactly one train/loss point per step"
    for key in run.data.metrics:
        steps = [m.step for m in client.get_metric_history(run.info.run_id, key)]
        assert len(steps) == len(set(steps)), f"{key}: a step logged twice"
    top = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"model", "final.json"} <= top


# ------------------------------------------------------------- the sink on its own (no server)
class FakeClient:
    """MLflow's client as the sink uses it; `down` makes every call fail as a refused connection,
    `lose_reply` makes the next log_batch land and then fail (its reply lost)."""

    def __init__(self) -> None:
        self.points: list[tuple[str, float, int]] = []
        self.tags: dict[str, str] = {}
        self.artifacts: list[tuple[str, str | None, bytes]] = []
        self.down = False
        self.lose_reply = False
        self.calls = 0

    def _gate(self) -> None:
        from mlflow.exceptions import MlflowException

        self.calls += 1
        if self.down:
            raise MlflowException("API request to http://user:hunter2@mlflow.example:5000/api failed with exception "
                                  "Connection refused", error_code="INTERNAL_ERROR")

    def get_metric_history(self, run_id, key):
        self._gate()
        return [type("M", (), {"step": s})() for k, _, s in self.points if k == key]

    def log_batch(self, run_id, metrics=(), tags=()):
        self._gate()
        self.points += [(m.key, m.value, m.step) for m in metrics or ()]
        self.tags.update({t.key: t.value for t in tags or ()})
        if self.lose_reply:
            self.lose_reply = False
            import requests

            raise requests.exceptions.ReadTimeout("read timed out")

    def log_artifact(self, run_id, path, artifact_path=None):
        self._gate()
        self.artifacts.append((os.path.basename(path), artifact_path, Path(path).read_bytes()))


def _sink(run_dir: Path, client: FakeClient, monkeypatch, bound: int = 100_000):
    from workers import mlflow_sink

    monkeypatch.setattr(mlflow_sink, "RETRY_S", 0.0)
    monkeypatch.setattr(mlflow_sink, "MAX_BUFFER", bound)
    sink = mlflow_sink.MlflowSink("http://user:hunter2@mlflow.example:5000", "run1", str(run_dir))
    sink.client = client
    return sink


def _pts(a: int, b: int) -> list[tuple[str, float, int]]:
    return [("train/loss", float(s), s) for s in range(a, b)]


def test_the_sink_keeps_points_tags_and_artifacts_through_an_outage_and_sends_each_once(tmp_path, monkeypatch, caplog):
    client = FakeClient()
    sink = _sink(tmp_path, client, monkeypatch)
    sink.log_metrics(_pts(1, 6))
    client.down = True
    sink.log_metrics(_pts(6, 11))  # no raise into training
    sink.set_tags({"orchestrator.checkpoint.latest": "ckpt-2"})
    art = tmp_path / "grid.png"
    art.write_bytes(b"png")
    sink.log_artifact(str(art), "predictions")
    art.unlink()  # the caller's temporary folder is gone; the sink kept a copy
    # The trainer hands the undelivered points over again with the next checkpoint's.
    assert sink.undelivered() == _pts(6, 11)
    sink.log_metrics(sink.undelivered() + _pts(11, 16))
    client.down = False
    client.lose_reply = True  # the first batch after the outage lands, its reply does not
    sink.log_metrics(_pts(16, 21))
    sink.log_metrics(sink.undelivered() + _pts(21, 26))
    sink.log_metrics(_pts(16, 26))  # points already sent, handed over again: skipped
    assert sink.close(wait_s=0) is True
    assert [s for _, _, s in client.points] == list(range(1, 26)), "not one point per step, in order"
    assert client.tags == {"orchestrator.checkpoint.latest": "ckpt-2"}
    assert client.artifacts == [("grid.png", "predictions", b"png")]
    lines = [r.getMessage() for r in caplog.records if r.name == "workers.mlflow_sink"]
    assert len(lines) == 2, lines
    assert "unreachable" in lines[0] and "buffering metrics, training goes on" in lines[0]
    assert "reachable again" in lines[1] and "flushed 20 points, 1 tags, 1 artifacts" in lines[1]
    assert "hunter2" not in caplog.text


def test_the_studys_sink_sends_each_key_and_step_once_in_any_order_across_attempts(monkeypatch):
    """any_order (the study: layers come back as their tasks finish): a lower step after a higher
    one still goes out, a repeat does not, points wait for flush_every_s, and a second attempt
    that loads what MLflow holds sends only what is new."""
    from workers import mlflow_sink

    monkeypatch.setattr(mlflow_sink, "RETRY_S", 0.0)
    client = FakeClient()

    def study_sink() -> mlflow_sink.MlflowSink:
        sink = mlflow_sink.MlflowSink("sqlite:///unused.db", "run1", any_order=True, flush_every_s=3600)
        sink.client = client
        return sink

    first = study_sink()
    first.log_metrics([("study/a/rms", 0.5, 7), ("study/a/rms", 0.4, 2)])
    first.set_tags({"orchestrator.study.a.layers_done": "2/9"})
    assert client.points == [] and client.tags == {}  # held for the next flush
    first.log_metrics([("study/a/rms", 0.4, 2), ("study/a/rms", 0.3, 0)])  # a repeat, and a lower step
    assert first.flush(force=True)
    assert sorted(s for _, _, s in client.points) == [0, 2, 7]
    assert client.tags == {"orchestrator.study.a.layers_done": "2/9"}
    first.log_metrics([("study/a/rms", 0.4, 2)])
    assert first.flush(force=True) and len(client.points) == 3  # sent once, whatever is handed over again

    second = study_sink()  # a resumed study: its committed results are logged again
    second.load_held(["study/a/rms"])
    second.log_metrics([("study/a/rms", 0.5, 7), ("study/a/rms", 0.4, 2), ("study/a/rms", 0.6, 5)])
    assert second.flush(force=True)
    assert sorted(s for _, _, s in client.points) == [0, 2, 5, 7]


def test_over_the_bound_points_go_to_run_storage_and_a_later_process_sends_them(tmp_path, monkeypatch, caplog):
    from workers.mlflow_sink import has_leftovers

    client = FakeClient()
    client.down = True
    sink = _sink(tmp_path, client, monkeypatch, bound=10)
    sink.log_metrics(_pts(1, 8))
    sink.log_metrics(_pts(8, 15))  # 14 > 10: to run storage, memory starts again
    assert sink.undelivered() == [] and len(os.listdir(tmp_path / "mlflow-spill")) == 1
    assert "saved to" in caplog.text and "over the bound of 10" in caplog.text
    sink.log_metrics(_pts(15, 18))
    sink.set_tags({"t": "1"})
    model = tmp_path / "state_dict.pt"
    model.write_bytes(b"weights")
    sink.log_artifact(str(model), "model")
    assert sink.close(wait_s=0) is False  # still down at the end: the run completes all the same
    end = [r.getMessage() for r in caplog.records if "at the end of the run" in r.getMessage()]
    assert len(end) == 1 and "17 metric points" in end[0] and "1 tags and 1 artifacts (state_dict.pt)" in end[0], end
    assert str(tmp_path / "mlflow-spill") in end[0] and "hunter2" not in caplog.text
    assert has_leftovers(str(tmp_path))

    # The next process (a resume) finds them and sends them, oldest first, none twice.
    client.down = False
    client.points = [("train/loss", 1.0, 1)]  # one of them had landed before the cut
    nxt = _sink(tmp_path, client, monkeypatch)
    nxt.log_metrics([], dedupe=True)
    nxt.resume({"train/loss"})
    assert [s for _, _, s in client.points] == list(range(1, 18))
    assert client.tags == {"t": "1"} and client.artifacts == [("state_dict.pt", "model", b"weights")]
    assert not has_leftovers(str(tmp_path))
    assert nxt.floor["train/loss"] == 17  # re-trained steps at or below are not sent again


def test_a_request_mlflow_refuses_still_raises(tmp_path, monkeypatch):
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

    client = FakeClient()
    sink = _sink(tmp_path, client, monkeypatch)

    def refuse(*a, **k):
        raise MlflowException("bad metric", error_code=INVALID_PARAMETER_VALUE)  # a 400

    client.log_batch = refuse
    with pytest.raises(MlflowException):
        sink.log_metrics(_pts(1, 3))


def test_the_drivers_end_of_run_call_warns_when_mlflow_is_down(caplog):
    from orchestrator import tracking
    from tests.gcs_emulator import free_port

    uri = f"http://user:hunter2@127.0.0.1:{free_port()}"
    tracking.end_run(uri, "0123456789abcdef", "FINISHED")  # no traceback
    assert "unreachable: could not mark MLflow run 0123456789abcdef FINISHED" in caplog.text
    assert "hunter2" not in caplog.text and "Retrying" not in caplog.text


def test_a_background_sink_keeps_what_it_is_given_until_its_client_is_made(tmp_path, monkeypatch):
    """The training worker's sink makes its MLflow client in a thread: what it is given before the
    client exists is kept (not lost, not an outage) and sent once it does; a client that cannot be
    made raises where it is first needed, as it did when it was made at once."""
    import threading

    from mlflow.tracking import MlflowClient

    from workers import mlflow_client, mlflow_sink

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_id = MlflowClient(uri).create_run(MlflowClient(uri).create_experiment("bg")).info.run_id
    gate = threading.Event()
    real = mlflow_client.ClientMaker._make

    def slow(self):
        gate.wait(30)
        real(self)

    monkeypatch.setattr(mlflow_client.ClientMaker, "_make", slow)
    sink = mlflow_sink.MlflowSink(uri, run_id, str(tmp_path / "run"), background=True)
    sink.log_metrics([("train/loss", 0.5, 1), ("train/loss", 0.25, 2)])
    sink.set_tags({"orchestrator.precision": "fp32"})
    assert sink.flush() is False and sink.undelivered() == [("train/loss", 0.5, 1), ("train/loss", 0.25, 2)]
    sink.connect()  # the trainer's call after its first step: the client is made in a thread
    assert sink.flush() is False  # not made yet (held at the gate): still kept
    gate.set()
    assert sink.close(wait_s=10) is True
    got = MlflowClient(uri)
    assert [(m.step, m.value) for m in got.get_metric_history(run_id, "train/loss")] == [(1, 0.5), (2, 0.25)]
    assert got.get_run(run_id).data.tags["orchestrator.precision"] == "fp32"
    assert not (tmp_path / "run" / mlflow_sink.SPILL_DIR).exists()  # nothing was taken for an outage

    def broken(self):
        self._error = ValueError("no such tracking store")

    monkeypatch.setattr(mlflow_client.ClientMaker, "_make", broken)
    bad = mlflow_sink.MlflowSink(uri, run_id, None, background=True)
    bad.log_metrics([("train/loss", 1.0, 3)])  # kept: no client yet
    with pytest.raises(ValueError, match="no such tracking store"):
        bad.flush(force=True)
