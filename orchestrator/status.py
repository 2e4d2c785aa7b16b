"""`status` and `runs`: what run storage says about a run, in the contract's JSON shape."""

from __future__ import annotations

import time
from typing import Any

from common.errors import RunError
from orchestrator.engine import RunState, lease, record
from storage import fs
from storage.layout import CURSOR_JSON, FINAL_JSON, PLAN_JSON, PROGRESS_JSON


def effective_state(rec: record.RunRecord, progress: dict[str, Any] | None, run_dir: str) -> RunState:
    """A running record whose driver is gone (its lease lapsed, or its progress went quiet) is interrupted."""
    if rec.state != RunState.RUNNING:
        return rec.state
    held = lease.read(run_dir)
    if held is None or not lease.is_live(held):
        return RunState.INTERRUPTED
    last = max(rec.updated_at, (progress or {}).get("updated_at", 0))
    return RunState.INTERRUPTED if time.time() - last > record.STALE_AFTER_S else RunState.RUNNING


def build_status(run_dir: str) -> dict[str, Any] | None:
    rec = record.load(run_dir)
    if rec is None:
        return None
    plan = record.read_optional(run_dir, PLAN_JSON) or {"stages": []}
    cursor = record.read_optional(run_dir, CURSOR_JSON) or {}
    progress = record.read_optional(run_dir, PROGRESS_JSON)
    state = effective_state(rec, progress, run_dir)
    trained = {(e["stage"], e["chunk"]): e for e in cursor.get("chunk_log", [])}
    stages, chunk_log = [], []
    for st in plan["stages"]:
        done = 0
        for c, n in enumerate(st["chunk_samples"]):
            e = trained.get((st["name"], c), {})
            times = int(e.get("times_trained", 0))
            done += times > 0
            chunk_log.append({"stage": st["name"], "chunk": c, "samples": n, "times_trained": times,
                              "world_size": e.get("world_size")})
        stages.append({"name": st["name"], "chunks_total": st["chunks"], "chunks_done": done})
    final = record.read_optional(run_dir, FINAL_JSON) if state == RunState.COMPLETED else None
    cur = cursor.get("cursor", {})
    return {
        "run_name": rec.run_name,
        "state": state,
        "mlflow_run_id": rec.mlflow_run_id,
        "global_step": int(cur.get("global_step", (progress or {}).get("global_step", 0))),
        "interruptions": int(cur.get("interruptions", 0)),
        "interruption_log": cursor.get("interruption_log", []),
        "stages": stages,
        "chunk_log": chunk_log,
        "final": None if final is None else {k: final[k] for k in ("checkpoint", "weights_sha256", "metrics")},
        "run_dir": run_dir,
        "data_uri": rec.data_uri,
        "last_checkpoint": cursor.get("checkpoint"),
        "progress": progress,
        "error": rec.error,
        "updated_at": rec.updated_at,
    }


DAMAGED = RunState.DAMAGED


def damaged_entry(name: str, run_dir: str, error: RunError) -> dict[str, Any]:
    """A run whose files cannot be read (a torn or hand-edited run.json, plan.json or cursor.json):
    listed with state "damaged" and the message naming the file and what to do, so one damaged
    run never hides the others."""
    return {
        "run_name": name, "state": DAMAGED, "mlflow_run_id": None, "global_step": 0, "interruptions": 0,
        "interruption_log": [], "stages": [], "chunk_log": [], "final": None, "run_dir": run_dir, "data_uri": "",
        "last_checkpoint": None, "progress": None, "error": str(error), "updated_at": 0.0,
    }


def list_runs(storage_root: str) -> list[dict[str, Any]]:
    """Every run under the root, newest first; damaged ones (damaged_entry) last."""
    out = []
    for name in fs.listdir(storage_root):
        run_dir = fs.join(storage_root, name)
        try:
            s = build_status(run_dir)
        except RunError as exc:
            s = damaged_entry(name, run_dir, exc)
        if s is not None:
            out.append(s)
    return sorted(out, key=lambda s: (s["state"] != DAMAGED, s["updated_at"]), reverse=True)
