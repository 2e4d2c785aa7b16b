"""The chief worker's line to MLflow: committed metrics, prediction grids, checkpoint URIs.

The driver creates the MLflow run; the worker only appends to it by id, so every restart
of every process writes into the same run.

An MLflow server that is down (a connection refused, a timeout, a 5xx) never raises into
training. The sink's own calls retry once, at once (MLflow's defaults, 7 retries with a backoff
of 2 s doubling to a 120 s cap and 120 s a request, would hold the training thread about four
minutes per call), then it keeps what it could not send and training goes on:

- metric points in memory, in order, up to MAX_BUFFER of them. They are also kept pending in
  the trainer's state (workers/train/checkpointer.py), so every checkpoint carries the points MLflow has not
  taken yet, and a process lost during an outage re-sends them from its checkpoint on resume.
  At the bound the buffer goes to run storage (<run>/mlflow-spill/NNNNNN.json, one warning
  line) and memory starts again: nothing is dropped, memory and checkpoints stay bounded.
- tags (the latest value per key) and artifacts (a copy of the file) in memory.

While MLflow is down it is tried again at most every RETRY_S seconds; the first call that
gets through sends everything kept, oldest first, after asking MLflow which steps it already
holds (a batch whose reply was lost is not sent twice): one point per (metric, step).
One warning line when the outage starts, one when it ends. close() at the run's end waits a
bounded time (FINAL_WAIT_S) for MLflow; whatever is still not delivered then goes to run
storage, named in one warning line.

The study (orchestrator/study/) uses the same sink with `any_order`: its layers come back as
their tasks finish, so there is no per-metric floor; every (key, step) MLflow holds is kept in
`held` (load_held() on resume) and a point is sent only when it is not there. `flush_every_s`
sends at most that often (one sqlite write costs ~40 ms; a small model's layer takes less);
flush(force=True) sends at once.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from common.redact import redact_text
from workers.mlflow_client import ClientMaker

log = logging.getLogger(__name__)

MAX_BATCH = 1000  # MLflow's limit of metrics per log_batch call
MAX_BUFFER = int(os.environ.get("ORCHESTRATOR_MLFLOW_BUFFER", "100000"))  # points kept in memory during an outage
RETRY_S = float(os.environ.get("ORCHESTRATOR_MLFLOW_RETRY_S", "15"))  # while down, one try per this many seconds
FINAL_WAIT_S = float(os.environ.get("ORCHESTRATOR_MLFLOW_FINAL_WAIT_S", "60"))  # at the run's end
SPILL_DIR = "mlflow-spill"

# The sink's own HTTP settings, where the user has not set MLflow's: one immediate retry and a
# short timeout, so a server that is down costs the training thread seconds, not minutes.
_QUICK_HTTP = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
               "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}
_ARTIFACT_TIMEOUT = "60"  # an upload (the final model) may take longer than a metric batch

Point = tuple[str, float, int]
TAGS_JSON = "tags.json"
ARTIFACTS_DIR = "artifacts"


@dataclass
class _Artifact:
    name: str
    artifact_path: str | None
    local: str | None  # a copy on this machine
    stored: str | None = None  # <run>/mlflow-spill/artifacts/NNNN (.json, .data) while MLflow is down


def has_leftovers(run_dir: str) -> bool:
    """Whether a process left points, tags or artifacts in run storage for MLflow."""
    from storage import fs

    spill = f"{run_dir.rstrip('/')}/{SPILL_DIR}"
    names = fs.listdir(spill)
    if any(n[:1].isdigit() or n == TAGS_JSON for n in names):
        return True
    return ARTIFACTS_DIR in names and any(n.endswith(".json") for n in fs.listdir(f"{spill}/{ARTIFACTS_DIR}"))


@contextmanager
def quick_http(timeout: str | None = None, retries: str | None = None) -> Iterator[None]:
    """MLflow's HTTP settings for the calls inside (those the user set stay as set)."""
    wanted = dict(_QUICK_HTTP)
    if timeout is not None:
        wanted["MLFLOW_HTTP_REQUEST_TIMEOUT"] = timeout
    if retries is not None:
        wanted["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = retries
    set_here = {k: v for k, v in wanted.items() if k not in os.environ}
    os.environ.update(set_here)
    pool_log = logging.getLogger("urllib3.connectionpool")
    pool_log.addFilter(_no_retry_lines)  # a line per retry; the sink says it once
    try:
        yield
    finally:
        pool_log.removeFilter(_no_retry_lines)
        for k in set_here:
            os.environ.pop(k, None)


def _no_retry_lines(record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith("Retrying")


def is_transient(exc: BaseException) -> bool:
    """An outage (no connection, a timeout, a 5xx, 408/429), not a request MLflow refuses."""
    import requests
    from mlflow.exceptions import MlflowException

    if isinstance(exc, requests.exceptions.HTTPError) and exc.response is not None:
        code = exc.response.status_code
        return code >= 500 or code in (408, 429)
    if isinstance(exc, (requests.exceptions.RequestException, OSError, TimeoutError)):
        return True
    if isinstance(exc, MlflowException):
        code = exc.get_http_status_code()
        return code >= 500 or code in (408, 429)
    return False


class _Down(Exception):
    """MLflow could not be reached; carries the cause."""


class MlflowSink:
    def __init__(self, tracking_uri: str, run_id: str, run_dir: str | None = None, any_order: bool = False,
                 flush_every_s: float = 0.0, background: bool = False) -> None:
        # With `background` (the training worker's sink) the client is made after connect(), in a
        # thread (workers/mlflow_client.py); until then flush() keeps what it is given, as while
        # MLflow is down (quietly: nothing is down), and a forced flush makes it at once.
        self._clients = ClientMaker(tracking_uri, background)
        self.run_id = run_id
        self.where = redact_text(tracking_uri)
        # Per metric, the highest step MLflow already held when this process resumed. Steps at or
        # below it are being trained again after a cut; their points are not sent twice.
        self.floor: dict[str, int] = {}
        self._floor_keys: set[str] | None = None  # resume() could not ask MLflow: asked at the next contact
        self._buffer: list[Point] = []  # committed points MLflow has not taken yet, oldest first
        self._buffered: set[tuple[str, int]] = set()
        self._dedupe = False  # ask MLflow which steps it holds before sending the buffer
        self._tags: dict[str, str] = {}
        self._artifacts: list[_Artifact] = []
        self._artifact_tmp: str | None = None
        self._spill_dir = f"{run_dir.rstrip('/')}/{SPILL_DIR}" if run_dir else None
        # Left by an earlier process (lost during an outage, or a run that ended with MLflow down): sent first.
        self._spilled = self._list_spill()
        self._tags_stored = self._load_stored_tags()
        self._artifacts += self._list_stored_artifacts()
        self._down_since: float | None = None
        self._next_try = 0.0
        self.any_order = any_order
        self.held: set[tuple[str, int]] = set()  # any_order: every (key, step) MLflow holds
        self.flush_every_s = flush_every_s
        self._flushed_at = time.monotonic()

    def connect(self) -> None:
        """Begin making the client in the background (a `background` sink; once)."""
        self._clients.start()

    @property
    def client(self) -> Any:
        return self._clients.get()

    @client.setter
    def client(self, client: Any) -> None:
        self._clients.set(client)

    # ----------------------------------------------------------------- public
    def resume(self, keys: set[str]) -> None:
        self._floor_keys = set(keys)
        self.flush()

    def load_held(self, keys: list[str]) -> None:
        """any_order: what MLflow already holds for `keys` (a resumed study: points sent before the cut)."""
        for key in keys:
            self.held.update((key, m.step) for m in self.client.get_metric_history(self.run_id, key))

    def log_metrics(self, points: list[Point], dedupe: bool = False) -> None:
        """Send (key, value, step) points, or keep them if MLflow is down. With dedupe, points
        MLflow already holds are skipped, which makes re-sending a restored checkpoint's pending
        points idempotent. A point already kept (the same metric and step) is not kept twice."""
        if dedupe and points:
            self._dedupe = True
        for k, v, s in points:
            if (k, int(s)) not in self._buffered and self._fresh(k, int(s)):
                self._buffer.append((k, float(v), int(s)))
                self._buffered.add((k, int(s)))
        if not self._flush_if_due() and len(self._buffer) > MAX_BUFFER:
            self._spill()

    def log_artifact(self, local_path: str, artifact_path: str | None = None) -> None:
        # The caller's file is usually in a temporary folder that goes away: keep a copy until sent,
        # and while MLflow is down one in run storage too, which a later process sends.
        if self._artifact_tmp is None:
            self._artifact_tmp = tempfile.mkdtemp(prefix="orch-mlflow-artifacts-")
        keep = os.path.join(self._artifact_tmp, f"{len(os.listdir(self._artifact_tmp)):04d}",
                            os.path.basename(local_path))
        os.makedirs(os.path.dirname(keep))
        shutil.copy2(local_path, keep)
        self._artifacts.append(_Artifact(os.path.basename(local_path), artifact_path, keep))
        if not self.flush():
            self._store_artifacts()

    def set_tags(self, tags: dict[str, Any]) -> None:
        self._tags.update({k: str(v) for k, v in tags.items()})
        self._flush_if_due()

    def undelivered(self) -> list[Point]:
        """The points kept in memory (not those spilled to run storage): the trainer keeps them
        pending, so the next checkpoint carries them."""
        return list(self._buffer)

    def flush(self, force: bool = False) -> bool:
        """Send everything kept, oldest first. True when nothing is left; False while MLflow is
        down (tried at most every RETRY_S seconds unless `force`)."""
        if not self._has_work():
            return True
        if not self._clients.ready() and not force:
            return False  # the client is not made yet: kept for the next flush
        if self._down_since is not None and not force and time.monotonic() < self._next_try:
            return False
        try:
            sent = self._send_all()
        except _Down as exc:
            self._went_down(exc.__cause__ or exc)
            return False
        self._flushed_at = time.monotonic()
        if self._down_since is not None:
            log.warning("MLflow at %s reachable again after %.0f s: flushed %d points%s", self.where,
                        time.monotonic() - self._down_since, sent[0],
                        f", {sent[1]} tags, {sent[2]} artifacts" if sent[1] or sent[2] else "")
            self._down_since = None
        return True

    def close(self, wait_s: float = FINAL_WAIT_S) -> bool:
        """At the run's end: a last flush, waiting up to wait_s for MLflow. True when all landed;
        otherwise one warning line says what did not, and its points and tags go to run storage."""
        deadline = time.monotonic() + wait_s
        while not self.flush(force=True):
            if time.monotonic() >= deadline:
                break
            time.sleep(min(max(RETRY_S, 1.0), max(0.0, deadline - time.monotonic())))
        else:
            self._drop_artifact_tmp()
            return True
        n_points = len(self._buffer) + sum(n for _, n in self._spilled_counts())
        described = self._describe_points()
        saved = ""
        if self._spill_dir is not None:
            try:
                from storage import fs

                self._spill(quiet=True)
                if self._tags:
                    fs.write_json(f"{self._spill_dir}/{TAGS_JSON}", self._tags)
                self._store_artifacts()
                saved = (f"; they are saved in {self._spill_dir} and the next `orchestrator run` of this run "
                         "sends them")
            except Exception as exc:  # noqa: BLE001 - the run still completes; say what was not kept
                saved = f"; could not save them to run storage either ({type(exc).__name__})"
        log.warning("MLflow at %s still unreachable at the end of the run: %d metric points (%s), %d tags and %d "
                    "artifacts "
                    "(%s) not delivered%s", self.where, n_points, described, len(self._tags),
                    len(self._artifacts), ", ".join(a.name for a in self._artifacts) or "none", saved)
        return False

    # ---------------------------------------------------------------- sending
    def _fresh(self, key: str, step: int) -> bool:
        """Not in MLflow yet, as far as this sink knows."""
        return (key, step) not in self.held if self.any_order else step > self.floor.get(key, -1)

    def _flush_if_due(self) -> bool:
        if self.flush_every_s and time.monotonic() - self._flushed_at < self.flush_every_s:
            return True  # kept for the next flush; nothing to spill
        return self.flush()

    def _has_work(self) -> bool:
        return bool(self._buffer or self._tags or self._artifacts or self._spilled or self._floor_keys is not None)

    def _call(self, fn: Any, *args: Any, timeout: str | None = None, **kwargs: Any) -> Any:
        try:
            with quick_http(timeout):
                return fn(*args, **kwargs)
        except Exception as exc:
            if is_transient(exc):
                raise _Down() from exc
            raise

    def _held(self, keys: set[str]) -> dict[str, set[int]]:
        """The steps MLflow already holds, per metric key."""
        return {key: {m.step for m in self._call(self.client.get_metric_history, self.run_id, key)}
                for key in sorted(keys)}

    def _send_points(self, points: list[Point], held: dict[str, set[int]] | None) -> int:
        """With `held`, the points MLflow does not hold yet (after a cut or an outage, a batch may
        have landed with its reply lost); without, those above the floor."""
        from mlflow.entities import Metric

        if self.any_order:
            points = todo = [p for p in points
                             if (p[0], p[2]) not in self.held and p[2] not in (held or {}).get(p[0], ())]
        elif held is not None:
            todo = [p for p in points if p[2] not in held.get(p[0], ())]
        else:
            points = todo = [p for p in points if p[2] > self.floor.get(p[0], -1)]
        now = int(time.time() * 1000)
        metrics = [Metric(k, float(v), now, int(s)) for k, v, s in todo]
        for i in range(0, len(metrics), MAX_BATCH):
            self._call(self.client.log_batch, self.run_id, metrics=metrics[i : i + MAX_BATCH])
        # All of `points` is in MLflow now. A metric's steps only grow within a process, so the
        # floor also skips these points when the trainer hands them over again (it keeps points
        # pending until the checkpoint after they landed; workers/train/checkpointer.py).
        if self.any_order:
            self.held.update((k, s) for k, _, s in points)
        else:
            self._raise_floor(points)
        return len(points)  # in MLflow now, sent or found there

    def _raise_floor(self, points: list[Point]) -> None:
        for k, _, s in points:
            if s > self.floor.get(k, -1):
                self.floor[k] = s

    def _send_all(self) -> tuple[int, int, int]:
        from mlflow.entities import RunTag

        n_points = 0
        while self._spilled:  # the oldest points: spilled by this process or an earlier one
            from storage import fs

            uri = self._spilled[0]
            try:
                points = [(str(k), float(v), int(s)) for k, v, s in fs.read_json(uri)["points"]]
            except FileNotFoundError:
                points = []
            # A cut may have come after it was sent: ask MLflow what it holds.
            n_points += self._send_points(points, self._held({k for k, _, _ in points}))
            fs.remove(uri)
            self._spilled.pop(0)
        if self._buffer or self._floor_keys is not None:
            held = None
            if self._dedupe or self._down_since is not None or self._floor_keys is not None:
                held = self._held({k for k, _, _ in self._buffer} | (self._floor_keys or set()))
            if self._floor_keys is not None:
                # Nothing from this process has reached MLflow yet, so what it holds now is what it
                # held when the process resumed.
                self._raise_floor([(k, 0.0, max(held[k], default=-1)) for k in self._floor_keys])
                self._floor_keys = None
            n_points += self._send_points(self._buffer, held)
            self._buffer, self._buffered, self._dedupe = [], set(), False
        n_tags = len(self._tags)
        if self._tags:
            tags = [RunTag(k, v) for k, v in self._tags.items()]
            for i in range(0, len(tags), 100):
                self._call(self.client.log_batch, self.run_id, tags=tags[i : i + 100])
            self._tags = {}
            if self._tags_stored:
                from storage import fs

                fs.remove(f"{self._spill_dir}/{TAGS_JSON}")
                self._tags_stored = False
        n_art = 0
        while self._artifacts:
            self._send_artifact(self._artifacts[0])
            self._artifacts.pop(0)
            n_art += 1
        return n_points, n_tags, n_art

    def _send_artifact(self, art: _Artifact) -> None:
        from storage import fs

        if art.local is None or not os.path.exists(art.local):  # only in run storage: an earlier process's
            if self._artifact_tmp is None:
                self._artifact_tmp = tempfile.mkdtemp(prefix="orch-mlflow-artifacts-")
            art.local = os.path.join(self._artifact_tmp, f"stored-{os.path.basename(art.stored or '')}", art.name)
            os.makedirs(os.path.dirname(art.local), exist_ok=True)
            with open(art.local, "wb") as f:
                f.write(fs.read_bytes(f"{art.stored}.data"))
        self._call(self.client.log_artifact, self.run_id, art.local, art.artifact_path, timeout=_ARTIFACT_TIMEOUT)
        shutil.rmtree(os.path.dirname(art.local), ignore_errors=True)
        if art.stored is not None:
            fs.remove(f"{art.stored}.json")  # the record first: a data file without one is never sent
            fs.remove(f"{art.stored}.data")

    def _went_down(self, exc: BaseException) -> None:
        self._next_try = time.monotonic() + RETRY_S
        if self._down_since is None:
            self._down_since = time.monotonic()
            text = redact_text(" ".join(str(exc).split()))[:200]
            log.warning("MLflow at %s unreachable (%s: %s); buffering metrics, training goes on", self.where,
                        type(exc).__name__, text)

    # ---------------------------------------------------------------- spilling
    def _list_spill(self) -> list[str]:
        if self._spill_dir is None:
            return []
        from storage import fs

        try:
            return [f"{self._spill_dir}/{n}" for n in fs.listdir(self._spill_dir)
                    if n[:1].isdigit() and n.endswith(".json")]
        except Exception:  # noqa: BLE001 - unreadable run storage shows up elsewhere; nothing to resend here
            log.warning("could not list %s", self._spill_dir, exc_info=True)
            return []

    def _spill(self, quiet: bool = False) -> None:
        """The buffer to run storage, memory starts again (the points stay in order: files are
        sent first, by name). Without run storage to spill to, the buffer just grows."""
        if self._spill_dir is None or not self._buffer:
            return
        from storage import fs

        seq = max((int(os.path.basename(u)[:6]) for u in self._spilled), default=-1) + 1
        uri = f"{self._spill_dir}/{seq:06d}.json"
        fs.write_json(uri, {"run_id": self.run_id, "points": [list(p) for p in self._buffer]})
        if not quiet:
            log.warning("MLflow at %s still unreachable: %d metric points (over the bound of %d in memory) saved "
                        "to %s; "
                        "sent from there when MLflow is back", self.where, len(self._buffer), MAX_BUFFER, uri)
        self._spilled.append(uri)
        self._buffer, self._buffered = [], set()

    def _spilled_counts(self) -> list[tuple[str, int]]:
        from storage import fs

        out = []
        for uri in self._spilled:
            try:
                out.append((uri, len(fs.read_json(uri)["points"])))
            except Exception:  # noqa: BLE001 - a count for a message only
                out.append((uri, 0))
        return out

    def _describe_points(self) -> str:
        steps: dict[str, list[int]] = {}
        for k, _, s in self._buffer:
            steps.setdefault(k, []).append(s)
        parts = [f"{k} steps {min(v)}-{max(v)}" for k, v in sorted(steps.items())]
        if self._spilled:
            parts.append(f"{len(self._spilled)} spilled files")
        return ", ".join(parts[:6]) + (", ..." if len(parts) > 6 else "") if parts else "none"

    def _load_stored_tags(self) -> bool:
        if self._spill_dir is None:
            return False
        from storage import fs

        try:
            self._tags.update(fs.read_json(f"{self._spill_dir}/{TAGS_JSON}"))
            return True
        except Exception:  # noqa: BLE001 - none left (the usual case), or unreadable: nothing to resend
            return False

    def _list_stored_artifacts(self) -> list[_Artifact]:
        if self._spill_dir is None:
            return []
        from storage import fs

        out = []
        try:
            for n in fs.listdir(f"{self._spill_dir}/{ARTIFACTS_DIR}"):
                if n.endswith(".json"):
                    rec = fs.read_json(f"{self._spill_dir}/{ARTIFACTS_DIR}/{n}")
                    out.append(_Artifact(rec["name"], rec["artifact_path"], None,
                                         f"{self._spill_dir}/{ARTIFACTS_DIR}/{n[:-5]}"))
        except Exception:  # noqa: BLE001 - unreadable run storage shows up elsewhere
            log.warning("could not list %s/%s", self._spill_dir, ARTIFACTS_DIR, exc_info=True)
        return out

    def _store_artifacts(self) -> None:
        """The artifacts not yet sent, to run storage (once each): a process lost while MLflow is
        down, or a run that ends with it down, leaves them for a later one."""
        if self._spill_dir is None:
            return
        from storage import fs

        for art in self._artifacts:
            if art.stored is not None:
                continue
            try:
                taken = {n.split(".")[0] for n in fs.listdir(f"{self._spill_dir}/{ARTIFACTS_DIR}")}
                seq = max((int(n) for n in taken if n.isdigit()), default=-1) + 1
                stored = f"{self._spill_dir}/{ARTIFACTS_DIR}/{seq:04d}"
                with open(art.local, "rb") as f:
                    fs.write_bytes(f"{stored}.data", f.read())
                fs.write_json(f"{stored}.json", {"name": art.name, "artifact_path": art.artifact_path})
                art.stored = stored
            except Exception:  # noqa: BLE001 - it is still kept in memory for this process
                log.warning("could not save MLflow artifact %s to run storage", art.name, exc_info=True)

    def _drop_artifact_tmp(self) -> None:
        if self._artifact_tmp is not None:
            shutil.rmtree(self._artifact_tmp, ignore_errors=True)
            self._artifact_tmp = None
