"""A fetched row group's columns read from Arrow's buffers: each sample checked against the
index's checksum, and the values a read asks for gathered in its order, as Python objects
(read_samples) or packed (Packed: one blob and an (offset, length) index, what a streamed chunk's
landing keeps or writes to its spool in one write; workers/spool.py).

Why the buffers and not Table.to_pylist: to_pylist makes a bytes object per value (a copy of every
byte, and an object per value) that the landing then copied once more into the spool. Slices of
the buffers are hashed in place and joined with one copy. On bench.peer's 56 px pass (6,000
samples, 99 MB) the landing threads' CPU fell from 0.44-0.48 s to 0.32-0.39 s, and to 0.24-0.30 s
with format /5's CRC-32 (docs/PERFORMANCE.md, "Issue 24, third pass").
"""

from __future__ import annotations

import hashlib
import zlib
from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa

from storage.columns import Column
from storage.shards.format import CHECKSUM_DIGEST_BYTES, CRC32

Group = tuple[int, int]  # (shard, row group)
# Integer Arrow types as numpy dtypes (DataType.to_pandas_dtype may import pandas: see reader.py's _FIXED).
_INTS = {pa.int8(): np.int8, pa.int16(): np.int16, pa.int32(): np.int32, pa.int64(): np.int64,
         pa.uint8(): np.uint8, pa.uint16(): np.uint16, pa.uint32(): np.uint32, pa.uint64(): np.uint64}


class Packed:
    """Byte values end to end in one blob: value i is blob[index[i, 0] : index[i, 0] + index[i, 1]],
    None where the length is -1. Indexes and iterates like the list of bytes it stands for."""

    __slots__ = ("blob", "index")

    def __init__(self, blob: bytes, index: np.ndarray) -> None:
        self.blob, self.index = blob, index

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> bytes | None:
        off, n = (int(x) for x in self.index[i])
        return None if n < 0 else self.blob[off : off + n]

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    @property
    def nbytes(self) -> int:
        return len(self.blob) + self.index.nbytes

    def tolist(self) -> list[bytes | None]:
        return list(self)


class GroupColumns:
    """One parsed row group's columns as numpy views of Arrow's buffers (made on first use)."""

    def __init__(self, table: pa.Table) -> None:
        self.table = table
        self.num_rows = table.num_rows
        self._arrays: dict[str, pa.Array] = {}
        self._views: dict[tuple[str, str], Any] = {}

    def _array(self, name: str) -> pa.Array:
        a = self._arrays.get(name)
        if a is None:
            col = self.table.column(name)
            a = self._arrays[name] = col.chunk(0) if col.num_chunks == 1 else pa.concat_arrays(col.chunks)
        return a

    def ints(self, name: str) -> np.ndarray:
        """An integer column as int64 (a null reads as 0: `valid` says where they are)."""
        key = (name, "ints")
        if key not in self._views:
            a = self._array(name)
            if a.type not in _INTS:
                raise TypeError(f"column {name} is {a.type}, not an integer column")
            dtype = np.dtype(_INTS[a.type])
            v = np.frombuffer(a.buffers()[1], dtype=dtype, count=len(a), offset=a.offset * dtype.itemsize)
            self._views[key] = v.astype(np.int64, copy=False)
        return self._views[key]

    def offsets(self, name: str) -> np.ndarray:
        """A binary column's value offsets into `data(name)` (len + 1 of them)."""
        key = (name, "offsets")
        if key not in self._views:
            a = self._array(name)
            if pa.types.is_binary(a.type) or pa.types.is_string(a.type):
                dtype = np.dtype(np.int32)
            elif pa.types.is_large_binary(a.type) or pa.types.is_large_string(a.type):
                dtype = np.dtype(np.int64)
            else:
                raise TypeError(f"column {name} is {a.type}, not a binary column")
            self._views[key] = np.frombuffer(a.buffers()[1], dtype=dtype, count=len(a) + 1,
                                             offset=a.offset * dtype.itemsize).astype(np.int64)
        return self._views[key]

    def data(self, name: str) -> memoryview:
        key = (name, "data")
        if key not in self._views:
            buf = self._array(name).buffers()[2]
            self._views[key] = memoryview(buf) if buf is not None else memoryview(b"")
        return self._views[key]

    def valid(self, name: str) -> np.ndarray | None:
        """Per row, whether the value is there; None when the column has no nulls."""
        a = self._array(name)
        if not a.null_count:
            return None
        bits = np.unpackbits(np.frombuffer(a.buffers()[0], dtype=np.uint8), bitorder="little")
        return bits[a.offset : a.offset + len(a)].astype(bool)

    def pylist(self, name: str) -> list:
        key = (name, "list")
        if key not in self._views:
            self._views[key] = self._array(name).to_pylist()
        return self._views[key]


def verify_rows(g: GroupColumns, rows: list[tuple[int, int, str]], columns: Sequence[Column],
                kind: str, item: str = "sample") -> str | None:
    """None when each (row, sample id, checksum) matches the row group's values; else what is wrong.
    The checksum is storage.shards.format.columns_checksum's of `kind`, over slices of the buffers."""
    try:
        sids = g.ints("sample_id").tolist()
        parts = []
        for c in columns:
            valid = g.valid(c.name)
            valid = None if valid is None else valid.tolist()
            if c.is_bytes:
                parts.append((False, g.offsets(c.name).tolist(), g.data(c.name), valid))
            else:
                parts.append((True, g.ints(c.name).tolist(), None, valid))
    except (KeyError, TypeError, ValueError, pa.ArrowException) as exc:
        return f"its columns are not the dataset's ({type(exc).__name__}: {exc})"
    n, crc32 = g.num_rows, kind == CRC32
    for r, sid, expected in rows:
        if r >= n or sids[r] != sid:
            return f"{item} {sid} is not at row {r} where the index puts it"
        h = None if crc32 else hashlib.blake2b(digest_size=CHECKSUM_DIGEST_BYTES)
        crc = 0
        for is_int, values, data, valid in parts:
            if valid is not None and not valid[r]:
                return f"{item} {sid} has a missing value"
            part = values[r].to_bytes(8, "little", signed=True) if is_int else data[values[r] : values[r + 1]]
            if crc32:
                crc = zlib.crc32(part, crc)
            else:
                h.update(part)
        got = f"{crc:08x}" if crc32 else h.hexdigest()
        if got != expected:
            return f"{item} {sid} fails its checksum (index {expected}, read {got})"
    return None


def gather(groups: dict[Group, GroupColumns], where: dict[Group, tuple[list[int], np.ndarray]], n: int,
           name: str, kind: str) -> Any:
    """Column `name` of n samples in read order: `where` gives, per row group, the output positions
    and the rows there. kind "int": int64 numpy; "list": a list of Python values; "packed": Packed."""
    if kind == "int":
        out = np.empty(n, dtype=np.int64)
        for key, (dst, rows) in where.items():
            out[dst] = groups[key].ints(name)[rows]
        return out
    if kind == "list":
        values: list[Any] = [None] * n
        for key, (dst, rows) in where.items():
            col = groups[key].pylist(name)
            for d, r in zip(dst, rows.tolist(), strict=True):
                values[d] = col[r]
        return values
    slices: list[Any] = [b""] * n
    lengths = np.empty(n, dtype=np.int64)
    for key, (dst, rows) in where.items():
        g = groups[key]
        off, data, valid = g.offsets(name), g.data(name), g.valid(name)
        starts, ends = off[rows], off[rows + 1]
        lengths[dst] = ends - starts
        if valid is not None:
            lengths[dst] = np.where(valid[rows], lengths[dst], -1)
        for d, a, b in zip(dst, starts.tolist(), ends.tolist(), strict=True):
            slices[d] = data[a:b]
    for d in np.flatnonzero(lengths < 0).tolist():
        slices[d] = b""
    index = np.empty((n, 2), dtype=np.int64)
    sizes = np.maximum(lengths, 0)
    index[:, 0] = np.cumsum(sizes) - sizes
    index[:, 1] = lengths
    return Packed(b"".join(slices), index)
