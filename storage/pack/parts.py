"""Cutting a source plan into parts (one shard each) and running them: in Ray tasks, a process pool,
or in-process."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed
from multiprocessing import get_context
from typing import Any

from storage.layouts.base import DEFAULT_MAX_PIXELS, DEFAULT_TASK, TaskPlan, set_max_pixels
from storage.pack.mask_depth import MASK_THRESHOLD, run_backgrounds_part, run_mask_depth_part
from storage.pack.reading import zip_locations
from storage.pack.records import BACKGROUNDS, PACK_VERSION, PartTask
from storage.pack.sizes import file_kinds
from storage.pack.tasks import run_task_part
from storage.shards import CRC32_FORMAT
from storage.source_plan import SampleRef, SourcePlan


def run_part(task: PartTask) -> dict[str, Any]:
    """Pack one part into its shard; write the part's index rows, then its record (the marker).
    Runs in a process or a Ray task: everything it needs is in `task`."""
    set_max_pixels(task.max_pixels)
    if task.role == BACKGROUNDS:
        return run_backgrounds_part(task)
    if task.task != DEFAULT_TASK:
        return run_task_part(task)
    return run_mask_depth_part(task)


def sample_tasks(
    plan: SourcePlan,
    dest: str,
    rows_per_shard: int,
    rows_per_group: int,
    bg_ids: list[int],
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> list[PartTask]:
    """The sample parts; `bg_ids` is background_ids(plan)[0] for mask_depth (empty otherwise)."""
    containers = [(c.kind, c.uri, c.is_zip) for c in plan.containers]
    config = {
        "version": PACK_VERSION,
        "rows_per_group": rows_per_group,
        "mask_threshold": MASK_THRESHOLD,
        "extra": plan.extra_columns,
    }
    task, options = (plan.task, dict(plan.options)) if isinstance(plan, TaskPlan) else (DEFAULT_TASK, {})
    kinds = file_kinds(plan)
    if task == DEFAULT_TASK:
        config["format"] = CRC32_FORMAT
    if max_pixels != DEFAULT_MAX_PIXELS:  # another limit re-checks every part; the default keeps earlier packs' parts
        config["max_pixels"] = max_pixels
    tasks = []
    for part, start in enumerate(range(0, len(plan.samples), rows_per_shard)):
        refs: list[SampleRef] = plan.samples[start : start + rows_per_shard]
        samples = [
            (s.sample_id, s.name, {k: (s.files[k].container, s.files[k].member) for k in kinds}, s.extra) for s in refs
        ]
        ids = bg_ids[start : start + rows_per_shard]
        part_config = {**config, "bg_ids": ids} if task == DEFAULT_TASK else config
        tasks.append(
            PartTask(
                part,
                dest,
                rows_per_group,
                plan.fingerprint(refs, part_config),
                plan.extra_columns,
                containers,
                samples,
                task,
                options,
                bg_ids=ids,
                max_pixels=max_pixels,
                zip_at=zip_locations(plan, (f for _, _, files, _ in samples for f in files.values())),
            )
        )
    return tasks


def _ray_ready(address: str | None) -> bool:
    ray = sys.modules.get("ray")
    return address is not None or (ray is not None and ray.is_initialized())


def run_parts(
    tasks: list[PartTask],
    workers: int,
    address: str | None,
    on_done: Callable[[dict[str, Any]], None],
    allow_ray: bool = True,
) -> str:
    """Run the parts; returns where they ran (ray | processes | in-process)."""
    if not tasks:
        return "none"
    if allow_ray and _ray_ready(address):
        import ray

        if not ray.is_initialized():
            ray.init(address=address, logging_level=logging.WARNING, log_to_driver=False)
        remote = ray.remote(num_cpus=1, max_retries=2)(run_part)
        pending = [remote.remote(t) for t in tasks]
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            on_done(ray.get(done[0]))
        return "ray"
    if workers > 1 and len(tasks) > 1:
        # spawn, not fork: the caller may hold pyarrow, gcsfs or MLflow threads.
        with ProcessPoolExecutor(max_workers=min(workers, len(tasks)), mp_context=get_context("spawn")) as pool:
            futures = [pool.submit(run_part, t) for t in tasks]
            try:
                for fut in as_completed(futures):
                    on_done(fut.result())
            except BaseException:
                for fut in futures:
                    fut.cancel()
                raise
        return "processes"
    for t in tasks:
        on_done(run_part(t))
    return "in-process"


def default_workers() -> int:
    return max(1, min(8, os.cpu_count() or 1))
