"""What every task layout shares: the plan a layout hands to pack, folder listing, layout detection
and the one-line "this is not the layout --task KIND takes" error."""

from __future__ import annotations

import hashlib
import os
import posixpath
from dataclasses import dataclass, field
from typing import Any

from common.tasks import MASK_DEPTH, get_task_spec, task_names
from storage import fs as sfs
from storage.seed_layout import CONTAINERS
from storage.source_plan import Container, Entry, FileRef, SampleRef, SourceError, SourcePlan

TASKS = tuple(task_names())  # the built-in tasks (common.tasks)
DEFAULT_TASK = MASK_DEPTH.name
# Image files a layout packs (torchvision's ImageFolder set, minus the rare ones).
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp")
MANIFEST_EXTS = (".csv", ".parquet", ".pq")
# Folder and file names skipped when listing (macOS and notebook litter).
_JUNK_PARTS = ("__MACOSX", ".DS_Store", ".ipynb_checkpoints", "Thumbs.db")


class BadSample(Exception):
    """One sample that cannot be packed: the file to look at and why."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(reason)
        self.path = path
        self.reason = reason


# `data pack` refuses images of more pixels than this (--max-pixels raises it). 40 MP is past any
# camera photo people train on (a 12 MP phone photo, a 24-36 MP DSLR's; 4096x4096, the recipe's
# largest resolution, is 16.8 MP) and still decodes in ~120 MB (RGB); every epoch decodes every
# image again, so a 10000x10000 scan (100 MP: ~300 MB per decode) is a mistake, not a sample.
# Pillow's own decompression-bomb check (a warning from 89 MP) is replaced by this one.
DEFAULT_MAX_PIXELS = 40_000_000
_max_pixels = DEFAULT_MAX_PIXELS


def set_max_pixels(limit: int) -> None:
    """The pixel limit of this process's image checks (a pack part sets its task's)."""
    global _max_pixels
    _max_pixels = int(limit)


def open_image_checked(data: bytes, kind: str, path: str):
    """Image.open(data), its header read only, refused (BadSample naming the file, its size and the
    flag) when it has more pixels than the limit; other errors propagate, for the caller to name."""
    import io

    from PIL import Image

    old = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None  # the check below replaces Pillow's (its warning, then its error)
    try:
        img = Image.open(io.BytesIO(data))
    finally:
        Image.MAX_IMAGE_PIXELS = old
    check_pixels(img.width, img.height, kind, path)
    return img


def check_pixels(width: int, height: int, kind: str, path: str) -> None:
    n = int(width) * int(height)
    if n > _max_pixels:
        raise BadSample(path, f"{kind} is {width}x{height} ({n / 1e6:.1f} MP), over the {_max_pixels / 1e6:g} MP limit "
                              f"(each decode takes ~{n * 3 / 2**20:.0f} MB); downscale it, or raise the limit with "
                              f"--max-pixels {n}")


def check_task(task: str) -> str:
    if task not in TASKS:
        raise ValueError(f"--task {task!r}: choose one of {', '.join(TASKS)}")
    return task


@dataclass
class TaskPlan(SourcePlan):
    """A SourcePlan for the task kinds: which files make a sample, and what the manifest's meta
    starts from (class names, ...). `options` travel to every part (what prepare needs)."""

    task: str = DEFAULT_TASK
    file_kinds: tuple[str, ...] = ("image",)
    meta: dict[str, Any] = field(default_factory=dict)
    options: dict[str, Any] = field(default_factory=dict)

    def fingerprint(self, refs: list[SampleRef], config: dict[str, Any]) -> str:
        h = hashlib.sha256(repr(sorted(config.items())).encode())
        h.update(repr((self.task, sorted(self.options.items()))).encode())
        for s in refs:
            h.update(f"{s.sample_id}|{s.name}|{sorted(s.extra.items())!r}".encode())
            for kind in self.file_kinds:
                ref = s.files[kind]
                where = "" if ref.container is None else self.containers[ref.container].uri
                h.update(f"|{where}|{ref.member}|{ref.stamp}".encode())
        return h.hexdigest()


# -- listing -------------------------------------------------------------------------------------------


def _junk(member: str) -> bool:
    parts = member.split("/")
    return any(p in _JUNK_PARTS or p.startswith(".") for p in parts)


def list_folder(kind: str, uri: str) -> Container:
    """Every file under `uri` (recursively), keyed by its path relative to `uri`; hidden files and
    macOS/notebook litter are left out. The stamp changes when the file does (size + mtime/etag)."""
    c = Container(kind, uri, is_zip=False)
    fs, path = sfs.filesystem(uri)
    root = path.replace(os.sep, "/").rstrip("/")
    for full, info in fs.find(path, detail=True).items():
        if info.get("type") == "directory":
            continue
        member = posixpath.relpath(full.replace(os.sep, "/"), root)
        if _junk(member):
            continue
        stamp = info.get("md5Hash") or info.get("ETag") or info.get("etag") or str(info.get("mtime")
                                                                                   or info.get("updated") or "")
        c.entries[member] = Entry(member, int(info.get("size") or 0), f"{info.get('size')}:{stamp}")
    return c


def top_level(uri: str) -> tuple[list[str], list[str]]:
    """(folders, files) directly under a folder URI, base names sorted, junk left out."""
    fs, path = sfs.filesystem(uri)
    dirs, files = [], []
    for info in fs.ls(path, detail=True):
        name = posixpath.basename(str(info["name"]).replace(os.sep, "/").rstrip("/"))
        if _junk(name):
            continue
        (dirs if info.get("type") == "directory" else files).append(name)
    return sorted(dirs), sorted(files)


def stem(member: str) -> str:
    """The pairing key of a file: its relative path without the extension."""
    return posixpath.splitext(member)[0]


def is_image(member: str) -> bool:
    return member.lower().endswith(IMAGE_EXTS)


def read_text(uri: str) -> str:
    try:
        return sfs.read_bytes(uri).decode("utf-8-sig", errors="replace")
    except FileNotFoundError:
        raise SourceError(f"{uri}: no such file") from None


def read_class_names(uri: str) -> list[str]:
    """Class names from a text file, one per line (line 1 = class 0); blank lines are skipped."""
    names = [ln.strip() for ln in read_text(uri).splitlines()]
    names = [n for n in names if n]
    if not names:
        raise SourceError(f"{uri}: no class names in it; write one class name per line (line 1 = class 0)")
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise SourceError(f"{uri}: class name(s) {', '.join(dup)} appear more than once; each line must name a "
                          "different class")
    return names


# -- which layout is this? ------------------------------------------------------------------------------

# layout name -> what it looks like, in words
_LOOKS = {
    "seed": "the mask_depth seed layout (fg_bg/, fg_bg_mask/, depth/, bg/, labels/)",
    "voc": "a Pascal VOC tree (JPEGImages/, SegmentationClass/, ImageSets/Segmentation/)",
    "images_masks": "images/ + masks/ (a segmentation layout)",
    "rgbd": "rgb/ + depth/ (a depth layout)",
    "imagefolder": "an ImageFolder tree (one folder per class)",
}
# layout name -> (what it looks like, in words; the task that packs it: the one whose spec lists it)
LAYOUTS: dict[str, tuple[str, str]] = {
    **{layout: (_LOOKS[layout], name) for name in TASKS for layout in get_task_spec(name).layouts},
    "manifest": ("a CSV/Parquet manifest", ""),
}
# What each task's `data pack` takes, in words (its spec's `sources`).
EXPECTED = {name: get_task_spec(name).sources for name in TASKS}
IMAGES_DIRS = ("images", "image", "imgs", "JPEGImages")
MASKS_DIRS = ("masks", "mask", "annotations", "labels", "SegmentationClass")
RGB_DIRS = ("rgb", "images", "image", "color")
DEPTH_DIRS = ("depth", "depths")


def find_voc_root(source: str, dirs: list[str], depth: int = 3) -> str | None:
    """SOURCE itself when it holds JPEGImages/ and SegmentationClass/, or the VOC20xx folder under
    it (a VOCdevkit root, or the folder a VOC tar was unpacked into: VOCtrainval_.../VOCdevkit/VOC2012)."""
    if "JPEGImages" in dirs and "SegmentationClass" in dirs:
        return source
    if depth == 0:
        return None
    for d in dirs:
        if d.startswith("VOC"):
            sub = sfs.join(source, d)
            found = find_voc_root(sub, top_level(sub)[0], depth - 1)
            if found:
                return found
    return None


def detect_layout(source: str) -> tuple[str, str]:
    """(layout name, what was found in words) for a SOURCE; layout "" when it is none we know."""
    source = sfs.normalize(source)
    if source.rstrip("/").lower().endswith(MANIFEST_EXTS):
        return "manifest", LAYOUTS["manifest"][0]
    fs, path = sfs.filesystem(source)
    if not fs.exists(path):
        return "missing", "nothing there"
    if not fs.isdir(path):
        return "", "a file, not a folder"
    dirs, files = top_level(source)
    names = set(dirs) | set(files)
    if not names:
        return "empty", "an empty folder"
    seed_names = {n for k in ("fg_bg", "mask", "bg") for n in CONTAINERS[k]}
    if names & (seed_names | {f"{n}.zip" for n in seed_names}):
        return "seed", LAYOUTS["seed"][0]
    if find_voc_root(source, dirs):
        return "voc", LAYOUTS["voc"][0]
    has = set(dirs)
    if has & set(IMAGES_DIRS) and has & set(MASKS_DIRS) and not has & set(DEPTH_DIRS):
        return "images_masks", LAYOUTS["images_masks"][0]
    if has & set(RGB_DIRS) and has & set(DEPTH_DIRS):
        return "rgbd", LAYOUTS["rgbd"][0]
    if dirs:
        shown = ", ".join(dirs[:6]) + (f" and {len(dirs) - 6} more" if len(dirs) > 6 else "")
        return "imagefolder", f"an ImageFolder-like tree of {len(dirs)} folder(s) ({shown}), i.e. one folder per class"
    shown = ", ".join(files[:4]) + (f" and {len(files) - 4} more" if len(files) > 4 else "")
    return "", f"only files ({shown}), no folders"


def wrong_layout(source: str, task: str, layout: str, found: str) -> SourceError:
    """The one-line error for a SOURCE that is not what `--task task` packs."""
    other = LAYOUTS.get(layout, ("", ""))[1]
    if other and other != task:
        fix = f"pack it with --task {other}" + (" (the default)" if other == DEFAULT_TASK
                                                else "") + f", or point SOURCE at {task} data"
    else:
        fix = (f"point SOURCE at such a folder (`orchestrator data synth DEST --task {task} --layout seed` writes an "
               "example)")
    return SourceError(f"{sfs.normalize(source)}: --task {task} expects {EXPECTED[task]}, but found {found}; {fix}")


# -- pairing two folders by file stem ---------------------------------------------------------------


def pair_folders(first: Container, second: Container, kinds: tuple[str, str], accept: tuple, default_ext: str,
                 source_prefix: str = "") -> tuple[list[SampleRef], list[dict[str, str]], list[str]]:
    """Samples made of one file from each folder with the same stem (relative path without its
    extension): (samples, bad, unlisted). A sample's `source` index value is source_prefix + the
    first file's path in its folder (e.g. "images/a.jpg": relative to SOURCE). Sample ids number the stems
    found in either folder, sorted, so fixing a bad pair never renumbers the good ones. A stem with no partner,
    or with two files in one folder (x.jpg and x.png), is bad; files whose extension neither folder takes are unlisted.
    """
    by_stem: list[dict[str, list[str]]] = [{}, {}]
    unlisted: list[str] = []
    for i, (c, ok) in enumerate(((first, accept[0]), (second, accept[1]))):
        for member in c.entries:
            if member.lower().endswith(ok):
                by_stem[i].setdefault(stem(member), []).append(member)
            else:
                unlisted.append(c.path_of(member))
    samples: list[SampleRef] = []
    bad: list[dict[str, str]] = []
    for sid, key in enumerate(sorted(set(by_stem[0]) | set(by_stem[1]))):
        got = [by_stem[0].get(key, []), by_stem[1].get(key, [])]
        conts = (first, second)
        problem = None
        for i in (0, 1):
            if len(got[i]) > 1:
                problem = (conts[i].path_of(got[i][0]),
                           f"{len(got[i])} {kinds[i]} files share the stem {key!r} ({', '.join(got[i])}); keep one")
        for i in (0, 1):
            if not got[i] and problem is None:
                have = conts[1 - i].path_of(got[1 - i][0])
                expected = conts[i].path_of(key + (default_ext if i == 1 else ".*"))
                problem = (have, f"missing partner file ({kinds[i]}): no {expected} for this {kinds[1 - i]}")
        if problem is not None:
            bad.append({"sample": str(sid), "path": problem[0], "reason": problem[1]})
            continue
        files = {kinds[i]: FileRef(i, got[i][0], conts[i].entries[got[i][0]].stamp) for i in (0, 1)}
        samples.append(SampleRef(sid, got[0][0], files, {"source": source_prefix + got[0][0]}))
    return samples, bad, sorted(unlisted)
