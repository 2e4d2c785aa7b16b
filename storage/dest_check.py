"""What a DEST may hold before `data synth` / `data pack` (or a run's first-run synthesis) write there.

Both replace what they wrote before: a re-synth rewrites shards/ and shared/, a re-pack resumes from
DEST/.pack/ and rewrites the parts whose settings changed. So DEST must be empty, missing, or hold
only files with the names this tool writes (a packed dataset, a pack's state, a synthetic raw layout,
the leftovers of a killed write); anything else is the user's, and the command refuses (exit 2)
unless --force. Even with --force, only files this tool writes are ever removed (storage.shards,
storage.pack): a user's file is never deleted.
"""

from __future__ import annotations

import re

from common.errors import RecipeError
from common.redact import redact_text
from storage import fs as sfs

# Names this tool writes, relative to DEST (storage.shards, storage.pack, storage.seed_layout,
# storage.synth_tasks). Kept exact: a loose pattern would let a user's file pass as ours.
_ID = r"\d{5,}"
PACKED_PATTERNS = (
    r"manifest\.json",
    r"index\.parquet",
    rf"shards/shard-{_ID}\.parquet",
    rf"shared/[A-Za-z0-9_]+/(part-{_ID}|index)\.parquet",
    r"\.pack/settings\.json",
    rf"\.pack/(bg-)?part-{_ID}(\.json|\.index\.parquet)",
)
# storage.synth_tasks
_CLASSES = ("crescent", "cross", "diamond", "disc", "frame", "plus", "ring", "square", "star", "triangle")
SEED_PATTERNS = (
    # mask_depth, the source's layout (storage.seed_layout.synthesize_seed_layout), folders or zips
    r"(fg_bg|fg_bg_mask|depth)/bg_\d{3}/fg_\d{3}_bg_\d{3}(_mask)?_\d{6,}\.(jpg|png)",
    r"bg/bg_\d{3}\.jpg",
    r"(fg_bg|fg_bg_mask|depth|bg)\.zip",
    r"labels/bg_\d{3}_label_info\.txt",
    # classification, segmentation, depth (storage.synth_tasks.synthesize_task_seed_layout)
    rf"({'|'.join(_CLASSES)})/\d{{6,}}\.png",
    r"images/\d{6,}\.jpg",
    r"masks/\d{6,}\.png",
    r"classes\.txt",
    r"rgb/\d{6,}\.jpg",
    r"depth/\d{6,}\.png",
)
# Leftovers of a write killed half-way: storage.fs's atomic-write temp files and DEST's write probe.
TRANSIENT_PATTERNS = (r"(.+/)?[^/]+\.tmp-[0-9a-f]{8}", r"\.probe-[0-9a-f]{8}")

_OURS = re.compile("|".join(f"(?:{p})" for p in (*PACKED_PATTERNS, *SEED_PATTERNS, *TRANSIENT_PATTERNS)))
_PACKED = re.compile("|".join(f"(?:{p})" for p in (*PACKED_PATTERNS, *TRANSIENT_PATTERNS)))
SHOWN = 3


class ForeignDestError(RecipeError):
    """DEST holds files this tool did not write: exit 2, naming DEST and the first of them."""


def is_ours(rel: str) -> bool:
    return _OURS.fullmatch(rel) is not None


def is_packed_file(rel: str) -> bool:
    """A file of a packed dataset or a pack's state (what a re-synth or a re-pack may replace)."""
    return _PACKED.fullmatch(rel) is not None


def files_under(uri: str) -> list[str]:
    """Every file under `uri`, relative to it, sorted ([] when it does not exist)."""
    fs, path = sfs.filesystem(uri)
    if not fs.exists(path):
        return []
    if fs.isfile(path):
        return [""]
    root = path.rstrip("/") + "/"
    out = []
    for p in fs.find(path):
        if p.endswith("/"):  # a bucket's folder placeholder object
            continue
        out.append(p[len(root):] if p.startswith(root) else p.rsplit("/", 1)[-1])
    return sorted(out)


def foreign_files(dest: str) -> list[str]:
    """Files under DEST, relative to it, that this tool does not write."""
    return [f for f in files_under(sfs.normalize(dest)) if f and not is_ours(f)]


def check_dest(dest: str, command: str, force: bool = False) -> None:
    """Refuse a DEST that holds files this tool did not write (ForeignDestError), unless `force`."""
    if force:
        return
    foreign = foreign_files(dest)
    if not foreign:
        return
    shown = ", ".join(foreign[:SHOWN]) + (f" and {len(foreign) - SHOWN} more" if len(foreign) > SHOWN else "")
    raise ForeignDestError(
        f"{redact_text(sfs.normalize(dest))}: holds files that `orchestrator {command}` did not write "
        f"({redact_text(shown)}); it replaces what it wrote there, so point DEST at an empty or new folder, "
        f"or add --force to write there anyway (files it did not write are never deleted)"
    )


def remove_packed_files(uri: str, folder: str, keep: frozenset[str] | set[str] = frozenset()) -> None:
    """Remove the files under DEST/folder that this tool writes (a packed dataset's), but those in `keep`;
    a user's file there stays."""
    for rel in files_under(sfs.join(uri, folder)):
        name = f"{folder}/{rel}"
        if rel and is_packed_file(name) and name not in keep:
            sfs.remove(sfs.join(uri, name))
