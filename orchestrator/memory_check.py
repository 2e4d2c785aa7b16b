"""At plan time: refuse a chunk that cannot fit in a worker's memory (or, streamed, its spool
disk), before anything trains.

A rank holds its share of the chunk it trains and, prefetched, of the next one; the stored
bytes are decoded a group at a time into per-sample arrays.

A plan that shuffles by window (data.shuffle: window, new runs) streams its chunks: the landed
pieces of both chunks share the worker's chunk memory budget (workers/spool.py: 15 % of its
memory, or ORCHESTRATOR_CHUNK_MEMORY), and what is beyond it goes to the spool on local disk. So
memory does not grow with the chunk: such a plan is refused only when the spool's disk
(ORCHESTRATOR_SPOOL_DIR, else beside the shard cache) has less room than the two chunks' bytes
beyond the budget, or when ORCHESTRATOR_CHUNK_MEMORY is set above what the worker has.

A plan that shuffles whole chunks (data.shuffle: chunk, and runs planned before windows) reads a
chunk whole into memory. The estimate:

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
from workers.spool import (
    CHUNK_MEMORY_ENV,
    SPOOL_DIR_ENV,
    available_memory,
    default_budget,
    spool_free_bytes,
    spool_root,
)

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
    streamed = plan.shuffle == "window"
    for sp in plan.stages:
        largest = max((len(sp.chunk_ids(c)) for c in range(sp.num_chunks)), default=0)
        if streamed:
            _check_streamed(sp.name, sp.chunk_size, per_sample * math.ceil(largest / world) * 2, budget, per_sample,
                            world)
            continue
        need = per_sample * math.ceil(largest / world) * 2 * DECODE_MARGIN
        if need > budget:
            fits = int(budget / (per_sample * 2 * DECODE_MARGIN) * world) if per_sample else largest
            raise RecipeError(
                f"stages.{sp.name}.chunk_size={sp.chunk_size}: a worker would hold about {_gb(need)} for its share of "
                f"a chunk and the prefetched next one ({_gb(per_sample)} stored per sample, {world} worker(s)), "
                f"more than the {_gb(budget)} it has; use a chunk_size of at most {max(fits, 1)}")


def _check_streamed(stage: str, chunk_size: int, both: float, memory: int, per_sample: float, world: int) -> None:
    """A streamed plan's two chunks (`both`: a rank's stored bytes of the chunk and the next one):
    what the chunk memory budget holds must fit the worker's memory, the rest the spool's disk."""
    held = default_budget(memory)
    if held * DECODE_MARGIN > memory:
        raise RecipeError(f"{CHUNK_MEMORY_ENV}: a worker may hold {_gb(held)} of chunk pieces, more than the "
                          f"{_gb(memory)} it has; set it lower, or unset it for 15 % of the worker's memory")
    spill = both - held
    if spill <= 0:
        return
    root = spool_root()
    free = spool_free_bytes(root)
    if spill > free:
        fits = int((free + held) / (2 * per_sample) * world) if per_sample else chunk_size
        raise RecipeError(
            f"stages.{stage}.chunk_size={chunk_size}: a worker would spool about {_gb(spill)} of a chunk and the "
            f"prefetched next one to {root} (beyond the {_gb(held)} it keeps in memory), more than the "
            f"{_gb(free)} free there; set {SPOOL_DIR_ENV} to a disk with more room, or use a chunk_size of at "
            f"most {max(fits, 1)}")


def _gb(n: float) -> str:
    if n >= 1e8:
        return f"{n / 1e9:.2f} GB"
    return f"{n / 1e6:.1f} MB" if n >= 1e5 else f"{n / 1e3:.1f} KB"
