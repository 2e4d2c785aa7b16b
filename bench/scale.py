"""A rehearsal at the source's scale: 1.2M samples (and 120K beside it, to show what grows).

This module is one piece on purpose: each figure and its baseline are measured in the same process, on
the same datasets made once at its start, and printed as one JSON document.

Usage: python -m bench.scale --json

Datasets. A small real set is synthesized once (storage.synth) and then written out again as a
dataset of N samples with storage's own ShardWriter: sample i holds the values (fg_bg, bg, mask,
depth) of source sample i % n_real, with its own id i. Every sample is a real row in a real shard,
checked against its checksum when read: the reader checks each row's id against the index, so an
index whose rows point into the same shard rows under other ids is not one it accepts. Shards and
row groups take the geometry `orchestrator data pack` gives the source's ~25 KB samples (41 rows
per ~1 MB row group, 5207 rows per ~128 MB shard), so the index, the footers and the row groups a
chunk touches are those of a real 1.2M-sample dataset; only the bytes per sample are smaller (the
images are small), and each figure that depends on bytes says so (*_at_source_sample_size).

Measured, per size:
  plan_s           make_plan for recipes/unet224.yaml over the dataset's ids
  driver_*         `orchestrator run`'s driver in a fresh subprocess up to launching workers (dataset
                   opened and validated, plan made and written, run files, MLflow run): wall time
                   and peak RSS (resource.getrusage)
  resume_s         the same command again on the run it left (driver: run files, plan, dataset,
                   MLflow), in a fresh subprocess; resume_worker_s: what the worker does before its
                   first batch that depends on N (plan and dataset opened, checkpoint found, step counts)
  status_s         `orchestrator status --json` of that run, in a fresh subprocess
  rank_slice_s     one rank's slice of a 100K chunk: its ids and its batches (common/plan.py), and
                   the loop's map from ids to rows
  rank_fetch_s     that slice's row groups fetched and parsed (ChunkPrefetcher, cache off), from
                   local disk; bytes, row groups, samples read (the read amplification) and peak RSS
                   with it; stage1_first_chunk_samples_read: the same count for stage 1's first chunk
  rank_stream_*    the same slice streamed (ChunkPrefetcher with the batches' order): its first
                   batch's rows in hand, the whole slice, and the ranged reads it took
Then first_step_s: `orchestrator run` from a fresh working directory to the first training step,
on a recipe derived from unet224.yaml (small model width, stage 1 at 56 px with a 50K chunk), the
data (by default 1.2M samples in the source's row groups, --first-step-samples/-geometry) in the GCS
emulator behind the fault proxy adding --latency-ms to every request. Issue 24's line is read there:
  worker_start_to_first_step_s  from the moment Ray hands the worker its train_loop (noted by a thin
                   wrapper, timed_train_loop) to the first optimizer step (progress.json, written by
                   the worker at that step); worker_imports_s, the worker's own modules imported,
                   is inside it
  ray_startup_s    the driver's launcher.launch call to that moment: Ray's start-up, not counted
  data_wait_share  the trainer's own perf/data_wait_fraction of the first 50K chunk (read from the
                   run's MLflow store): time train_chunk waited on prefetcher.get and on each next
                   batch, over the chunk's wall time; the run goes on to the end of that chunk for
                   it (--no-data-wait stops at the first step)
`--only first_step` runs just that part (bench/scale_first_step.py).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench import machine
from bench.scale_data import (
    RECIPE,
    REPO,
    SOURCE_ROWS_PER_GROUP,
    SOURCE_ROWS_PER_SHARD,
    SOURCE_SAMPLE_BYTES,
    make_source,
    replicate_dataset,
)


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


# -- children: each measurement in a fresh process, as a new driver or worker would be ------------


def _child_driver(out_path: str, cli_args: list[str]) -> None:
    """`orchestrator <cli_args>` in this process, up to the moment the driver launches workers:
    there the launch is replaced by a note of the time and the peak RSS, and a KeyboardInterrupt
    (the run is left `interrupted`, as a Ctrl-C before the workers started would leave it)."""
    t0 = time.perf_counter()
    import orchestrator.launcher as launcher
    import orchestrator.runner as runner

    parts: dict[str, float] = {}

    def timed(name: str, fn: Any) -> Any:
        def wrapper(*a: Any, **k: Any) -> Any:
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                parts[name] = parts.get(name, 0.0) + time.perf_counter() - t

        return wrapper

    # The driver's steps that touch the dataset or the plan, timed where `orchestrator run` calls them.
    runner.plan_for_dataset = timed("plan_s", runner.plan_for_dataset)
    runner.open_data = timed("open_and_validate_data_s", runner.open_data)
    runner.task_info = timed("task_info_s", runner.task_info)
    runner.save_plan = timed("plan_save_s", runner.save_plan)
    runner.load_plan = timed("plan_load_s", runner.load_plan)

    def stub(recipe: Any, config: dict[str, Any], address: str | None) -> None:
        Path(out_path).write_text(
            json.dumps(
                {
                    "to_launch_s": time.perf_counter() - t0,
                    "peak_rss_mb": _peak_rss_mb(),
                    "config_json_bytes": len(json.dumps(config)),
                    **parts,
                }
            )
        )
        raise KeyboardInterrupt

    launcher.launch = stub
    sys.argv = ["orchestrator", *cli_args]
    from orchestrator.cli import main

    try:
        main()
    except SystemExit as exc:
        if exc.code not in (0, 130, None):
            raise


def _child_worker(out_path: str, run_dir: str, data_uri: str, stage: int, chunk: int) -> None:
    """What a worker does on a (re)start that depends on the dataset's size, then one rank's slice of
    a chunk and its fetch (ChunkPrefetcher, the cache off: a fresh machine)."""
    t0 = time.perf_counter()
    from common.plan import batches_for_rank, rank_slice, steps_per_chunk
    from common.recipe import validate_recipe
    from storage import checkpoints
    from storage.plans import load_plan
    from storage.shards import open_dataset
    from workers.data import ChunkPrefetcher
    from workers.windows import Windows

    rec = json.loads(Path(run_dir, "run.json").read_text())
    recipe = validate_recipe(rec["recipe"])
    t_imports = time.perf_counter()
    plan = load_plan(run_dir)
    ds = open_dataset(data_uri)
    found = checkpoints.list_complete(run_dir)
    world, rank = recipe.execution.num_workers, 0
    total = sum(
        steps_per_chunk(len(sp.chunk_ids(c)), st.batch_size, st.epochs_per_chunk, world)
        for st, sp in zip(recipe.stages, plan.stages, strict=True)
        for c in range(sp.num_chunks)
    )
    resume_worker_s = time.perf_counter() - t_imports
    rss_after_open = _peak_rss_mb()

    # One rank's slice of the chunk, as workers/train/trainer.py train_chunk cuts it.
    st = recipe.stages[stage]
    t = time.perf_counter()
    ids = plan.chunk_ids(stage, chunk)
    contiguous = recipe.data.chunking == "row_groups"
    mine = rank_slice(ids, world, rank, contiguous)
    # The plan's shuffle, as the trainer takes it (workers/windows.py: the window keys of a new run's plan).
    windows = Windows(ds, plan).order(mine, len(ids), st.batch_size, world)
    batches = batches_for_rank(ids, st.batch_size, world, rank, [recipe.run.seed, 3, stage, chunk, 0], contiguous,
                               windows=windows)
    rank_slice_s = time.perf_counter() - t
    # The loop's map from ids to rows of the fetched slice (workers/train/trainer.py; not one of this bench's files).
    t = time.perf_counter()
    position = {int(sid): i for i, sid in enumerate(mine)}
    todo = [[position[int(x)] for x in b] for b in batches]
    loop_map_s = time.perf_counter() - t
    del position, todo

    t = time.perf_counter()
    pf = ChunkPrefetcher(ds)
    rows = pf.get((stage, chunk), mine)
    rank_fetch_s = time.perf_counter() - t
    # Here, before this bench's own read-amplification sums below (the index as int64 keys, two
    # more plans), which a worker never does and which would otherwise set the peak.
    rank_fetch_peak_rss_mb = _peak_rss_mb()
    pf.close()
    stats = ds.reader.stats.as_dict()
    assert np.array_equal(rows["sample_id"], mine)
    del rows
    # The same slice streamed (workers/train/trainer.py since the streaming change): its first batch's rows
    # in hand, then the whole slice; a fresh dataset object, so footers are fetched again.
    from workers.data import stream_order

    sds = open_dataset(data_uri)
    t = time.perf_counter()
    spf = ChunkPrefetcher(sds)
    order, per_batch = stream_order(mine, batches)
    streamed = spf.get((stage, chunk), mine, order, per_batch)
    if hasattr(streamed, "wait"):
        streamed.wait(order[: len(batches[0])])
    rank_stream_first_batch_s = time.perf_counter() - t
    if hasattr(streamed, "wait"):
        streamed.wait()
    rank_stream_all_s = time.perf_counter() - t
    stream_requests = sds.reader.stats.requests
    spf.close()
    del streamed
    n = ds.num_samples
    groups_total = sum(int(s.get("row_groups") or 0) for s in ds.manifest["shards"])
    dataset_bytes = sum(int(s["bytes"]) for s in ds.manifest["shards"])
    # Samples in the row groups read, against the samples wanted (from the index: no reads).
    key = ds.index.column("shard").to_numpy().astype(np.int64) << 32 | ds.index.column("row_group").to_numpy()

    def samples_read_for(wanted: np.ndarray) -> int:
        keys = np.unique(ds.index_values("shard", wanted).astype(np.int64) << 32 | ds.index_values("row_group", wanted))
        return int(np.isin(key, keys).sum())

    samples_read = samples_read_for(mine)
    first = rank_slice(
        plan.chunk_ids(0, 0), world, rank, contiguous
    )  # stage 1's first chunk (50K): what a first step waits for
    first_read = samples_read_for(first)
    # The same chunk's read amplification under each data.chunking (plans only: no reads).
    from common.plan import plan_for_dataset

    by_chunking = {}
    for chunking in ("samples", "row_groups"):
        alt = plan_for_dataset(
            recipe.model_copy(update={"data": recipe.data.model_copy(update={"chunking": chunking})}), ds
        )
        alt_mine = rank_slice(alt.chunk_ids(stage, chunk), world, rank, chunking == "row_groups")
        by_chunking[chunking] = round(samples_read_for(alt_mine) / len(alt_mine), 2)
    Path(out_path).write_text(
        json.dumps(
            {
                "resume_worker_s": resume_worker_s,
                "checkpoints_found": len(found),
                "total_steps": total,
                "worker_rss_after_open_mb": rss_after_open,
                "rank_slice_s": rank_slice_s,
                "rank_slice_samples": len(mine),
                "rank_slice_batches": len(batches),
                "loop_id_map_s": loop_map_s,
                "rank_fetch_s": rank_fetch_s,
                "rank_fetch_peak_rss_mb": rank_fetch_peak_rss_mb,
                "bench_analysis_peak_rss_mb": _peak_rss_mb(),
                "rank_fetch_row_groups": stats["groups_fetched"],
                "dataset_row_groups": groups_total,
                "rank_fetch_requests": stats["requests"],
                "rank_fetch_bytes": stats["bytes_fetched"],
                "rank_fetch_samples_read": samples_read,
                "dataset_bytes": dataset_bytes,
                "rank_fetch_read_amplification": round(samples_read / len(mine), 2),
                "read_amplification_by_chunking": by_chunking,
                "chunking": recipe.data.chunking,
                "stage1_first_chunk_samples": len(first),
                "stage1_first_chunk_samples_read": first_read,
                "dataset_samples": n,
                "worker_startup_imports_s": t_imports - t0,
                "rank_stream_first_batch_s": rank_stream_first_batch_s,
                "rank_stream_all_s": rank_stream_all_s,
                "rank_stream_requests": stream_requests,
            }
        )
    )


def _child_status(out_path: str, storage: str, name: str) -> None:
    t0 = time.perf_counter()
    from orchestrator.status import build_status
    from storage import fs as sfs

    t = time.perf_counter()
    st = build_status(sfs.join(sfs.normalize(storage), name))
    status_s = time.perf_counter() - t
    Path(out_path).write_text(
        json.dumps(
            {
                "status_s": status_s,
                "status_imports_s": t - t0,
                "status_peak_rss_mb": _peak_rss_mb(),
                "status_chunks": len(st["chunk_log"]),
                "status_state": st["state"],
            }
        )
    )


def _run_child(mode: str, *argv: str, cwd: str | None = None, env: dict[str, str] | None = None) -> dict[str, Any]:
    out = tempfile.mktemp(prefix=f"scale-{mode}-", suffix=".json")
    t = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "bench.scale", "--child", mode, out, *argv],
        cwd=cwd,
        env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})},
        capture_output=True,
        text=True,
    )
    wall = time.perf_counter() - t
    if not os.path.exists(out):
        raise RuntimeError(
            f"bench.scale child {mode} failed (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        )
    res = json.loads(Path(out).read_text())
    os.unlink(out)
    res["process_wall_s"] = wall
    return res


# -- per size -------------------------------------------------------------------------------------


def bench_size(n: int, source: str, work: Path, image_size: int, keep_data: bool) -> dict[str, Any]:
    """Driver (new run, then resume), status and one rank's slice and fetch, on an n-sample dataset."""
    data = work / f"data-{n}"
    t = time.perf_counter()
    if not (data / "manifest.json").exists():
        replicate_dataset(source, str(data), n)
    made_s = time.perf_counter() - t
    cwd = work / f"run-{n}"  # a fresh working directory: run storage and the MLflow store go here
    shutil.rmtree(cwd, ignore_errors=True)
    cwd.mkdir(parents=True)
    cli = [
        "run",
        str(RECIPE),
        "--set",
        f"data.uri={data}",
        "--set",
        f"data.expected_samples={n}",
        "--set",
        f"data.image_size=[{image_size},{image_size}]",
        "--set",
        "run.storage=runs",
        "--set",
        "tracking.uri=sqlite:///mlflow.db",
    ]
    new = _run_child("driver", *cli, cwd=str(cwd))
    resume = _run_child("driver", *cli, cwd=str(cwd))
    status = _run_child("status", "runs", "unet224", cwd=str(cwd))
    t = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", "status", "unet224", "--json", "--storage", "runs"],
        cwd=cwd,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        check=True,
        capture_output=True,
    )
    status_cli_wall = time.perf_counter() - t
    # Stage 3 ("full", chunks of 100K), its first chunk.
    worker = _run_child("worker", str(cwd / "runs" / "unet224"), str(data), "2", "0", env={"ORCHESTRATOR_CACHE": "off"})
    out: dict[str, Any] = {
        "plan_s": round(new["plan_s"], 3),
        "driver_rss_mb": round(new["peak_rss_mb"], 1),
        "driver_to_launch_s": round(new["to_launch_s"], 2),
        "driver_open_and_validate_data_s": round(new["open_and_validate_data_s"], 3),
        "driver_plan_save_s": round(new["plan_save_s"], 3),
        "driver_task_info_s": round(new["task_info_s"], 3),
        "driver_process_wall_s": round(new["process_wall_s"], 2),
        "resume_s": round(resume["to_launch_s"], 2),
        "resume_rss_mb": round(resume["peak_rss_mb"], 1),
        "resume_plan_load_s": round(resume["plan_load_s"], 3),
        "resume_open_and_validate_data_s": round(resume["open_and_validate_data_s"], 3),
        "resume_process_wall_s": round(resume["process_wall_s"], 2),
        "resume_worker_s": round(worker["resume_worker_s"], 3),
        "status_s": round(status["status_s"], 4),
        "status_cli_wall_s": round(status_cli_wall, 2),
        "status_state": status["status_state"],
        "plan_npz_bytes": (cwd / "runs" / "unet224" / "plan.npz").stat().st_size,
        "index_parquet_bytes": (data / "index.parquet").stat().st_size,
        "worker_rss_after_open_mb": round(worker["worker_rss_after_open_mb"], 1),
        "rank_slice_s": round(worker["rank_slice_s"], 4),
        "rank_slice_samples": worker["rank_slice_samples"],
        "loop_id_map_s": round(worker["loop_id_map_s"], 3),
        "rank_fetch_s": round(worker["rank_fetch_s"], 2),
        "rank_stream_first_batch_s": round(worker["rank_stream_first_batch_s"], 2),
        "rank_stream_all_s": round(worker["rank_stream_all_s"], 2),
        "rank_stream_requests": worker["rank_stream_requests"],
        "rank_fetch_peak_rss_mb": round(worker["rank_fetch_peak_rss_mb"], 1),
        "bench_analysis_peak_rss_mb": round(worker["bench_analysis_peak_rss_mb"], 1),
        "rank_fetch_row_groups": worker["rank_fetch_row_groups"],
        "dataset_row_groups": worker["dataset_row_groups"],
        "rank_fetch_requests": worker["rank_fetch_requests"],
        "rank_fetch_bytes": worker["rank_fetch_bytes"],
        "rank_fetch_samples_read": worker["rank_fetch_samples_read"],
        "stage1_first_chunk_samples": worker["stage1_first_chunk_samples"],
        "stage1_first_chunk_samples_read": worker["stage1_first_chunk_samples_read"],
        "rank_fetch_read_amplification": worker["rank_fetch_read_amplification"],
        "read_amplification_by_chunking": worker["read_amplification_by_chunking"],
        "chunking": worker["chunking"],
        "dataset_bytes": worker["dataset_bytes"],
        "dataset_made_s": round(made_s, 1),
    }
    # The same fetch at the source's ~25 KB per sample: the same row groups, only bigger.
    out["rank_fetch_bytes_at_source_sample_size"] = int(out["rank_fetch_samples_read"] * SOURCE_SAMPLE_BYTES)
    if not keep_data:
        shutil.rmtree(data, ignore_errors=True)
    shutil.rmtree(cwd, ignore_errors=True)
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="120000,1200000", help="dataset sizes, comma-separated")
    ap.add_argument("--real-samples", type=int, default=4096, help="samples of the real set every dataset repeats")
    ap.add_argument("--real-image-size", type=int, default=32, help="px of that set's images (bytes per sample)")
    ap.add_argument("--first-step-real-samples", type=int, default=5000)
    ap.add_argument("--first-step-image-size", type=int, default=16,
                    help="px of the first-step set's images (at 1.2M samples the emulator holds them all in memory)")
    ap.add_argument("--first-step-samples", type=int, default=1_200_000,
                    help="samples of the first-step set (0: stage 1's first chunk plus the eval split, ~60K)")
    ap.add_argument("--first-step-geometry", choices=("source", "pack"), default="source",
                    help="row groups and shards: the source's (41 rows a group) or as `data pack` sizes these samples")
    ap.add_argument("--first-step-chunk", type=int, default=0,
                    help="stage 1's chunk_size (0: the recipe's 50K, which issue 24 reads; smaller for a quick check)")
    ap.add_argument("--first-step-log", default="",
                    help="write the first-step run's output here, each line at its time from the start")
    ap.add_argument("--no-data-wait", action="store_true",
                    help="first-step run: stop at the first step (no data_wait_share: it needs the whole first chunk)")
    ap.add_argument("--first-step-width", type=float, default=0.125, help="model.width of the first-step recipe")
    ap.add_argument("--latency-ms", type=float, default=20.0, help="added by the proxy to every GCS request")
    ap.add_argument("--timeout", type=float, default=1800.0,
                    help="first-step run: give up after this long (the first 50K chunk on 2 CPU cores: ~12 min)")
    ap.add_argument("--skip", default="", help="comma list of parts to skip: sizes,first_step")
    ap.add_argument("--only", default="", help="the one part to run (sizes or first_step): --skip every other")
    ap.add_argument(
        "--workdir", default=None, help="where datasets and runs go (default: a new temp folder, removed after)"
    )
    ap.add_argument("--keep", action="store_true", help="keep the datasets and the working folder")
    ap.add_argument("--json", action="store_true", help="one JSON line on stdout")
    args = ap.parse_args(argv)
    skip = set(filter(None, args.skip.split(",")))
    if args.only:
        skip |= {"sizes", "first_step"} - {args.only}
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {
        "bench": "scale",
        "machine": machine(),
        "python": platform.python_version(),
        "load_average_1m_at_start": round(os.getloadavg()[0], 2),
    }
    t0 = time.perf_counter()
    try:
        if "sizes" not in skip:
            source = make_source(
                str(work / f"source-{args.real_samples}-{args.real_image_size}px"),
                args.real_samples,
                args.real_image_size,
            )
            result["dataset"] = (
                f"{args.real_samples} synthetic samples at {args.real_image_size} px "
                "repeated to each size with distinct ids, "
                f"{SOURCE_ROWS_PER_GROUP} rows per row group, {SOURCE_ROWS_PER_SHARD} per shard "
                "(data pack's geometry "
                f"for the source's ~{SOURCE_SAMPLE_BYTES // 1000} KB samples)"
            )
            result["sizes"] = {}
            for n in (int(x) for x in args.sizes.split(",")):
                result["sizes"][str(n)] = bench_size(n, source, work, args.real_image_size, args.keep)
        if "first_step" not in skip:
            from bench.scale_first_step import bench_first_step

            result.update(bench_first_step(args, work))
    finally:
        if not args.keep and not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    result["load_average_1m_at_end"] = round(os.getloadavg()[0], 2)
    result["bench_seconds"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(result) if args.json else json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        mode, out_path, rest = sys.argv[2], sys.argv[3], sys.argv[4:]
        if mode == "driver":
            _child_driver(out_path, rest)
        elif mode == "worker":
            _child_worker(out_path, rest[0], rest[1], int(rest[2]), int(rest[3]))
        elif mode == "status":
            _child_status(out_path, rest[0], rest[1])
        elif mode == "run":
            from bench.scale_first_step import child_run

            child_run(out_path, rest)
        else:
            raise SystemExit(f"unknown child {mode}")
    else:
        main()
