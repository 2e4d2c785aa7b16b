"""A real multi-node Ray cluster on loopback: `ray start --head`, then `ray start --address` per node.

Its processes are told apart from any other Ray on the machine by the session dir its GCS names,
so that stopping it (or picking its training worker to kill) never touches another test run's.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil

from tests.conftest import cli_env

RAY = str(Path(sys.executable).parent / "ray")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ray_cli(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run([RAY, *args], env=cli_env(), capture_output=True, text=True, timeout=120, check=check)


class LoopbackCluster:
    """A head with no CPUs (drivers and Ray's own actors only) plus worker nodes added on demand."""

    def __init__(self) -> None:
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        # Token auth for the head, the nodes and every client: the session's token (conftest.py).
        assert os.environ.get("RAY_AUTH_MODE") == "token" and os.environ.get("RAY_AUTH_TOKEN")
        self.session_dir = ""
        try:
            ray_cli("start", "--head", f"--port={self.port}", "--node-ip-address=127.0.0.1", "--num-cpus=0",
                    "--dashboard-host=127.0.0.1", f"--dashboard-port={free_port()}",
                    f"--ray-client-server-port={free_port()}", f"--dashboard-agent-listen-port={free_port()}",
                    "--disable-usage-stats")
            self.session_dir = self._find_session_dir()
            self._wait_for_job_server()
        except BaseException:
            self.stop()  # a half-started head must not outlive the test that wanted it
            raise

    @classmethod
    def adopt(cls, port: int) -> LoopbackCluster:
        """A cluster something else started (tests/test_cluster_auth.py runs the YAML's own `ray start`
        lines) on loopback at `port`: found, watched and stopped the same way."""
        self = cls.__new__(cls)
        self.port, self.address, self.session_dir = port, f"127.0.0.1:{port}", ""
        self.session_dir = self._find_session_dir()
        return self

    def add_node(self, num_cpus: int = 1, num_gpus: int = 0) -> None:
        """A worker node; num_gpus advertises fake GPUs (Ray resources only, no CUDA behind them)."""
        # Each node's dashboard agent on a port of its own: at Ray's default (52365) the head's agent loses the
        # port to any other Ray on the machine, and the Jobs API answers "No available agent to submit job".
        ray_cli("start", f"--address={self.address}", "--node-ip-address=127.0.0.1", f"--num-cpus={num_cpus}",
                f"--dashboard-agent-listen-port={free_port()}", *([f"--num-gpus={num_gpus}"] if num_gpus else []))

    def _find_session_dir(self) -> str:
        for p in psutil.process_iter(["cmdline"]):
            args = p.info["cmdline"] or []
            if f"--gcs_server_port={self.port}" in args:
                return next(a.split("=", 1)[1] for a in args if a.startswith("--session-dir="))
        raise AssertionError(f"no GCS server on port {self.port}")

    def _wait_for_job_server(self, timeout: float = 60) -> None:
        from ray.job_submission import JobSubmissionClient

        deadline = time.monotonic() + timeout
        while True:
            try:
                JobSubmissionClient(self.address)
                return
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(1)

    def processes(self) -> list[psutil.Process]:
        """Every process of this cluster: its daemons name the session dir; workers are their children."""
        if not self.session_dir:
            return [p
                    for p in psutil.process_iter(["cmdline"]) if f"--gcs_server_port={self.port}"
                    in (p.info["cmdline"] or [])]
        roots = [p for p in psutil.process_iter(["cmdline"]) if self.session_dir in " ".join(p.info["cmdline"] or [])]
        found = {p.pid: p for p in roots}
        for root in roots:
            try:
                found.update({c.pid: c for c in root.children(recursive=True)})
            except psutil.NoSuchProcess:
                pass
        return list(found.values())

    def pids_named(self, prefix: str) -> list[int]:
        pids = []
        for p in self.processes():
            try:
                if " ".join(p.cmdline()).startswith(prefix):
                    pids.append(p.pid)
            except psutil.NoSuchProcess:
                pass
        return pids

    def train_worker_pid(self) -> int:
        pids = self.pids_named("ray::RayTrainWorker")
        if not pids:
            raise AssertionError(f"no RayTrainWorker process in {self.session_dir}")
        return pids[0]

    def jobs(self):
        from ray.job_submission import JobSubmissionClient

        return JobSubmissionClient(self.address).list_jobs()

    def stop(self) -> None:
        # Not `ray stop --force`: that kills every Ray process on the machine, other runs' included.
        procs = self.processes()
        for p in procs:
            try:
                p.terminate()
            except psutil.NoSuchProcess:
                pass
        _, alive = psutil.wait_procs(procs, timeout=5)  # gcs_server ignores SIGTERM: do not wait long
        for p in alive:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        # Like `ray stop`: a stale pointer here would send later ray.init(address="auto") calls
        # to a dead cluster.
        current = Path("/tmp/ray/ray_current_cluster")
        try:
            if current.read_text().strip().endswith(f":{self.port}"):
                current.unlink()
        except FileNotFoundError:
            pass
