"""Copies of the small byte ranges a reader needs before any sample: every shard's (and shared
part's) Parquet footer and every shared table's index, carried in index.parquet's key-value
metadata, so that opening a dataset costs two requests (manifest, index) and then only data.

Why in the index and not in a sidecar file: every reader reads index.parquet whole anyway, so
the copies ride along in that one request; a sidecar would cost one more GET per process. On the
GCS emulator, bench.peer's 6,000 samples (2 shards, one shared table) read as one chunk cost 8
GETs with them here (manifest, index, the shared values, 5 ranges), 9 with a sidecar, 16-20
before (3 for the manifest, a footer per file, the shared index, and pieces in flight together
each fetching what another was already fetching). The price: the index grows by the zstd-compressed
footers (about 215 bytes per row group: ~6 MB at 1.2M samples in 41-row groups, beside an index of
~29 MB), which the driver reads too when it plans; a reader keeps a copy's bytes only until it has
parsed that footer. Beyond COPIES_MAX_BYTES nothing is embedded and readers fetch each
footer from its shard, as for every dataset written before.

They are copies: the shards keep their footers and shared/<name>/index.parquet stays, so older
code and any Parquet reader read the dataset as before (older code ignores the metadata key and
the manifest's "footers" entry), and `data verify` still checks each shared index's own file.
Format /2, written on request byte for byte as before columns were declared, gets none.

On disk: metadata key COPIES_KEY of index.parquet holds a zstd-compressed Parquet table (file:
string, offset: int64, data: binary), one row per file: a shard or shared part's last
footer_bytes + 8 bytes (footer, its length, "PAR1") at offset bytes - footer_bytes - 8, a shared
table's whole index file at offset 0. The manifest's "footers" entry ({"key", "files", "bytes",
"sha256"}) says they are there and seals them: copies that differ from it are a damaged dataset,
never silently trusted.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Mapping
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from storage import fs as sfs
from storage.errors import DatasetError
from storage.retry import storage_retry
from storage.shards.format import MANIFEST, parse_parquet

COPIES_KEY = "orchestrator.footers"
MANIFEST_KEY = "footers"  # the manifest's entry
# Bigger than this (compressed), the copies are not embedded: the index would grow past what a
# driver that only plans wants to download, and Thrift's metadata limits (100 MB) come near.
COPIES_MAX_BYTES = 32 * 2**20

Copies = dict[str, tuple[int, bytes]]  # file (relative to the dataset) -> (offset in it, bytes)


def collect(uri: str, shards: list[dict[str, Any]], shared: Mapping[str, dict[str, Any]] | None) -> bytes | None:
    """The copies' blob for a dataset whose shard files (and shared tables) are written, or None
    when a file's footer length is unknown or the blob would exceed COPIES_MAX_BYTES.

    The footers are read back from the files, all in one concurrent batch (writers in other
    processes, storage/pack/, then need not send them along); a shared index is read whole."""
    files = [*shards, *(f for entry in (shared or {}).values() for f in entry["files"])]
    if any(not isinstance(f.get("footer_bytes"), int) for f in files):
        return None
    starts = [int(f["bytes"]) - int(f["footer_bytes"]) - 8 for f in files]
    tails = _read_tails(uri, files, starts)
    rows: dict[str, list] = {"file": [], "offset": [], "data": []}
    for f, start, tail in zip(files, starts, tails, strict=True):
        rows["file"].append(f["file"])
        rows["offset"].append(start)
        rows["data"].append(bytes(tail))
    for entry in (shared or {}).values():
        rows["file"].append(entry["index"])
        rows["offset"].append(0)
        rows["data"].append(sfs.read_bytes(sfs.join(uri, entry["index"])))
    table = pa.table({"file": pa.array(rows["file"], pa.string()), "offset": pa.array(rows["offset"], pa.int64()),
                      "data": pa.array(rows["data"], pa.binary())})
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    blob = buf.getvalue()
    return blob if len(blob) <= COPIES_MAX_BYTES else None


@storage_retry
def _read_tails(uri: str, files: list[dict[str, Any]], starts: list[int]) -> list[bytes]:
    """The files' tails, all in flight together; a transient failure retries the batch (a pack
    is not lost to one 503 at its last step), a permanent one raises."""
    fs, _ = sfs.filesystem(uri)
    paths = [sfs.filesystem(sfs.join(uri, f["file"]))[1] for f in files]
    tails = sfs.cat_ranges(fs, paths, starts, [int(f["bytes"]) for f in files])
    failed = next((t for t in tails if isinstance(t, BaseException)), None)
    if failed is not None:
        raise failed
    return [bytes(t) for t in tails]


def manifest_entry(blob: bytes, files: int) -> dict[str, Any]:
    return {"key": COPIES_KEY, "files": files, "bytes": len(blob), "sha256": hashlib.sha256(blob).hexdigest()}


def entry_problem(entry: Any) -> str | None:
    """What makes a manifest's "footers" entry unusable, or None (for manifest.py's checks)."""
    if not isinstance(entry, dict):
        return f"{MANIFEST_KEY} is a {type(entry).__name__}, not an object"
    wrong = [k for k, ok in (("key", isinstance(entry.get("key"), str) and entry["key"]),
                             ("files", isinstance(entry.get("files"), int) and not isinstance(entry["files"], bool)),
                             ("bytes", isinstance(entry.get("bytes"), int) and not isinstance(entry["bytes"], bool)),
                             ("sha256", isinstance(entry.get("sha256"), str))) if not ok]
    return f"{MANIFEST_KEY} has no valid {', '.join(wrong)}" if wrong else None


def index_metadata(blob: bytes) -> dict[bytes, bytes]:
    """What write_index_and_manifest adds to index.parquet's key-value metadata."""
    return {COPIES_KEY.encode(): blob}


def load(uri: str, manifest: Mapping[str, Any], metadata: Mapping[bytes, bytes] | None) -> Copies:
    """The copies index.parquet carries ({} when the manifest lists none: a dataset written before
    them, read as then), checked against the manifest; DatasetError names the index and what to do."""
    entry = manifest.get(MANIFEST_KEY)
    if entry is None:
        return {}
    index_uri = sfs.join(uri, manifest["index"])
    fix = (f"the dataset is damaged: re-pack it (`orchestrator data pack`, or `orchestrator data synth {uri}`), "
           f'or delete "{MANIFEST_KEY}" from {sfs.join(uri, MANIFEST)} to read each shard\'s own footer instead')
    blob = (metadata or {}).get(str(entry["key"]).encode())
    if blob is None:
        raise DatasetError(f"{index_uri}: the shard footers the manifest lists (metadata {entry['key']!r}) are "
                           f"missing; {fix}")
    if len(blob) != entry["bytes"] or hashlib.sha256(blob).hexdigest() != entry["sha256"]:
        raise DatasetError(f"{index_uri}: the shard footers it carries (metadata {entry['key']!r}) differ from the "
                           f"manifest's sha256 (changed after packing); {fix}")
    try:
        table = parse_parquet(blob)[0]
        copies = {f: (int(o), d) for f, o, d in zip(table.column("file").to_pylist(),
                                                    table.column("offset").to_pylist(),
                                                    table.column("data").to_pylist(), strict=True)}
    except (OSError, KeyError, pa.ArrowException) as exc:
        raise DatasetError(" ".join(f"{index_uri}: the shard footers it carries cannot be read "
                                    f"({type(exc).__name__}: {exc}); {fix}".split())) from exc
    if len(copies) != entry["files"]:
        raise DatasetError(f"{index_uri}: carries {len(copies)} footers, the manifest says {entry['files']}; {fix}")
    return copies
