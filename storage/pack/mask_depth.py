"""mask_depth's parts: its samples (four images, checked and converted) and its shared backgrounds.

mask_depth is packed as format /4 (storage/shards/): each distinct background file gets an id
(in the order of its container and name), background parts store each one once in shared/bg/,
and sample parts store the id in its place. Sample parts still read and check their samples'
backgrounds (a bad background makes each of its samples bad, named as before)."""

from __future__ import annotations

import hashlib
import io
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from common.redact import redact_text
from storage import codec
from storage import fs as sfs
from storage.columns import MASK_DEPTH_COLUMNS, Column
from storage.layouts.base import (
    DEFAULT_MAX_PIXELS,
    DEFAULT_TASK,
    BadSample,
    TaskPlan,
)
from storage.layouts.samples import open_image
from storage.pack.reading import member_problem, path_of, read_part_files, zip_locations
from storage.pack.records import (
    BACKGROUNDS,
    PACK_VERSION,
    RECORD_PREFIX,
    STATE_DIR,
    IndexRows,
    PartTask,
    commit_part,
)
from storage.pack.result import PackError
from storage.pack.sizes import DEFAULT_SAMPLE_BYTES, choose_sizes
from storage.seed_layout import IMAGE_KINDS, member_key
from storage.shards import (
    BASE_INDEX_COLUMNS,
    CRC32_FORMAT,
    INDEX_COLUMNS,
    MASK_DEPTH_SHARED,
    ShardFileWriter,
    checksum_of,
    columns_checksum,
    index_table,
    shard_file,
    shared_file,
    shared_key,
    stored_columns,
    write_shared_index,
)
from storage.source_plan import FileRef, MemberError, SourcePlan

# Source masks are JPEGs (lossy): pixels at or above this gray value are foreground.
MASK_THRESHOLD = 128
# Bad samples named in an error message before "and N more" (the report lists them all).
BAD_IN_MESSAGE = 20
# What a mask_depth shard row holds (/5): the background's id in its place; its table's column.
MASK_DEPTH_STORED = stored_columns(MASK_DEPTH_COLUMNS, MASK_DEPTH_SHARED)
CHECKSUM = checksum_of(CRC32_FORMAT)  # what write_index_and_manifest writes these columns as (shared: /5)
BG_COLUMN = Column("bg", "image")


def decode_checked(data: bytes, kind: str, path: str) -> Image.Image:
    """The image, decoded in full (storage/layouts/samples.py open_image), and JPEG or PNG."""
    img = open_image(data, kind, path)
    if img.format not in ("JPEG", "PNG"):
        raise BadSample(path, f"{kind} is {img.format}, expected JPEG or PNG")
    return img


def prepare_sample(
    blobs: dict[str, bytes | MemberError], paths: dict[str, str], bg_seen: dict[str, tuple[int, int]]
) -> tuple[dict[str, bytes], int, int, float]:
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
    fg = decode_checked(blobs["fg_bg"], "fg_bg", paths["fg_bg"])
    sizes["fg_bg"] = fg.size
    if paths["bg"] in bg_seen:
        sizes["bg"] = bg_seen[paths["bg"]]
    else:
        sizes["bg"] = bg_seen[paths["bg"]] = decode_checked(blobs["bg"], "bg", paths["bg"]).size

    mask_img = decode_checked(blobs["mask"], "mask", paths["mask"])
    sizes["mask"] = mask_img.size
    mask = np.asarray(mask_img.convert("L"))
    mask_bytes = codec.encode_mask((mask >= MASK_THRESHOLD).astype(np.uint8) * 255)

    depth_img = decode_checked(blobs["depth"], "depth", paths["depth"])
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
        raise BadSample(
            paths["fg_bg"], f"size mismatch: {desc} (width x height); all four images of a sample must have one size"
        )
    w, h = sizes["fg_bg"]
    images = {"fg_bg": bytes(blobs["fg_bg"]), "bg": bytes(blobs["bg"]), "mask": mask_bytes, "depth": depth_bytes}
    return images, h, w, depth_mean


def run_mask_depth_part(task: PartTask) -> dict[str, Any]:
    """One part of mask_depth samples: each row holds its background's id, the image is in the shared table."""
    blobs = read_part_files(task)
    rows = IndexRows.of(INDEX_COLUMNS, task.extra_columns)
    bad: list[dict[str, str]] = []
    bg_seen: dict[str, tuple[int, int]] = {}
    bg_used: set[int] = set()
    writer: ShardFileWriter | None = None
    key = shared_key("bg")
    try:
        for (sid, _name, files, sample_extra), bg_id in zip(task.samples, task.bg_ids, strict=True):
            paths = {k: path_of(task, c, m) for k, (c, m) in files.items()}
            try:
                images, h, w, depth_mean = prepare_sample(
                    {k: blobs[(c, m)] for k, (c, m) in files.items()}, paths, bg_seen
                )
            except BadSample as exc:
                bad.append({"sample": str(sid), "path": redact_text(exc.path), "reason": exc.reason})
                continue
            if writer is None:
                writer = ShardFileWriter(task.dest, shard_file(task.part), task.rows_per_group, MASK_DEPTH_STORED)
            values = {"fg_bg": images["fg_bg"], key: int(bg_id), "mask": images["mask"], "depth": images["depth"]}
            group, row = writer.add(sid, values, h, w)
            bg_used.add(int(bg_id))
            rows.add(
                sid,
                group,
                row,
                h,
                w,
                columns_checksum(MASK_DEPTH_STORED, values, CHECKSUM),
                {k: sample_extra.get(k) for k in task.extra_columns},
                depth_mean=depth_mean,
            )
        entry = writer.close() if writer is not None else None
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    return commit_part(task, rows, entry, bad, extra_record={"bg_used": sorted(bg_used)})


def run_backgrounds_part(task: PartTask) -> dict[str, Any]:
    """Store one part's distinct backgrounds (each checked to decode) in a file of the shared
    table, id as sample_id. One that does not decode is left out and recorded; its samples are
    bad in their own parts, which read it too."""
    blobs = read_part_files(task)
    rows = IndexRows.of(BASE_INDEX_COLUMNS)
    bad: list[dict[str, str]] = []
    writer: ShardFileWriter | None = None
    try:
        for vid, _name, files, _ in task.samples:
            c, m = files["bg"]
            path, blob = path_of(task, c, m), blobs[(c, m)]
            try:
                if isinstance(blob, MemberError):
                    raise BadSample(path, member_problem("bg", blob))
                w, h = decode_checked(blob, "bg", path).size
            except BadSample as exc:
                bad.append({"sample": f"bg {vid}", "path": redact_text(exc.path), "reason": exc.reason})
                continue
            if writer is None:
                writer = ShardFileWriter(
                    task.dest, shared_file(BG_COLUMN.name, task.part), task.rows_per_group, (BG_COLUMN,)
                )
            value = {BG_COLUMN.name: bytes(blob)}
            group, row = writer.add(vid, value, h, w)
            rows.add(vid, group, row, h, w, columns_checksum((BG_COLUMN,), value, CHECKSUM))
        entry = writer.close() if writer is not None else None
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    return commit_part(task, rows, entry, bad)


def background_ids(plan: SourcePlan) -> tuple[list[int], list[FileRef]]:
    """Each sample's background id, and the background file of each id: the distinct files in
    the order of (container, name), so the ids depend only on the source's files."""
    key = lambda ref: (-1 if ref.container is None else ref.container, ref.member)  # noqa: E731
    files = sorted({key(s.files["bg"]): s.files["bg"] for s in plan.samples}.items())
    ids = {k: i for i, (k, _) in enumerate(files)}
    return [ids[key(s.files["bg"])] for s in plan.samples], [ref for _, ref in files]


def background_tasks(
    plan: SourcePlan, dest: str, refs: list[FileRef], max_pixels: int = DEFAULT_MAX_PIXELS
) -> list[PartTask]:
    """mask_depth's background parts: the distinct background files (`refs`, background_ids(plan)[1]),
    in files of ~SHARD_TARGET_BYTES."""
    if isinstance(plan, TaskPlan) or not plan.samples:
        return []
    sizes = []
    for ref in refs[:2000]:
        entry = (
            None if ref.container is None else plan.containers[ref.container].entries.get(member_key("bg", ref.member))
        )
        sizes.append(entry.size if entry else DEFAULT_SAMPLE_BYTES)
    per_file, per_group = choose_sizes(int(np.mean(sizes)), None, None)
    containers = [(c.kind, c.uri, c.is_zip) for c in plan.containers]
    tasks = []
    for part, start in enumerate(range(0, len(refs), per_file)):
        chunk = refs[start : start + per_file]
        h = hashlib.sha256(repr(("backgrounds", PACK_VERSION, CRC32_FORMAT, per_group)).encode())
        if max_pixels != DEFAULT_MAX_PIXELS:
            h.update(f"|max_pixels={max_pixels}".encode())
        for vid, ref in enumerate(chunk, start):
            where = "" if ref.container is None else plan.containers[ref.container].uri
            h.update(f"|{vid}|{where}|{ref.member}|{ref.stamp}".encode())
        samples = [(vid, ref.member, {"bg": (ref.container, ref.member)}, {}) for vid, ref in enumerate(chunk, start)]
        tasks.append(
            PartTask(
                part,
                dest,
                per_group,
                h.hexdigest(),
                (),
                containers,
                samples,
                DEFAULT_TASK,
                {},
                role=BACKGROUNDS,
                max_pixels=max_pixels,
                zip_at=zip_locations(plan, ((ref.container, ref.member) for ref in chunk)),
            )
        )
    return tasks


def backgrounds_table(
    dest: str, bg_records: dict[int, dict[str, Any]], records: dict[int, dict[str, Any]]
) -> dict[str, Any]:
    """Write the shared backgrounds' index from the background parts; returns its manifest entry.
    PackError when a packed sample's background is not in it (its file changed during the pack)."""
    state = sfs.join(dest, STATE_DIR)
    files: list[dict[str, Any]] = []
    tables = []
    for p in sorted(bg_records):
        rec = bg_records[p]
        if not rec["rows"]:
            continue
        table = pq.read_table(
            io.BytesIO(sfs.read_bytes(sfs.join(state, f"{RECORD_PREFIX[BACKGROUNDS]}-{p:05d}.index.parquet")))
        )
        tables.append(table.add_column(1, "shard", pa.array([len(files)] * table.num_rows, pa.int32())))
        files.append(rec["shard"])
    index = pa.concat_tables(tables) if tables else index_table({c: [] for c in BASE_INDEX_COLUMNS})
    have = set(index.column("sample_id").to_pylist())
    missing = sorted({b for r in records.values() for b in r.get("bg_used", [])} - have)
    if missing:
        raise PackError(
            f"{redact_text(dest)}: backgrounds {missing[:BAD_IN_MESSAGE]} of packed samples could not be stored "
            f"({[b for r in bg_records.values() for b in r['bad']][:3]}); did the source change during the pack? "
            "Run the same command again"
        )
    return write_shared_index(dest, BG_COLUMN, index, files)
