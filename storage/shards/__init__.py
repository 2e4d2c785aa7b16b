"""The packed dataset format (manifest + index + Parquet shards of encoded values): writer and reader.

One module per job: format.py (names, formats, schemas, checksums; its docstring describes the
layout on disk), legacy.py (the one fixed column layout, formats /1 and /2), files.py (shard
files, index and manifest writing), footers.py (the shard footers and shared indexes the index
carries, so a reader needs no request per shard), writer.py (ShardWriter, SharedTableWriter),
manifest.py (reading and checking manifest and index), fetch.py (ranged row-group reads, the
cache), reader.py (ShardDataset, open_dataset). This package re-exports the names the rest of the code imports.
"""

from __future__ import annotations

from storage.errors import DatasetError
from storage.shards.files import ShardFileWriter, write_index_and_manifest, write_shared_index
from storage.shards.format import (
    BASE_INDEX_COLUMNS,
    BLAKE2B,
    CHECKSUM_DIGEST_BYTES,
    COLUMNS_FORMAT,
    CRC32,
    CRC32_FORMAT,
    FIXED_COLUMN_FORMATS,
    INDEX,
    LEGACY_MASK_DEPTH_FORMAT,
    MANIFEST,
    READABLE_FORMATS,
    ROWS_PER_GROUP,
    ROWS_PER_SHARD,
    SHARD_DIR,
    SHARED_DIR,
    SHARED_FORMAT,
    SHARED_FORMATS,
    WRITABLE_FORMATS,
    checksum_of,
    columns_checksum,
    index_table,
    sample_columns,
    shard_file,
    shard_schema,
    shared_file,
    shared_index_file,
    shared_key,
    stored_columns,
)
from storage.shards.legacy import (
    FORMAT,
    INDEX_COLUMNS,
    MASK_DEPTH_FORMAT,
    MASK_DEPTH_SHARED,
    sample_checksum,
    write_format,
)
from storage.shards.reader import SHARED_CACHE_BYTES, ShardDataset, open_dataset, shared_table
from storage.shards.writer import ShardWriter, SharedTableWriter

__all__ = [
    "BASE_INDEX_COLUMNS",
    "BLAKE2B",
    "CHECKSUM_DIGEST_BYTES",
    "COLUMNS_FORMAT",
    "CRC32",
    "CRC32_FORMAT",
    "FIXED_COLUMN_FORMATS",
    "FORMAT",
    "INDEX",
    "INDEX_COLUMNS",
    "LEGACY_MASK_DEPTH_FORMAT",
    "MANIFEST",
    "MASK_DEPTH_FORMAT",
    "MASK_DEPTH_SHARED",
    "READABLE_FORMATS",
    "ROWS_PER_GROUP",
    "ROWS_PER_SHARD",
    "SHARD_DIR",
    "SHARED_CACHE_BYTES",
    "SHARED_DIR",
    "SHARED_FORMAT",
    "SHARED_FORMATS",
    "WRITABLE_FORMATS",
    "checksum_of",
    "DatasetError",
    "ShardDataset",
    "ShardFileWriter",
    "ShardWriter",
    "SharedTableWriter",
    "columns_checksum",
    "index_table",
    "open_dataset",
    "sample_checksum",
    "write_format",
    "sample_columns",
    "shard_file",
    "shard_schema",
    "shared_file",
    "shared_index_file",
    "shared_key",
    "shared_table",
    "stored_columns",
    "write_index_and_manifest",
    "write_shared_index",
]
