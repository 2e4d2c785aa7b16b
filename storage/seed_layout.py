"""The source dataset's raw layout (fg_bg, fg_bg_mask, depth, bg and label_info files): write it, list it.

  SOURCE/fg_bg/bg_000/fg_003_bg_000_000017.jpg        (or the same members in fg_bg.zip)
  SOURCE/fg_bg_mask/bg_000/fg_003_bg_000_mask_000017.jpg                   (fg_bg_mask.zip)
  SOURCE/depth/bg_000/fg_003_bg_000_000017.png            (depth.zip, or the source's depth_fg_bg.zip)
  SOURCE/bg/bg_000.jpg                                                             (bg.zip)
  SOURCE/labels/bg_000_label_info.txt   one line per sample: fg_bg path, mask path, x, y (tabs)

The label_info files pair each fg_bg with its mask; depth has the fg_bg's name (or the source's
`mask_<name>.png`) under the same bg folder; the bg is named by the label file. The sample id is
the number that ends the fg_bg name. Any container may be a folder or a ZIP_STORED zip.
"""

from __future__ import annotations

import hashlib
import io
import os
import posixpath
import re
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from storage import codec
from storage import fs as sfs
from storage.source_plan import (
    Container,
    Entry,
    FileRef,
    MemberError,
    SampleRef,
    SourceError,
    SourcePlan,
    read_members,
)
from storage.zip_ranges import locate_members

# Container names as written by `data synth --layout seed`, then accepted aliases.
CONTAINERS: dict[str, tuple[str, ...]] = {
    "fg_bg": ("fg_bg",),
    "mask": ("fg_bg_mask",),
    "depth": ("depth", "depth_fg_bg"),
    "bg": ("bg",),
    "labels": ("labels",),
}
IMAGE_KINDS = ("fg_bg", "mask", "depth", "bg")
# The source saved fg_bg and mask JPEGs at quality 30 (small files; masks are thresholded on pack).
SEED_JPEG_QUALITY = 30
_ID_AT_END = re.compile(r"(\d+)$")
_LABEL_FILE = re.compile(r"^(?P<bg>.+?)_label_info\.txt$")
_JUNK = ("__MACOSX/", ".DS_Store")


# -- listing -------------------------------------------------------------------------------------


def member_key(kind: str, member: str) -> str:
    """The name a partner is looked up by: 'bg_000/file.jpg' (image folders) or 'file' (bg, labels)."""
    parts = member.strip("/").split("/")
    return parts[-1] if kind in ("bg", "labels") else "/".join(parts[-2:])


def open_container(kind: str, source: str) -> Container | None:
    """The folder or zip for `kind` under `source`, listed; None when there is neither."""
    for name in CONTAINERS[kind]:
        folder = sfs.join(source, name)
        fs, path = sfs.filesystem(folder)
        if fs.isdir(path):
            c = Container(kind, folder, is_zip=False)
            for full, info in fs.find(path, detail=True).items():
                if info.get("type") == "directory":
                    continue
                member = posixpath.relpath(full.replace(os.sep, "/"), path.replace(os.sep, "/"))
                if member.startswith(_JUNK) or member.endswith(_JUNK):
                    continue
                stamp = info.get("md5Hash") or info.get("ETag") or info.get("etag") or str(info.get("mtime")
                                                                                           or info.get("updated") or "")
                c.entries[member_key(kind, member)] = Entry(member, int(info.get("size") or 0),
                                                            f"{info.get('size')}:{stamp}")
            return c
        archive = folder + ".zip"
        if sfs.exists(archive):
            c = Container(kind, archive, is_zip=True)
            fs, path = sfs.filesystem(archive)
            with fs.open(path, "rb") as f, zipfile.ZipFile(f) as zf:
                located = locate_members(zf)
                for info in zf.infolist():
                    if info.is_dir() or info.filename.startswith(_JUNK) or info.filename.endswith(_JUNK):
                        continue
                    c.entries[member_key(kind, info.filename)] = Entry(info.filename, info.file_size,
                                                                       f"{info.file_size}:{info.CRC:08x}",
                                                                       located.get(info.filename))
            return c
    return None


# -- reading -------------------------------------------------------------------------------------


# -- writing (`data synth --layout seed`) ----------------------------------------------------------


def sample_names(bg_index: int, fg_index: int, sample_id: int) -> dict[str, str]:
    """Member paths of one sample in the seed layout, as the source named them."""
    stem = f"fg_{fg_index:03d}_bg_{bg_index:03d}"
    folder = f"bg_{bg_index:03d}"
    return {
        "fg_bg": f"fg_bg/{folder}/{stem}_{sample_id:06d}.jpg",
        "mask": f"fg_bg_mask/{folder}/{stem}_mask_{sample_id:06d}.jpg",
        "depth": f"depth/{folder}/{stem}_{sample_id:06d}.png",
    }


def encode_depth_8bit(depth: np.ndarray) -> bytes:
    """8-bit grayscale PNG of a [0, 1] depth map, as the source stored its depth maps."""
    values = np.rint(np.clip(np.asarray(depth, np.float32), 0.0, 1.0) * 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(values).save(buf, format="PNG", compress_level=codec.PNG_COMPRESS_LEVEL)
    return buf.getvalue()


def _jpeg(img: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(img)).save(buf, format="JPEG", quality=SEED_JPEG_QUALITY)
    return buf.getvalue()


def _seed_chunk(seed: int, start: int, stop: int, image_size: int) -> list[dict[str, Any]]:
    """Encoded files and label lines of samples start..stop-1 (runs in a pool worker)."""
    from storage.synth import FG_SHAPES, make_sample

    out = []
    for i in range(start, stop):
        s = make_sample(seed, i, image_size)
        names = sample_names(s["bg_index"], FG_SHAPES.index(s["fg_shape"]), i)
        out.append({
            "bg_index": s["bg_index"],
            "files": {names["fg_bg"]: _jpeg(s["fg_bg"]), names["mask"]: _jpeg(s["mask"]),
                      names["depth"]: encode_depth_8bit(s["depth"])},
            "label": f"{names['fg_bg']}\t{names['mask']}\t{s['fg_x']}\t{s['fg_y']}\n",
        })
    return out


class _FolderSink:
    def __init__(self, dest: str) -> None:
        self.dest = dest
        self._pending: dict[str, bytes] = {}

    def add(self, member: str, data: bytes) -> None:
        self._pending[sfs.join(self.dest, member)] = data

    def flush(self) -> None:
        if not self._pending:
            return
        fs, _ = sfs.filesystem(self.dest)
        if sfs.is_local(self.dest):
            for uri, data in self._pending.items():
                os.makedirs(os.path.dirname(uri), exist_ok=True)
                with open(uri, "wb") as f:
                    f.write(data)
        else:  # one concurrent batch of uploads
            fs.pipe({sfs.filesystem(u)[1]: d for u, d in self._pending.items()})
        self._pending = {}

    def close(self) -> None:
        self.flush()


class _ZipSink:
    """Members go into <kind>.zip by their top folder, stored without compression like the source's."""

    def __init__(self, dest: str) -> None:
        self.dest = dest
        self._files: dict[str, Any] = {}
        self._zips: dict[str, zipfile.ZipFile] = {}

    def add(self, member: str, data: bytes) -> None:
        top = member.split("/", 1)[0]
        if top not in self._zips:
            fs, path = sfs.filesystem(sfs.join(self.dest, f"{top}.zip"))
            if sfs.is_local(self.dest):
                os.makedirs(os.path.dirname(path), exist_ok=True)
            self._files[top] = fs.open(path, "wb")
            self._zips[top] = zipfile.ZipFile(self._files[top], "w", compression=zipfile.ZIP_STORED)
        self._zips[top].writestr(member, data)

    def flush(self) -> None:
        pass

    def close(self) -> None:
        for top, zf in self._zips.items():
            zf.close()
            self._files[top].close()


def synthesize_seed_layout(
    dest: str,
    samples: int,
    seed: int = 0,
    image_size: int = 200,
    as_zip: bool = False,
    progress: Callable[[int], None] | None = None,
    workers: int | None = None,
) -> dict[str, Any]:
    """Write `samples` synthetic samples (ids 0..samples-1) to `dest` in the source's raw layout.

    The images are synth.make_sample's, saved as the source saved them: fg_bg and mask as JPEG
    (quality 30), depth as an 8-bit PNG, one bg JPEG per background; label_info files pair them.
    """
    from storage.synth import NUM_BACKGROUNDS, backgrounds, default_workers, map_chunks

    if samples < 0:
        raise ValueError(f"samples must be >= 0, got {samples}")
    dest = sfs.normalize(dest)
    workers = default_workers() if workers is None else max(1, int(workers))
    sink: _FolderSink | _ZipSink = _ZipSink(dest) if as_zip else _FolderSink(dest)
    labels: dict[int, list[str]] = {}
    for b, img in enumerate(backgrounds(image_size)):
        sink.add(f"bg/bg_{b:03d}.jpg", codec.encode_jpeg(img))
    for chunk in map_chunks(_seed_chunk, samples, workers, seed, image_size):
        for item in chunk:
            for member, data in item["files"].items():
                sink.add(member, data)
            labels.setdefault(item["bg_index"], []).append(item["label"])
        sink.flush()
        if progress is not None:
            progress(len(chunk))
    sink.close()
    for b, lines in sorted(labels.items()):
        sfs.write_bytes(sfs.join(dest, "labels", f"bg_{b:03d}_label_info.txt"), "".join(lines).encode())
    return {"samples": samples, "backgrounds": NUM_BACKGROUNDS, "label_files": len(labels), "zip": as_zip, "uri": dest}


# -- planning a pack -----------------------------------------------------------------------------


@dataclass
class SeedPlan(SourcePlan):
    """The plan of a mask_depth source (the seed layout or its manifest): a sample is its four images."""

    def fingerprint(self, refs: list[SampleRef], config: dict[str, Any]) -> str:
        """Changes when these samples' files or the pack settings change: a part's resume key."""
        h = hashlib.sha256(repr(sorted(config.items())).encode())
        for s in refs:
            h.update(f"{s.sample_id}|{s.name}".encode())
            for kind in IMAGE_KINDS:
                ref = s.files[kind]
                where = "" if ref.container is None else self.containers[ref.container].uri
                h.update(f"|{where}|{ref.member}|{ref.stamp}".encode())
        return h.hexdigest()


def sample_id_of(name: str) -> int | None:
    m = _ID_AT_END.search(posixpath.splitext(posixpath.basename(name))[0])
    return int(m.group(1)) if m else None


def plan_seed_layout(source: str) -> SourcePlan:
    """List the layout's containers and pair every label line with its four files."""
    source = sfs.normalize(source)
    found = {kind: open_container(kind, source) for kind in CONTAINERS}
    missing = [CONTAINERS[k][0] for k, c in found.items() if c is None]
    if len(missing) == len(CONTAINERS):
        raise SourceError(
            f"{source}: empty source: none of fg_bg, fg_bg_mask, depth, bg or labels is there (as folders or .zip). "
            "Point pack at the dataset's root folder, or try `orchestrator data synth DEST --layout seed`"
        )
    if missing:
        raise SourceError(f"{source}: no {' / '.join(m + '/ or ' + m + '.zip' for m in missing)}; the layout needs "
                          "fg_bg, fg_bg_mask, depth, bg and labels")
    containers = [found[k] for k in ("fg_bg", "mask", "depth", "bg", "labels")]
    ci = {c.kind: i for i, c in enumerate(containers)}
    fg, mask, depth, bg, labels = containers

    bad: list[dict[str, str]] = []
    samples: list[SampleRef] = []
    listed: set[str] = set()
    for key in sorted(labels.entries):
        m = _LABEL_FILE.match(key)
        if not m:
            continue
        bg_name = m.group("bg")
        label_path = labels.path_of(labels.entries[key].member)
        text = read_members(labels, [labels.entries[key].member])[labels.entries[key].member]
        if isinstance(text, MemberError):
            bad.append({"sample": label_path, "path": label_path, "reason": f"label file {text}"})
            continue
        for lineno, line in enumerate(text.decode("utf-8", errors="replace").splitlines(), 1):
            if not line.strip():
                continue
            fields = line.rstrip("\r").split("\t")
            where = f"{label_path}:{lineno}"
            if len(fields) < 2:
                bad.append({"sample": where, "path": label_path,
                            "reason": f"label line {lineno} has {len(fields)} tab-separated fields, expected fg_bg, "
                                      "mask, x, y"})
                continue
            fg_key, mask_key = member_key("fg_bg", fields[0]), member_key("mask", fields[1])
            sid = sample_id_of(fg_key)
            if sid is None:
                bad.append({"sample": where, "path": fields[0], "reason": "fg_bg name does not end in a sample number"})
                continue
            listed.add(fg_key)
            refs: dict[str, FileRef] = {}
            problems = []
            for kind, cont, keys in (
                ("fg_bg", fg, [fg_key]),
                ("mask", mask, [mask_key]),
                ("depth", depth, _depth_keys(fg_key)),
                ("bg", bg, [f"{bg_name}.jpg", f"{bg_name}.png", f"{bg_name}.jpeg"]),
            ):
                entry = next((cont.entries[k] for k in keys if k in cont.entries), None)
                if entry is None:
                    problems.append((kind, cont.path_of(_expected_member(cont, keys[0]))))
                else:
                    refs[kind] = FileRef(ci[kind], entry.member, entry.stamp)
            if problems:
                kinds = ", ".join(k for k, _ in problems)
                bad.append({"sample": str(sid), "path": problems[0][1],
                            "reason": f"missing partner file ({kinds}) for {fields[0]}"})
                continue
            extra = {"source": fields[0], "fg_x": _int(fields, 2), "fg_y": _int(fields, 3)}
            samples.append(SampleRef(sid, fields[0], refs, extra))
    unlisted = sorted(fg.path_of(e.member) for k, e in fg.entries.items() if k not in listed)
    kinds = {c.is_zip for c in containers[:4]}
    kind = "seed-zips" if kinds == {True} else "seed-folders" if kinds == {False} else "seed-mixed"
    plan = SeedPlan(source, kind, containers, samples, bad, unlisted, ("source", "fg_x", "fg_y"))
    drop_duplicate_ids(plan)
    return plan


def _depth_keys(fg_key: str) -> list[str]:
    folder, name = fg_key.split("/") if "/" in fg_key else ("", fg_key)
    stem = posixpath.splitext(name)[0]
    names = [f"{stem}.png", f"mask_{stem}.png"]  # ours, then the source's depth_fg_bg.zip naming
    return [f"{folder}/{n}" if folder else n for n in names]


def _expected_member(cont: Container, key: str) -> str:
    """Where a missing partner would be: relative to its folder, or under the zip's top folder."""
    return f"{CONTAINERS[cont.kind][0]}/{key}" if cont.is_zip else key


def _int(fields: list[str], i: int) -> int:
    try:
        return int(fields[i])
    except (IndexError, ValueError):
        return -1


def manifest_row_id(manifest_uri: str, row: int, ids: list, cols: dict[str, list], kinds: Any,
                    bad: list[dict[str, str]]) -> int | None:
    """A manifest row's sample id, or None with the row recorded as bad (an empty field, an id that is no integer)."""
    where = f"{manifest_uri} row {row + 1}"
    empty = [k for k in kinds if cols[k][row] is None or cols[k][row] == ""]
    if empty or ids[row] is None:
        bad.append({"sample": str(ids[row]) if ids[row] is not None else where, "path": where,
                    "reason": f"empty field(s): {', '.join(empty) or 'sample_id'}"})
        return None
    try:
        return int(ids[row])
    except (TypeError, ValueError):
        bad.append({"sample": where, "path": where, "reason": f"sample_id {ids[row]!r} is not an integer"})
        return None


def drop_duplicate_ids(plan: SourcePlan, first_kind: str = "fg_bg") -> None:
    """Every sample whose id another sample shares is bad: which copy is right cannot be known.
    The bad entries name each copy's `first_kind` file."""
    by_id: dict[int, list[SampleRef]] = {}
    for s in plan.samples:
        by_id.setdefault(s.sample_id, []).append(s)
    keep = []
    for sid, group in by_id.items():
        if len(group) == 1:
            keep.append(group[0])
            continue
        for s in group:
            others = ", ".join(o.name for o in group if o is not s)
            plan.bad.append({"sample": str(sid), "path": plan.path_of(s.files[first_kind]),
                             "reason": f"duplicate sample id {sid} (also {others})"})
    plan.samples = sorted(keep, key=lambda s: s.sample_id)


MANIFEST_COLUMNS = ("fg_bg", "mask", "depth", "bg")


def plan_manifest(manifest_uri: str, columns: dict[str, str] | None = None) -> SourcePlan:
    """A CSV or Parquet manifest: one row per sample, columns naming the four files.

    Columns default to fg_bg, mask, depth, bg and an optional sample_id (else the row number);
    `columns` maps those names to the manifest's own. Relative paths are relative to the
    manifest's folder.
    """
    import pyarrow.csv as pcsv
    import pyarrow.parquet as pq

    manifest_uri = sfs.normalize(manifest_uri)
    mapping = {k: k for k in (*MANIFEST_COLUMNS, "sample_id")}
    mapping.update(columns or {})
    try:
        data = sfs.read_bytes(manifest_uri)
    except FileNotFoundError:
        raise SourceError(f"{manifest_uri}: no such manifest file") from None
    try:
        if manifest_uri.endswith((".parquet", ".pq")):
            table = pq.read_table(io.BytesIO(data))
        else:
            table = pcsv.read_csv(io.BytesIO(data))
    except Exception as exc:  # noqa: BLE001 - pyarrow raises several types for a bad file
        raise SourceError(f"{manifest_uri}: cannot be read as "
                          f"{'Parquet' if manifest_uri.endswith(('.parquet', '.pq')) else 'CSV'} ({exc})") from exc
    absent = [f"{k} (column {mapping[k]!r})" for k in MANIFEST_COLUMNS if mapping[k] not in table.column_names]
    if absent:
        raise SourceError(f"{manifest_uri}: no column for {', '.join(absent)}; it has {table.column_names}. Map them "
                          "with --column KIND=NAME")
    if table.num_rows == 0:
        raise SourceError(f"{manifest_uri}: empty source: the manifest has no rows")
    base = posixpath.dirname(manifest_uri) if not sfs.is_local(manifest_uri) else os.path.dirname(manifest_uri)
    cols = {k: table.column(mapping[k]).to_pylist() for k in MANIFEST_COLUMNS}
    ids = (table.column(mapping["sample_id"]).to_pylist() if mapping["sample_id"] in table.column_names
           else list(range(table.num_rows)))
    bad: list[dict[str, str]] = []
    samples: list[SampleRef] = []
    for row in range(table.num_rows):
        sid = manifest_row_id(manifest_uri, row, ids, cols, MANIFEST_COLUMNS, bad)
        if sid is None:
            continue
        refs = {k: FileRef(None, _resolve(base, str(cols[k][row]))) for k in MANIFEST_COLUMNS}
        samples.append(SampleRef(sid, str(cols["fg_bg"][row]), refs, {"source": str(cols["fg_bg"][row])}))
    plan = SeedPlan(manifest_uri, "manifest", [], samples, bad, [], ("source",))
    drop_duplicate_ids(plan)
    return plan


def _resolve(base: str, path: str) -> str:
    if "://" in path or os.path.isabs(path):
        return sfs.normalize(path)
    return sfs.join(base, path)


def plan_source(source: str, columns: dict[str, str] | None = None) -> SourcePlan:
    """A seed-layout folder, or a .csv/.parquet manifest file."""
    if source.rstrip("/").endswith((".csv", ".parquet", ".pq")):
        return plan_manifest(source, columns)
    if columns:
        raise SourceError("--column applies to CSV/Parquet manifests only")
    fs, path = sfs.filesystem(source)
    if not fs.exists(path):
        raise SourceError(f"{sfs.normalize(source)}: empty source: nothing there")
    return plan_seed_layout(source)
