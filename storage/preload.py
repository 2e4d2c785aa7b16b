"""Selective chunk preload: the row-group fetcher (storage/shards/fetch.py) under the name the
rest of the code first knew it by."""

from __future__ import annotations

from storage.errors import ShardFetchError
from storage.shards.fetch import (
    FOOTER_GUESS_BYTES,
    MERGE_MAX_BYTES,
    Group,
    PreloadStats,
    ShardReader,
)

__all__ = ["FOOTER_GUESS_BYTES", "MERGE_MAX_BYTES", "Group", "PreloadStats", "ShardFetchError", "ShardReader"]
