"""Reading and checking a dataset's manifest.json and index.parquet: every way they can be
unusable is a one-line DatasetError naming the file and what to do."""

from __future__ import annotations

import json
from typing import Any

import pyarrow as pa

from storage import fs as sfs
from storage.columns import ColumnsError, columns_from_manifest
from storage.errors import DatasetError
from storage.shards.footers import COPIES_KEY, Copies
from storage.shards.footers import MANIFEST_KEY as FOOTERS_KEY
from storage.shards.footers import entry_problem as footers_entry_problem
from storage.shards.footers import load as load_footers
from storage.shards.format import (
    BASE_INDEX_COLUMNS,
    COLUMNS_FORMAT,
    CRC32_FORMAT,
    MANIFEST,
    READABLE_FORMATS,
    SHARED_FORMATS,
    check_shared,
    parse_parquet,
    shared_key,
)
from storage.shards.legacy import fixed_columns_problem


def read_manifest(uri: str) -> dict[str, Any]:
    """The manifest of the dataset at `uri` (normalized), checked; DatasetError says what is wrong."""
    manifest_uri = sfs.join(uri, MANIFEST)
    # One request: read it and take "not found" as absence (an exists() first cost 3 more on GCS).
    try:
        data = sfs.read_bytes(manifest_uri)
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
        hint = missing_bucket_hint(uri)
        raise DatasetError(
            f"{uri}: no dataset here (manifest.json missing{hint}). Make one with `orchestrator data synth {uri}` "
            "(or `orchestrator data pack SOURCE DEST` from raw files), or point data.uri at a packed dataset"
        ) from None
    damaged = "the dataset is damaged or was not written by this code: re-pack it, or restore its manifest.json"
    try:
        manifest = json.loads(data)
    except ValueError as exc:  # json.JSONDecodeError, UnicodeDecodeError
        raise DatasetError(one_line(f"{manifest_uri}: not valid JSON ({exc}); {damaged}")) from exc
    if isinstance(manifest, dict) and manifest.get("format") not in READABLE_FORMATS:
        raise DatasetError(
            one_line(
                f"{manifest_uri}: format {manifest.get('format')!r}, expected one of {list(READABLE_FORMATS)}; "
                f"re-create the dataset (`orchestrator data pack`, or `orchestrator data synth {uri}`) with this code"
            )
        )
    problem = _manifest_problem(manifest)
    if problem:
        raise DatasetError(one_line(f"{manifest_uri}: {problem}; {damaged}"))
    if manifest["num_samples"] == 0:
        raise DatasetError(f"{uri}: the dataset is empty (0 samples); re-create it with more samples")
    return manifest


def read_index(uri: str, manifest: dict[str, Any]) -> pa.Table:
    """The index.parquet of a checked manifest, checked against it."""
    return read_index_and_footers(uri, manifest)[0]


def read_index_and_footers(uri: str, manifest: dict[str, Any]) -> tuple[pa.Table, Copies]:
    """read_index, and the footer copies the index carries (storage/shards/footers.py; {} for a
    dataset written before them), checked against the manifest: one request for both."""
    index_uri = sfs.join(uri, manifest["index"])
    try:
        index, metadata = parse_parquet(sfs.read_bytes(index_uri), drop_key=COPIES_KEY)
    except FileNotFoundError as exc:
        raise DatasetError(
            f"{uri}: {manifest['index']} is missing although manifest.json is there; the dataset is damaged, "
            "re-create it"
        ) from exc
    except (OSError, pa.ArrowException) as exc:
        raise DatasetError(
            one_line(
                f"{index_uri}: cannot be read as Parquet ({type(exc).__name__}: {exc}); the dataset is damaged, "
                "re-create it"
            )
        ) from exc
    if index.num_rows != manifest["num_samples"]:
        raise DatasetError(
            f"{uri}: index has {index.num_rows} rows but the manifest says {manifest['num_samples']} samples; the "
            "dataset is damaged, re-create it"
        )
    missing = [c for c in BASE_INDEX_COLUMNS if c not in index.column_names]
    if missing:
        raise DatasetError(
            f"{index_uri}: columns {missing} missing (it has {index.column_names}); the dataset is damaged, re-create "
            "it"
        )
    return index, load_footers(uri, manifest, metadata)


def read_table(uri: str) -> pa.Table:
    """A whole (small) Parquet file, e.g. index.parquet: one read, then parsed in memory."""
    return parse_parquet(sfs.read_bytes(uri))[0]


def missing_bucket_hint(uri: str) -> str:
    """', and bucket X does not exist' when that is why, so nobody hunts for a path typo."""
    if "://" not in uri or uri.startswith(("file://", "memory://")):
        return ""
    scheme, rest = uri.split("://", 1)
    bucket = rest.split("/", 1)[0]
    try:
        return (
            ""
            if sfs.exists(f"{scheme}://{bucket}")
            else f", and bucket {bucket!r} does not exist or is not visible with these credentials"
        )
    except Exception:  # noqa: BLE001 - only a hint; the main message stands without it
        return ""


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _manifest_problem(manifest: Any) -> str | None:
    """What makes a parsed manifest.json unusable (beyond its format), or None."""
    if not isinstance(manifest, dict):
        return f"holds a JSON {type(manifest).__name__}, not an object"
    missing = [k for k in ("num_samples", "index", "shards") if k not in manifest]
    if missing:
        return f"keys {missing} missing"
    if not _is_int(manifest["num_samples"]) or manifest["num_samples"] < 0:
        return f"num_samples is {manifest['num_samples']!r}, not a count"
    if not isinstance(manifest["index"], str) or not manifest["index"]:
        return f"index is {manifest['index']!r}, not a file name"
    shards = manifest["shards"]
    if not isinstance(shards, list):
        return f"shards is a {type(shards).__name__}, not a list"
    problem = _file_entries_problem(shards, "shards")
    if problem:
        return problem
    if manifest.get(FOOTERS_KEY) is not None:
        problem = footers_entry_problem(manifest[FOOTERS_KEY])
        if problem:
            return problem
    if "task" in manifest and (not isinstance(manifest["task"], str) or not manifest["task"]):
        return f"task is {manifest['task']!r}, not a name"
    if manifest.get("meta") is not None and not isinstance(manifest["meta"], dict):
        return f"meta is a {type(manifest['meta']).__name__}, not an object"
    if manifest["format"] in (COLUMNS_FORMAT, CRC32_FORMAT) and manifest.get("columns") is None:
        return f'format {manifest["format"]} without "columns"'
    try:
        columns = columns_from_manifest(manifest)
    except ColumnsError as exc:
        return str(exc)
    problem = fixed_columns_problem(manifest["format"], columns)
    if problem:
        return problem
    shared = manifest.get("shared")
    fmt = manifest["format"]
    if fmt not in SHARED_FORMATS:
        have = " and ".join(SHARED_FORMATS)
        return f'format {fmt} with "shared" (only {have} have shared columns)' if shared else None
    if fmt == CRC32_FORMAT and shared is None:
        return None  # /5 without shared columns
    if manifest.get("columns") is None:
        return f'format {fmt} without "columns"'
    if not isinstance(shared, dict) or not shared:
        return f'format {fmt} without "shared" (an object: column name -> its table)'
    try:
        check_shared(columns, list(shared))
    except ColumnsError as exc:
        return str(exc)
    by_name = {c.name: c for c in columns}
    for name, entry in shared.items():
        if not isinstance(entry, dict):
            return f"shared[{name!r}] is a {type(entry).__name__}, not an object"
        wrong = [
            k
            for k, ok in (
                ("key", entry.get("key") == shared_key(name)),
                ("codec", entry.get("codec") == by_name[name].codec),
                ("num", _is_int(entry.get("num")) and entry["num"] >= 0),
                ("index", isinstance(entry.get("index"), str) and entry["index"]),
                ("index_sha256", isinstance(entry.get("index_sha256"), str)),
                ("files", isinstance(entry.get("files"), list)),
            )
            if not ok
        ]
        if wrong:
            return f"shared[{name!r}] has no valid {', '.join(wrong)}"
        problem = _file_entries_problem(entry["files"], f"shared[{name!r}].files")
        if problem:
            return problem
    return None


def _file_entries_problem(entries: list, where: str) -> str | None:
    """What is wrong with a list of shard-file entries ({file, rows, bytes, sha256[, footer_bytes]}), or None."""
    for i, sh in enumerate(entries):
        if not isinstance(sh, dict):
            return f"{where}[{i}] is a {type(sh).__name__}, not an object"
        wrong = [
            k
            for k, ok in (
                ("file", isinstance(sh.get("file"), str)),
                ("rows", _is_int(sh.get("rows"))),
                ("bytes", _is_int(sh.get("bytes"))),
                ("sha256", isinstance(sh.get("sha256"), str)),
            )
            if not ok
        ]
        if sh.get("footer_bytes") is not None and not _is_int(sh["footer_bytes"]):
            wrong.append("footer_bytes")
        if wrong:
            return f"{where}[{i}] has no valid {', '.join(wrong)}"
    return None


def one_line(message: str) -> str:
    return " ".join(message.split())
