"""The progress line's samples/s and ETA with slow steps (the full UNet-224 on a CPU: ~30 s a step)."""

from __future__ import annotations

import pytest

import workers.progress as wp
from orchestrator.progress import ProgressDisplay, describe


@pytest.mark.parametrize("step_s", [0.05, 31.0, 95.0])
def test_every_step_after_the_first_has_a_rate(monkeypatch, step_s):
    """A time window alone (30 s) held a single step every other line when steps took ~30 s."""
    now = [1000.0]
    monkeypatch.setattr(wp.time, "monotonic", lambda: now[0])
    rate = wp.Rate()
    rate.add(16)
    assert rate.per_s() is None  # one step: no interval yet
    for _ in range(12):
        now[0] += step_s
        rate.add(16)
        assert rate.per_s() == pytest.approx(16 / step_s)
        assert rate.steps_per_s() == pytest.approx(1 / step_s)


def test_the_rate_follows_the_last_steps_not_the_whole_run(monkeypatch):
    now = [0.0]
    monkeypatch.setattr(wp.time, "monotonic", lambda: now[0])
    rate = wp.Rate()
    for _ in range(100):  # a fast stage...
        now[0] += 0.1
        rate.add(32)
    for _ in range(wp.Rate.MIN_STEPS):  # ...then a slow one: its own rate as soon as it has steps
        now[0] += 40.0
        rate.add(8)
    assert rate.per_s() == pytest.approx(8 / 40.0)


def test_the_driver_keeps_the_last_rate_when_a_reading_has_none(tmp_path):
    d = ProgressDisplay(str(tmp_path))
    base = {"stage": "full", "stage_index": 2, "stages": 3, "chunk": 0, "chunks": 2, "total_steps": 100,
            "loss": 0.5, "phase": "train"}
    d.fill_rate({**base, "global_step": 40, "samples_per_s": 0.5, "eta_s": 1800.0})
    p = d.fill_rate({**base, "global_step": 70, "samples_per_s": None, "eta_s": None})
    assert p["samples_per_s"] == 0.5 and p["eta_s"] == pytest.approx(900.0)
    assert "- samples/s" not in describe(p) and "ETA --:--" not in describe(p)
