"""`orchestrator data verify`: re-read a packed dataset end to end and list what is wrong with it.

Every stored byte is checked: each shard file's size and sha256 against the manifest, each
sample's checksum and decode; for /4 datasets also each shared table (the backgrounds of
mask_depth): its index's sha256, each of its files' size and sha256, each value's checksum and
decode, and that every sample's id points at a value of the sample's size. A bad shared value is
named by its file and id, with the number of samples that use it (none of which counts as ok).
"""

from __future__ import annotations

import hashlib
import io
import os
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed
from multiprocessing import get_context
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from common.redact import redact_text
from storage import codec
from storage import fs as sfs
from storage.columns import MASK_DEPTH_COLUMNS, Column, decode_check, is_mask_depth
from storage.shards import BLAKE2B, CRC32_FORMAT, DatasetError, columns_checksum, open_dataset, shared_key

# Parallel shard checks; each holds one shard in memory.
DEFAULT_WORKERS = max(1, min(4, os.cpu_count() or 1))


# What check_shard knows of a shared column: its good values' sizes by id, and its bad ids.
SharedCheck = tuple[dict[int, tuple[int, int]], set[int]]


def check_shard(uri: str, shard: dict[str, Any], rows: dict[str, list],
                columns: tuple[Column, ...] = MASK_DEPTH_COLUMNS,
                shared: dict[str, SharedCheck] | None = None, kind: str = BLAKE2B) -> dict[str, Any]:
    """Bad entries of one shard and how many samples passed; `rows` are its index rows.

    The file's size and sha256 against the manifest, its row count, every indexed sample at its
    (row group, row) with its checksum (of `kind`: the dataset's, format.checksum_of) over the stored
    `columns`, and each column's value decoding per its codec (images and raw arrays at the size
    the index records). `shared` (/4, /5) maps each shared column to SharedCheck: a sample's id
    must name a value of the sample's size; one whose value is bad is not ok (the value is
    reported once, by its own check).
    """
    name = shard["file"]
    bad: list[dict[str, Any]] = []
    shared = shared or {}
    users: dict[str, dict[int, int]] = {}  # samples that are fine but for a bad shared value

    def fail(sample: int | None, reason: str) -> None:
        bad.append({"sample": None if sample is None else str(sample), "shard": name, "reason": reason})

    try:
        data = sfs.read_bytes(sfs.join(uri, name))
    except FileNotFoundError:
        fail(None, "shard file missing")
        return {"bad": bad, "ok": 0, "checksums_ok": 0, "checked": 0}
    except Exception as exc:  # noqa: BLE001 - reported, not raised: verify lists every problem
        fail(None, f"cannot read the shard ({exc})")
        return {"bad": bad, "ok": 0, "checksums_ok": 0, "checked": 0}
    if len(data) != shard["bytes"]:
        fail(None, f"size {len(data)} bytes, the manifest says {shard['bytes']}")
    if hashlib.sha256(data).hexdigest() != shard["sha256"]:
        fail(None, "sha256 differs from the manifest's (the file changed after packing)")
    try:
        table = pq.read_table(io.BytesIO(data))
    except Exception as exc:  # noqa: BLE001
        fail(None, f"not a readable Parquet file ({type(exc).__name__}: {exc})")
        return {"bad": bad, "ok": 0, "checksums_ok": 0, "checked": 0}
    if table.num_rows != shard["rows"]:
        fail(None, f"holds {table.num_rows} rows, the manifest says {shard['rows']}")
    meta = pq.ParquetFile(io.BytesIO(data)).metadata
    starts = np.concatenate([[0], np.cumsum([meta.row_group(g).num_rows for g in range(meta.num_row_groups)])])
    absent = [c.name for c in columns if c.name not in table.column_names]
    if absent or "sample_id" not in table.column_names:
        fail(None, f"lacks the declared columns {absent or ['sample_id']} (it has {table.column_names})")
        return {"bad": bad, "ok": 0, "checksums_ok": 0, "checked": len(rows["sample_id"])}
    cols = {c: table.column(c) for c in ("sample_id", *(c.name for c in columns))}
    ok = sums_ok = 0
    for sid, group, row, checksum, h, w in zip(rows["sample_id"], rows["row_group"], rows["row"], rows["checksum"],
                                               rows["height"], rows["width"], strict=True):
        at = int(starts[group] + row) if group < meta.num_row_groups else table.num_rows
        if at >= table.num_rows or cols["sample_id"][at].as_py() != sid:
            fail(sid, f"not at row group {group} row {row} where the index puts it")
            continue
        values = {c.name: cols[c.name][at].as_py() for c in columns}
        try:
            got = columns_checksum(columns, values, kind)
        except (TypeError, ValueError, AttributeError) as exc:  # a null where a value must be
            fail(sid, f"a value is missing or malformed ({type(exc).__name__}: {exc})")
            continue
        if got != checksum:
            fail(sid, f"checksum mismatch (index {checksum}, shard {got})")
            continue
        sums_ok += 1
        sizes: list[str] = []
        broken = None
        for c in columns:
            try:
                decode_check(c, values[c.name], h, w)
            except codec.ImageSizeError as exc:
                sizes.append(str(exc))
            except Exception as exc:  # noqa: BLE001 - any decode failure is this sample's problem
                broken = f"column {c.name!r} does not decode ({type(exc).__name__}: {exc})"
                break
        if (problem := _sample_problem(broken, sizes, h, w)) is not None:
            fail(sid, problem)
            continue
        shared_bad = False
        for col, (good, bad_ids) in shared.items():
            vid = values[shared_key(col)]
            if vid in bad_ids:
                shared_bad = True
            elif vid not in good:
                broken = f"refers to shared {col} {vid}, which the shared table does not hold"
            elif good[vid] != (h, w):
                sizes.append(f"column {col!r} (shared {col} {vid}) is {good[vid][0]}x{good[vid][1]}")
        if (problem := _sample_problem(broken, sizes, h, w)) is not None:
            fail(sid, problem)
            continue
        if shared_bad:
            for col, (_, bad_ids) in shared.items():
                vid = values[shared_key(col)]
                if vid in bad_ids:
                    users.setdefault(col, {}).setdefault(vid, 0)
                    users[col][vid] += 1
            continue  # its shared value is reported by the shared table's check
        ok += 1
    return {"bad": bad, "ok": ok, "checksums_ok": sums_ok, "checked": len(rows["sample_id"]), "shared_users": users}


def _shared_checks(uri: str, ds: Any,
                   pool: ProcessPoolExecutor | None) -> tuple[dict[str, SharedCheck], list[dict[str, Any]], int]:
    """Check every shared table of a /4 dataset (each value's file, checksum and decode); returns
    what check_shard needs to know of them, their bad entries, and their bytes."""
    checks: dict[str, SharedCheck] = {}
    bad: list[dict[str, Any]] = []
    nbytes = 0
    for col, table in ds.shared.items():
        files = table.manifest["shards"]
        nbytes += sum(int(f["bytes"]) for f in files) + int(ds.manifest["shared"][col].get("index_bytes") or 0)
        per_file = _rows_per_shard(table, len(files))
        columns = table.columns
        if pool is not None and len(files) > 1:
            results = list(pool.map(check_shard, [uri] * len(files), files, per_file, [columns] * len(files),
                                    [None] * len(files), [table.checksum] * len(files)))
        else:
            results = [check_shard(uri, files[f], per_file[f], columns, None, table.checksum)
                       for f in range(len(files))]
        bad_ids: set[int] = set()
        for f, res in enumerate(results):
            checked = set(per_file[f]["sample_id"])
            for b in res["bad"]:
                vid = None if b["sample"] is None else int(b["sample"])
                if vid is not None:
                    bad_ids.add(vid)
                    b["reason"] = f"shared {col} {vid}: {b['reason']}"
                    b["sample"] = None
                elif not res["ok"]:
                    bad_ids |= checked  # the whole file is unusable (missing, unreadable)
                b["_shared"] = (col, vid)
                bad.append(b)
        for s in np.setdiff1d(np.unique(table.index.column("shard").to_numpy()), np.arange(len(files))):
            bad.append({"sample": None, "shard": None,
                        "reason": f"shared {col}: the index refers to file {int(s)}, which the manifest does not list"})
        ids = table.sample_ids.tolist()
        sizes = zip(table.index.column("height").to_pylist(), table.index.column("width").to_pylist(), strict=True)
        good = {v: (int(h), int(w)) for v, (h, w) in zip(ids, sizes, strict=True) if v not in bad_ids}
        checks[col] = (good, bad_ids)
    return checks, bad, nbytes


def _rows_per_shard(ds: Any, num_shards: int) -> list[dict[str, list]]:
    """Each shard's index rows (sample_id, row_group, row, checksum, height, width), in index order."""
    index = ds.index
    shard_col = index.column("shard").to_numpy()
    names = ("sample_id", "row_group", "row", "checksum", "height", "width")
    columns = {c: index.column(c).to_pylist() for c in names}
    order = np.argsort(shard_col, kind="stable")
    bounds = np.searchsorted(shard_col[order], np.arange(num_shards + 1))
    return [{c: [columns[c][i] for i in order[bounds[s] : bounds[s + 1]]] for c in names} for s in range(num_shards)]


def verify(uri: str, workers: int | None = None, progress: Callable[[int], None] | None = None) -> dict[str, Any]:
    """{"samples", "shards", "bad": [{"sample", "shard", "reason"}], "checksums_ok" (samples whose
    checksum matches), "ok" (samples that pass every check, their shared values included),
    "bytes" (every data file: shards, shared tables), "format", "seconds"}."""
    t0 = time.monotonic()
    uri = sfs.normalize(uri)
    try:
        ds = open_dataset(uri, own_files=True)  # the shared indexes' files, not the index's copies of them
    except DatasetError as exc:
        return {
            "uri": redact_text(uri),
            "samples": 0,
            "shards": 0,
            "bad": [{"sample": None, "shard": None, "reason": redact_text(str(exc))}],
            "checksums_ok": 0,
            "ok": 0,
            "bytes": 0,
            "seconds": round(time.monotonic() - t0, 2),
        }
    index = ds.index
    shards = ds.manifest["shards"]
    bad: list[dict[str, Any]] = []
    ids = ds.sample_ids
    uniq, counts = np.unique(ids, return_counts=True)
    for sid in uniq[counts > 1][:100]:
        bad.append({"sample": str(int(sid)), "shard": None, "reason": "sample id appears more than once in the index"})
    total_rows = sum(int(s["rows"]) for s in shards)
    if total_rows != ds.num_samples:
        bad.append({"sample": None, "shard": None,
                    "reason": f"shards hold {total_rows} rows, the manifest says {ds.num_samples} samples"})

    per_shard = _rows_per_shard(ds, len(shards))
    shard_col = index.column("shard").to_numpy()
    unknown = np.setdiff1d(np.unique(shard_col), np.arange(len(shards)))
    for s in unknown:
        bad.append({"sample": None, "shard": None,
                    "reason": f"index refers to shard {int(s)}, which the manifest does not list"})

    ok = sums_ok = 0
    users: dict[str, dict[int, int]] = {}
    workers = DEFAULT_WORKERS if workers is None else max(1, int(workers))
    pool = ProcessPoolExecutor(max_workers=min(workers, max(len(shards), 2)),
                               mp_context=get_context("spawn")) if workers > 1 and len(shards) > 1 else None

    def add(res: dict[str, Any]) -> None:
        nonlocal ok, sums_ok
        bad.extend(res["bad"])
        ok += res["ok"]
        sums_ok += res["checksums_ok"]
        for col, counts in res.get("shared_users", {}).items():
            for vid, n in counts.items():
                users.setdefault(col, {})[vid] = users.get(col, {}).get(vid, 0) + n
        if progress is not None:
            progress(res["checked"])

    try:
        # Shared tables first: what a sample needs of them is known before its shard is checked.
        shared, shared_bad, shared_bytes = _shared_checks(uri, ds, pool)
        if pool is not None:
            futures = [pool.submit(check_shard, uri, shards[s], per_shard[s], ds.stored_columns, shared, ds.checksum)
                       for s in range(len(shards))]
            for fut in as_completed(futures):
                add(fut.result())
        else:
            for s in range(len(shards)):
                add(check_shard(uri, shards[s], per_shard[s], ds.stored_columns, shared, ds.checksum))
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
    for b in shared_bad:  # how many samples each bad shared value leaves unusable
        col, vid = b.pop("_shared")
        if vid is not None:
            n = users.get(col, {}).get(vid, 0)
            b["reason"] += f" (used by {n} sample{'' if n == 1 else 's'})"
    bad.sort(key=lambda b: (b["shard"] or "", int(b["sample"]) if (b["sample"] or "").lstrip("-").isdigit() else -1))
    bad = shared_bad + bad  # the shared values first: fixing one fixes every sample that uses it
    note = {}
    if not ds.shared and is_mask_depth(ds.columns):
        note = {"note": f"format {ds.format}: reads and trains as it is; every row holds its own background. "
                        f"`orchestrator data pack SOURCE DEST` again writes {CRC32_FORMAT}, each background stored "
                        "once"}
    return {
        "uri": redact_text(uri),
        "format": ds.format,
        **note,
        "samples": ds.num_samples,
        "shards": len(shards),
        "bad": bad,
        "checksums_ok": sums_ok,
        "ok": ok,
        "bytes": int(sum(int(s["bytes"]) for s in shards)) + shared_bytes,
        "seconds": round(time.monotonic() - t0, 2),
    }


def _sample_problem(broken: str | None, sizes: list[str], h: int, w: int) -> str | None:
    """A sample's first problem: a value that does not decode, else sizes that differ from its index row."""
    if broken:
        return broken
    if sizes:
        return f"image sizes differ from the index's {h}x{w}: {'; '.join(sizes)}"
    return None
