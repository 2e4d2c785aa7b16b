"""A seekable read-only file whose bytes come from ranges fetched ahead: what lets a library that
reads a file through seeks and small reads (pyarrow's Parquet reader, zipfile) read from a few
large concurrent requests instead (storage/shards/fetch.py, storage/zip_ranges.py)."""

from __future__ import annotations

import bisect
import io
from collections.abc import Mapping
from typing import Any


class RangesFile(io.RawIOBase):
    """`size` bytes, known in the fetched `parts` ({start: bytes}). A read outside them goes to
    `fallback` (an open file of the same bytes) when there is one, and counts in fallback_reads;
    without one it is a bug in the range planning and fails loudly rather than returning zeros."""

    def __init__(self, size: int, parts: Mapping[int, bytes | memoryview], fallback: Any = None) -> None:
        self._size = size
        self._parts = sorted(parts.items(), key=lambda p: p[0])
        self._starts = [start for start, _ in self._parts]
        self._fallback = fallback
        self._pos = 0
        self.fallback_reads = 0

    def add(self, parts: Mapping[int, bytes | memoryview]) -> None:
        """More fetched ranges (a reader that learns what it needs from the file's own directory,
        read through the fallback, fetches the rest then)."""
        self._parts = sorted([*self._parts, *parts.items()], key=lambda p: p[0])
        self._starts = [start for start, _ in self._parts]

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size}[whence]
        self._pos = base + offset
        return self._pos

    def read(self, n: int | None = -1) -> bytes | memoryview:
        if n is None or n < 0:
            n = max(0, self._size - self._pos)
        k = bisect.bisect_right(self._starts, self._pos) - 1
        if k >= 0:
            start, blob = self._parts[k]
            if self._pos + n <= start + len(blob):
                out = blob[self._pos - start : self._pos - start + n]
                self._pos += n
                return out  # a memoryview stays one: pyarrow reads row groups through here, uncopied
        if self._fallback is None:
            raise OSError(f"read of {n} bytes at {self._pos} outside the fetched ranges")
        self.fallback_reads += 1
        self._fallback.seek(self._pos)
        out = self._fallback.read(n)
        self._pos += len(out)
        return out

    def readinto(self, b: Any) -> int:
        data = self.read(len(b))
        b[: len(data)] = data
        return len(data)
