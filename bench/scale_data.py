"""bench.scale's datasets: the source's geometry, and a small real set written out again as N samples
(shared by bench/scale.py's sizes and bench/scale_first_step.py; bench/scale.py says why they look so)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "recipes" / "unet224.yaml"
# `data pack`'s geometry for the source's samples (~25 KB each: 200-px JPEG pair, raw mask + depth).
SOURCE_ROWS_PER_GROUP = 41
SOURCE_ROWS_PER_SHARD = 5207
SOURCE_SAMPLE_BYTES = 25_000


# -- datasets -------------------------------------------------------------------------------------


def replicate_dataset(
    src_uri: str,
    dest_uri: str,
    n: int,
    rows_per_shard: int = SOURCE_ROWS_PER_SHARD,
    rows_per_group: int = SOURCE_ROWS_PER_GROUP,
) -> dict[str, Any]:
    """Write `n` samples to dest_uri with storage's own writer (ShardWriter, in whatever format it
    writes): sample i holds the values (and depth_mean) of source sample i % len(src), with id i,
    in shards and row groups of the given geometry. Returns the manifest."""
    from storage.shards import ShardWriter, open_dataset

    src = open_dataset(src_uri)
    names = [c.name for c in src.columns]
    ids = np.sort(src.sample_ids)
    rows = src.read_samples(ids)
    extra = {}
    if "depth_mean" in src.index.column_names:  # so the writer need not decode every depth map again
        extra["depth_mean"] = src.index_values("depth_mean", ids).tolist()
    m = len(ids)
    samples = [
        {
            **{c: rows[c][j] for c in names},
            "height": int(rows["height"][j]),
            "width": int(rows["width"][j]),
            **{k: v[j] for k, v in extra.items()},
        }
        for j in range(m)
    ]
    writer = ShardWriter(
        dest_uri, rows_per_shard=rows_per_shard, rows_per_group=rows_per_group, columns=src.columns, task=src.task
    )
    with writer:
        for i in range(n):
            writer.add({**samples[i % m], "sample_id": i})
        meta = {"meta": src.meta} if src.meta else {}
        return writer.close({**meta, "source": f"bench.scale: {m} samples of {src_uri} repeated to {n}"})


def make_source(dest: str, samples: int, image_size: int) -> str:
    """The small real set that every bigger dataset repeats (storage.synth)."""
    from storage.synth import synthesize

    if not os.path.exists(os.path.join(dest, "manifest.json")):
        synthesize(dest, samples, seed=0, image_size=image_size)
    return dest
