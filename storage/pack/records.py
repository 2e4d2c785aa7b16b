"""A pack's state under DEST/.pack/: each part's task, its index rows, its commit record, and what a
re-run reuses or clears. A part's record is written last: it is the part's commit marker."""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from typing import Any

import pyarrow.parquet as pq

from storage import fs as sfs
from storage.dest_check import is_packed_file, remove_packed_files
from storage.layouts.base import DEFAULT_MAX_PIXELS, DEFAULT_TASK
from storage.shards import MANIFEST, index_table

PACK_VERSION = 2  # 2: CRC-32 checksums (format /5); parts packed before hold blake2b ones
STATE_DIR = ".pack"
# Roles of a part: a shard of samples, or a file of the shared backgrounds (mask_depth).
SAMPLES, BACKGROUNDS = "samples", "backgrounds"
RECORD_PREFIX = {SAMPLES: "part", BACKGROUNDS: "bg-part"}


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
    # Where each zip member the part reads lies ((container, member) -> storage.zip_ranges.ZipAt,
    # from the plan's listing): the part then reads no zip directory.
    zip_at: dict[tuple[int, str], Any] = field(default_factory=dict)


@dataclass
class IndexRows:
    """A part's index rows, column by column: storage's own columns (but `shard`, set when the parts
    are joined) and the extra ones the samples bring. One place builds them for every kind of part."""

    cols: dict[str, list[Any]]
    extra: dict[str, list[Any]] = field(default_factory=dict)

    @classmethod
    def of(cls, columns: tuple[str, ...] | list[str], extra: tuple[str, ...] = ()) -> IndexRows:
        return cls({c: [] for c in columns if c != "shard"}, {c: [] for c in extra})

    def add(
        self,
        sample_id: int,
        group: int,
        row: int,
        height: int,
        width: int,
        checksum: Any,
        extra: dict[str, Any] | None = None,
        **more: Any,
    ) -> None:
        """One sample's row; `more`: other storage columns (mask_depth's depth_mean)."""
        values = {
            "sample_id": sample_id,
            "row_group": group,
            "row": row,
            "height": height,
            "width": width,
            **more,
            "checksum": checksum,
        }
        for k, v in values.items():
            self.cols[k].append(v)
        for k, v in (extra or {}).items():
            self.extra.setdefault(k, []).append(v)

    def __len__(self) -> int:
        return len(self.cols["sample_id"])


def commit_part(
    task: PartTask,
    rows: IndexRows,
    entry: dict[str, Any] | None,
    bad: list[dict[str, str]],
    stats: dict[str, Any] | None = None,
    extra_record: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write the part's index rows, then its record: the marker a re-run finds and reuses."""
    state = sfs.join(task.dest, STATE_DIR)
    prefix = RECORD_PREFIX[task.role]
    table = index_table({**rows.cols, "shard": [0] * len(rows)}, rows.extra).drop_columns(["shard"])
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    sfs.write_bytes(sfs.join(state, f"{prefix}-{task.part:05d}.index.parquet"), buf.getvalue())
    record = {
        "part": task.part,
        "role": task.role,
        "fingerprint": task.fingerprint,
        "shard": entry,
        "rows": len(rows),
        "bad": bad,
        "samples": len(task.samples),
        **(extra_record or {}),
    }
    if stats is not None:
        record["stats"] = stats
    sfs.write_json(sfs.join(state, f"{prefix}-{task.part:05d}.json"), record)
    return record


def done_record(dest: str, task: PartTask) -> dict[str, Any] | None:
    """The part's record when it was packed with this fingerprint and its shard is still there."""
    state = sfs.join(dest, STATE_DIR)
    prefix = RECORD_PREFIX[task.role]
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


def recorded_files(dest: str) -> set[str]:
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
        out |= {
            s["file"] for s in manifest.get("shards") or [] if isinstance(s, dict) and isinstance(s.get("file"), str)
        }
        for entry in (manifest.get("shared") or {}).values():
            if isinstance(entry, dict):
                out |= {entry["index"]} if isinstance(entry.get("index"), str) else set()
                out |= {
                    f["file"]
                    for f in entry.get("files") or []
                    if isinstance(f, dict) and isinstance(f.get("file"), str)
                }
    # Only names a pack writes: a damaged or hand-edited record cannot point the re-pack at a user's file.
    return {f for f in out if is_packed_file(f) and not f.startswith(f"{STATE_DIR}/")}


def clear_stale(dest: str, settings: dict[str, Any], recorded: set[str]) -> None:
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


def record_files(records: dict[int, dict[str, Any]]) -> set[str]:
    return {r["shard"]["file"] for r in records.values() if isinstance(r.get("shard"), dict)}


def remove_stray_shards(dest: str, keep: set[str], recorded: set[str]) -> None:
    """Shard files of parts that ended up empty (every sample bad) are not part of the dataset.
    Only files a pack recorded go: a user's file in shards/ stays."""
    for rel in sorted(recorded - keep):
        if is_packed_file(rel):
            sfs.remove(sfs.join(dest, rel))
