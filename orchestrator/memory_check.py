"""At plan time: refuse a chunk that cannot fit in a worker's memory, before anything trains.

A rank holds its share of the chunk it trains and, prefetched, of the next one; the stored
bytes are decoded a group at a time into per-sample arrays. The estimate:

    stored bytes per sample (the manifest's shard bytes / samples)
      x the rank's samples of the largest chunk (ceil(chunk / world size))
      x 2 (the chunk and the prefetched next one)
      x DECODE_MARGIN (bench: the fetching worker's peak RSS was 1.34x the chunk's bytes at 96 px)

against the memory one worker has: ORCHESTRATOR_WORKER_MEMORY_BYTES when set; on a local run
the machine's available memory; on a cluster the check is skipped (Ray's node memory resource
says nothing of how many ranks share a node before placement).
"""

from __future__ import annotations

import math
import os

from common.errors import RecipeError
from common.plan import Plan
from common.recipe import Recipe
from workers.spool import available_memory

DECODE_MARGIN = 1.5
ENV = "ORCHESTRATOR_WORKER_MEMORY_BYTES"


def available_bytes(recipe: Recipe) -> int | None:
    """The memory one worker may use, or None when it cannot be known here."""
    if os.environ.get(ENV):
        return int(os.environ[ENV])
    if recipe.execution.backend != "local":
        return None
    return available_memory()


def stored_bytes_per_sample(ds) -> float:
    shards = ds.manifest.get("shards") or []
    total = sum(int(s.get("bytes", 0)) for s in shards)
    return total / max(ds.num_samples, 1)


def check_chunks_fit(recipe: Recipe, plan: Plan, ds) -> None:
    """RecipeError (exit 2) naming stages.<name>.chunk_size when a rank's chunks cannot fit."""
    budget = available_bytes(recipe)
    if budget is None:
        return
    per_sample = stored_bytes_per_sample(ds)
    # Elastic runs may go on with min_workers ranks: each then holds a bigger share.
    world = max(int(recipe.execution.min_workers or recipe.execution.num_workers), 1)
    for sp in plan.stages:
        largest = max((len(sp.chunk_ids(c)) for c in range(sp.num_chunks)), default=0)
        need = per_sample * math.ceil(largest / world) * 2 * DECODE_MARGIN
        if need > budget:
            fits = int(budget / (per_sample * 2 * DECODE_MARGIN) * world) if per_sample else largest
            raise RecipeError(
                f"stages.{sp.name}.chunk_size={sp.chunk_size}: a worker would hold about {_gb(need)} for its share of "
                f"a chunk and the prefetched next one ({_gb(per_sample)} stored per sample, {world} worker(s)), "
                f"more than the {_gb(budget)} it has; use a chunk_size of at most {max(fits, 1)}")


def _gb(n: float) -> str:
    if n >= 1e8:
        return f"{n / 1e9:.2f} GB"
    return f"{n / 1e6:.1f} MB" if n >= 1e5 else f"{n / 1e3:.1f} KB"
