"""Reading many members of a zip in a few concurrent ranged requests, without its directory.

zipfile reads a member through seeks and small reads of the file it is given. On a remote file
(gcsfs) each of those misses the read cache as soon as the members read are not one after another,
and costs a request: packing 6,000 samples from seed-layout zips on the GCS emulator at 20 ms a
request took 96,134 requests and 184 s in the source's order (docs/PERFORMANCE.md, "`data pack`
stores samples shuffled"). And a ZipFile parses the whole central directory before any read: 3.4 s
and 30 MB for a zip of the source's 400K members, in every part of a pack.

So the planner's listing records where each member lies (locate_members: a ZipAt per member), and a
part reads its members with read_zip_members: their byte ranges (from a member's header to the next
member's) merged into requests of up to MERGE_BYTES, all in flight together (storage.fs.cat_ranges),
each member then taken from its local header and checked against the listing's CRC-32. A member
the listing did not locate, or stored another way, is read by zipfile, as before.
"""

from __future__ import annotations

import bisect
import struct
import zipfile
import zlib
from typing import Any, NamedTuple

from fsspec.utils import merge_offset_ranges

from storage import fs as sfs

# One request covers nearby members up to this many bytes: large enough that a run of a row
# group's members (~1 MB) is one request, small enough that a part's requests run side by side.
MERGE_BYTES = 8 * 2**20
# Members this close are fetched in one request, the bytes between them read and dropped: a request
# costs a round trip (20 ms and more), 64 KB at a bucket's ~100 MB/s under one ms.
GAP_BYTES = 64 * 2**10


class ZipAt(NamedTuple):
    """Where a member lies and how it is stored, from the zip's central directory."""

    start: int  # its local header's offset
    end: int  # the next member's header (or the directory): its header, data and descriptor lie before
    method: int  # zipfile.ZIP_STORED or ZIP_DEFLATED (others are read through zipfile)
    compressed: int
    size: int
    crc: int
    flags: int


def locate_members(zf: zipfile.ZipFile) -> dict[str, ZipAt]:
    """Each member's ZipAt, from an opened zip's directory (read once, by the planner)."""
    infos = sorted(zf.infolist(), key=lambda i: i.header_offset)
    ends = [i.header_offset for i in infos[1:]] + [zf.start_dir]
    return {i.filename: ZipAt(i.header_offset, end, i.compress_type, i.compress_size, i.file_size, i.CRC, i.flag_bits)
            for i, end in zip(infos, ends, strict=True)}


# Why our own member reader: zipfile reads a member only through a ZipFile, which parses the whole
# central directory first. A part of a pack reads a few thousand members of a zip whose directory
# the planner has already read; at the source's size (400K members a zip) a parse takes 3.4 s and
# 30 MB read, per part and per zip (docs/PERFORMANCE.md). What a member needs beyond the directory's
# record is its 30-byte local header: stored and deflated data are read here, checked against the
# directory's CRC-32 and size; any other method, or encryption, goes through zipfile.
_LOCAL_HEADER = struct.Struct("<4s22xHH")  # signature, (version..sizes), name length, extra length


def member_data(blob: bytes | memoryview, name: str, at: ZipAt) -> bytes:
    """The member's bytes from `blob`, its range [at.start, at.end); zipfile.BadZipFile when they are
    not what the directory says."""
    if len(blob) < _LOCAL_HEADER.size:
        raise zipfile.BadZipFile(f"truncated local header of {name!r}")
    signature, n, extra = _LOCAL_HEADER.unpack_from(blob)
    if signature != b"PK\x03\x04":
        raise zipfile.BadZipFile(f"bad magic number for file header of {name!r}")
    begin = _LOCAL_HEADER.size + n + extra
    data = blob[begin : begin + at.compressed]
    if len(data) != at.compressed:
        raise zipfile.BadZipFile(f"truncated data of {name!r}")
    if at.method == zipfile.ZIP_STORED:
        out = bytes(data)
    else:
        z = zlib.decompressobj(-15)
        out = z.decompress(data) + z.flush()
    if len(out) != at.size or zlib.crc32(out) != at.crc:
        raise zipfile.BadZipFile(f"Bad CRC-32 for file {name!r}")
    return out


def read_zip_members(fs: Any, path: str, members: list[str],
                     located: dict[str, ZipAt]) -> dict[str, bytes | str]:
    """Each member's bytes, or why not (a one-line reason: "missing from the zip", or "zip member
    unreadable (...)"). Located stored or deflated members are read from their ranges only (merge_spans,
    all requests in flight together), never the zip's directory; the rest through zipfile."""
    simple = {m: located[m] for m in members if m in located
              and located[m].method in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED) and not located[m].flags & 0x1}
    out: dict[str, bytes | str] = {}
    others = [m for m in members if m not in simple]
    if others:  # not located, another method, or encrypted: zipfile's own reader
        with fs.open(path, "rb") as f, zipfile.ZipFile(f) as zf:
            infos = {i.filename: i for i in zf.infolist()}
            # In archive order, so a local zip is read front to back.
            for m in sorted(others, key=lambda m: infos[m].header_offset if m in infos else -1):
                try:
                    out[m] = zf.read(infos[m]) if m in infos else "missing from the zip"
                except Exception as exc:  # noqa: BLE001 - zlib.error and friends: a bad member, not a crash
                    out[m] = f"zip member unreadable ({type(exc).__name__}: {exc})"
    if simple:
        ranges = merge_spans((at.start, at.end) for at in simple.values())
        starts = [s for s, _ in ranges]
        got = sfs.cat_ranges(fs, [path] * len(ranges), starts, [e for _, e in ranges])
        for m, at in simple.items():
            k = bisect.bisect_right(starts, at.start) - 1  # the merged range holding the member's
            try:
                if isinstance(got[k], BaseException):
                    raise got[k]
                out[m] = member_data(memoryview(got[k])[at.start - starts[k] : at.end - starts[k]], m, at)
            except Exception as exc:  # noqa: BLE001 - a failed request or a bad member, not a crash
                out[m] = f"zip member unreadable ({type(exc).__name__}: {exc})"
    return out


def merge_spans(spans: Any) -> list[tuple[int, int]]:
    """Byte ranges [start, end) of members, those within GAP_BYTES of each other merged up to
    MERGE_BYTES (fsspec's merge_offset_ranges), in file order."""
    spans = sorted(spans)
    if not spans:
        return []
    _, starts, ends = merge_offset_ranges([""] * len(spans), [s for s, _ in spans], [e for _, e in spans],
                                          max_gap=GAP_BYTES, max_block=MERGE_BYTES, sort=False)
    return list(zip(starts, ends, strict=True))
