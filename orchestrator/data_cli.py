"""`orchestrator data ...`: make and check datasets."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.console import Console

data_app = typer.Typer(no_args_is_help=True, help="Make and check datasets.")
err = Console(stderr=True, soft_wrap=True)


@data_app.command("synth")
def data_synth(
    dest: Annotated[str, typer.Argument(help="Destination URI (local path, file://, gs://, memory://).")],
    samples: Annotated[int, typer.Option("--samples", min=1)] = 4096,
    seed: Annotated[int, typer.Option("--seed")] = 0,
    image_size: Annotated[int, typer.Option("--image-size", min=32)] = 200,
    layout: Annotated[str, typer.Option("--layout", help="shards (packed dataset). 'seed' arrives with `data pack`.")] = "shards",
) -> None:
    """Write a synthetic dataset made the way the source dataset was."""
    from orchestrator.progress import count_progress
    from storage.synth import synthesize

    if layout != "shards":
        raise typer.BadParameter(f"--layout {layout!r}: only 'shards' is available in this version", param_hint="--layout")
    with count_progress(err, "synthesizing", samples) as advance:
        manifest = synthesize(dest, samples, seed=seed, image_size=image_size, progress=advance)
    err.print(f"wrote {manifest['num_samples']} samples in {len(manifest['shards'])} shards to {dest}")
