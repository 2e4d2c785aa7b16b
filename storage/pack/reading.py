"""Reading a part's source files: from their containers (folders, zips) or, for manifests, by URI."""

from __future__ import annotations

from collections.abc import Iterable

from storage.pack.records import PartTask
from storage.source_plan import Container, MemberError, SourcePlan, read_files, read_members
from storage.zip_ranges import ZipAt


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
            located = {m: task.zip_at[(c, m)] for m in members if (c, m) in task.zip_at} if is_zip else None
            got = read_members(Container(kind, uri, is_zip), sorted(members), located)
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


def zip_locations(plan: SourcePlan, files: Iterable[tuple[int | None, str]]) -> dict[tuple[int, str], ZipAt]:
    """PartTask.zip_at for the files (container, member) of a part: where the plan's listing found
    each zip member."""
    from storage.seed_layout import member_key

    out: dict[tuple[int, str], ZipAt] = {}
    for c, member in files:
        if c is None or not plan.containers[c].is_zip:
            continue
        container = plan.containers[c]
        entry = container.entries.get(member) or container.entries.get(member_key(container.kind, member))
        if entry is not None and entry.member == member and entry.at is not None:
            out[(c, member)] = entry.at
    return out
