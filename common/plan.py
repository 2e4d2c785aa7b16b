"""The plan: recipe + dataset size -> a held-out eval split and stages x chunks of sample ids.

A chunk is a slice of a seeded permutation of the training ids; every stage covers the
training split once. With `data.chunking: row_groups` the permutation moves whole stored row
groups (the ids of one group stay together, the groups in a seeded order), so a chunk reads
about its own size from storage instead of touching every row group of the dataset. The plan
is written to run storage at the first start and read back on every resume, so a resumed run
trains exactly the chunks it planned; storage/plans.py does that I/O (common/ imports nothing above it).

The plan also records how each rank shuffles a chunk's batches (`shuffle`): over its whole slice
(`chunk`, the only mode before it was recorded, so a plan without the key means it), or window by
window (`window`: runs of consecutive stored row groups of about `shuffle_window_bytes`, taken in
a seeded order, shuffled inside), so the first batch needs one window's row groups, not most of
the chunk's. The worker reads the mode from the plan, never from the recipe: a run keeps the
batch order it started with, whatever code or recipe resumes it.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass

import numpy as np
import numpy.random  # noqa: F401 - with the plan, not on a worker's first batch (numpy imports it lazily: ~17 ms)

from common.errors import RecipeError
from common.recipe import Recipe


@dataclass(frozen=True)
class StagePlan:
    name: str
    chunk_size: int
    permutation: np.ndarray  # training ids in this stage's order

    @property
    def num_chunks(self) -> int:
        return math.ceil(len(self.permutation) / self.chunk_size)

    def chunk_ids(self, chunk: int) -> np.ndarray:
        if not 0 <= chunk < self.num_chunks:
            raise IndexError(f"stage {self.name!r} has {self.num_chunks} chunks, not {chunk + 1}")
        return self.permutation[chunk * self.chunk_size : (chunk + 1) * self.chunk_size]


# Window mode: a chunk's first HEAD_BYTES of row groups (at least a batch) are shuffled and trained
# before the rest of their window, so the first batch waits on these alone. With a growth (new
# plans: HEAD_GROWTH), the rest of the leading windows (those that start within one window's rows
# of the chunk's start, so a small first window does not leave the next one whole) follows in
# tiers that grow that many times (2, 4, 8 MB..., then what is left of each window), each shuffled
# inside and trained before the next: the reader lands a tier while the one before it trains
# (workers/chunks.py pieces them so), and the decode processes do not wait for a whole window at
# once. bench.peer, 2-core machine: the reader lands row groups about twice as fast as 2 decode
# processes take them at 56 px, so tiers that double keep the landing ahead. The later windows mix
# whole. Plans made before tiers (a 16 MB head on the first window alone) record growth 1 and keep
# their order.
HEAD_BYTES = 1 * 2**20
HEAD_GROWTH = 2


@dataclass(frozen=True)
class WindowOrder:
    """A rank's slice in window mode: each id's window (`keys`, in file order) and its tier in its
    window (`head`: 0 for the window's first row groups, then 1, 2, ...; see HEAD_BYTES). The tiers
    order the leading windows: those that start within `span` ids of the slice's start, or the
    first window alone when `span` is 0 (one-head plans)."""

    keys: np.ndarray
    head: np.ndarray
    span: int = 0


@dataclass(frozen=True)
class Plan:
    seed: int
    num_samples: int
    eval_ids: np.ndarray
    train_ids: np.ndarray
    stages: tuple[StagePlan, ...]
    shuffle: str = "chunk"  # what a plan saved before the mode was recorded means
    shuffle_window_bytes: int = 0  # window mode: stored bytes of row groups per window
    shuffle_head_bytes: int = 0  # window mode: the first window's head, trained first (0: none)
    shuffle_head_growth: int = 1  # window mode: tiers after the head grow this many times (1: one head only)

    def chunk_ids(self, stage: int, chunk: int) -> np.ndarray:
        return self.stages[stage].chunk_ids(chunk)

    def summary(self) -> dict:
        return {
            "seed": self.seed,
            "num_samples": self.num_samples,
            "eval_samples": len(self.eval_ids),
            "train_samples": len(self.train_ids),
            "stages": [
                {"name": s.name, "chunk_size": s.chunk_size, "chunks": s.num_chunks,
                 "chunk_samples": [len(s.chunk_ids(c)) for c in range(s.num_chunks)]}
                for s in self.stages
            ],
            "shuffle": self.shuffle,
            "shuffle_window_bytes": self.shuffle_window_bytes,
            "shuffle_head_bytes": self.shuffle_head_bytes,
            "shuffle_head_growth": self.shuffle_head_growth,
        }

    def to_npz(self) -> bytes:
        """The id arrays as .npz bytes (storage/plans.py writes them beside summary()'s JSON)."""
        buf = io.BytesIO()
        arrays = {"eval_ids": self.eval_ids, "train_ids": self.train_ids}
        arrays.update({f"stage_{i}": s.permutation for i, s in enumerate(self.stages)})
        np.savez(buf, **arrays)
        return buf.getvalue()

    @classmethod
    def from_saved(cls, meta: dict, npz: bytes) -> Plan:
        """The plan back from summary()'s JSON and to_npz()'s bytes."""
        arrays = np.load(io.BytesIO(npz))
        stages = tuple(
            StagePlan(s["name"], s["chunk_size"], arrays[f"stage_{i}"]) for i, s in enumerate(meta["stages"])
        )
        # A plan written before the shuffle mode was recorded shuffled whole chunks: it still does.
        return cls(meta["seed"], meta["num_samples"], arrays["eval_ids"], arrays["train_ids"], stages,
                   shuffle=str(meta.get("shuffle", "chunk")),
                   shuffle_window_bytes=int(meta.get("shuffle_window_bytes", 0)),
                   shuffle_head_bytes=int(meta.get("shuffle_head_bytes", 0)),
                   shuffle_head_growth=int(meta.get("shuffle_head_growth", 1)))


def grouped_permutation(ids: np.ndarray, groups: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """`ids` in a seeded order of their groups: each group's ids together (ascending), the groups
    shuffled. Vectorized: a sort over the ids, no per-group Python loop (1.2M ids in well under a second)."""
    _, inverse = np.unique(groups, return_inverse=True)
    rank = rng.permutation(int(inverse.max()) + 1 if len(inverse) else 0)
    return ids[np.lexsort((ids, rank[inverse]))]


def make_plan(recipe: Recipe, sample_ids: np.ndarray, row_groups: np.ndarray | None = None) -> Plan:
    """Split off the eval ids, then give each stage its own seeded order of the training ids.

    `row_groups`, one key per id of `sample_ids` (the stored row group that holds it), is needed
    with `data.chunking: row_groups`; the default chunking ignores it."""
    sample_ids = np.asarray(sample_ids, dtype=np.int64)
    by_group = recipe.data.chunking == "row_groups"
    if by_group and (row_groups is None or len(row_groups) != len(sample_ids)):
        raise ValueError("data.chunking row_groups needs the row group of every sample id")
    order = np.argsort(sample_ids, kind="stable")
    sample_ids = sample_ids[order]
    group_of = np.asarray(row_groups)[order] if by_group else None

    def shuffle(ids: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        if group_of is None:
            return rng.permutation(ids)
        return grouped_permutation(ids, group_of[np.searchsorted(sample_ids, ids)], rng)

    n = len(sample_ids)
    n_eval = recipe.data.eval_samples
    if n_eval >= n:
        raise RecipeError(f"data.eval_samples={n_eval} leaves no training samples (the dataset has {n})")
    shuffled = shuffle(sample_ids, np.random.default_rng([recipe.run.seed, 0]))
    eval_ids, train_ids = np.sort(shuffled[:n_eval]), np.sort(shuffled[n_eval:])
    min_batch = recipe.execution.num_workers
    stages = []
    for i, st in enumerate(recipe.stages):
        perm = shuffle(train_ids, np.random.default_rng([recipe.run.seed, 1, i]))
        plan = StagePlan(st.name, st.chunk_size, perm)
        last = len(plan.chunk_ids(plan.num_chunks - 1))
        if last < min_batch:
            raise RecipeError(
                f"stages.{st.name}.chunk_size={st.chunk_size}: the last chunk holds {last} samples, fewer than "
                f"the {min_batch} workers; pick a chunk_size that divides the {len(train_ids)} training samples "
                "more evenly"
            )
        stages.append(plan)
    by_window = recipe.data.shuffle == "window"
    window = recipe.data.shuffle_window_mb * 2**20 if by_window else 0
    return Plan(recipe.run.seed, n, eval_ids, train_ids, tuple(stages), shuffle=recipe.data.shuffle,
                shuffle_window_bytes=window, shuffle_head_bytes=min(HEAD_BYTES, window) if by_window else 0,
                shuffle_head_growth=HEAD_GROWTH if by_window else 1)


def rank_slice(ids: np.ndarray, world_size: int, rank: int, contiguous: bool = False) -> np.ndarray:
    """The part of a chunk that rank r fetches and trains: ids[r::world], or with `contiguous`
    (data.chunking row_groups, whose chunks hold whole row groups one after another) the r-th of
    `world` consecutive blocks, so each rank reads only its own row groups. Both give rank r the
    same number of ids (the first n % world ranks one more)."""
    if not contiguous:
        return ids[rank::world_size]
    return np.array_split(ids, world_size)[rank]


def batches_for_rank(ids: np.ndarray, batch_size: int, world_size: int, rank: int, seed: list[int],
                     contiguous: bool = False, windows: np.ndarray | WindowOrder | None = None) -> list[np.ndarray]:
    """This rank's batches of one pass over a chunk.

    Rank r takes its `rank_slice`; its shuffled slice is cut into the same number of steps on
    every rank (ceil(n / global batch)), so DDP ranks never wait on a missing step and every
    sample is trained exactly once per pass. `windows`, one key per id of the rank's slice (the
    plan's window mode; workers/windows.py computes them, with the heads of the windows as a
    WindowOrder), shuffles it window by window (window_permutation); None shuffles the whole slice.
    """
    steps = num_steps(len(ids), batch_size, world_size)
    mine = rank_slice(ids, world_size, rank, contiguous)
    rng = np.random.default_rng(seed + [rank])
    if windows is None:
        order = rng.permutation(mine)
    elif isinstance(windows, WindowOrder):
        order = window_permutation(mine, windows.keys, rng, head=windows.head, span=windows.span)
    else:
        order = window_permutation(mine, windows, rng)
    return [b for b in np.array_split(order, steps)]


def window_permutation(ids: np.ndarray, windows: np.ndarray, rng: np.random.Generator,
                       head: np.ndarray | None = None, span: int = 0) -> np.ndarray:
    """`ids` window by window: the windows (`windows`, one key per id) in a seeded order, the ids
    inside each in a seeded order. With `head` (one tier per id: 0 for the head, then 1, 2, ...)
    the leading windows train their tiers in order: the windows that start within `span`
    ids of the start, or with `span` 0 the first window alone. With a single window it is exactly
    `rng.permutation(ids)`, the same draws, so a chunk that fits one window trains the batches it
    trained before windows existed; `head` and `span` take no draws."""
    ids = np.asarray(ids)
    windows = np.asarray(windows)
    if len(windows) != len(ids):
        raise ValueError(f"{len(windows)} window keys for {len(ids)} ids")
    uniq, inverse = np.unique(windows, return_inverse=True)
    if len(uniq) <= 1:
        return rng.permutation(ids)
    inverse = inverse.reshape(-1)
    position = np.argsort(rng.permutation(len(uniq)))  # each window's place in the seeded order
    within = rng.permutation(len(ids))  # a uniform order inside every window (ties broken at random)
    place = position[inverse]
    if head is None:
        return ids[np.lexsort((within, place))]
    tier = np.asarray(head, dtype=np.int64)
    if span > 0:
        by_place = np.bincount(place, minlength=len(uniq))  # ids of the window at each place
        leading = (np.cumsum(by_place) - by_place) < span  # the windows that start within span ids
        lead = leading[place]
    else:
        lead = place == 0
    return ids[np.lexsort((within, np.where(lead, tier, 0), place))]


def num_steps(n: int, batch_size: int, world_size: int) -> int:
    """Steps of one pass over n samples; capped so that no rank gets an empty batch."""
    return max(1, min(math.ceil(n / batch_size), n // world_size))


def steps_per_chunk(n: int, batch_size: int, epochs: int, world_size: int) -> int:
    return epochs * num_steps(n, batch_size, world_size)


def plan_for_dataset(recipe: Recipe, ds) -> Plan:
    """make_plan over an opened dataset (storage.shards.ShardDataset): its ids and, when the recipe
    chunks by row groups, the stored row group of each (from the index: no shard is read)."""
    groups = None
    if recipe.data.chunking == "row_groups":
        shard = ds.index.column("shard").to_numpy().astype(np.int64)
        group = ds.index.column("row_group").to_numpy().astype(np.int64)
        groups = (shard << 32) | group
    return make_plan(recipe, ds.sample_ids, groups)
