"""`orchestrator data ...`: make, pack and check datasets."""

from __future__ import annotations

import json
from typing import Annotated

import typer
from rich.console import Console

# Bad arguments raise RecipeError (exit 2): orchestrator.cli prints it as one `error:` line,
# where a typer.BadParameter raised in a command body would surface as a traceback.
from orchestrator.errors import RecipeError, RunError
from orchestrator.redact import redact_text

data_app = typer.Typer(no_args_is_help=True, help="Make, pack and check datasets.")
err = Console(stderr=True, soft_wrap=True)


@data_app.command("synth")
def data_synth(
    dest: Annotated[str, typer.Argument(help="Destination URI (local path, file://, gs://, memory://).")],
    samples: Annotated[int, typer.Option("--samples", min=1)] = 4096,
    seed: Annotated[int, typer.Option("--seed")] = 0,
    image_size: Annotated[int, typer.Option("--image-size", min=32)] = 200,
    layout: Annotated[str, typer.Option("--layout", help="shards: a packed dataset. seed: raw files in the source dataset's layout, the input of `data pack`.")] = "shards",
    as_zip: Annotated[bool, typer.Option("--zip", help="With --layout seed: fg_bg, fg_bg_mask, depth and bg as ZIP_STORED zips, as the source shipped them.")] = False,
    workers: Annotated[int | None, typer.Option("--workers", min=1, help="Processes that make samples (default: up to 2).")] = None,
) -> None:
    """Write a synthetic dataset made the way the source dataset was."""
    from orchestrator.progress import count_progress

    if layout not in ("shards", "seed"):
        raise RecipeError(f"--layout {layout!r}: choose 'shards' (a packed dataset) or 'seed' (the source's raw layout)")
    if as_zip and layout != "seed":
        raise RecipeError("--zip applies to --layout seed only")
    with count_progress(err, "synthesizing", samples) as advance:
        if layout == "seed":
            from storage.seed_layout import synthesize_seed_layout

            info = synthesize_seed_layout(dest, samples, seed=seed, image_size=image_size, as_zip=as_zip, progress=advance, workers=workers)
        else:
            from storage.synth import synthesize

            manifest = synthesize(dest, samples, seed=seed, image_size=image_size, progress=advance, workers=workers)
    if layout == "seed":
        kind = "zips" if as_zip else "folders"
        err.print(f"wrote {info['samples']} samples in the source layout ({kind}, {info['label_files']} label_info files) to {redact_text(dest)}; "
                  f"pack them with `orchestrator data pack {redact_text(dest)} DEST`", highlight=False)
    else:
        err.print(f"wrote {manifest['num_samples']} samples in {len(manifest['shards'])} shards to {redact_text(dest)}", highlight=False)


def _parse_columns(values: list[str] | None) -> dict[str, str] | None:
    from storage.seed_layout import MANIFEST_COLUMNS

    if not values:
        return None
    out = {}
    for v in values:
        key, sep, name = v.partition("=")
        if not sep or key not in (*MANIFEST_COLUMNS, "sample_id") or not name:
            raise RecipeError(f"--column {v!r}: expected KIND=COLUMN with KIND one of {', '.join((*MANIFEST_COLUMNS, 'sample_id'))}")
        out[key] = name
    return out


@data_app.command("pack")
def data_pack(
    source: Annotated[str, typer.Argument(help="The source dataset's root (fg_bg, fg_bg_mask, depth, bg and labels, as folders or zips), or a .csv/.parquet manifest.")],
    dest: Annotated[str, typer.Argument(help="Where the packed dataset goes (any fsspec URI).")],
    skip_bad: Annotated[bool, typer.Option("--skip-bad", help="Pack the good samples and list the bad ones in the report, instead of failing.")] = False,
    report: Annotated[str | None, typer.Option("--report", help="Write the JSON report here: {packed, skipped: [{sample, path, reason}]}.")] = None,
    column: Annotated[list[str] | None, typer.Option("--column", help="Manifest column for a file kind, KIND=COLUMN (kinds: fg_bg, mask, depth, bg, sample_id).")] = None,
    rows_per_shard: Annotated[int | None, typer.Option("--rows-per-shard", min=1, help="Samples per shard (default: ~128 MB shards).")] = None,
    rows_per_group: Annotated[int | None, typer.Option("--rows-per-group", min=1, help="Samples per row group, the unit of a chunk preload (default: ~1 MB).")] = None,
    workers: Annotated[int | None, typer.Option("--workers", min=1, help="Local worker processes (default: the cores, up to 8).")] = None,
    address: Annotated[str | None, typer.Option("--address", help="Ray cluster to pack on (parts become Ray tasks); SOURCE and DEST must be reachable from it.")] = None,
) -> None:
    """Pack a raw dataset into Parquet shards + index + manifest. Killed? Run it again: it continues."""
    from orchestrator.progress import count_progress
    from storage.pack import PackError, pack
    from storage.seed_layout import SourceError

    columns = _parse_columns(column)
    state: dict = {}

    def on_plan(samples: int, todo: int) -> None:
        state["samples"] = samples
        state["bar"] = count_progress(err, "packing", samples)
        state["advance"] = state["bar"].__enter__()

    def progress(n: int) -> None:
        if "advance" in state:
            state["advance"](n)

    try:
        res = pack(source, dest, skip_bad=skip_bad, report=report, rows_per_shard=rows_per_shard, rows_per_group=rows_per_group,
                   workers=workers, address=address, columns=columns, progress=progress, on_plan=on_plan)
    except (SourceError, PackError) as exc:
        raise RunError(str(exc)) from None
    finally:
        if "bar" in state:
            state["bar"].__exit__(None, None, None)
    reused = f", {res.parts_reused} of {res.parts} parts reused from an earlier run" if res.parts_reused else ""
    err.print(f"packed {res.packed} samples into {res.shards} shards at {redact_text(res.dest)} in {res.seconds:.1f} s{reused}", highlight=False)
    if res.skipped:
        err.print(f"skipped {len(res.skipped)} bad sample(s)" + (f", listed in {report}" if report else "; add --report FILE to list them"), highlight=False)
        for b in res.skipped[:20]:
            err.print(f"  skipped sample {b['sample']}: {b['path']}: {b['reason']}", highlight=False, markup=False)
    if res.unlisted:
        err.print(f"note: {len(res.unlisted)} fg_bg file(s) appear in no label_info file and were not packed, e.g. {res.unlisted[0]}", highlight=False, markup=False)


@data_app.command("verify")
def data_verify(
    uri: Annotated[str, typer.Argument(help="A packed dataset (any fsspec URI).")],
    as_json: Annotated[bool, typer.Option("--json", help="Print {samples, shards, bad: [{sample, shard, reason}], ...} on stdout.")] = False,
    workers: Annotated[int | None, typer.Option("--workers", min=1, help="Shards checked in parallel (default: up to 4).")] = None,
) -> None:
    """Re-read every shard: counts, sizes, sha256 and per-sample checksums, and that every image decodes. Exit 1 when anything is bad."""
    from orchestrator.progress import count_progress
    from storage.shards import DatasetError, open_dataset
    from storage.verify import verify

    try:
        total = open_dataset(uri).num_samples
    except DatasetError:
        total = 0
    with count_progress(err, "verifying", total) as advance:
        res = verify(uri, workers=workers, progress=advance)
    if as_json:
        print(json.dumps(res, sort_keys=True))
    else:
        err.print(f"{res['uri']}: {res['samples']} samples in {res['shards']} shards; {res['checksums_ok']} checksums match, "
                  f"{res['ok']} samples pass every check; {len(res['bad'])} problem(s)", highlight=False, markup=False)
        for b in res["bad"][:50]:
            err.print(f"  bad: sample {b['sample']} shard {b['shard']}: {b['reason']}", highlight=False, markup=False)
    if res["bad"]:
        # RunError, not typer.Exit(1): orchestrator.cli runs typer with standalone_mode=False,
        # where an Exit's code is returned and lost.
        raise RunError(f"{res['uri']}: {len(res['bad'])} problem(s) found; re-pack the dataset (or restore the named shards)")
