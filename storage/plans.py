"""A run's plan on storage: plan.npz (the id arrays), then plan.json (the summary), which marks it complete."""

from __future__ import annotations

from common.plan import Plan
from storage import fs
from storage.layout import PLAN_JSON, PLAN_NPZ


def save_plan(plan: Plan, run_dir: str) -> None:
    fs.write_bytes(fs.join(run_dir, PLAN_NPZ), plan.to_npz())
    # The JSON is written second: it marks the plan complete.
    fs.write_json(fs.join(run_dir, PLAN_JSON), plan.summary())


def load_plan(run_dir: str) -> Plan:
    return Plan.from_saved(fs.read_json(fs.join(run_dir, PLAN_JSON)), fs.read_bytes(fs.join(run_dir, PLAN_NPZ)))
