"""CSV or Parquet manifests for the task kinds: one row per sample, columns naming its files.

  classification   image, label      (label: a class name, or a class index)
  segmentation     image, mask       (class names: --classes FILE, or classes.txt beside the manifest)
  depth            image, depth
  any              sample_id         (optional; else the row number)

Paths may be URIs or relative to the manifest's folder; `--column KIND=NAME` maps the kinds to the
manifest's own column names, as for the mask_depth manifests.
"""

from __future__ import annotations

import io
import os
import posixpath
from typing import Any

from common.tasks import MASK_DEPTH, get_task_spec, task_names
from storage import fs as sfs
from storage.layouts.base import TaskPlan, read_class_names
from storage.layouts.images_masks import check_classes
from storage.seed_layout import MANIFEST_COLUMNS, _resolve, drop_duplicate_ids, manifest_row_id
from storage.source_plan import FileRef, SampleRef, SourceError

# Each task's columns (its spec's), mask_depth's in its manifests' own order; the file-backed ones
# are those stored as bytes (an int64 column, a class label, is a value in the manifest itself).
TASK_COLUMNS = {name: MANIFEST_COLUMNS if name == MASK_DEPTH.name else get_task_spec(name).column_names
                for name in task_names()}
FILE_COLUMNS = {name: tuple(c for c, codec in get_task_spec(name).columns if codec != "int64")
                for name in task_names() if name != MASK_DEPTH.name}


def column_kinds(task: str) -> tuple[str, ...]:
    """What --column may map for a task: its columns and sample_id."""
    return (*TASK_COLUMNS[task], "sample_id")


def read_manifest(uri: str):
    import pyarrow.csv as pcsv
    import pyarrow.parquet as pq

    try:
        data = sfs.read_bytes(uri)
    except FileNotFoundError:
        raise SourceError(f"{uri}: no such manifest file") from None
    parquet = uri.lower().endswith((".parquet", ".pq"))
    try:
        return pq.read_table(io.BytesIO(data)) if parquet else pcsv.read_csv(io.BytesIO(data))
    except Exception as exc:  # noqa: BLE001 - pyarrow raises several types for a bad file
        raise SourceError(f"{uri}: cannot be read as {'Parquet' if parquet else 'CSV'} ({exc})") from exc


def _classes_beside(uri: str, classes_file: str | None) -> tuple[list[str] | None, str | None]:
    if classes_file:
        return check_classes(read_class_names(sfs.normalize(classes_file)), classes_file), classes_file
    base = posixpath.dirname(uri) if not sfs.is_local(uri) else os.path.dirname(uri)
    beside = sfs.join(base, "classes.txt")
    if sfs.exists(beside):
        return read_class_names(beside), beside
    return None, None


def _label_index(value: Any, classes: list[str] | None, numeric: bool) -> int | str:
    """The class index of a label cell, or the reason it has none."""
    if numeric:
        f = float(value)
        if not f.is_integer() or f < 0:
            return f"label {value!r} is not a class index (an integer >= 0)"
        i = int(f)
        if classes is not None and i >= len(classes):
            return f"label {i} is not a class index (0..{len(classes) - 1}, {len(classes)} classes)"
        return i
    name = str(value).strip()
    if classes is not None and name not in classes:
        return f"label {name!r} is not one of the {len(classes)} class names"
    return name


def plan_task_manifest(task: str, manifest_uri: str, columns: dict[str, str] | None = None,
                       classes_file: str | None = None) -> TaskPlan:
    import pyarrow as pa

    manifest_uri = sfs.normalize(manifest_uri)
    kinds = TASK_COLUMNS[task]
    mapping = {k: k for k in (*kinds, "sample_id")}
    mapping.update(columns or {})
    table = read_manifest(manifest_uri)
    absent = [f"{k} (column {mapping[k]!r})" for k in kinds if mapping[k] not in table.column_names]
    if absent:
        other = next((t for t, cols in TASK_COLUMNS.items()
                      if t != task and all(c in table.column_names for c in cols)), None)
        hint = f"; its columns are what --task {other} takes" if other else ""
        raise SourceError(f"{manifest_uri}: --task {task} needs columns {', '.join(kinds)}: no column for "
                          f"{', '.join(absent)}; it has {table.column_names}{hint}. Map them with --column KIND=NAME")
    if table.num_rows == 0:
        raise SourceError(f"{manifest_uri}: empty source: the manifest has no rows")
    base = posixpath.dirname(manifest_uri) if not sfs.is_local(manifest_uri) else os.path.dirname(manifest_uri)
    cols = {k: table.column(mapping[k]).to_pylist() for k in kinds}
    ids = (table.column(mapping["sample_id"]).to_pylist() if mapping["sample_id"] in table.column_names
           else list(range(table.num_rows)))
    meta: dict[str, Any] = {}
    options: dict[str, Any] = {}
    classes, numeric = None, False
    if task in ("classification", "segmentation"):
        classes, _ = _classes_beside(manifest_uri, classes_file)
        if task == "segmentation" and classes is None:
            raise SourceError(f"{manifest_uri}: no class names for the masks; put a classes.txt beside the manifest "
                              "(one name per line, line 1 = class 0) or pass --classes FILE")
    if task == "classification":
        typ = table.column(mapping["label"]).type
        numeric = pa.types.is_integer(typ) or pa.types.is_floating(typ)
    bad: list[dict[str, str]] = []
    samples: list[SampleRef] = []
    labels: dict[int, int | str] = {}
    for row in range(table.num_rows):
        where = f"{manifest_uri} row {row + 1}"
        sid = manifest_row_id(manifest_uri, row, ids, cols, kinds, bad)
        if sid is None:
            continue
        if task == "classification":
            label = _label_index(cols["label"][row], classes, numeric)
            if isinstance(label, str) and (numeric or classes is not None):
                bad.append({"sample": str(sid), "path": where, "reason": label})
                continue
            labels[sid] = label
        refs = {k: FileRef(None, _resolve(base, str(cols[k][row]))) for k in FILE_COLUMNS[task]}
        samples.append(SampleRef(sid, str(cols["image"][row]), refs, {"source": str(cols["image"][row])}))
    if task == "classification":
        if classes is None:
            if numeric:
                top = max((v for v in labels.values() if isinstance(v, int)), default=-1)
                classes = [str(i) for i in range(top + 1)]
            else:
                classes = sorted({str(v) for v in labels.values()})
        index = {name: i for i, name in enumerate(classes)}
        for s in samples:
            v = labels[s.sample_id]
            s.extra["label"] = v if isinstance(v, int) else index[v]
        meta["classes"] = classes
        options["num_classes"] = len(classes)
    elif task == "segmentation":
        meta.update(classes=classes, ignore_index=255)
        options["num_classes"] = len(classes)
    else:
        meta["depth_scale"] = 1000
    plan = TaskPlan(manifest_uri, "manifest", [], samples, bad, [], ("source",), task=task,
                    file_kinds=FILE_COLUMNS[task],
                    meta=meta, options=options)
    drop_duplicate_ids(plan, "image")
    return plan
