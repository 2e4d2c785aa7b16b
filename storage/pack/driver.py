"""`pack()`: plan the source, run the parts not committed yet, then write the index and manifest."""

from __future__ import annotations

import io
import json
import logging
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from common.redact import redact_text
from storage import fs as sfs
from storage.dest_check import check_dest
from storage.layouts.base import (
    DEFAULT_MAX_PIXELS,
    DEFAULT_TASK,
    TaskPlan,
    check_task,
    detect_layout,
    wrong_layout,
)
from storage.pack.mask_depth import (
    BAD_IN_MESSAGE,
    BG_COLUMN,
    MASK_THRESHOLD,
    background_ids,
    background_tasks,
    backgrounds_table,
)
from storage.pack.order import DEFAULT_ORDER, order_entry, stored_order
from storage.pack.parts import default_workers, run_parts, sample_tasks
from storage.pack.records import (
    BACKGROUNDS,
    PACK_VERSION,
    STATE_DIR,
    PartTask,
    clear_stale,
    done_record,
    record_files,
    recorded_files,
    remove_stray_shards,
)
from storage.pack.result import PackError, PackResult
from storage.pack.sizes import choose_sizes, mean_sample_bytes
from storage.pack.tasks import TASK_COLUMNS, task_meta
from storage.seed_layout import plan_source
from storage.shards import CRC32_FORMAT, INDEX, MANIFEST, write_index_and_manifest
from storage.source_plan import SourceError, SourcePlan

log = logging.getLogger("storage.pack")


def pack(
    source: str,
    dest: str,
    *,
    skip_bad: bool = False,
    report: str | None = None,
    rows_per_shard: int | None = None,
    rows_per_group: int | None = None,
    workers: int | None = None,
    address: str | None = None,
    columns: dict[str, str] | None = None,
    progress: Callable[[int], None] | None = None,
    on_plan: Callable[[int, int], None] | None = None,
    task: str = DEFAULT_TASK,
    classes: str | None = None,
    depth_units_per_m: float | None = None,
    force: bool = False,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    order: str = DEFAULT_ORDER,
) -> PackResult:
    """Pack `source` into a dataset at `dest`.

    The samples, sorted by id, are cut into parts of one shard each. A part reads its files,
    checks every image (decodes it fully, compares sizes), writes its shard, then its record
    under DEST/.pack/ (written last: the part's commit marker). A re-run skips each part whose
    record matches the part's fingerprint (its files and the settings), so a killed pack goes on
    where it was. The index and manifest.json come last, and only when no sample is bad or
    skip_bad is set.

    Raises SourceError when the source holds nothing packable, PackError when samples are bad
    (without skip_bad) or none is left; `report` (a URI) gets the JSON report either way.
    `on_plan(samples, parts_to_run)` is called once the work is known (for a progress bar).

    `task` (storage.layouts.TASKS) says what SOURCE holds and what the dataset will: mask_depth
    (the default: the seed layout or its manifests), classification, segmentation or depth; a
    SOURCE in another task's layout is a SourceError saying which `--task` fits. `classes` is a
    class-names file (one per line) for segmentation/classification sources without one;
    `depth_units_per_m` the unit of 16-bit depth PNGs (default 1000: millimetres; KITTI: 256).
    An image (or depth array) of more than `max_pixels` pixels is a bad sample, named with its size.
    `order` is how the samples are stored (storage/pack/order.py): shuffled, the default, or the
    source's order; sample ids are the source's either way.

    DEST must be empty or hold only files this tool writes (storage.dest_check; ForeignDestError
    otherwise, unless `force`); a re-pack removes only the files an earlier pack recorded.
    """
    t0 = time.monotonic()
    check_task(task)
    dest = sfs.normalize(dest)
    check_dest(dest, "data pack", force)
    plan = plan_pack_source(task, source, columns, classes, depth_units_per_m)
    if not plan.samples and not plan.bad:
        what = "no label_info lines / manifest rows" if task == DEFAULT_TASK else "no images"
        raise SourceError(f"{redact_text(plan.source)}: empty source: no samples found ({what})")
    rps, rpg = choose_sizes(mean_sample_bytes(plan), rows_per_shard, rows_per_group)
    in_source_order = plan.samples
    plan = replace(plan, samples=[plan.samples[i] for i in stored_order(len(plan.samples), rps, rpg, order)])
    # A re-pack first removes the manifest: a crash mid-way then leaves no dataset describing
    # shards that are being rewritten.
    recorded = recorded_files(dest)
    sfs.remove(sfs.join(dest, MANIFEST))
    settings = {"version": PACK_VERSION, "rows_per_shard": rps, "rows_per_group": rpg, "samples": len(plan.samples)}
    if order != "source":  # packs from before the stored order had none: theirs was the source's
        settings["order"] = order_entry(order, rpg)
    if task != DEFAULT_TASK:
        settings["task"] = task
    else:
        settings["format"] = CRC32_FORMAT
    clear_stale(dest, settings, recorded)
    # Each sample's background id and the distinct background files: one sort over the samples.
    bg_ids, bg_refs = background_ids(plan) if task == DEFAULT_TASK else ([], [])
    tasks = sample_tasks(plan, dest, rps, rpg, bg_ids, max_pixels)
    bg_tasks = background_tasks(plan, dest, bg_refs, max_pixels) if task == DEFAULT_TASK else []
    records, bg_records = _committed(dest, tasks), _committed(dest, bg_tasks)
    todo = [t for t in tasks if t.part not in records]
    reused = len(records)
    if on_plan is not None:
        on_plan(len(plan.samples), len(todo))
    if progress is not None and reused:
        progress(sum(r["samples"] for r in records.values()))

    def done(record: dict[str, Any]) -> None:
        if record.get("role") == BACKGROUNDS:
            bg_records[record["part"]] = record
            return
        records[record["part"]] = record
        if progress is not None:
            progress(record["samples"])

    # memory:// lives in this process only: other processes or Ray tasks would write elsewhere.
    in_memory = dest.startswith("memory://") or plan.source.startswith("memory://")
    # Background parts first: few, and every sample part's row refers to them.
    bg_reused = len(bg_records)
    todo = [t for t in bg_tasks if t.part not in bg_records] + todo
    where = run_parts(
        todo,
        1 if in_memory else workers or default_workers(),
        None if in_memory else address,
        done,
        allow_ray=not in_memory,
    )
    log.info("pack: %d parts run (%s), %d reused", len(todo), where, reused + bg_reused)

    # The parts' bad samples in the source's order (the parts hold shuffled samples), as listed before;
    # the ranks only when there are some (a dict over every sample id: ~100 MB at 1.2M).
    found = [b for p in sorted(records) for b in records[p]["bad"]]
    if found:
        rank = {str(s.sample_id): i for i, s in enumerate(in_source_order)}
        found.sort(key=lambda b: (b["sample"] not in rank, rank.get(b["sample"], 0)))
    bad = list(plan.bad) + found
    bad = [{**b, "path": redact_text(b["path"])} for b in bad]
    packed = sum(records[p]["rows"] for p in records)
    result = PackResult(dest=dest, skipped=bad, unlisted=plan.unlisted, parts=len(tasks), parts_reused=reused)
    refusal = None
    if bad and not skip_bad:
        refusal = _bad_message(plan.source, bad, dest)
    elif packed == 0:
        refusal = f"{redact_text(plan.source)}: every sample is bad ({len(bad)}); nothing to pack"
    if refusal:  # nothing packed: the report says so before the error does
        result.report = {"packed": 0, "skipped": bad, "unlisted": len(plan.unlisted), "complete": False,
                         "dataset": None}
        _write_report(report, result.report)
        raise PackError(refusal)

    manifest, n_shards = _write_dataset(dest, plan, task, rps, rpg, bad, records, bg_records, recorded, order)
    result.packed, result.shards, result.manifest = packed, n_shards, manifest
    result.seconds = time.monotonic() - t0
    result.report = {
        "packed": packed,
        "skipped": bad,
        "unlisted": len(plan.unlisted),
        "complete": True,
        "dataset": redact_text(dest),
    }
    _write_report(report, result.report)
    return result


def _committed(dest: str, tasks: list[PartTask]) -> dict[int, dict[str, Any]]:
    """The parts an earlier pack committed with the same fingerprint (and whose shard is still there)."""
    records = {}
    for t in tasks:
        rec = done_record(dest, t)
        if rec is not None:
            records[t.part] = rec
    return records


def _write_dataset(
    dest: str,
    plan: SourcePlan,
    task: str,
    rps: int,
    rpg: int,
    bad: list[dict[str, str]],
    records: dict[int, dict[str, Any]],
    bg_records: dict[int, dict[str, Any]],
    recorded: set[str],
    order: str,
) -> tuple[dict[str, Any], int]:
    """The parts' index rows joined into the dataset's index, then manifest.json (last: it makes the
    dataset); stray shards of empty parts removed. Returns the manifest and the number of shards."""
    shards: list[dict[str, Any]] = []
    tables = []
    state = sfs.join(dest, STATE_DIR)
    for p in sorted(records):
        rec = records[p]
        if not rec["rows"]:
            continue
        table = pq.read_table(io.BytesIO(sfs.read_bytes(sfs.join(state, f"part-{p:05d}.index.parquet"))))
        table = table.add_column(1, "shard", pa.array([len(shards)] * table.num_rows, pa.int32()))
        tables.append(table)
        shards.append(rec["shard"])
    index = pa.concat_tables(tables)
    extra = {
        "source": redact_text(plan.source),
        "source_layout": plan.kind,
        "rows_per_group": rpg,
        "rows_per_shard": rps,
        "stored_order": order_entry(order, rpg),
        "mask_threshold": MASK_THRESHOLD,
        "pack": {"version": PACK_VERSION, "skipped": len(bad), "unlisted": len(plan.unlisted)},
    }
    if isinstance(plan, TaskPlan):
        remove_stray_shards(dest, {s["file"] for s in shards}, recorded | record_files(records))
        del extra["mask_threshold"]
        extra["meta"] = task_meta(plan, [records[p].get("stats") or {} for p in sorted(records)])
        manifest = write_index_and_manifest(dest, index, shards, extra, columns=TASK_COLUMNS[task], task=task)
    else:
        bg_entry = backgrounds_table(dest, bg_records, records)
        remove_stray_shards(
            dest,
            {s["file"] for s in shards} | {f["file"] for f in bg_entry["files"]} | {bg_entry["index"]},
            recorded | record_files(records) | record_files(bg_records),
        )
        manifest = write_index_and_manifest(dest, index, shards, extra, shared={BG_COLUMN.name: bg_entry})
    return manifest, len(shards)


def plan_pack_source(
    task: str,
    source: str,
    columns: dict[str, str] | None = None,
    classes: str | None = None,
    depth_units_per_m: float | None = None,
) -> SourcePlan:
    """The plan of SOURCE for `task`; SourceError when SOURCE is not what the task packs."""
    if task != DEFAULT_TASK:
        from storage.layouts import plan_task_source

        return plan_task_source(task, source, columns, classes, depth_units_per_m)
    if classes or depth_units_per_m:
        raise SourceError(
            f"--classes and --depth-units-per-m apply to --task classification/segmentation/depth, not {DEFAULT_TASK}"
        )
    layout, found = detect_layout(source)
    if layout in ("voc", "images_masks", "rgbd") or (layout == "imagefolder" and not _has_seed_names(source)):
        raise wrong_layout(source, task, layout, found)
    return plan_source(source, columns)


def _has_seed_names(source: str) -> bool:
    from storage.layouts.base import top_level
    from storage.seed_layout import CONTAINERS

    dirs, files = top_level(sfs.normalize(source))
    names = {n for ns in CONTAINERS.values() for n in ns}
    return bool(set(dirs) & names or {f[:-4] for f in files if f.endswith(".zip")} & names)


def _write_report(uri: str | None, report: dict[str, Any]) -> None:
    if uri:
        sfs.write_bytes(sfs.normalize(uri), (json.dumps(report, indent=2) + "\n").encode())


def _bad_message(source: str, bad: list[dict[str, str]], dest: str) -> str:
    lines = [f"- sample {b['sample']}: {b['path']}: {b['reason']}" for b in bad[:BAD_IN_MESSAGE]]
    more = (
        f"\n  ... and {len(bad) - BAD_IN_MESSAGE} more (all in the --report file)" if len(bad) > BAD_IN_MESSAGE else ""
    )
    return (
        f"{redact_text(source)}: {len(bad)} bad sample(s); no dataset written at {redact_text(dest)} "
        f"(no {MANIFEST} or {INDEX}):\n"
        + "\n".join(lines)
        + more
        + "\nFix or remove them and run the same command again (packed parts are kept and reused), "
        "or add --skip-bad to pack the rest and list the skipped ones with --report FILE"
    )
