"""Reading a part's source files: from their containers (folders, zips) or, for manifests, by URI."""

from __future__ import annotations

from storage.pack.records import PartTask
from storage.source_plan import Container, MemberError, read_files, read_members


def read_part_files(task: PartTask) -> dict[tuple[int | None, str], bytes | MemberError]:
    wanted: dict[int | None, set[str]] = {}
    for _, _, files, _ in task.samples:
        for c, member in files.values():
            wanted.setdefault(c, set()).add(member)
    blobs: dict[tuple[int | None, str], bytes | MemberError] = {}
    for c, members in wanted.items():
        if c is None:
            # Manifest URIs: one concurrent batch per filesystem.
            by_protocol: dict[str, list[str]] = {}
            for uri in sorted(members):
                by_protocol.setdefault(uri.split("://", 1)[0] if "://" in uri else "file", []).append(uri)
            for uris in by_protocol.values():
                blobs.update({(None, k): v for k, v in read_files(uris).items()})
        else:
            kind, uri, is_zip = task.containers[c]
            got = read_members(Container(kind, uri, is_zip), sorted(members))
            blobs.update({(c, k): v for k, v in got.items()})
    return blobs


def path_of(task: PartTask, c: int | None, member: str) -> str:
    if c is None:
        return member
    _, uri, is_zip = task.containers[c]
    return Container("", uri, is_zip).path_of(member)


def member_problem(kind: str, blob: MemberError) -> str:
    return (
        f"{kind}: missing partner file" if str(blob) in ("file missing", "missing from the zip") else f"{kind}: {blob}"
    )
