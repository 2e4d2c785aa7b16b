"""bench.scale's first-step notes, small: the worker's wrapper marks its start before our worker code is
imported and then runs the real train_loop, and data_wait_share reads the first chunk's
perf/data_wait_fraction from a real MLflow sqlite store (the figures themselves: docs/PERFORMANCE.md)."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench import scale_first_step as scale


def test_timed_train_loop_marks_the_worker_start_then_runs_train_loop(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    import workers.train.entry as entry

    seen = []
    monkeypatch.setattr(entry, "train_loop", lambda config: seen.append((config, scale._marks(tmp_path))))
    monkeypatch.setenv(scale.MARKS_ENV, str(tmp_path))
    scale.timed_train_loop({"run_dir": "x"})
    (config, marks_then), = seen
    assert config == {"run_dir": "x"}
    # Both marks exist before the training loop runs, in order: its start-up is inside the measure.
    assert marks_then["worker_entry"] <= marks_then["worker_imported"]


def test_data_wait_share_is_the_first_chunks_value_in_mlflow(tmp_path: Path) -> None:
    import mlflow

    db = tmp_path / "mlflow.db"
    assert scale._data_wait_fraction(db) is None  # no store yet: not measured, never a made-up value
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{db}")
    run = client.create_run(client.create_experiment("e", artifact_location=str(tmp_path / "art")))
    client.log_metric(run.info.run_id, "perf/other", 0.9, step=1)
    assert scale._data_wait_fraction(db) is None
    client.log_metric(run.info.run_id, "perf/data_wait_fraction", 0.25, step=400)  # the second chunk's
    client.log_metric(run.info.run_id, "perf/data_wait_fraction", 0.0318, step=196)  # the first chunk's
    assert scale._data_wait_fraction(db) == pytest.approx(0.0318)
