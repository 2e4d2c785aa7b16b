"""How big a pack's shards and row groups are, from the mean size of what a shard row holds."""

from __future__ import annotations

import numpy as np

from storage.layouts.base import TaskPlan
from storage.seed_layout import IMAGE_KINDS, member_key
from storage.source_plan import SourcePlan

# Shards sized for object stores: big enough that per-object costs vanish, small enough that a
# failed upload or a re-pack of one part is cheap.
SHARD_TARGET_BYTES = 128 * 2**20
# Row groups are the unit of a chunk preload (one ranged read each); ~1 MB keeps a read's
# latency small next to its transfer and the bytes fetched close to the bytes needed.
GROUP_TARGET_BYTES = 1 * 2**20
ROWS_PER_GROUP_RANGE = (4, 256)
ROWS_PER_SHARD_RANGE = (16, 65536)
# When no file sizes are known (a manifest of URIs), assume this many bytes per sample.
DEFAULT_SAMPLE_BYTES = 48 * 2**10


def file_kinds(plan: SourcePlan) -> tuple[str, ...]:
    return plan.file_kinds if isinstance(plan, TaskPlan) else IMAGE_KINDS


def mean_sample_bytes(plan: SourcePlan) -> int:
    """Mean bytes of what a shard row holds: every file of a sample but the background of
    mask_depth, which is stored once in its own table."""
    kinds = file_kinds(plan) if isinstance(plan, TaskPlan) else tuple(k for k in IMAGE_KINDS if k != "bg")
    sizes = []
    for s in plan.samples[:2000]:
        total = 0
        for kind in kinds:
            ref = s.files[kind]
            if ref.container is None:
                return DEFAULT_SAMPLE_BYTES
            container = plan.containers[ref.container]
            entry = container.entries.get(member_key(container.kind, ref.member))
            total += entry.size if entry else 0
        sizes.append(total)
    return int(np.mean(sizes)) if sizes else DEFAULT_SAMPLE_BYTES


def choose_sizes(sample_bytes: int, rows_per_shard: int | None, rows_per_group: int | None) -> tuple[int, int]:
    sample_bytes = max(sample_bytes, 1)
    if rows_per_group is None:
        rows_per_group = int(np.clip(GROUP_TARGET_BYTES // sample_bytes, *ROWS_PER_GROUP_RANGE))
    if rows_per_shard is None:
        rows_per_shard = int(np.clip(SHARD_TARGET_BYTES // sample_bytes, *ROWS_PER_SHARD_RANGE))
        rows_per_shard = max(rows_per_group, rows_per_shard // rows_per_group * rows_per_group)
    return int(rows_per_shard), min(int(rows_per_group), int(rows_per_shard))
