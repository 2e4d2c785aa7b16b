"""The parts of a classification, segmentation or depth dataset: columns from the task's spec, values
from storage.layouts.samples, and the manifest's meta."""

from __future__ import annotations

from typing import Any

import numpy as np

from common.redact import redact_text
from common.tasks import (
    DEFAULT_DEPTH_RANGE_M,
    IGNORE_INDEX,
    MASK_DEPTH,
    MM_PER_M,
    get_task_spec,
    task_names,
)
from storage.columns import Column
from storage.layouts.base import BadSample, TaskPlan
from storage.pack.reading import member_problem, path_of, read_part_files
from storage.pack.records import IndexRows, PartTask, commit_part
from storage.shards import BASE_INDEX_COLUMNS, ShardFileWriter, checksum_of, columns_checksum, shard_file, write_format
from storage.source_plan import MemberError

# The columns of each task's dataset, as its spec declares them (mask_depth: storage.columns.MASK_DEPTH_COLUMNS).
TASK_COLUMNS: dict[str, tuple[Column, ...]] = {
    name: tuple(Column(c, codec_name) for c, codec_name in get_task_spec(name).columns)
    for name in task_names()
    if name != MASK_DEPTH.name
}


def run_task_part(task: PartTask) -> dict[str, Any]:
    """One part of a classification, segmentation or depth dataset: storage.layouts.samples makes the values."""
    from storage.layouts.samples import PREPARE, merge_stats

    prepare = PREPARE[task.task]
    columns = TASK_COLUMNS[task.task]
    kind = checksum_of(write_format(columns, shared=False))  # what the manifest will say these columns are
    blobs = read_part_files(task)
    rows = IndexRows.of(BASE_INDEX_COLUMNS, task.extra_columns)
    bad: list[dict[str, str]] = []
    stats: dict[str, Any] = {}
    writer: ShardFileWriter | None = None
    try:
        for sid, _name, files, sample_extra in task.samples:
            paths = {k: path_of(task, c, m) for k, (c, m) in files.items()}
            got = {k: blobs[(c, m)] for k, (c, m) in files.items()}
            try:
                for k, blob in got.items():
                    if isinstance(blob, MemberError):
                        raise BadSample(paths[k], member_problem(k, blob))
                prep = prepare(got, paths, sample_extra, task.options)
            except BadSample as exc:
                bad.append({"sample": str(sid), "path": redact_text(exc.path), "reason": exc.reason})
                continue
            if writer is None:
                writer = ShardFileWriter(task.dest, shard_file(task.part), task.rows_per_group, columns)
            group, row = writer.add(sid, prep.values, prep.height, prep.width)
            rows.add(
                sid,
                group,
                row,
                prep.height,
                prep.width,
                columns_checksum(columns, prep.values, kind),
                {**{k: sample_extra.get(k) for k in task.extra_columns}, **prep.index},
            )
            merge_stats(stats, prep.stats)
        entry = writer.close() if writer is not None else None
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    return commit_part(task, rows, entry, bad, stats)


# Depth datasets: NYU Depth v2's range (common.tasks.DEFAULT_DEPTH_RANGE_M), widened to the data's
# when they go beyond it.
def task_meta(plan: TaskPlan, part_stats: list[dict[str, Any]]) -> dict[str, Any]:
    """The manifest's "meta" of a task dataset: the plan's (class names, ...) plus what the packed
    samples showed (channels; for depth, the range)."""
    from storage.layouts.samples import merge_stats

    stats: dict[str, Any] = {}
    for st in part_stats:
        merge_stats(stats, st)
    meta = dict(plan.meta)
    channels = 3 if 3 in stats.get("channels", []) else 1
    if plan.task == "classification":
        meta["channels"] = channels
    elif plan.task == "segmentation":
        meta.setdefault("ignore_index", IGNORE_INDEX)
        meta["channels"] = channels
    elif plan.task == "depth":
        lo, hi = DEFAULT_DEPTH_RANGE_M
        meta["depth_scale"] = MM_PER_M
        if "min_mm" in stats:
            data_lo, data_hi = stats["min_mm"] / MM_PER_M, stats["max_mm"] / MM_PER_M
            meta.update(data_min_depth_m=data_lo, data_max_depth_m=data_hi)
            lo, hi = min(lo, data_lo), max(hi, float(np.ceil(data_hi)))
        meta.update(min_depth_m=lo, max_depth_m=hi, channels=channels)
    return meta
