"""Real GCS on loopback: gcp-storage-emulator as a subprocess, reached through the fault proxy.
Fixtures to import: `gcs_emulator` (session: its URL) and `gcs` (a fresh bucket behind a fresh proxy)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from tests.fault_proxy import FaultProxy

STARTUP_TIMEOUT_S = 30.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _emulator_command(port: int) -> list[str]:
    exe = shutil.which("gcp-storage-emulator") or os.path.join(os.path.dirname(sys.executable), "gcp-storage-emulator")
    return [exe, "start", "--host=127.0.0.1", f"--port={port}", "--in-memory"]


def start_emulator() -> tuple[subprocess.Popen, str]:
    """Start the emulator on a free loopback port; returns (process, URL) once it answers."""
    port = free_port()
    proc = subprocess.Popen(_emulator_command(port), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"gcp-storage-emulator exited with {proc.returncode}")
        try:
            urllib.request.urlopen(f"{url}/storage/v1/b?project=test", timeout=1).read()
            return proc, url
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError(f"gcp-storage-emulator did not answer on {url} within {STARTUP_TIMEOUT_S} s")


def stop_emulator(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)


def point_gcsfs_at(url: str) -> None:
    """Make every new gcsfs instance (here and in child processes) talk to `url`."""
    os.environ["STORAGE_EMULATOR_HOST"] = url
    # Without this gcsfs probes a gRPC control plane the emulator lacks, a minute per bucket.
    os.environ["GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT"] = "false"
    from storage import fs as sfs

    sfs.reset_filesystems()


def make_bucket(bucket: str) -> None:
    from storage import fs as sfs

    fs, _ = sfs.filesystem(f"gs://{bucket}")
    fs.mkdir(bucket)  # gcsfs's makedirs() does not create buckets


@pytest.fixture(scope="session")
def gcs_emulator() -> Iterator[str]:
    proc, url = start_emulator()
    try:
        yield url
    finally:
        stop_emulator(proc)


@dataclass
class Gcs:
    bucket: str
    proxy: FaultProxy
    emulator: str

    def uri(self, *parts: str) -> str:
        return "/".join([f"gs://{self.bucket}", *parts])


@pytest.fixture
def gcs(gcs_emulator: str, monkeypatch: pytest.MonkeyPatch, tmp_path) -> Iterator[Gcs]:
    """A new bucket, reached through a new fault proxy (no faults until configured)."""
    from storage import fs as sfs

    bucket = f"test-{uuid.uuid4().hex[:10]}"
    with FaultProxy(gcs_emulator) as proxy:
        monkeypatch.setenv("STORAGE_EMULATOR_HOST", proxy.url)
        # Without this gcsfs probes a gRPC control plane the emulator lacks, a minute per bucket.
        monkeypatch.setenv("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
        monkeypatch.setenv("ORCHESTRATOR_CACHE_DIR", str(tmp_path / "shard-cache"))
        sfs.reset_filesystems()
        make_bucket(bucket)
        proxy.reset_counters()
        try:
            yield Gcs(bucket, proxy, gcs_emulator)
        finally:
            sfs.reset_filesystems()
