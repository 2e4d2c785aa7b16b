"""`orchestrator data ...`: make, pack and check datasets."""

from __future__ import annotations

import json
import os
from typing import Annotated

import typer
from rich.console import Console

# Bad arguments raise RecipeError (exit 2): orchestrator.cli prints it as one `error:` line,
# where a typer.BadParameter raised in a command body would surface as a traceback.
from common.errors import RecipeError, RunError
from common.plugins import is_import_path
from common.redact import check_no_credentials, redact_text
from common.tasks import MASK_DEPTH, get_task_spec, task_names

data_app = typer.Typer(no_args_is_help=True, help="Make, pack and check datasets.")
err = Console(stderr=True, soft_wrap=True)

# The built-in tasks (common.tasks: no storage import for `--help`); --task also takes a TaskSpec by import path.
TASKS = tuple(task_names())
FORCE_HELP = ("Write into a DEST that holds files this tool did not write (refused otherwise, exit 2); "
              "only files it writes are ever replaced or deleted there.")
TASK_HELP = (f"What the dataset holds: {TASKS[0]} (the default: {'/'.join(MASK_DEPTH.column_names)}), "
             f"{', '.join(TASKS[1:-1])} or {TASKS[-1]}.")


def check_dest(dest: str, command: str, force: bool) -> None:
    """DEST empty, or holding only what this tool writes (storage.dest_check), unless --force: exit 2."""
    from storage.dest_check import check_dest as _check_ours

    _check_ours(dest, command, force)


def _check_task(task: str) -> str:
    if task in TASKS:
        return task
    if is_import_path(task):
        try:
            get_task_spec(task)
        except ValueError as exc:
            raise RecipeError(f"--task: {exc}") from None
        return task
    raise RecipeError(f"--task {task!r}: choose one of {', '.join(TASKS)}")


def _check_dest(dest: str, verb: str) -> None:
    """Fail in the first second, in one line, when DEST cannot be created or written (under a file,
    in /proc, a read-only mount, a bucket without write access), instead of a traceback later."""
    from storage import fs as sfs

    uri = sfs.normalize(dest)
    try:
        fs, path = sfs.filesystem(uri)
        existed = not sfs.is_local(uri) or os.path.exists(path)
        if existed and sfs.is_local(uri) and not os.path.isdir(path):
            raise NotADirectoryError(f"{path} is a file")
        sfs.probe_writable(uri)
        if not existed:
            os.rmdir(path)  # made by the probe: leave nothing behind if the command fails before writing
    except Exception as exc:  # noqa: BLE001 - one clear line whatever the filesystem raised
        cause = exc
        while cause.__cause__ is not None:  # the filesystem's own error, under storage's wrappers
            cause = cause.__cause__
        reason = " ".join(f"{type(cause).__name__}: {cause}".split())
        raise RunError(f"{redact_text(uri)}: cannot {verb} there ({redact_text(reason)}); choose a DEST you can create "
                       "and write (a folder whose parent exists and is writable, or a bucket path with write "
                       "access)") from None


def _check_report(report: str | None) -> None:
    """A --report FILE that cannot be written fails before packing, not after it."""
    from storage import fs as sfs

    if not report:
        return
    uri = sfs.normalize(report)
    if not sfs.is_local(uri):
        return
    parent = os.path.dirname(uri)
    while parent != os.path.dirname(parent) and not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if os.path.isdir(uri):
        why = "it is a folder"
    elif not os.path.isdir(parent):
        why = f"{parent} is a file, not a folder"
    elif not os.access(parent, os.W_OK):
        why = f"{parent} is not writable"
    else:
        return
    raise RunError(f"--report {redact_text(uri)}: cannot write the report there ({why}); choose a FILE in a folder you "
                   "can write")


def _check_source(source: str, task: str) -> None:
    """A SOURCE that is not there, or that is already a packed dataset, in one line."""
    from storage import fs as sfs

    uri = sfs.normalize(source)
    try:
        missing = not sfs.exists(uri)
        packed = (not missing and sfs.exists(sfs.join(uri, "manifest.json"))
                  and sfs.exists(sfs.join(uri, "index.parquet")))
    except Exception:  # noqa: BLE001 - unreachable or forbidden: pack itself says so, naming the URI
        return
    if missing:
        raise RunError(f"{redact_text(uri)}: no such file or folder; point SOURCE at the raw {task} data "
                       f"(`orchestrator data synth DEST --task {task} --layout seed` writes an example)")
    if packed:
        raise RunError(f"{redact_text(uri)}: this is a packed dataset already (manifest.json, index.parquet); train on "
                       f"it as it is (data.uri: {redact_text(uri)}; `orchestrator data verify {redact_text(uri)}` "
                       "checks it), or point SOURCE at raw files")


@data_app.command("synth")
def data_synth(
    dest: Annotated[str, typer.Argument(help="Destination URI (local path, file://, gs://, memory://).")],
    samples: Annotated[int, typer.Option("--samples", min=1)] = 4096,
    seed: Annotated[int, typer.Option("--seed")] = 0,
    image_size: Annotated[int | None,
                          typer.Option("--image-size", min=8,
                                       help="Side in px (default: mask_depth 200, classification 28, segmentation and "
                                            "depth 64).")] = None,
    layout: Annotated[str,
                      typer.Option("--layout",
                                   help="shards: a packed dataset. seed: raw files in the layout `data pack --task "
                                        "KIND` takes (mask_depth: the source dataset's; classification: an ImageFolder "
                                        "tree; segmentation: images/ + masks/ + classes.txt; depth: rgb/ + depth/ "
                                        "16-bit PNG mm).")] = "shards",
    as_zip: Annotated[bool,
                      typer.Option("--zip",
                                   help="With --layout seed: fg_bg, fg_bg_mask, depth and bg as ZIP_STORED zips, as "
                                        "the source shipped them.")] = False,
    workers: Annotated[int | None,
                       typer.Option("--workers", min=1, help="Processes that make samples (default: up to 2).")] = None,
    task: Annotated[str, typer.Option("--task", help=TASK_HELP)] = "mask_depth",
    force: Annotated[bool, typer.Option("--force", help=FORCE_HELP)] = False,
) -> None:
    """Write a synthetic dataset: mask_depth made the way the source dataset was, or a learnable classification,
    segmentation or depth set."""
    from orchestrator.progress import count_progress

    check_no_credentials(dest, "DEST")
    _check_task(task)
    if layout not in ("shards", "seed"):
        raise RecipeError(f"--layout {layout!r}: choose 'shards' (a packed dataset) or 'seed' (the raw layout `data "
                          f"pack --task {task}` takes)")
    if as_zip and (layout != "seed" or task != "mask_depth"):
        raise RecipeError("--zip applies to --layout seed of --task mask_depth only")
    least = get_task_spec(task).min_image_size
    if image_size is not None and image_size < least:
        raise RecipeError(f"--image-size {image_size}: {task} needs at least {least} px")
    _check_dest(dest, "write the dataset")
    check_dest(dest, "data synth", force)
    with count_progress(err, "synthesizing", samples) as advance:
        if task != "mask_depth":
            from storage.synth_tasks import synthesize_task, synthesize_task_seed_layout

            if layout == "seed":
                info = synthesize_task_seed_layout(task, dest, samples, seed=seed, image_size=image_size,
                                                   progress=advance, workers=workers)
            else:
                manifest = synthesize_task(task, dest, samples, seed=seed, image_size=image_size, progress=advance,
                                           workers=workers, force=True)
        elif layout == "seed":
            from storage.seed_layout import synthesize_seed_layout

            info = synthesize_seed_layout(dest, samples, seed=seed, image_size=image_size or 200, as_zip=as_zip,
                                          progress=advance, workers=workers)
        else:
            from storage.synth import synthesize

            manifest = synthesize(dest, samples, seed=seed, image_size=image_size or 200, progress=advance,
                                  workers=workers, force=True)
    if task != "mask_depth":
        if layout == "seed":
            err.print(f"wrote {info['samples']} {task} samples in the {info['layout']} layout to {redact_text(dest)}; "
                      f"pack them with `orchestrator data pack {redact_text(dest)} DEST --task {task}`",
                      highlight=False)
        else:
            err.print(f"wrote {manifest['num_samples']} {task} samples in {len(manifest['shards'])} shards to "
                      f"{redact_text(dest)}", highlight=False)
    elif layout == "seed":
        kind = "zips" if as_zip else "folders"
        err.print(f"wrote {info['samples']} samples in the source layout ({kind}, {info['label_files']} label_info "
                  f"files) to {redact_text(dest)}; pack them with `orchestrator data pack {redact_text(dest)} DEST`",
                  highlight=False)
    else:
        err.print(f"wrote {manifest['num_samples']} samples in {len(manifest['shards'])} shards to {redact_text(dest)}",
                  highlight=False)


def _parse_columns(values: list[str] | None, task: str = "mask_depth") -> dict[str, str] | None:
    from storage.layouts.manifest import column_kinds

    if not values:
        return None
    kinds = column_kinds(task)
    out = {}
    for v in values:
        key, sep, name = v.partition("=")
        if not sep or key not in kinds or not name:
            raise RecipeError(f"--column {v!r}: expected KIND=COLUMN with KIND one of {', '.join(kinds)} (--task "
                              f"{task})")
        out[key] = name
    return out


@data_app.command("pack")
def data_pack(
    source: Annotated[str,
                      typer.Argument(help="The raw dataset: for mask_depth the source dataset's root (fg_bg, "
                                          "fg_bg_mask, depth, bg and labels, as folders or zips); classification: "
                                          "an ImageFolder tree; segmentation: images/ + masks/ + classes.txt, or "
                                          "Pascal VOC; depth: rgb/ + depth/ (16-bit PNG mm or .npy m); or a "
                                          ".csv/.parquet manifest.")],
    dest: Annotated[str, typer.Argument(help="Where the packed dataset goes (any fsspec URI).")],
    skip_bad: Annotated[bool,
                        typer.Option("--skip-bad",
                                     help="Pack the good samples and list the bad ones in the report, instead of "
                                          "failing.")] = False,
    report: Annotated[str | None,
                      typer.Option("--report",
                                   help="Write the JSON report here: {packed, skipped: [{sample, path, "
                                        "reason}]}.")] = None,
    column: Annotated[list[str] | None,
                      typer.Option("--column",
                                   help="Manifest column for a kind, KIND=COLUMN (mask_depth: fg_bg, mask, depth, bg; "
                                        "classification: image, label; segmentation: image, mask; depth: image, depth; "
                                        "all: sample_id).")] = None,
    rows_per_shard: Annotated[int | None,
                              typer.Option("--rows-per-shard", min=1,
                                           help="Samples per shard (default: ~128 MB shards).")] = None,
    rows_per_group: Annotated[int | None,
                              typer.Option("--rows-per-group", min=1,
                                           help="Samples per row group, the unit of a chunk preload (default: ~1 "
                                                "MB).")] = None,
    workers: Annotated[int | None,
                       typer.Option("--workers", min=1,
                                    help="Local worker processes (default: the cores, up to 8).")] = None,
    address: Annotated[str | None,
                       typer.Option("--address",
                                    help="Ray cluster to pack on (parts become Ray tasks); SOURCE and DEST must be "
                                         "reachable from it.")] = None,
    task: Annotated[str, typer.Option("--task", help=TASK_HELP)] = "mask_depth",
    classes: Annotated[str | None,
                       typer.Option("--classes",
                                    help="Class names, one per line (line 1 = class 0), for segmentation sources "
                                         "without classes.txt and for manifests.")] = None,
    depth_units_per_m: Annotated[float | None,
                                 typer.Option("--depth-units-per-m", min=1e-9,
                                              help="--task depth: 16-bit depth PNG values per metre (default 1000: "
                                                   "millimetres, NYU; KITTI: 256).")] = None,
    force: Annotated[bool, typer.Option("--force", help=FORCE_HELP)] = False,
    max_pixels: Annotated[int,
                          typer.Option("--max-pixels", min=1,
                                       help="Images of more pixels than this are bad samples, named with their size "
                                            "(default 40,000,000: 40 MP decodes in ~120 MB, every "
                                            "epoch).")] = 40_000_000,
    order: Annotated[str,
                     typer.Option("--order",
                                  help="How the samples are stored: shuffled (the default: every row group a draw "
                                       "from the whole dataset, so the default window shuffle mixes classes) or "
                                       "source (the source's order, e.g. class by class). Sample ids are the "
                                       "source's either way.")] = "shuffled",
) -> None:
    """Pack a raw dataset into Parquet shards + index + manifest. Killed? Run it again: it continues."""
    from common.recipe import SHUFFLE_WINDOW_MB
    from orchestrator.progress import count_progress
    from storage.pack import PackError, pack
    from storage.pack.order import ORDERS
    from storage.source_plan import SourceError
    from workers.windows import STORED_ORDER_ADVICE

    for value, what in ((source, "SOURCE"), (dest, "DEST"), (report, "--report")):
        check_no_credentials(value, what)
    _check_task(task)
    if order not in ORDERS:
        raise RecipeError(f"--order {order!r}: expected one of {', '.join(ORDERS)}")
    columns = _parse_columns(column, task)
    if task == "mask_depth" and (classes or depth_units_per_m):
        raise RecipeError("--classes and --depth-units-per-m apply to --task classification, segmentation or depth")
    _check_source(source, task)
    _check_report(report)
    _check_dest(dest, "write the packed dataset")
    check_dest(dest, "data pack", force)
    state: dict = {}

    def on_plan(samples: int, todo: int) -> None:
        state["samples"] = samples
        state["bar"] = count_progress(err, "packing", samples)
        state["advance"] = state["bar"].__enter__()

    def progress(n: int) -> None:
        if "advance" in state:
            state["advance"](n)

    try:
        res = pack(source, dest, skip_bad=skip_bad, report=report, rows_per_shard=rows_per_shard,
                   rows_per_group=rows_per_group,
                   workers=workers, address=address, columns=columns, progress=progress, on_plan=on_plan,
                   task=task, classes=classes, depth_units_per_m=depth_units_per_m, force=True,
                   max_pixels=max_pixels, order=order)
    except (SourceError, PackError) as exc:
        raise RunError(str(exc)) from None
    finally:
        if "bar" in state:
            state["bar"].__exit__(None, None, None)
    reused = f", {res.parts_reused} of {res.parts} parts reused from an earlier run" if res.parts_reused else ""
    what = ""
    if task != "mask_depth" and res.manifest:
        meta = res.manifest.get("meta") or {}
        what = f" ({task}" + (f", {len(meta['classes'])} classes" if "classes" in meta
                              else "") + f", from {res.manifest.get('source_layout')})"
    err.print(f"packed {res.packed} samples{what} into {res.shards} shards at {redact_text(res.dest)} in "
              f"{res.seconds:.1f} s{reused}", highlight=False)
    stored = sum(int(sh.get("bytes") or 0) for sh in (res.manifest or {}).get("shards", []))
    # More than one default window, stored in order: see workers/windows.py stored_order_note.
    if order == "source" and stored > SHUFFLE_WINDOW_MB * 2**20:
        err.print(f"note: the samples are stored in the source's order ({(res.manifest or {}).get('source_layout')}); "
                  f"the window shuffle (data.shuffle: window, the default) mixes only samples stored near each "
                  f"other: {STORED_ORDER_ADVICE}", highlight=False, markup=False)
    if res.skipped:
        err.print(f"skipped {len(res.skipped)} bad sample(s)"
                  + (f", listed in {report}" if report else "; add --report FILE to list them"), highlight=False)
        for b in res.skipped[:20]:
            err.print(f"  skipped sample {b['sample']}: {b['path']}: {b['reason']}", highlight=False, markup=False)
    if res.unlisted and task == "mask_depth":
        err.print(f"note: {len(res.unlisted)} fg_bg file(s) appear in no label_info file and were not packed, e.g. "
                  f"{res.unlisted[0]}", highlight=False, markup=False)
    elif res.unlisted:
        err.print(f"note: {len(res.unlisted)} file(s) belong to no sample (not an image, or outside the layout's "
                  f"folders) and were not packed, e.g. {res.unlisted[0]}", highlight=False, markup=False)


@data_app.command("verify")
def data_verify(
    uri: Annotated[str, typer.Argument(help="A packed dataset (any fsspec URI).")],
    as_json: Annotated[bool,
                       typer.Option("--json",
                                    help="Print {samples, shards, bad: [{sample, shard, reason}], ...} on "
                                         "stdout.")] = False,
    workers: Annotated[int | None,
                       typer.Option("--workers", min=1, help="Shards checked in parallel (default: up to 4).")] = None,
) -> None:
    """Re-read every shard: counts, sizes, sha256 and per-sample checksums, and that every image decodes.
    Exit 1 when anything is bad."""
    from orchestrator.progress import count_progress
    from storage.shards import DatasetError, open_dataset
    from storage.verify import verify

    check_no_credentials(uri, "URI")
    try:
        total = open_dataset(uri).num_samples
    except DatasetError as exc:
        # Nothing to check sample by sample: one line naming the URI (or its manifest) and the fix;
        # --json still prints the record, its one `bad` entry that line.
        if as_json:
            print(json.dumps(verify(uri, workers=workers), sort_keys=True))
        raise RunError(" ".join(redact_text(str(exc)).split())) from None
    with count_progress(err, "verifying", total) as advance:
        res = verify(uri, workers=workers, progress=advance)
    if as_json:
        print(json.dumps(res, sort_keys=True))
    else:
        err.print(f"{res['uri']}: {res['samples']} samples in {res['shards']} shards; {res['checksums_ok']} checksums "
                  f"match, {res['ok']} samples pass every check; {len(res['bad'])} problem(s)", highlight=False,
                  markup=False)
        for b in res["bad"][:50]:
            err.print(f"  bad: sample {b['sample']} shard {b['shard']}: {b['reason']}", highlight=False, markup=False)
    if res["bad"]:
        # RunError, not typer.Exit(1): orchestrator.cli runs typer with standalone_mode=False,
        # where an Exit's code is returned and lost.
        raise RunError(f"{res['uri']}: {len(res['bad'])} problem(s) found; re-pack the dataset (or restore the named "
                       "shards)")
