"""What a pack plans over, whatever the task: listed containers (folders, zips), the files of each
sample, the plan of a whole source, and reading files. The mask_depth seed layout (storage/seed_layout.py)
and the other tasks' layouts (storage/layouts/) build these."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from storage import fs as sfs
from storage.zip_ranges import ZipAt, read_zip_members


def zip_member_uri(zip_uri: str, member: str) -> str:
    """fsspec's chained URL of a zip member: openable with fsspec.open, and readable in a report."""
    return f"zip://{member}::{zip_uri}"


@dataclass(frozen=True)
class Entry:
    member: str  # path inside the container (zip member name, or path relative to the folder)
    size: int
    stamp: str  # changes when the file changes: CRC for zips, size/mtime or etag for folders
    at: ZipAt | None = None  # a zip member: where it lies, so that a part reads it without the directory


@dataclass
class Container:
    """One folder or zip of the layout, listed once: key -> Entry."""

    kind: str  # fg_bg | mask | depth | bg | labels
    uri: str
    is_zip: bool
    entries: dict[str, Entry] = field(default_factory=dict)

    def path_of(self, member: str) -> str:
        return zip_member_uri(self.uri, member) if self.is_zip else sfs.join(self.uri, member)


class MemberError(Exception):
    """A file or zip member that cannot be read; the message says why."""


def read_members(container: Container, members: list[str],
                 located: dict[str, ZipAt] | None = None) -> dict[str, bytes | MemberError]:
    """Bytes of each member (or the MemberError saying why not), one open of a zip per call.

    `located`: where each member of a zip lies (the plan's listing, Entry.at); those are read from
    their ranges without the zip's directory (storage/zip_ranges.py says why), the rest by zipfile.
    Each call opens its own handle: zip readers shared between threads or processes are what
    broke the source's zip-backed loaders.
    """
    if container.is_zip:
        fs, path = sfs.filesystem(container.uri)
        got = read_zip_members(fs, path, members, located or {})
        return {m: g if isinstance(g, bytes) else MemberError(g) for m, g in got.items()}
    return read_files([sfs.join(container.uri, m) for m in members], keys=members)


def read_files(uris: list[str], keys: list[str] | None = None) -> dict[str, bytes | MemberError]:
    """Bytes of each file URI (or a MemberError), concurrently where the filesystem allows."""
    keys = keys or uris
    if not uris:
        return {}
    fs, _ = sfs.filesystem(uris[0])
    paths = [sfs.filesystem(u)[1] for u in uris]
    out: dict[str, bytes | MemberError] = {}
    for key, r in zip(keys, sfs.cat_ranges(fs, paths, [None] * len(paths), [None] * len(paths)), strict=True):
        if isinstance(r, (FileNotFoundError, IsADirectoryError)):
            out[key] = MemberError("file missing")
        elif isinstance(r, BaseException):
            out[key] = MemberError(f"unreadable ({sfs.describe_error(r)})")
        else:
            out[key] = bytes(r)
    return out


@dataclass(frozen=True)
class FileRef:
    """One file of a sample: a member of a listed container, or a plain URI (manifests)."""

    container: int | None  # index into SourcePlan.containers, or None for a URI
    member: str
    stamp: str = ""


@dataclass
class SampleRef:
    sample_id: int
    name: str  # the fg_bg path as the source names it
    files: dict[str, FileRef]  # fg_bg, mask, depth, bg
    extra: dict[str, Any]  # per-sample index columns (source, fg_x, fg_y)


@dataclass
class SourcePlan:
    """Every sample a source holds, sorted by id, plus what is wrong before any image is read."""

    source: str
    kind: str  # seed-folders | seed-zips | seed-mixed | manifest
    containers: list[Container]
    samples: list[SampleRef]
    bad: list[dict[str, str]]  # {"sample", "path", "reason"}
    unlisted: list[str]  # image files no label line names (not packed; counted in the report)
    extra_columns: tuple[str, ...]

    def path_of(self, ref: FileRef) -> str:
        return ref.member if ref.container is None else self.containers[ref.container].path_of(ref.member)

    def fingerprint(self, refs: list[SampleRef], config: dict[str, Any]) -> str:
        """Changes when these samples' files or the pack settings change: a part's resume key."""
        raise NotImplementedError  # each kind of source says which of a sample's files count, in its order


class SourceError(ValueError):
    """A source that cannot be packed at all (nothing there, a container missing)."""
