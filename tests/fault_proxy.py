"""A fault-injecting HTTP proxy on loopback, for GCS traffic to the emulator: 503s, dropped
connections, corrupted bodies, added latency, and permanent 403s, on command."""

from __future__ import annotations

import http.client
import json
import random
import re
import socket
import struct
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

UPSTREAM_CONCURRENCY = 4
_UPLOAD_NAME = re.compile(r'"name":\s*"([^"]*)"')
_HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "proxy-connection",
               "content-length"}


@dataclass
class Faults:
    fail_rate: float = 0.0  # share of requests answered 503
    drop_rate: float = 0.0  # share of requests whose connection is reset (or, for GETs, cut mid-body)
    latency_s: float = 0.0  # added to every request
    forbid: bool = False  # answer every request 403 (a permanent error)
    corrupt_gets: int = 0  # the next N GET bodies of object data get one byte flipped
    corrupt_match: str = ""  # ...only for URLs containing this
    # An outage of one path: every request naming an object that contains this (in its URL, or in
    # an upload's metadata, where gcsfs puts the object name of a multipart upload) gets a 503...
    outage_match: str = ""
    # ...or a 403 (a permanent error) instead.
    forbid_match: str = ""


@dataclass
class Counters:
    requests: int = 0
    failed_503: int = 0
    dropped: int = 0
    forbidden: int = 0
    corrupted: int = 0
    paths: list[str] = field(default_factory=list)


class FaultProxy:
    """`with FaultProxy(upstream) as proxy:` then point STORAGE_EMULATOR_HOST at proxy.url.

    Test-only controls: `configure(...)` changes the faults at any time; `counters` says what was
    injected. 503s, resets and 403s are injected before the request reaches the emulator, so a
    retried upload never lands twice; truncated and corrupted bodies only on GET responses. The
    emulator serves one connection at a time with a listen backlog of 5, so requests reach it
    through at most UPSTREAM_CONCURRENCY connections while the proxy itself takes hundreds.
    """

    def __init__(self, upstream: str, seed: int = 0) -> None:
        u = urlsplit(upstream)
        self.upstream_host, self.upstream_port = u.hostname or "127.0.0.1", u.port or 80
        self.faults = Faults()
        self.counters = Counters()
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._upstream_slots = threading.BoundedSemaphore(UPSTREAM_CONCURRENCY)
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # quiet
                pass

            def _any(self) -> None:
                proxy._handle(self)

            do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = _any

        class Server(ThreadingHTTPServer):
            daemon_threads = True
            request_queue_size = 1024  # gcsfs opens up to 100 connections at once

            def handle_error(self, request, client_address) -> None:
                pass  # clients dropping idle keep-alive connections is normal, not news

        self._server = Server(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, name="fault-proxy", daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def start(self) -> FaultProxy:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def configure(self, seed: int | None = None, **faults) -> None:
        """Faults from now on; `seed` restarts the draws, so the requests that follow meet a known
        sequence (a run of a few requests could otherwise draw no fault at all)."""
        with self._lock:
            self.faults = Faults(**faults)
            if seed is not None:
                self._rng = random.Random(seed)

    def reset_counters(self) -> None:
        with self._lock:
            self.counters = Counters()

    # -- one request ----------------------------------------------------------------------------

    def _decide(self, method: str, path: str, body: bytes | None = None) -> str:
        with self._lock:
            f, c = self.faults, self.counters
            c.requests += 1
            c.paths.append(f"{method} {path}")
            # The object's name: in the URL, or in a multipart upload's JSON metadata (not its data).
            named = _UPLOAD_NAME.search(body[:4096].decode("latin-1")) if body else None
            head = path + (named.group(1) if named else "")
            if f.forbid or (f.forbid_match and f.forbid_match in head):
                c.forbidden += 1
                return "forbid"
            if f.outage_match and f.outage_match in head:
                c.failed_503 += 1
                return "503"
            r = self._rng.random()
            if r < f.fail_rate:
                c.failed_503 += 1
                return "503"
            if r < f.fail_rate + f.drop_rate:
                c.dropped += 1
                return "truncate" if method == "GET" and self._rng.random() < 0.5 else "reset"
            if f.corrupt_gets and method == "GET" and "alt=media" in path and f.corrupt_match in path:
                f.corrupt_gets -= 1
                c.corrupted += 1
                return "corrupt"
            return "pass"

    def _handle(self, h: BaseHTTPRequestHandler) -> None:
        length = int(h.headers.get("Content-Length") or 0)
        body = h.rfile.read(length) if length else None
        action = self._decide(h.command, h.path, body)
        if self.faults.latency_s:
            time.sleep(self.faults.latency_s)
        if action == "forbid":
            return self._reply(h, 403, {"error": {"code": 403, "message": "Forbidden (injected by the fault proxy)"}})
        if action == "503":
            return self._reply(h, 503,
                               {"error": {"code": 503, "message": "Service Unavailable (injected by the fault proxy)"}})
        if action == "reset":
            return self._reset(h)
        headers = {k: v for k, v in h.headers.items() if k.lower() not in _HOP_BY_HOP and k.lower() != "host"}
        headers["Host"] = f"{self.upstream_host}:{self.upstream_port}"
        if body is not None:
            headers["Content-Length"] = str(len(body))
        with self._upstream_slots:
            conn = http.client.HTTPConnection(self.upstream_host, self.upstream_port, timeout=60)
            try:
                conn.request(h.command, h.path, body=body, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                status, reason, resp_headers = resp.status, resp.reason, resp.getheaders()
            finally:
                conn.close()
        if action == "corrupt" and data:
            i = len(data) // 2
            data = data[:i] + bytes([data[i] ^ 0xFF]) + data[i + 1 :]
        h.send_response(status, reason)
        for k, v in resp_headers:
            if k.lower() not in _HOP_BY_HOP:
                h.send_header(k, v)
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        if action == "truncate" and len(data) > 1:
            h.wfile.write(data[: len(data) // 2])
            h.wfile.flush()
            return self._reset(h)
        if h.command != "HEAD":
            h.wfile.write(data)

    @staticmethod
    def _reply(h: BaseHTTPRequestHandler, status: int, payload: dict) -> None:
        data = json.dumps(payload).encode()
        h.send_response(status)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        h.wfile.write(data)

    @staticmethod
    def _reset(h: BaseHTTPRequestHandler) -> None:
        # SO_LINGER 0: close() sends a TCP RST, which the client sees as "connection reset".
        h.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        h.close_connection = True
        try:
            h.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
