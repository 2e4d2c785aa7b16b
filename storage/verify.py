"""`orchestrator data verify`: re-read a packed dataset end to end and list what is wrong with it."""

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
from storage.columns import MASK_DEPTH_COLUMNS, Column, decode_check
from storage.shards import DatasetError, columns_checksum, open_dataset

# Parallel shard checks; each holds one shard in memory.
DEFAULT_WORKERS = max(1, min(4, os.cpu_count() or 1))


def check_shard(uri: str, shard: dict[str, Any], rows: dict[str, list], columns: tuple[Column, ...] = MASK_DEPTH_COLUMNS) -> dict[str, Any]:
    """Bad entries of one shard and how many samples passed; `rows` are its index rows.

    The file's size and sha256 against the manifest, its row count, every indexed sample at its
    (row group, row) with its checksum over the declared `columns`, and each column's value
    decoding per its codec (images and raw arrays at the size the index records).
    """
    name = shard["file"]
    bad: list[dict[str, Any]] = []

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
    for sid, group, row, checksum, h, w in zip(rows["sample_id"], rows["row_group"], rows["row"], rows["checksum"], rows["height"], rows["width"], strict=True):
        at = int(starts[group] + row) if group < meta.num_row_groups else table.num_rows
        if at >= table.num_rows or cols["sample_id"][at].as_py() != sid:
            fail(sid, f"not at row group {group} row {row} where the index puts it")
            continue
        values = {c.name: cols[c.name][at].as_py() for c in columns}
        try:
            got = columns_checksum(columns, values)
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
        if broken:
            fail(sid, broken)
            continue
        if sizes:
            fail(sid, f"image sizes differ from the index's {h}x{w}: {'; '.join(sizes)}")
            continue
        ok += 1
    return {"bad": bad, "ok": ok, "checksums_ok": sums_ok, "checked": len(rows["sample_id"])}


def verify(uri: str, workers: int | None = None, progress: Callable[[int], None] | None = None) -> dict[str, Any]:
    """{"samples", "shards", "bad": [{"sample", "shard", "reason"}], "checksums_ok" (samples whose
    checksum matches), "ok" (samples that pass every check), "bytes", "seconds"}."""
    t0 = time.monotonic()
    uri = sfs.normalize(uri)
    try:
        ds = open_dataset(uri)
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
        bad.append({"sample": None, "shard": None, "reason": f"shards hold {total_rows} rows, the manifest says {ds.num_samples} samples"})

    shard_col = index.column("shard").to_numpy()
    per_shard: list[dict[str, list]] = []
    names = ("sample_id", "row_group", "row", "checksum", "height", "width")
    columns = {c: index.column(c).to_pylist() for c in names}
    order = np.argsort(shard_col, kind="stable")
    bounds = np.searchsorted(shard_col[order], np.arange(len(shards) + 1))
    for s in range(len(shards)):
        sel = order[bounds[s] : bounds[s + 1]]
        per_shard.append({c: [columns[c][i] for i in sel] for c in names})
    unknown = np.setdiff1d(np.unique(shard_col), np.arange(len(shards)))
    for s in unknown:
        bad.append({"sample": None, "shard": None, "reason": f"index refers to shard {int(s)}, which the manifest does not list"})

    ok = sums_ok = 0
    workers = DEFAULT_WORKERS if workers is None else max(1, int(workers))
    if workers > 1 and len(shards) > 1:
        with ProcessPoolExecutor(max_workers=min(workers, len(shards)), mp_context=get_context("spawn")) as pool:
            futures = {pool.submit(check_shard, uri, shards[s], per_shard[s], ds.columns): s for s in range(len(shards))}
            for fut in as_completed(futures):
                res = fut.result()
                bad.extend(res["bad"])
                ok += res["ok"]
                sums_ok += res["checksums_ok"]
                if progress is not None:
                    progress(res["checked"])
    else:
        for s in range(len(shards)):
            res = check_shard(uri, shards[s], per_shard[s], ds.columns)
            bad.extend(res["bad"])
            ok += res["ok"]
            sums_ok += res["checksums_ok"]
            if progress is not None:
                progress(res["checked"])
    bad.sort(key=lambda b: (b["shard"] or "", int(b["sample"]) if (b["sample"] or "").lstrip("-").isdigit() else -1))
    return {
        "uri": redact_text(uri),
        "samples": ds.num_samples,
        "shards": len(shards),
        "bad": bad,
        "checksums_ok": sums_ok,
        "ok": ok,
        "bytes": int(sum(int(s["bytes"]) for s in shards)),
        "seconds": round(time.monotonic() - t0, 2),
    }
