"""Runs on a cluster as Ray Jobs: the driver lives on the head node, not in the notebook.

`orchestrator run RECIPE --address ADDR` submits the run as a Ray Job whose entrypoint is
`orchestrator run` itself, inside the cluster (`--address auto`). Closing the notebook or
killing the submitting process then leaves training untouched; `orchestrator logs RUN` and
`orchestrator status RUN` reattach from anywhere that reaches the cluster. Runs are found again
through the job metadata (run name, run dir), so no state lives on the client.
"""

from __future__ import annotations

import ipaddress
import json
import os
import shlex
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console

from common.errors import RunError
from common.recipe import Recipe

# The resolved recipe travels in the job's environment: no file has to exist on the head.
RECIPE_ENV = "ORCHESTRATOR_RECIPE_JSON"
META_RUN = "orchestrator.run_name"
META_DIR = "orchestrator.run_dir"
LIVE = ("PENDING", "RUNNING")
POLL_S = 2.0


@dataclass
class JobRef:
    submission_id: str
    status: str
    run_name: str
    run_dir: str
    start_time: int


def client(address: str):
    """A JobSubmissionClient for a GCS address (host:6379), a dashboard URL or ray:// address."""
    from ray.job_submission import JobSubmissionClient

    try:
        return JobSubmissionClient(address)
    except Exception as exc:  # noqa: BLE001 - connection, auth and version errors all end here
        from common.redact import redact_text

        first = redact_text(str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__)
        raise RunError(
            f"--address {address}: cannot reach the Ray cluster's job server ({first}). "
            "Check that the cluster is up (`ray status`), that its dashboard runs (port 8265 by default), "
            "and, with token auth, that RAY_AUTH_TOKEN is set"
        ) from None


def find_jobs(jc: Any, run_name: str) -> list[JobRef]:
    """This run's jobs, newest first."""
    refs = []
    for j in jc.list_jobs():
        meta = j.metadata or {}
        if meta.get(META_RUN) == run_name:
            refs.append(JobRef(j.submission_id, str(j.status.value if hasattr(j.status, "value") else j.status),
                               run_name, meta.get(META_DIR, ""), int(j.start_time or 0)))
    return sorted(refs, key=lambda r: r.start_time, reverse=True)


def is_loopback(address: str) -> bool:
    host = address.split("://", 1)[-1].rsplit(":", 1)[0].strip("[]")
    if host in ("localhost", "auto", ""):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _gcs_runs_here() -> bool:
    """Whether a Ray head runs on this machine (a GCS server process): tells a local cluster
    from a remote one reached through a tunnel on localhost (Colab + IAP). Linux /proc only;
    elsewhere a loopback address is taken to mean a local cluster."""
    proc = Path("/proc")
    if not proc.is_dir():
        return True
    for comm in proc.glob("[0-9]*/comm"):
        try:
            if comm.read_text().strip() == "gcs_server":
                return True
        except OSError:
            continue
    return False


def cluster_is_local(address: str) -> bool:
    return is_loopback(address) and _gcs_runs_here()


HEAD_WORKDIR = "~/orchestrator"


def entrypoint(workdir: str, run_name: str) -> str:
    """The command the head runs: this same CLI, driving Ray from inside the cluster (the run
    name stands in the recipe's place, for the dashboard's job list; --from-env reads the recipe)."""
    # "~/x" is expanded by the head's shell, not here: the head's home is not ours.
    where = '"$HOME"/' + shlex.quote(workdir[2:]) if workdir.startswith("~/") else shlex.quote(workdir)
    return (f"mkdir -p {where} && cd {where} && python -m orchestrator.cli run {shlex.quote(run_name)} "
            "--from-env --address auto")


def submit_or_attach(recipe: Recipe, run_dir: str, address: str, console: Console, detach: bool,
                     workdir: str | None) -> int:
    """Submit the run as a Ray Job, or attach to its live job; returns the exit code to use."""
    jc = client(address)
    # The same name in another run storage is another run: match the run dir as well.
    live = [j for j in find_jobs(jc, recipe.run.name) if j.status in LIVE and j.run_dir == run_dir]
    if live:
        job = live[0]
        console.print(f"run '{recipe.run.name}' is already running as Ray job {job.submission_id}; attaching (no "
                      "second driver)")
    else:
        # Relative paths (runs/, mlflow.db, data/) resolve where the driver runs. On a cluster
        # on this machine, that is here; on a remote head, a folder in its home directory, and
        # runs belong on GCS there (the head holds nothing that cannot be rebuilt).
        local = cluster_is_local(address)
        workdir = workdir or (os.getcwd() if local else HEAD_WORKDIR)
        if not local and "://" not in recipe.run.storage and not recipe.run.storage.startswith("/"):
            console.print(f"[yellow]note[/yellow]: run.storage '{recipe.run.storage}' is on the head node's disk; "
                          "set it to gs://... so that runs outlive the head")
        from orchestrator.launcher import SETUP_HOOK, worker_env

        sid = f"orchestrator-{recipe.run.name}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:4]}"
        env = worker_env() | {RECIPE_ENV: json.dumps(recipe.model_dump(mode="json"))}
        jc.submit_job(
            submission_id=sid,
            entrypoint=entrypoint(workdir, recipe.run.name),
            metadata={META_RUN: recipe.run.name, META_DIR: run_dir},
            # The same setup hook as a local driver's (launcher.py): SIGTERM becomes a checkpoint.
            runtime_env={"env_vars": env, "worker_process_setup_hook": SETUP_HOOK},
        )
        job = JobRef(sid, "PENDING", recipe.run.name, run_dir, int(time.time() * 1000))
        console.print(f"run '{recipe.run.name}': submitted as Ray job {sid}; the driver runs on the cluster, "
                      "so closing this terminal or notebook does not stop it")
    console.print(f"  follow it:  orchestrator logs {recipe.run.name} --address {address} --follow\n"
                  f"  status:     orchestrator status {recipe.run.name} --address {address}")
    if detach:
        return 0
    return follow(jc, job.submission_id, sys.stdout.write, console)


def follow(jc: Any, submission_id: str, write: Callable[[str], Any], console: Console) -> int:
    """Stream the job's logs until it ends; 0 when it succeeded."""
    shown = 0
    try:
        while True:
            status = str(jc.get_job_status(submission_id).value)
            logs = jc.get_job_logs(submission_id)
            if len(logs) > shown:
                write(logs[shown:])
                sys.stdout.flush()
                shown = len(logs)
            if status not in LIVE:
                break
            time.sleep(POLL_S)
    except KeyboardInterrupt:
        console.print(f"detached from Ray job {submission_id}; the run goes on. "
                      "`orchestrator logs RUN --address ADDR --follow` reattaches")
        raise SystemExit(130) from None
    if status == "SUCCEEDED":
        return 0
    info = jc.get_job_info(submission_id)
    console.print(f"Ray job {submission_id} ended {status}: {(info.message or '').strip()[:500]}")
    return 1


def latest_job(address: str, run_name: str) -> tuple[Any, JobRef]:
    jc = client(address)
    jobs = find_jobs(jc, run_name)
    if not jobs:
        raise RunError(f"no Ray job for run '{run_name}' on {address}; `ray job list --address ...` shows what runs "
                       "there")
    return jc, jobs[0]
