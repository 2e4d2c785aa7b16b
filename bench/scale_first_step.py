"""bench.scale's first-step part: `orchestrator run` from a fresh working directory to the first
training step and on to the end of the first chunk, the data in the GCS emulator behind the fault proxy
(issue 24's second acceptance line: worker start to first step, Ray's start-up beside it, data wait).
Run it alone with `python -m bench.scale --only first_step --json`; bench/scale.py describes the keys."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.scale_data import (
    RECIPE,
    REPO,
    SOURCE_ROWS_PER_GROUP,
    SOURCE_ROWS_PER_SHARD,
    SOURCE_SAMPLE_BYTES,
    make_source,
    replicate_dataset,
)


def _first_step_recipe(data_uri: str, n: int, image_size: int, width: float, chunk: int,
                       sample_bytes: int) -> dict[str, Any]:
    """recipes/unet224.yaml as it is (stages, chunks, batches, resolutions, checkpointing), but a
    small model (compute must not hide the data path), this dataset, and a 2-core CPU worker.

    The shuffle window is reckoned in stored bytes: with samples smaller than the source's ~25 KB
    the default 48 MB window would hold ~25 KB / sample_bytes times the source's rows (a 16-px set:
    the whole 50K chunk), so it is scaled to hold the rows, and so the row groups, it holds at the
    source's size."""
    import yaml

    from common.recipe import SHUFFLE_WINDOW_MB

    d = yaml.safe_load(RECIPE.read_text())
    d["data"]["shuffle_window_mb"] = max(1, round(SHUFFLE_WINDOW_MB * sample_bytes / SOURCE_SAMPLE_BYTES))
    d["run"].update({"name": "scale-first-step", "storage": "runs"})
    d["data"].update(
        {"uri": data_uri, "expected_samples": n, "image_size": [image_size, image_size], "decode_workers": 0}
    )
    d["model"]["width"] = width
    d["stages"][0]["chunk_size"] = chunk
    d["tracking"]["uri"] = "sqlite:///mlflow.db"
    d["execution"].update({"backend": "ray", "num_workers": 1, "use_gpu": False, "cpus_per_worker": 2})
    return d


def _stop(proc: subprocess.Popen, grace_s: float = 60.0) -> None:
    """Ctrl-C (a checkpoint at the next step, Ray shut down), then SIGKILL to whatever is left."""
    import signal

    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGINT)
            proc.wait(timeout=grace_s)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=30)


MARKS_ENV = "BENCH_SCALE_MARKS"  # a folder: the driver and the worker each write the moment they reach a point


def _mark(name: str) -> None:
    folder = os.environ.get(MARKS_ENV)
    if folder:
        Path(folder, name).write_text(repr(time.time()))


def timed_train_loop(config: dict[str, Any]) -> None:
    """The worker's entry point (workers/train/entry.py train_loop) with the moment Ray handed it to the
    worker noted first, and the moment our worker modules were imported. Ray pickles this function by
    reference (bench.scale_first_step.timed_train_loop): the worker imports this module, then calls it."""
    _mark("worker_entry")
    import workers.train.trainer as trainer
    from workers.train.entry import train_loop

    _mark("worker_imported")
    real_step = trainer.Trainer._train_step

    def first_step(self: Any, *args: Any, **kwargs: Any) -> None:
        # The first batch in hand (data path done), then the step's own compute (a CPU here: seconds
        # a GPU does in a fraction of one); later steps as they are.
        _mark("first_batch")
        real_step(self, *args, **kwargs)
        _mark("first_step_computed")
        trainer.Trainer._train_step = real_step

    trainer.Trainer._train_step = first_step
    train_loop(config)


def child_run(marks: str, cli_args: list[str]) -> None:
    """`orchestrator <cli_args>` as the CLI runs it, with two notes taken: when the driver calls
    launcher.launch (Ray's start-up begins), and, in the worker, when train_loop is entered."""
    import bench.scale_first_step as me  # by this name, not __main__'s: Ray pickles the wrapper by reference
    import orchestrator.launcher as launcher
    import workers.train.entry as entry

    os.environ[MARKS_ENV] = marks  # Ray's local workers inherit the driver's environment
    real_launch = launcher.launch

    def launch(recipe: Any, config: dict[str, Any], address: str | None) -> None:
        me._mark("launch")
        real_launch(recipe, config, address)

    launcher.launch = launch
    entry.train_loop = me.timed_train_loop  # launch_ray imports it from the module when it runs
    sys.argv = ["orchestrator", *cli_args]
    from orchestrator.cli import main

    main()


def _marks(folder: Path) -> dict[str, float]:
    return {p.name: float(p.read_text()) for p in folder.iterdir()} if folder.exists() else {}


def _data_wait_fraction(mlflow_db: Path) -> float | None:
    """perf/data_wait_fraction of the run's first chunk, as the trainer logged it to MLflow: the time
    train_chunk waited on prefetcher.get and on each next batch, over the chunk's wall time up to its
    end-of-chunk evaluation (workers/train/trainer.py)."""
    import sqlite3

    if not mlflow_db.exists():
        return None
    con = sqlite3.connect(f"file:{mlflow_db}?mode=ro", uri=True)
    try:
        row = con.execute("SELECT value FROM metrics WHERE key = 'perf/data_wait_fraction' ORDER BY step, timestamp "
                          "LIMIT 1").fetchone()
    except sqlite3.Error:
        return None
    finally:
        con.close()
    return float(row[0]) if row else None


def bench_first_step(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """`orchestrator run` in a fresh working directory (no MLflow store, no run files, an empty
    shard cache) to the first training step, and on to the end of its first chunk; the data in the
    GCS emulator behind the fault proxy."""
    import yaml

    from bench.resume import Lines
    from storage.pack import choose_sizes
    from storage.shards import open_dataset
    from tests.fault_proxy import FaultProxy
    from tests.gcs_emulator import make_bucket, point_gcsfs_at, start_emulator, stop_emulator

    d = yaml.safe_load(RECIPE.read_text())
    chunk, eval_n = args.first_step_chunk or int(d["stages"][0]["chunk_size"]), int(d["data"]["eval_samples"])
    # By default the source's 1.2M; stage 1's first chunk is 50K of them either way.
    n = args.first_step_samples or chunk + eval_n
    size = args.first_step_image_size
    source = make_source(
        str(work / f"source-{args.first_step_real_samples}-{size}px"), args.first_step_real_samples, size
    )
    src = open_dataset(source)
    sample_bytes = sum(int(s["bytes"]) for s in src.manifest["shards"]) // src.num_samples
    if args.first_step_geometry == "source":  # the row groups `data pack` makes of the source's ~25 KB samples
        rows_per_shard, rows_per_group = SOURCE_ROWS_PER_SHARD, SOURCE_ROWS_PER_GROUP
    else:  # as `data pack` sizes them for these (smaller) samples
        rows_per_shard, rows_per_group = choose_sizes(sample_bytes, None, None)
    out: dict[str, Any] = {
        "first_step_dataset_samples": n,
        "first_step_chunk_samples": chunk,
        "first_step_image_size": size,
        "first_step_sample_bytes": sample_bytes,
        "first_step_geometry": args.first_step_geometry,
        "first_step_rows_per_group": rows_per_group,
        "first_step_rows_per_shard": rows_per_shard,
        "first_step_latency_ms_per_request": args.latency_ms,
        "first_step_model_width": args.first_step_width,
        "first_step_shuffle_window_mb": _first_step_recipe("", n, size, 1.0, chunk, sample_bytes)["data"][
            "shuffle_window_mb"],
    }
    proc, url = start_emulator()
    try:
        with FaultProxy(url) as proxy:
            point_gcsfs_at(proxy.url)
            make_bucket("scale")
            t = time.perf_counter()
            replicate_dataset(source, "gs://scale/data", n, rows_per_shard, rows_per_group)
            out["first_step_upload_untimed_s"] = round(time.perf_counter() - t, 1)
            fresh = work / "fresh"
            shutil.rmtree(fresh, ignore_errors=True)
            fresh.mkdir(parents=True)
            marks = fresh / "marks"
            marks.mkdir()
            (fresh / "recipe.yaml").write_text(
                yaml.safe_dump(_first_step_recipe("gs://scale/data", n, size, args.first_step_width, chunk,
                                                  sample_bytes))
            )
            env = {
                **os.environ,
                "PYTHONPATH": str(REPO),
                "ORCHESTRATOR_CACHE_DIR": str(fresh / "shard-cache"),
                "RAY_USAGE_STATS_ENABLED": "0",
            }
            proxy.configure(latency_s=args.latency_ms / 1000)
            proxy.reset_counters()
            progress = fresh / "runs" / "scale-first-step" / "progress.json"
            out["load_average_1m_at_first_step_start"] = round(os.getloadavg()[0], 2)
            t_start = time.time()
            run = subprocess.Popen(
                [sys.executable, "-m", "bench.scale", "--child", "run", str(marks), "run", "recipe.yaml"],
                cwd=fresh,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            lines = Lines(run)
            seen: dict[str, float] = {}
            step = chunk_end = None
            wait_fraction = None
            deadline = time.monotonic() + args.timeout
            try:
                while True:
                    try:
                        p = json.loads(progress.read_text())
                    except (OSError, ValueError):
                        p = {}
                    if p.get("phase"):
                        seen.setdefault(p["phase"], p["updated_at"])
                    if step is None and p.get("phase") == "train" and p.get("global_step", 0) >= 1:
                        step = p
                        requests = proxy.counters.requests
                        if args.no_data_wait:
                            break
                    if step is not None and chunk_end is None and (p.get("chunk", 0) >= 1 or p.get("stage_index", 0)):
                        chunk_end = p  # the first chunk trained and evaluated; its metrics go to MLflow next
                    if chunk_end is not None:
                        wait_fraction = _data_wait_fraction(fresh / "mlflow.db")
                        if wait_fraction is not None:
                            break
                    if step is not None and time.monotonic() > deadline:
                        break  # the first step's figures stand; data_wait_share says it was not reached
                    if run.poll() is not None or time.monotonic() > deadline:
                        what = "a training step" if step is None else "the end of its first chunk in MLflow"
                        raise RuntimeError(f"the run did not reach {what}:\n{lines.text()[-3000:]}")
                    time.sleep(0.05)
            finally:
                _stop(run)
            proxy.configure()
    finally:
        stop_emulator(proc)
    first_line = next((t for t, line in lines.lines if line.startswith("run '")), None)
    if args.first_step_log:  # the run's output, each line at its time from the start, and the worker's marks
        mark = _marks(marks)
        text = [f"{t - t_start:8.2f}  {line}" for t, line in lines.lines]
        text += [f"{t - t_start:8.2f}  [mark] {name}" for name, t in sorted(mark.items(), key=lambda kv: kv[1])]
        Path(args.first_step_log).write_text("\n".join(sorted(text, key=lambda x: float(x.split()[0]))) + "\n")
    mark = _marks(marks)
    out.update(
        {
            "first_step_s": round(step["updated_at"] - t_start, 1),
            "first_step_to_plan_made_s": round(first_line - t_start, 1) if first_line else None,
            "first_step_to_worker_preload_s": round(seen["preload"] - t_start, 1) if "preload" in seen else None,
            "first_step_preload_to_step_s": round(step["updated_at"] - seen["preload"], 1)
            if "preload" in seen
            else None,
            # The chunk in memory (the loop's "train" phase begins), then the first batch decoded and trained.
            "first_step_chunk_fetch_s": round(seen["train"] - seen["preload"], 1) if "preload" in seen else None,
            "first_step_first_batch_s": round(step["updated_at"] - seen["train"], 1),
            "first_step_gcs_requests": requests,
            "first_step_chunk_bytes": sample_bytes * chunk,
            # Issue 24's line: from the worker's start (Ray hands it train_loop) to its first optimizer step,
            # with Ray's own start-up beside it (the driver's launch call to that moment), not counted.
            "worker_start_to_first_step_s": round(step["updated_at"] - mark["worker_entry"], 2)
            if "worker_entry" in mark
            else None,
            # The same to the first batch in hand (the data path's part), and the first step's compute.
            "worker_start_to_first_batch_s": round(mark["first_batch"] - mark["worker_entry"], 2)
            if {"worker_entry", "first_batch"} <= mark.keys()
            else None,
            "first_step_compute_s": round(mark["first_step_computed"] - mark["first_batch"], 2)
            if {"first_batch", "first_step_computed"} <= mark.keys()
            else None,
            "worker_imports_s": round(mark["worker_imported"] - mark["worker_entry"], 2)
            if {"worker_entry", "worker_imported"} <= mark.keys()
            else None,
            "ray_startup_s": round(mark["worker_entry"] - mark["launch"], 2)
            if {"worker_entry", "launch"} <= mark.keys()
            else None,
            "driver_to_launch_s": round(mark["launch"] - t_start, 2) if "launch" in mark else None,
        }
    )
    if not args.no_data_wait:
        out["data_wait_share"] = round(wait_fraction, 4) if wait_fraction is not None else None
        if chunk_end is not None:
            # Preload to the first sign of the next chunk: the chunk's training, its evaluation and checkpoint.
            # progress.json holds only the latest phase, so a short one may pass unseen.
            start = seen.get("preload", seen.get("train"))
            out["first_chunk_wall_s_upper"] = round(chunk_end["updated_at"] - start, 1) if start else None
            out["first_chunk_steps"] = chunk_end["global_step"]
        if wait_fraction is None:
            out["data_wait_share_note"] = (f"the first chunk's perf/data_wait_fraction was not in MLflow within "
                                           f"--timeout {args.timeout:.0f} s (it is logged at the chunk's end)")
    return out
