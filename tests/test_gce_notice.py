"""GCE's metadata-server preemption notice (workers/gce_notice.py), against a loopback server that
speaks the metadata server's protocol: `Metadata-Flavor: Google` both ways, an ETag, and
`wait_for_change=true&last_etag=...` requests that block until `instance/preempted` changes."""

from __future__ import annotations

import json
import re
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from tests.conftest import (
    assert_completed_exactly_once,
    run_cli,
    slow_recipe,
    start_cli,
    wait_for_cursor,
    write_recipe,
)
from workers import gce_notice


class FakeMetadataServer:
    """instance/preempted on 127.0.0.1, flipped by the test with set()."""

    def __init__(self) -> None:
        self.value, self.etag, self.closing = "FALSE", 1, False
        self.cond = threading.Condition()
        self.requests: list[dict] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                url = urllib.parse.urlsplit(self.path)
                q = dict(urllib.parse.parse_qsl(url.query))
                outer.requests.append({"path": url.path, "query": q, "flavor": self.headers.get("Metadata-Flavor")})
                if self.headers.get("Metadata-Flavor") != "Google":
                    self.send_error(403, "Missing Metadata-Flavor:Google header")
                    return
                if url.path != gce_notice.PATH:
                    self.send_error(404)
                    return
                with outer.cond:
                    if q.get("wait_for_change") == "true" and q.get("last_etag") == str(outer.etag):
                        outer.cond.wait_for(lambda: q["last_etag"] != str(outer.etag) or outer.closing,
                                            timeout=float(q.get("timeout_sec", 60)))
                    value, etag = outer.value, outer.etag
                body = value.encode()
                self.send_response(200)
                self.send_header("Metadata-Flavor", "Google")
                self.send_header("ETag", str(etag))
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.host = f"127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def set(self, value: str) -> None:
        with self.cond:
            self.value, self.etag = value, self.etag + 1
            self.cond.notify_all()

    def close(self) -> None:
        with self.cond:
            self.closing = True
            self.cond.notify_all()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def metadata():
    server = FakeMetadataServer()
    try:
        yield server
    finally:
        server.close()


def test_the_watcher_blocks_on_wait_for_change_and_sets_the_notice_when_preempted(metadata, monkeypatch):
    monkeypatch.setattr(gce_notice, "PREEMPTED", threading.Event())
    watcher = threading.Thread(target=gce_notice.watch, args=(metadata.host,), daemon=True)
    watcher.start()
    deadline = time.monotonic() + 10
    while not any(r["query"].get("wait_for_change") for r in metadata.requests):
        assert time.monotonic() < deadline, metadata.requests
        time.sleep(0.05)
    time.sleep(0.3)
    assert not gce_notice.PREEMPTED.is_set()
    assert len(metadata.requests) == 2, "a blocking request, not polling"
    assert all(r["flavor"] == "Google" for r in metadata.requests)
    metadata.set("TRUE")
    assert gce_notice.PREEMPTED.wait(5), "the notice did not arrive"
    watcher.join(5)
    assert not watcher.is_alive(), "the watcher ends once it has told"


def test_off_gce_nothing_starts_and_nothing_waits(tmp_path, metadata, monkeypatch):
    monkeypatch.delenv(gce_notice.HOST_ENV, raising=False)
    product = tmp_path / "product_name"
    product.write_text("Standard PC (Q35 + ICH9, 2009)\n")
    monkeypatch.setattr(gce_notice, "DMI_PRODUCT", product)
    # Were this machine taken for a VM, the watcher would ask the fake server: it must hear nothing.
    monkeypatch.setattr(gce_notice, "DEFAULT_HOST", metadata.host)
    assert gce_notice.start() is False
    assert not any(t.name == "gce-preempted-watch" for t in threading.enumerate())
    assert metadata.requests == [], "a metadata request was made off GCE"
    monkeypatch.setattr(gce_notice, "DMI_PRODUCT", tmp_path / "absent")
    assert gce_notice.metadata_host() is None
    product.write_text("Google Compute Engine\n")
    monkeypatch.setattr(gce_notice, "DMI_PRODUCT", product)
    assert gce_notice.metadata_host() == gce_notice.DEFAULT_HOST
    monkeypatch.setenv(gce_notice.HOST_ENV, "127.0.0.1:1")
    assert gce_notice.metadata_host() == "127.0.0.1:1"


def test_the_launcher_passes_the_metadata_host_to_ray_workers(monkeypatch):
    from orchestrator.launcher import worker_env

    monkeypatch.setenv(gce_notice.HOST_ENV, "127.0.0.1:8089")
    assert worker_env()[gce_notice.HOST_ENV] == "127.0.0.1:8089"


def test_preempted_true_mid_stage_checkpoints_stops_and_resumes_bit_identical(tmp_path, tiny_dataset, reference_sha,
                                                                              metadata, monkeypatch):
    """The in-process backend, the same notice path as on Ray (PreemptionMonitor.notice)."""
    monkeypatch.setenv(gce_notice.HOST_ENV, metadata.host)
    recipe = slow_recipe(tiny_dataset)
    recipe["checkpoint"]["every_steps"] = 1000  # no scheduled checkpoint: only the notice's can save stage 2
    path = write_recipe(tmp_path / "r.yaml", recipe)
    run_dir = tmp_path / "runs" / "tiny"
    proc = start_cli("run", path, cwd=tmp_path, log=tmp_path / "run.log")
    wait_for_cursor(run_dir, lambda c: c["stage"] == 1, proc)
    time.sleep(0.5)  # mid-chunk
    at_notice = json.loads((run_dir / "progress.json").read_text())["global_step"]
    metadata.set("TRUE")
    assert proc.wait(timeout=120) == 1
    log = (tmp_path / "run.log").read_text()
    assert "preemption notice (gce)" in log, log[-3000:]
    # The notice's checkpoint landed; how soon is bounded in steps below, not in seconds.
    assert re.search(r"checkpoint saved (\d+\.\d+) s after the notice", log), log[-3000:]
    stopped_at = json.loads((run_dir / "cursor.json").read_text())["cursor"]["global_step"]
    # The checkpoint is the one the notice asked for: a step or so after it, not a scheduled one.
    assert at_notice <= stopped_at <= at_notice + 10, (at_notice, stopped_at)
    assert any(r["query"].get("wait_for_change") == "true" for r in metadata.requests)
    metadata.set("FALSE")  # the replacement VM is not being preempted
    assert run_cli("run", path, cwd=tmp_path).returncode == 0
    st = assert_completed_exactly_once(tmp_path, reference_sha)
    (record,) = st["interruption_log"]
    assert record["cause"] == "preemption notice" and record["steps_lost"] == 0
    assert record["resumed_at_step"] == stopped_at
