"""`orchestrator data pack`: a raw source (the seed layout, or a CSV/Parquet manifest) -> a packed
dataset, resumably (one committed part per shard) and in parallel (Ray tasks or processes).

`--task` picks what the dataset holds: mask_depth (the seed layout; the default), classification,
segmentation or depth (their layouts are in storage/layouts/). Every task goes through the same
parts, records, resume and report; only how a sample's files become column values differs
(prepare_sample for mask_depth, storage.layouts.samples for the others).

mask_depth is packed as format /4 (storage/shards.py): each distinct background file gets an id
(in the order of its container and name), background parts store each one once in shared/bg/,
and sample parts store the id in its place. Sample parts still read and check their samples'
backgrounds (a bad background makes each of its samples bad, named as before)."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import sys
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from multiprocessing import get_context
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from common.redact import redact_text
from common.tasks import DEFAULT_DEPTH_RANGE_M, MASK_DEPTH, get_task_spec, task_names
from storage import codec
from storage import fs as sfs
from storage.columns import MASK_DEPTH_COLUMNS, Column
from storage.dest_check import check_dest, is_packed_file, remove_packed_files
from storage.layouts.base import (  # BadSample lives there now; importable from here as before
    DEFAULT_MAX_PIXELS,
    DEFAULT_TASK,
    BadSample,
    TaskPlan,
    check_task,
    detect_layout,
    open_image_checked,
    set_max_pixels,
    wrong_layout,
)
from storage.seed_layout import (
    IMAGE_KINDS,
    Container,
    FileRef,
    MemberError,
    SampleRef,
    SourceError,
    SourcePlan,
    member_key,
    plan_source,
    read_files,
    read_members,
)
from storage.shards import (
    BASE_INDEX_COLUMNS,
    INDEX,
    INDEX_COLUMNS,
    MANIFEST,
    MASK_DEPTH_SHARED,
    SHARED_FORMAT,
    ShardFileWriter,
    columns_checksum,
    index_table,
    shard_file,
    shared_file,
    shared_key,
    stored_columns,
    write_index_and_manifest,
    write_shared_index,
)

log = logging.getLogger(__name__)

PACK_VERSION = 1
STATE_DIR = ".pack"
# Shards sized for object stores: big enough that per-object costs vanish, small enough that a
# failed upload or a re-pack of one part is cheap.
SHARD_TARGET_BYTES = 128 * 2**20
# Row groups are the unit of a chunk preload (one ranged read each); ~1 MB keeps a read's
# latency small next to its transfer and the bytes fetched close to the bytes needed.
GROUP_TARGET_BYTES = 1 * 2**20
ROWS_PER_GROUP_RANGE = (4, 256)
ROWS_PER_SHARD_RANGE = (16, 65536)
# When no file sizes are known (a manifest of URIs), assume this many bytes per sample.
DEFAULT_SAMPLE_BYTES = 48 * 2**10
# Source masks are JPEGs (lossy): pixels at or above this gray value are foreground.
MASK_THRESHOLD = 128
# Bad samples named in an error message before "and N more" (the report lists them all).
BAD_IN_MESSAGE = 20
# What a mask_depth shard row holds (/4): the background's id in its place; its table's column.
MASK_DEPTH_STORED = stored_columns(MASK_DEPTH_COLUMNS, MASK_DEPTH_SHARED)
BG_COLUMN = Column("bg", "image")
# Roles of a part: a shard of samples, or a file of the shared backgrounds (mask_depth).
SAMPLES, BACKGROUNDS = "samples", "backgrounds"
_RECORD_PREFIX = {SAMPLES: "part", BACKGROUNDS: "bg-part"}


class PackError(RuntimeError):
    """The pack cannot finish (bad samples without --skip-bad, or nothing to pack); names them."""


# The columns of each task's dataset (mask_depth: storage.columns.MASK_DEPTH_COLUMNS, the default).
TASK_COLUMNS: dict[str, tuple[Column, ...]] = {
    name: tuple(Column(c, codec_name) for c, codec_name in get_task_spec(name).columns)
    for name in task_names() if name != MASK_DEPTH.name
}
# Depth datasets: NYU Depth v2's range (common.tasks.DEFAULT_DEPTH_RANGE_M), widened to the data's
# when they go beyond it.


@dataclass
class PackResult:
    dest: str
    packed: int
    skipped: list[dict[str, str]]
    unlisted: list[str]
    shards: int
    parts: int
    parts_reused: int
    seconds: float
    manifest: dict[str, Any] | None = None
    report: dict[str, Any] = field(default_factory=dict)


@dataclass
class PartTask:
    """Everything one part needs, small and picklable (it travels to a process or a Ray task)."""

    part: int
    dest: str
    rows_per_group: int
    fingerprint: str
    extra_columns: tuple[str, ...]
    containers: list[tuple[str, str, bool]]  # (kind, uri, is_zip)
    samples: list[tuple[int, str, dict[str, tuple[int | None, str]], dict[str, Any]]]
    task: str = DEFAULT_TASK
    options: dict[str, Any] = field(default_factory=dict)  # what the task's prepare needs (class count, depth units)
    role: str = SAMPLES  # or BACKGROUNDS: samples are then (bg id, name, {"bg": file}, {})
    bg_ids: list[int] = field(default_factory=list)  # mask_depth: each sample's background id
    max_pixels: int = DEFAULT_MAX_PIXELS  # images over this are bad samples (--max-pixels)


# -- sizing ----------------------------------------------------------------------------------------


def _file_kinds(plan: SourcePlan) -> tuple[str, ...]:
    return plan.file_kinds if isinstance(plan, TaskPlan) else IMAGE_KINDS


def mean_sample_bytes(plan: SourcePlan) -> int:
    """Mean bytes of what a shard row holds: every file of a sample but the background of
    mask_depth, which is stored once in its own table."""
    kinds = _file_kinds(plan) if isinstance(plan, TaskPlan) else tuple(k for k in IMAGE_KINDS if k != "bg")
    sizes = []
    for s in plan.samples[:2000]:
        total = 0
        for kind in kinds:
            ref = s.files[kind]
            if ref.container is None:
                return DEFAULT_SAMPLE_BYTES
            container = plan.containers[ref.container]
            entry = container.entries.get(member_key(container.kind, ref.member))
            total += entry.size if entry else 0
        sizes.append(total)
    return int(np.mean(sizes)) if sizes else DEFAULT_SAMPLE_BYTES


def choose_sizes(sample_bytes: int, rows_per_shard: int | None, rows_per_group: int | None) -> tuple[int, int]:
    sample_bytes = max(sample_bytes, 1)
    if rows_per_group is None:
        rows_per_group = int(np.clip(GROUP_TARGET_BYTES // sample_bytes, *ROWS_PER_GROUP_RANGE))
    if rows_per_shard is None:
        rows_per_shard = int(np.clip(SHARD_TARGET_BYTES // sample_bytes, *ROWS_PER_SHARD_RANGE))
        rows_per_shard = max(rows_per_group, rows_per_shard // rows_per_group * rows_per_group)
    return int(rows_per_shard), min(int(rows_per_group), int(rows_per_shard))


# -- one part -----------------------------------------------------------------------------------------


def _decode(data: bytes, kind: str, path: str) -> Image.Image:
    try:
        img = open_image_checked(data, kind, path)  # over the pixel limit: BadSample, before any decode
        img.load()  # Pillow decodes lazily: a truncated file fails here, not in training
    except BadSample:
        raise
    except Exception as exc:  # noqa: BLE001 - Pillow raises many types for bad bytes
        raise BadSample(path, f"{kind} cannot be decoded ({type(exc).__name__}: {exc}); corrupt or truncated image") from None
    if img.format not in ("JPEG", "PNG"):
        raise BadSample(path, f"{kind} is {img.format}, expected JPEG or PNG")
    return img


def prepare_sample(blobs: dict[str, bytes | MemberError], paths: dict[str, str], bg_seen: dict[str, tuple[int, int]]) -> tuple[dict[str, bytes], int, int, float]:
    """Check one sample's four files and turn them into the packed format's bytes.

    fg_bg and bg are kept as they are (JPEG or PNG); the mask becomes a 0/255 mask in the raw
    format (storage.codec; source masks are JPEGs, thresholded at MASK_THRESHOLD); depth is
    stored in the raw format with the values of the source file when it is an 8- or 16-bit
    grayscale PNG, else converted to 8-bit gray first. Raises BadSample naming the file and the reason.
    """
    for kind in IMAGE_KINDS:
        blob = blobs[kind]
        if isinstance(blob, MemberError):
            reason = "missing partner file" if str(blob) in ("file missing", "missing from the zip") else str(blob)
            raise BadSample(paths[kind], f"{kind}: {reason}")
    sizes: dict[str, tuple[int, int]] = {}
    fg = _decode(blobs["fg_bg"], "fg_bg", paths["fg_bg"])
    sizes["fg_bg"] = fg.size
    if paths["bg"] in bg_seen:
        sizes["bg"] = bg_seen[paths["bg"]]
    else:
        sizes["bg"] = bg_seen[paths["bg"]] = _decode(blobs["bg"], "bg", paths["bg"]).size

    mask_img = _decode(blobs["mask"], "mask", paths["mask"])
    sizes["mask"] = mask_img.size
    mask = np.asarray(mask_img.convert("L"))
    mask_bytes = codec.encode_mask((mask >= MASK_THRESHOLD).astype(np.uint8) * 255)

    depth_img = _decode(blobs["depth"], "depth", paths["depth"])
    sizes["depth"] = depth_img.size
    try:
        if depth_img.format == "PNG" and depth_img.mode in ("L", "I;16", "I;16B", "I;16L"):
            values = codec.depth_image_values(depth_img)
        elif depth_img.mode in ("RGB", "RGBA", "P", "LA", "L"):
            values = np.asarray(depth_img.convert("L"))
        else:
            raise BadSample(paths["depth"], f"depth has mode {depth_img.mode}, expected 8- or 16-bit grayscale")
        depth_bytes = codec.encode_depth_8bit(values) if values.dtype == np.uint8 else codec.encode_depth_uint16(values)
        depth_mean = float(codec.decode_depth(depth_bytes).mean())
    except codec.CorruptImageError as exc:
        raise BadSample(paths["depth"], f"depth: {exc}") from None

    if len(set(sizes.values())) != 1:
        desc = ", ".join(f"{k} {w}x{h}" for k, (w, h) in sizes.items())
        raise BadSample(paths["fg_bg"], f"size mismatch: {desc} (width x height); all four images of a sample must have one size")
    w, h = sizes["fg_bg"]
    images = {"fg_bg": bytes(blobs["fg_bg"]), "bg": bytes(blobs["bg"]), "mask": mask_bytes, "depth": depth_bytes}
    return images, h, w, depth_mean


def _read_part_files(task: PartTask) -> dict[tuple[int | None, str], bytes | MemberError]:
    wanted: dict[int | None, set[str]] = {}
    for _, _, files, _ in task.samples:
        for c, member in files.values():
            wanted.setdefault(c, set()).add(member)
    blobs: dict[tuple[int | None, str], bytes | MemberError] = {}
    for c, members in wanted.items():
        if c is None:
            # Manifest URIs: one concurrent batch per filesystem.
            by_protocol: dict[str, list[str]] = {}
            for uri in sorted(members):
                by_protocol.setdefault(uri.split("://", 1)[0] if "://" in uri else "file", []).append(uri)
            for uris in by_protocol.values():
                blobs.update({(None, k): v for k, v in read_files(uris).items()})
        else:
            kind, uri, is_zip = task.containers[c]
            got = read_members(Container(kind, uri, is_zip), sorted(members))
            blobs.update({(c, k): v for k, v in got.items()})
    return blobs


def _path_of(task: PartTask, c: int | None, member: str) -> str:
    if c is None:
        return member
    _, uri, is_zip = task.containers[c]
    return Container("", uri, is_zip).path_of(member)


def run_part(task: PartTask) -> dict[str, Any]:
    """Pack one part into its shard; write the part's index rows, then its record (the marker)."""
    set_max_pixels(task.max_pixels)
    if task.role == BACKGROUNDS:
        return _run_backgrounds_part(task)
    if task.task != DEFAULT_TASK:
        return _run_task_part(task)
    blobs = _read_part_files(task)
    cols: dict[str, list] = {c: [] for c in INDEX_COLUMNS if c != "shard"}
    extra: dict[str, list] = {c: [] for c in task.extra_columns}
    bad: list[dict[str, str]] = []
    bg_seen: dict[str, tuple[int, int]] = {}
    bg_used: set[int] = set()
    writer: ShardFileWriter | None = None
    key = shared_key("bg")
    try:
        for (sid, _name, files, sample_extra), bg_id in zip(task.samples, task.bg_ids, strict=True):
            paths = {k: _path_of(task, c, m) for k, (c, m) in files.items()}
            try:
                images, h, w, depth_mean = prepare_sample({k: blobs[(c, m)] for k, (c, m) in files.items()}, paths, bg_seen)
            except BadSample as exc:
                bad.append({"sample": str(sid), "path": redact_text(exc.path), "reason": exc.reason})
                continue
            if writer is None:
                writer = ShardFileWriter(task.dest, shard_file(task.part), task.rows_per_group, MASK_DEPTH_STORED)
            values = {"fg_bg": images["fg_bg"], key: int(bg_id), "mask": images["mask"], "depth": images["depth"]}
            group, row = writer.add(sid, values, h, w)
            bg_used.add(int(bg_id))
            for k, v in (("sample_id", sid), ("row_group", group), ("row", row), ("height", h), ("width", w), ("depth_mean", depth_mean),
                         ("checksum", columns_checksum(MASK_DEPTH_STORED, values))):
                cols[k].append(v)
            for k in task.extra_columns:
                extra[k].append(sample_extra.get(k))
        entry = writer.close() if writer is not None else None
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    return _commit_part(task, cols, extra, entry, bad, extra_record={"bg_used": sorted(bg_used)})


def _run_backgrounds_part(task: PartTask) -> dict[str, Any]:
    """Store one part's distinct backgrounds (each checked to decode) in a file of the shared
    table, id as sample_id. One that does not decode is left out and recorded; its samples are
    bad in their own parts, which read it too."""
    blobs = _read_part_files(task)
    cols: dict[str, list] = {c: [] for c in BASE_INDEX_COLUMNS if c != "shard"}
    bad: list[dict[str, str]] = []
    writer: ShardFileWriter | None = None
    try:
        for vid, _name, files, _ in task.samples:
            c, m = files["bg"]
            path, blob = _path_of(task, c, m), blobs[(c, m)]
            try:
                if isinstance(blob, MemberError):
                    raise BadSample(path, _member_problem("bg", blob))
                w, h = _decode(blob, "bg", path).size
            except BadSample as exc:
                bad.append({"sample": f"bg {vid}", "path": redact_text(exc.path), "reason": exc.reason})
                continue
            if writer is None:
                writer = ShardFileWriter(task.dest, shared_file(BG_COLUMN.name, task.part), task.rows_per_group, (BG_COLUMN,))
            value = {BG_COLUMN.name: bytes(blob)}
            group, row = writer.add(vid, value, h, w)
            for k, v in (("sample_id", vid), ("row_group", group), ("row", row), ("height", h), ("width", w),
                         ("checksum", columns_checksum((BG_COLUMN,), value))):
                cols[k].append(v)
        entry = writer.close() if writer is not None else None
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    return _commit_part(task, cols, {}, entry, bad)


def _commit_part(task: PartTask, cols: dict[str, list], extra: dict[str, list], entry: dict[str, Any] | None,
                 bad: list[dict[str, str]], stats: dict[str, Any] | None = None, extra_record: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write the part's index rows, then its record: the marker a re-run finds and reuses."""
    state = sfs.join(task.dest, STATE_DIR)
    prefix = _RECORD_PREFIX[task.role]
    table = index_table({**cols, "shard": [0] * len(cols["sample_id"])}, extra).drop_columns(["shard"])
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    sfs.write_bytes(sfs.join(state, f"{prefix}-{task.part:05d}.index.parquet"), buf.getvalue())
    record = {"part": task.part, "role": task.role, "fingerprint": task.fingerprint, "shard": entry, "rows": len(cols["sample_id"]), "bad": bad,
              "samples": len(task.samples), **(extra_record or {})}
    if stats is not None:
        record["stats"] = stats
    sfs.write_json(sfs.join(state, f"{prefix}-{task.part:05d}.json"), record)
    return record


def _member_problem(kind: str, blob: MemberError) -> str:
    return f"{kind}: missing partner file" if str(blob) in ("file missing", "missing from the zip") else f"{kind}: {blob}"


def _run_task_part(task: PartTask) -> dict[str, Any]:
    """run_part for classification, segmentation and depth: storage.layouts.samples makes the values."""
    from storage.layouts.samples import PREPARE, merge_stats

    prepare = PREPARE[task.task]
    columns = TASK_COLUMNS[task.task]
    blobs = _read_part_files(task)
    cols: dict[str, list] = {c: [] for c in BASE_INDEX_COLUMNS if c != "shard"}
    extra: dict[str, list] = {c: [] for c in task.extra_columns}
    bad: list[dict[str, str]] = []
    stats: dict[str, Any] = {}
    writer: ShardFileWriter | None = None
    try:
        for sid, _name, files, sample_extra in task.samples:
            paths = {k: _path_of(task, c, m) for k, (c, m) in files.items()}
            got = {k: blobs[(c, m)] for k, (c, m) in files.items()}
            try:
                for k, blob in got.items():
                    if isinstance(blob, MemberError):
                        raise BadSample(paths[k], _member_problem(k, blob))
                prep = prepare(got, paths, sample_extra, task.options)
            except BadSample as exc:
                bad.append({"sample": str(sid), "path": redact_text(exc.path), "reason": exc.reason})
                continue
            if writer is None:
                writer = ShardFileWriter(task.dest, shard_file(task.part), task.rows_per_group, columns)
            group, row = writer.add(sid, prep.values, prep.height, prep.width)
            for k, v in (("sample_id", sid), ("row_group", group), ("row", row), ("height", prep.height), ("width", prep.width),
                         ("checksum", columns_checksum(columns, prep.values))):
                cols[k].append(v)
            for k in task.extra_columns:
                extra[k].append(sample_extra.get(k))
            for k, v in prep.index.items():
                extra.setdefault(k, []).append(v)
            merge_stats(stats, prep.stats)
        entry = writer.close() if writer is not None else None
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    return _commit_part(task, cols, extra, entry, bad, stats)


# -- the whole pack -------------------------------------------------------------------------------


def background_ids(plan: SourcePlan) -> tuple[list[int], list[FileRef]]:
    """Each sample's background id, and the background file of each id: the distinct files in
    the order of (container, name), so the ids depend only on the source's files."""
    key = lambda ref: (-1 if ref.container is None else ref.container, ref.member)  # noqa: E731
    files = sorted({key(s.files["bg"]): s.files["bg"] for s in plan.samples}.items())
    ids = {k: i for i, (k, _) in enumerate(files)}
    return [ids[key(s.files["bg"])] for s in plan.samples], [ref for _, ref in files]


def _tasks(plan: SourcePlan, dest: str, rows_per_shard: int, rows_per_group: int, bg_ids: list[int],
           max_pixels: int = DEFAULT_MAX_PIXELS) -> list[PartTask]:
    """The sample parts; `bg_ids` is background_ids(plan)[0] for mask_depth (empty otherwise)."""
    containers = [(c.kind, c.uri, c.is_zip) for c in plan.containers]
    config = {"version": PACK_VERSION, "rows_per_group": rows_per_group, "mask_threshold": MASK_THRESHOLD, "extra": plan.extra_columns}
    task, options = (plan.task, dict(plan.options)) if isinstance(plan, TaskPlan) else (DEFAULT_TASK, {})
    kinds = _file_kinds(plan)
    if task == DEFAULT_TASK:
        config["format"] = SHARED_FORMAT
    if max_pixels != DEFAULT_MAX_PIXELS:  # another limit re-checks every part; the default keeps earlier packs' parts
        config["max_pixels"] = max_pixels
    tasks = []
    for part, start in enumerate(range(0, len(plan.samples), rows_per_shard)):
        refs: list[SampleRef] = plan.samples[start : start + rows_per_shard]
        samples = [(s.sample_id, s.name, {k: (s.files[k].container, s.files[k].member) for k in kinds}, s.extra) for s in refs]
        ids = bg_ids[start : start + rows_per_shard]
        part_config = {**config, "bg_ids": ids} if task == DEFAULT_TASK else config
        tasks.append(PartTask(part, dest, rows_per_group, plan.fingerprint(refs, part_config), plan.extra_columns, containers, samples, task,
                              options, bg_ids=ids, max_pixels=max_pixels))
    return tasks


def _background_tasks(plan: SourcePlan, dest: str, refs: list[FileRef], max_pixels: int = DEFAULT_MAX_PIXELS) -> list[PartTask]:
    """mask_depth's background parts: the distinct background files (`refs`, background_ids(plan)[1]),
    in files of ~SHARD_TARGET_BYTES."""
    if isinstance(plan, TaskPlan) or not plan.samples:
        return []
    sizes = []
    for ref in refs[:2000]:
        entry = None if ref.container is None else plan.containers[ref.container].entries.get(member_key("bg", ref.member))
        sizes.append(entry.size if entry else DEFAULT_SAMPLE_BYTES)
    per_file, per_group = choose_sizes(int(np.mean(sizes)), None, None)
    containers = [(c.kind, c.uri, c.is_zip) for c in plan.containers]
    tasks = []
    for part, start in enumerate(range(0, len(refs), per_file)):
        chunk = refs[start : start + per_file]
        h = hashlib.sha256(repr(("backgrounds", PACK_VERSION, SHARED_FORMAT, per_group)).encode())
        if max_pixels != DEFAULT_MAX_PIXELS:
            h.update(f"|max_pixels={max_pixels}".encode())
        for vid, ref in enumerate(chunk, start):
            where = "" if ref.container is None else plan.containers[ref.container].uri
            h.update(f"|{vid}|{where}|{ref.member}|{ref.stamp}".encode())
        samples = [(vid, ref.member, {"bg": (ref.container, ref.member)}, {}) for vid, ref in enumerate(chunk, start)]
        tasks.append(PartTask(part, dest, per_group, h.hexdigest(), (), containers, samples, DEFAULT_TASK, {}, role=BACKGROUNDS,
                              max_pixels=max_pixels))
    return tasks


def _done_record(dest: str, task: PartTask) -> dict[str, Any] | None:
    """The part's record when it was packed with this fingerprint and its shard is still there."""
    state = sfs.join(dest, STATE_DIR)
    prefix = _RECORD_PREFIX[task.role]
    try:
        record = sfs.read_json(sfs.join(state, f"{prefix}-{task.part:05d}.json"))
    except (FileNotFoundError, ValueError):
        return None
    if record.get("fingerprint") != task.fingerprint:
        return None
    shard = record.get("shard")
    if shard is not None:
        try:
            if sfs.size(sfs.join(dest, shard["file"])) != shard["bytes"]:
                return None
        except FileNotFoundError:
            return None
    if not sfs.exists(sfs.join(state, f"{prefix}-{task.part:05d}.index.parquet")):
        return None
    return record


def _ray_ready(address: str | None) -> bool:
    ray = sys.modules.get("ray")
    return address is not None or (ray is not None and ray.is_initialized())


def _run_parts(tasks: list[PartTask], workers: int, address: str | None, on_done: Callable[[dict[str, Any]], None], allow_ray: bool = True) -> str:
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


def _recorded_files(dest: str) -> set[str]:
    """The data files (relative to DEST) that an earlier pack recorded: in its part records under
    DEST/.pack/ and in its manifest. A re-pack removes no other file: DEST may hold a user's files."""
    out: set[str] = set()
    state = sfs.join(dest, STATE_DIR)
    for name in sfs.listdir(state):
        if not name.endswith(".json") or name == "settings.json":
            continue
        try:
            shard = sfs.read_json(sfs.join(state, name)).get("shard")
        except (FileNotFoundError, ValueError, AttributeError):
            continue
        if isinstance(shard, dict) and isinstance(shard.get("file"), str):
            out.add(shard["file"])
    try:
        manifest = sfs.read_json(sfs.join(dest, MANIFEST))
    except (FileNotFoundError, ValueError):
        manifest = None
    if isinstance(manifest, dict):
        out |= {s["file"] for s in manifest.get("shards") or [] if isinstance(s, dict) and isinstance(s.get("file"), str)}
        for entry in (manifest.get("shared") or {}).values():
            if isinstance(entry, dict):
                out |= {entry["index"]} if isinstance(entry.get("index"), str) else set()
                out |= {f["file"] for f in entry.get("files") or [] if isinstance(f, dict) and isinstance(f.get("file"), str)}
    # Only names a pack writes: a damaged or hand-edited record cannot point the re-pack at a user's file.
    return {f for f in out if is_packed_file(f) and not f.startswith(f"{STATE_DIR}/")}


def _clear_stale(dest: str, settings: dict[str, Any], recorded: set[str]) -> None:
    """Start over when the part layout changed (other shard/group sizes): old parts cannot be reused.
    Removes what the earlier pack recorded and its state files, nothing else."""
    state = sfs.join(dest, STATE_DIR)
    try:
        old = sfs.read_json(sfs.join(state, "settings.json"))
    except (FileNotFoundError, ValueError):
        old = None
    if old != settings:
        for rel in sorted(recorded):
            sfs.remove(sfs.join(dest, rel))
        remove_packed_files(dest, STATE_DIR)
        sfs.write_json(sfs.join(state, "settings.json"), settings)


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
    # A re-pack first removes the manifest: a crash mid-way then leaves no dataset describing
    # shards that are being rewritten.
    recorded = _recorded_files(dest)
    sfs.remove(sfs.join(dest, MANIFEST))
    settings = {"version": PACK_VERSION, "rows_per_shard": rps, "rows_per_group": rpg, "samples": len(plan.samples)}
    if task != DEFAULT_TASK:
        settings["task"] = task
    else:
        settings["format"] = SHARED_FORMAT
    _clear_stale(dest, settings, recorded)
    # Each sample's background id and the distinct background files: one sort over the samples.
    bg_ids, bg_refs = background_ids(plan) if task == DEFAULT_TASK else ([], [])
    tasks = _tasks(plan, dest, rps, rpg, bg_ids, max_pixels)
    bg_tasks = _background_tasks(plan, dest, bg_refs, max_pixels) if task == DEFAULT_TASK else []
    records: dict[int, dict[str, Any]] = {}
    bg_records: dict[int, dict[str, Any]] = {}
    for t in tasks:
        rec = _done_record(dest, t)
        if rec is not None:
            records[t.part] = rec
    for t in bg_tasks:
        rec = _done_record(dest, t)
        if rec is not None:
            bg_records[t.part] = rec
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
    where = _run_parts(todo, 1 if in_memory else workers or default_workers(), None if in_memory else address, done, allow_ray=not in_memory)
    log.info("pack: %d parts run (%s), %d reused", len(todo), where, reused + bg_reused)

    bad = list(plan.bad) + [b for p in sorted(records) for b in records[p]["bad"]]
    bad = [{**b, "path": redact_text(b["path"])} for b in bad]
    packed = sum(records[p]["rows"] for p in records)
    result = PackResult(dest, 0, bad, plan.unlisted, 0, len(tasks), reused, 0.0)
    if bad and not skip_bad:
        result.report = {"packed": 0, "skipped": bad, "unlisted": len(plan.unlisted), "complete": False, "dataset": None}
        _write_report(report, result.report)
        raise PackError(_bad_message(plan.source, bad, dest))
    if packed == 0:
        result.report = {"packed": 0, "skipped": bad, "unlisted": len(plan.unlisted), "complete": False, "dataset": None}
        _write_report(report, result.report)
        raise PackError(f"{redact_text(plan.source)}: every sample is bad ({len(bad)}); nothing to pack")

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
        "mask_threshold": MASK_THRESHOLD,
        "pack": {"version": PACK_VERSION, "skipped": len(bad), "unlisted": len(plan.unlisted)},
    }
    if isinstance(plan, TaskPlan):
        _remove_stray_shards(dest, {s["file"] for s in shards}, recorded | _record_files(records))
        del extra["mask_threshold"]
        extra["meta"] = task_meta(plan, [records[p].get("stats") or {} for p in sorted(records)])
        manifest = write_index_and_manifest(dest, index, shards, extra, columns=TASK_COLUMNS[task], task=task)
    else:
        bg_entry = _backgrounds_table(dest, bg_records, records)
        _remove_stray_shards(dest, {s["file"] for s in shards} | {f["file"] for f in bg_entry["files"]} | {bg_entry["index"]},
                             recorded | _record_files(records) | _record_files(bg_records))
        manifest = write_index_and_manifest(dest, index, shards, extra, shared={BG_COLUMN.name: bg_entry})
    result.packed, result.shards, result.manifest = packed, len(shards), manifest
    result.seconds = time.monotonic() - t0
    result.report = {"packed": packed, "skipped": bad, "unlisted": len(plan.unlisted), "complete": True, "dataset": redact_text(dest)}
    _write_report(report, result.report)
    return result


def plan_pack_source(task: str, source: str, columns: dict[str, str] | None = None, classes: str | None = None,
                     depth_units_per_m: float | None = None) -> SourcePlan:
    """The plan of SOURCE for `task`; SourceError when SOURCE is not what the task packs."""
    if task != DEFAULT_TASK:
        from storage.layouts import plan_task_source

        return plan_task_source(task, source, columns, classes, depth_units_per_m)
    if classes or depth_units_per_m:
        raise SourceError(f"--classes and --depth-units-per-m apply to --task classification/segmentation/depth, not {DEFAULT_TASK}")
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
        meta.setdefault("ignore_index", 255)
        meta["channels"] = channels
    elif plan.task == "depth":
        lo, hi = DEFAULT_DEPTH_RANGE_M
        meta["depth_scale"] = 1000
        if "min_mm" in stats:
            data_lo, data_hi = stats["min_mm"] / 1000, stats["max_mm"] / 1000
            meta.update(data_min_depth_m=data_lo, data_max_depth_m=data_hi)
            lo, hi = min(lo, data_lo), max(hi, float(np.ceil(data_hi)))
        meta.update(min_depth_m=lo, max_depth_m=hi, channels=channels)
    return meta


def _backgrounds_table(dest: str, bg_records: dict[int, dict[str, Any]], records: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """Write the shared backgrounds' index from the background parts; returns its manifest entry.
    PackError when a packed sample's background is not in it (its file changed during the pack)."""
    state = sfs.join(dest, STATE_DIR)
    files: list[dict[str, Any]] = []
    tables = []
    for p in sorted(bg_records):
        rec = bg_records[p]
        if not rec["rows"]:
            continue
        table = pq.read_table(io.BytesIO(sfs.read_bytes(sfs.join(state, f"{_RECORD_PREFIX[BACKGROUNDS]}-{p:05d}.index.parquet"))))
        tables.append(table.add_column(1, "shard", pa.array([len(files)] * table.num_rows, pa.int32())))
        files.append(rec["shard"])
    index = pa.concat_tables(tables) if tables else index_table({c: [] for c in BASE_INDEX_COLUMNS})
    have = set(index.column("sample_id").to_pylist())
    missing = sorted({b for r in records.values() for b in r.get("bg_used", [])} - have)
    if missing:
        raise PackError(f"{redact_text(dest)}: backgrounds {missing[:BAD_IN_MESSAGE]} of packed samples could not be stored "
                        f"({[b for r in bg_records.values() for b in r['bad']][:3]}); did the source change during the pack? Run the same command again")
    return write_shared_index(dest, BG_COLUMN, index, files)


def _record_files(records: dict[int, dict[str, Any]]) -> set[str]:
    return {r["shard"]["file"] for r in records.values() if isinstance(r.get("shard"), dict)}


def _remove_stray_shards(dest: str, keep: set[str], recorded: set[str]) -> None:
    """Shard files of parts that ended up empty (every sample bad) are not part of the dataset.
    Only files a pack recorded go: a user's file in shards/ stays."""
    for rel in sorted(recorded - keep):
        if is_packed_file(rel):
            sfs.remove(sfs.join(dest, rel))


def _write_report(uri: str | None, report: dict[str, Any]) -> None:
    if uri:
        sfs.write_bytes(sfs.normalize(uri), (json.dumps(report, indent=2) + "\n").encode())


def _bad_message(source: str, bad: list[dict[str, str]], dest: str) -> str:
    lines = [f"- sample {b['sample']}: {b['path']}: {b['reason']}" for b in bad[:BAD_IN_MESSAGE]]
    more = f"\n  ... and {len(bad) - BAD_IN_MESSAGE} more (all in the --report file)" if len(bad) > BAD_IN_MESSAGE else ""
    return (
        f"{redact_text(source)}: {len(bad)} bad sample(s); no dataset written at {redact_text(dest)} (no {MANIFEST} or {INDEX}):\n"
        + "\n".join(lines) + more
        + "\nFix or remove them and run the same command again (packed parts are kept and reused), "
        "or add --skip-bad to pack the rest and list the skipped ones with --report FILE"
    )
