"""Reading many members of a remote zip in a few concurrent ranged requests.

zipfile reads a member through seeks and small reads of the file it is given. On a remote file
(gcsfs) each of those misses the read cache as soon as the members read are not one after another,
and costs a request: packing 6,000 samples from seed-layout zips on the GCS emulator at 20 ms a
request took 96,134 requests and 184 s in the source's order (docs/PERFORMANCE.md, "`data pack`
stores samples shuffled"). Here the byte range of every wanted member (its local header, data and
descriptor: from its header offset to the next member's) is fetched first, runs of adjacent members
merged into one request of up to MERGE_BYTES, all in flight together (storage.fs.cat_ranges); then
zipfile reads the members from those bytes as from the file, with its own header parsing,
decompression and CRC check. The zip is opened once, on a storage/ranges_file.py RangesFile that
reads its directory through to the file; a read outside the fetched ranges (or of a range whose
request failed) goes to the file too, so nothing is read differently, only sooner.
"""

from __future__ import annotations

import io
import zipfile
from typing import Any

from fsspec.utils import merge_offset_ranges

from storage import fs as sfs
from storage.ranges_file import RangesFile

# One request covers nearby members up to this many bytes: large enough that a run of a row
# group's members (~1 MB) is one request, small enough that a part's requests run side by side.
MERGE_BYTES = 8 * 2**20
# Members this close are fetched in one request, the bytes between them read and dropped: a request
# costs a round trip (20 ms and more), 64 KB at a bucket's ~100 MB/s under one ms.
GAP_BYTES = 64 * 2**10


def member_ranges(zf: zipfile.ZipFile, members: list[str]) -> list[tuple[int, int]]:
    """Byte ranges [start, end) to fetch for `members` (names in the zip; others are skipped),
    those within GAP_BYTES of each other merged up to MERGE_BYTES, in file order."""
    infos = sorted(zf.infolist(), key=lambda i: i.header_offset)
    offsets = [i.header_offset for i in infos]
    end_of = {i.filename: (offsets[k + 1] if k + 1 < len(infos) else zf.start_dir) for k, i in enumerate(infos)}
    by_name = {i.filename: i for i in infos}
    wanted = sorted((by_name[m].header_offset, end_of[m]) for m in set(members) if m in by_name)
    if not wanted:
        return []
    _, starts, ends = merge_offset_ranges([""] * len(wanted), [s for s, _ in wanted], [e for _, e in wanted],
                                          max_gap=GAP_BYTES, max_block=MERGE_BYTES, sort=False)
    return list(zip(starts, ends, strict=True))


def open_remote(f: Any) -> RangesFile:
    """`f`, an open remote zip, as a RangesFile that reads through to it: open the ZipFile on this
    (its directory is read through to `f` once), then fetch_members() before reading members."""
    return RangesFile(f.seek(0, io.SEEK_END), {}, fallback=f)


def fetch_members(fs: Any, path: str, zf: zipfile.ZipFile, members: list[str], into: RangesFile) -> None:
    """Fetch the byte ranges of `members` of `zf` (opened on `into`) into `into`, all requests in
    flight together. A range whose request failed is left to the file."""
    ranges = member_ranges(zf, members)
    got = sfs.cat_ranges(fs, [path] * len(ranges), [s for s, _ in ranges], [e for _, e in ranges])
    into.add({s: bytes(r) for (s, e), r in zip(ranges, got, strict=True)
              if not isinstance(r, BaseException) and len(r) == e - s})
