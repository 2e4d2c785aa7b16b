"""The shipped cluster files' authentication, run here on loopback with their own commands.

`ray start` (head and worker) and `mlflow server` are taken from ray_cluster.yaml as written; only
what a laptop cannot have is swapped: ports (free ones), the host the commands bind (127.0.0.1),
the kept disk (/mnt/mlflow) and GCS (temporary folders), and $HOME (a temporary one, holding the
secrets that `file_mounts` copies to every node). Clients run in their own processes: Ray reads
its token once per process, and this test session's own processes carry the session's token.
"""

from __future__ import annotations

import json
import secrets
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import yaml

from tests.conftest import cli_env
from tests.loopback_cluster import LoopbackCluster, free_port

REPO = Path(__file__).resolve().parents[1]
CONFIG = yaml.safe_load((REPO / "ray_cluster.yaml").read_text())
AUTH_VARS = ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH",
             "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")


def start_command(key: str, needle: str) -> str:
    (cmd,) = [c for c in CONFIG[key] if needle in c]
    return cmd


def node_home(tmp_path: Path, token: str, password: str) -> Path:
    """A node's $HOME after `ray up` copied the file_mounts: the token and the MLflow password."""
    home = tmp_path / "home"
    for remote, content in (("~/.ray/auth_token", token), ("~/.orchestrator/mlflow_password", password)):
        assert remote in CONFIG["file_mounts"], remote
        f = home / remote.removeprefix("~/")
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text(content)
    return home


def clean_env(home: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in cli_env().items() if k not in AUTH_VARS}
    env.update(HOME=str(home), **extra)
    return env


def run_bash(cmd: str, env: dict[str, str]) -> None:
    res = subprocess.run(["bash", "-c", cmd], env=env, capture_output=True, text=True, timeout=180)
    assert res.returncode == 0, f"{cmd!r}: {res.stdout[-2000:]}{res.stderr[-2000:]}"


def loopback(cmd: str, swaps: dict[str, str]) -> str:
    for old, new in swaps.items():
        assert old in cmd, f"{old!r} is no longer in the YAML's command: update this test"
        cmd = cmd.replace(old, new)
    return cmd


# What a client does, in a process of its own: the Jobs API, then Ray's GCS (ray.init).
CLIENT = r"""
import json, sys
out = {}
try:
    from ray.job_submission import JobSubmissionClient
    JobSubmissionClient(sys.argv[1]).list_jobs()
    out["jobs"] = "ok"
except Exception as e:
    out["jobs"] = f"{type(e).__name__}: {e}"[:300]
try:
    import ray
    ray.init(address=sys.argv[2], logging_level="ERROR", log_to_driver=False)
    out["init"] = "ok"
    out["nodes"] = sum(n["Alive"] for n in ray.nodes())
    ray.shutdown()
except Exception as e:
    out["init"] = f"{type(e).__name__}: {e}"[:300]
print(json.dumps(out))
"""


def clients(envs: list[dict[str, str]], dashboard: str, gcs: str) -> list[dict]:
    """Each env's client, all at once (a refused ray.init retries for ~20 s before it gives up)."""
    procs = [subprocess.Popen([sys.executable, "-c", CLIENT, dashboard, gcs], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for env in envs]
    out = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=120)
        assert p.returncode == 0, stderr[-3000:]
        out.append(json.loads(stdout.strip().splitlines()[-1]))
    return out


@pytest.mark.ray
def test_the_yamls_own_ray_start_commands_refuse_clients_without_the_token(tmp_path):
    token = secrets.token_hex(32)
    home = node_home(tmp_path, token, secrets.token_urlsafe(18))
    port, dash = free_port(), free_port()
    def common() -> dict[str, str]:  # one machine: each node its own object manager port
        return {"ulimit -n 65536;": "",  # this machine's hard limit is lower; not what is under test
                "--object-manager-port=8076": f"--object-manager-port={free_port()} --node-ip-address=127.0.0.1"}

    head = loopback(start_command("head_start_ray_commands", "ray start"), {
        **common(), "--port=6379": f"--port={port}",
        "--autoscaling-config=~/ray_bootstrap_config.yaml":
            f"--num-cpus=0 --dashboard-port={dash} --ray-client-server-port={free_port()} --disable-usage-stats",
    })
    worker = loopback(start_command("worker_start_ray_commands", "ray start"), {
        **common(), "--address=$RAY_HEAD_IP:6379": f"--address=$RAY_HEAD_IP:{port} --num-cpus=1",
    })
    cluster = None
    try:
        run_bash(head, clean_env(home))
        cluster = LoopbackCluster.adopt(port)
        run_bash(worker, clean_env(home, RAY_HEAD_IP="127.0.0.1"))
        dashboard, gcs = f"http://127.0.0.1:{dash}", f"127.0.0.1:{port}"
        with_token = clean_env(tmp_path, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token)
        no_token = clean_env(tmp_path)
        wrong_token = clean_env(tmp_path, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32))
        good, *bad = clients([with_token, no_token, wrong_token], dashboard, gcs)
        deadline = time.monotonic() + 60
        while good["jobs"] != "ok" and time.monotonic() < deadline:  # the Jobs API may come up late
            time.sleep(1)
            (good,) = clients([with_token], dashboard, gcs)
        assert good == {"jobs": "ok", "init": "ok", "nodes": 2}, good  # the worker joined with the token too
        for refused in bad:
            assert "Authentication" in refused["jobs"] and refused["init"] != "ok", refused
        # The dashboard and Jobs API listen on loopback only.
        listening = {c.laddr.ip for c in psutil.net_connections("tcp") if c.status == "LISTEN" and c.laddr.port == dash}
        assert listening == {"127.0.0.1"}, listening
    finally:
        if cluster is not None:
            cluster.stop()


def stop_tree(pid: int) -> None:
    try:
        root = psutil.Process(pid)
    except psutil.NoSuchProcess:
        return
    procs = [root, *root.children(recursive=True)]
    for p in procs:
        try:
            p.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(procs, timeout=10)
    for p in alive:
        p.kill()


def test_the_heads_mlflow_server_refuses_requests_without_credentials(tmp_path, monkeypatch):
    import requests
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    password = secrets.token_urlsafe(18)
    home = node_home(tmp_path, secrets.token_hex(32), password)
    disk = tmp_path / "mlflow-disk"  # the kept disk, /mnt/mlflow on the head
    disk.mkdir()
    port = free_port()
    cmd = loopback(start_command("head_start_ray_commands", "mlflow server"), {
        "/mnt/mlflow": str(disk),
        "--host 0.0.0.0": "--host 127.0.0.1",
        "--port 5000": f"--port {port} --workers 1",  # one worker: a 2-core test machine
        "gs://YOUR_BUCKET/mlflow-artifacts": str(tmp_path / "artifacts"),
    })
    run_bash(cmd, clean_env(home))
    pid = int((home / "mlflow-server.pid").read_text())
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                requests.get(f"{uri}/health", timeout=5)  # any answer (basic auth: a 401) means it is up
                break
            except requests.ConnectionError:
                pass
            assert psutil.pid_exists(pid), (home / "mlflow-server.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "the MLflow server did not come up"
            time.sleep(0.5)
        for k in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
            monkeypatch.delenv(k, raising=False)
        with pytest.raises(MlflowException, match="401|Unauthorized|credentials"):
            MlflowClient(uri).search_experiments()
        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "admin")
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "not-" + password)
        with pytest.raises(MlflowException, match="401|Unauthorized|credentials"):
            MlflowClient(uri).search_experiments()
        # What the workers and the driver get from their node's environment (the start commands).
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", password)
        assert [e.name for e in MlflowClient(uri).search_experiments()] == ["Default"]
        assert password not in (home / "mlflow-server.log").read_text(), "the server printed its password"
    finally:
        stop_tree(pid)
