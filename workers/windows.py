"""The plan's window shuffle on a worker: which window each id of a rank's slice falls in.

A window is a run of consecutive stored row groups (in (shard, row_group) order) holding about
the plan's `shuffle_window_bytes` of stored bytes; common/plan.py `window_permutation` takes the
windows in a seeded order and shuffles inside each. The first batch then needs the row groups of
one window, so a streamed chunk (workers/chunks.py) starts training when that window has landed
instead of most of the chunk.

The keys depend only on the dataset's index and manifest, the plan and the batch size, all fixed
for a run, so every (re)start of a run cuts the same windows and trains the same batches.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from common.plan import Plan, WindowOrder, num_steps
from common.recipe import Recipe

log = logging.getLogger(__name__)

MODES = ("chunk", "window")


def stored_group_bytes(manifest: dict[str, Any]) -> np.ndarray:
    """Each shard's bytes per row group (the shard's mean), from the manifest alone.

    The windows decide the batch order, which a resumed run must reproduce bit for bit: change
    this and runs in progress train other batches. workers/chunks.py sizes its pieces with it too;
    a prefetcher that wants another reckoning must not change this one."""
    per_group = int(manifest.get("rows_per_group") or 256)
    out = np.empty(len(manifest["shards"]), dtype=np.float64)
    for i, sh in enumerate(manifest["shards"]):
        groups = int(sh.get("row_groups") or 0) or max(1, -(-int(sh["rows"]) // per_group))
        out[i] = int(sh["bytes"]) / groups
    return out


def window_keys(dataset: Any, ids: np.ndarray, window_bytes: int, min_rows: int = 1,
                groups: tuple[np.ndarray, ...] | None = None) -> np.ndarray:
    """The window number (0, 1, ... in file order) of each id of `ids`. Index only, no shard reads.

    The row groups `ids` touch, in (shard, row_group) order, are cut every `window_bytes` of their
    stored bytes (whole row groups; one bigger than a window is a window of its own). A window of
    fewer than `min_rows` of `ids` joins the next one (the last such joins the one before), so the
    first batch, `min_rows` ids, never spans two windows. `groups`: _touched_groups(dataset, ids),
    when the caller has them."""
    ids = np.asarray(ids, dtype=np.int64).reshape(-1)
    n = len(ids)
    if n == 0 or window_bytes <= 0:
        return np.zeros(n, dtype=np.int64)
    uniq, _, inverse, size = groups or _touched_groups(dataset, ids)
    before = np.cumsum(size) - size  # stored bytes of the touched row groups ahead of each one
    _, window_of_group = np.unique((before // int(window_bytes)).astype(np.int64), return_inverse=True)
    rows = np.bincount(window_of_group.reshape(-1), weights=np.bincount(inverse, minlength=len(uniq)))
    merged = _merge_small(rows, max(1, int(min_rows)))
    return merged[window_of_group.reshape(-1)][inverse]


def window_heads(dataset: Any, ids: np.ndarray, keys: np.ndarray, head_bytes: int, min_rows: int = 1,
                 growth: int = 1, groups: tuple[np.ndarray, ...] | None = None) -> np.ndarray:
    """Each id's tier in its window (`keys`, from window_keys), from the window's row groups in
    file order: 0 (the head) for those that start within its first `head_bytes` of stored bytes,
    and more until they hold `min_rows` ids (a batch); after it, with `growth` > 1, tier k for those
    that start within head_bytes * (1 + growth + ... + growth**k), and with growth 1 tier 1 for all
    the rest. Index only, no shard reads. `groups` as for window_keys."""
    ids = np.asarray(ids, dtype=np.int64).reshape(-1)
    if len(ids) == 0 or head_bytes <= 0:
        return np.zeros(len(ids), dtype=np.int64)
    uniq, first, inverse, size = groups or _touched_groups(dataset, ids)
    window = np.asarray(keys, dtype=np.int64)[first]  # every row group lies in one window
    rows = np.bincount(inverse, minlength=len(uniq)).astype(np.float64)
    # Bytes and ids of the window's row groups ahead of each one (its groups are in file order).
    starts = np.flatnonzero(np.r_[True, window[1:] != window[:-1]])
    begin = np.repeat(starts, np.diff(np.r_[starts, len(uniq)]))
    bytes_ahead = np.cumsum(size) - size
    rows_ahead = np.cumsum(rows) - rows
    ahead = bytes_ahead - bytes_ahead[begin]
    in_head = (ahead < head_bytes) | (rows_ahead - rows_ahead[begin] < min_rows)
    if growth > 1:  # the tier whose span holds `ahead`: sum of head_bytes * growth**j for j <= k
        tier = np.floor(np.log1p(ahead / head_bytes * (growth - 1)) / np.log(growth)).astype(np.int64)
        tier = np.where(in_head, 0, np.maximum(tier, 1))
    else:
        tier = np.where(in_head, 0, 1)
    return tier[inverse].astype(np.int64)


def _touched_groups(dataset: Any, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The row groups `ids` touch, in file order, as (shard << 32 | row_group keys, the first
    position in `ids` of each, each id's row group, each row group's stored bytes)."""
    shard = np.asarray(dataset.index_values("shard", ids), dtype=np.int64)
    group = np.asarray(dataset.index_values("row_group", ids), dtype=np.int64)
    uniq, first, inverse = np.unique((shard << 32) | group, return_index=True, return_inverse=True)
    size = stored_group_bytes(dataset.manifest)[(uniq >> 32).astype(np.int64)]
    return uniq, first, inverse.reshape(-1), size


def _merge_small(rows: np.ndarray, min_rows: int) -> np.ndarray:
    """New window number of each window (rows: ids per window, in order): a window closes once it
    holds min_rows; a short tail joins the window before it."""
    out = np.empty(len(rows), dtype=np.int64)
    current, held = 0, 0.0
    for w, r in enumerate(rows.tolist()):  # one entry per window: a few hundred at most
        out[w] = current
        held += r
        if held >= min_rows:
            current, held = current + 1, 0.0
    if 0 < held < min_rows and current > 0:
        out[out == current] = current - 1
    return out


class Windows:
    """The plan's shuffle mode for this run's batches: `of(mine, ...)` gives the window keys of a
    rank's slice for common/plan.py batches_for_rank, or None when the plan shuffles whole chunks."""

    def __init__(self, dataset: Any, plan: Plan, recipe: Recipe | None = None) -> None:
        if plan.shuffle not in MODES:
            raise ValueError(f"the run's plan shuffles by {plan.shuffle!r}, which this version does not know "
                             f"(it knows {', '.join(MODES)}); resume it with the version that started it")
        self.dataset, self.mode, self.window_bytes = dataset, plan.shuffle, int(plan.shuffle_window_bytes)
        self.head_bytes = int(plan.shuffle_head_bytes)
        self.head_growth = int(plan.shuffle_head_growth)
        if recipe is not None:
            for field, differs in self._differences(recipe):
                if differs:
                    log.warning("data.%s: the recipe's value is not what this run's plan recorded (shuffle %s, "
                                "%d-byte windows); the run keeps its plan's batch order. A new run.name takes the "
                                "recipe's.", field, self.mode, self.window_bytes)

    def _differences(self, recipe: Recipe) -> list[tuple[str, bool]]:
        data = recipe.data
        same_bytes = data.shuffle_window_mb * 2**20 == self.window_bytes
        return [("shuffle", data.shuffle != self.mode),
                ("shuffle_window_mb", self.mode == "window" and data.shuffle == "window" and not same_bytes)]

    def of(self, mine: np.ndarray, chunk_samples: int, batch_size: int, world: int) -> np.ndarray | None:
        """Window keys of `mine` (this rank's slice of a chunk of chunk_samples ids, batches of
        batch_size across world ranks), or None in chunk mode. A window holds at least one of this
        rank's batches."""
        return self._keys(mine, chunk_samples, batch_size, world, None)

    def _keys(self, mine: np.ndarray, chunk_samples: int, batch_size: int, world: int,
              groups: tuple[np.ndarray, ...] | None) -> np.ndarray | None:
        if self.mode != "window" or not hasattr(self.dataset, "index_values"):
            return None
        steps = num_steps(chunk_samples, batch_size, world)
        return window_keys(self.dataset, mine, self.window_bytes, min_rows=-(-len(mine) // steps), groups=groups)

    def order(self, mine: np.ndarray, chunk_samples: int, batch_size: int, world: int) -> WindowOrder | None:
        """What batches_for_rank shuffles `mine` by: its window keys (of), each id's tier in its window
        (the plan's shuffle_head_bytes and shuffle_head_growth) and the span of the leading windows
        that train tier by tier, or None in chunk mode."""
        if self.mode != "window" or not hasattr(self.dataset, "index_values"):
            return None
        groups = _touched_groups(self.dataset, np.asarray(mine, dtype=np.int64).reshape(-1))  # found once, for both
        keys = self._keys(mine, chunk_samples, batch_size, world, groups)
        batch = -(-len(mine) // num_steps(chunk_samples, batch_size, world))
        tiers = window_heads(self.dataset, mine, keys, self.head_bytes, min_rows=batch, growth=self.head_growth,
                             groups=groups)
        # Tiered plans order the windows that start within one (the largest) window's ids of the start.
        per_window = np.unique(keys, return_counts=True)[1]
        span = int(per_window.max()) if self.head_growth > 1 and len(per_window) else 0
        return WindowOrder(keys, tiers, span)


# What to do about it, said alike by `data pack` and a new run.
STORED_ORDER_ADVICE = ("if its folders group similar images (classes, backgrounds), so will each batch: pack it again "
                       "without --order source (data pack stores samples shuffled by default), or train it with "
                       "data.shuffle: chunk, which mixes the whole chunk (README: \"Mind the stored order\")")


def stored_order_note(dataset: Any, plan: Plan, first_batch: int) -> str | None:
    """A note for a new run whose window shuffle will mix only what is stored near each other in a
    dataset stored in its source's order, or None.

    A dataset packed with `--order source`, or by a version before storage/pack/order.py, holds its
    samples in the order of its source (an ImageFolder class by class, the source's mask-depth set
    background by background), and a window is a run of consecutive stored row groups: on such data
    each batch holds a few classes. Measured (docs/PERFORMANCE.md, "Window shuffle on
    data stored in order"): BaseNet on 6,000 class-sorted samples in 1 MB windows, 3 classes a batch,
    reached 0.65 accuracy where shuffle: chunk reached 1.00. Synthesized sets (no source layout) are
    stored in no order, and a chunk that fits one window is shuffled whole: no note for either."""
    manifest = getattr(dataset, "manifest", None) or {}
    # storage/pack/order.py: `data pack` stores shuffled unless told --order source; packs made
    # before it existed record no stored_order and are in their source's order.
    shuffled = (manifest.get("stored_order") or {}).get("order") == "shuffled"
    if plan.shuffle != "window" or not manifest.get("source_layout") or shuffled or not plan.stages:
        return None
    ids = plan.stages[0].chunk_ids(0)
    keys = Windows(dataset, plan).of(ids, len(ids), max(1, int(first_batch)), 1)
    windows = 0 if keys is None else len(np.unique(keys))
    if windows <= 1:
        return None
    return (f"data.shuffle is window: the first chunk trains in {windows} windows of consecutive stored row groups, "
            f"and this dataset is stored in its source's order ({manifest['source_layout']}); {STORED_ORDER_ADVICE}")
