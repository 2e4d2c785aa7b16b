"""The order a pack stores its samples in: shuffled (the default) or the source's.

Why shuffle at all: a source lists its samples in an order that groups alike ones (an ImageFolder
class by class, the source's mask-depth set background by background), and the training reader's
default window shuffle (workers/windows.py) mixes only samples stored near each other. Stored in
the source's order, a 1 MB window of a class-sorted set held 3 classes a batch and BaseNet reached
0.65 accuracy where a whole-chunk shuffle reached 1.00 (docs/PERFORMANCE.md, "Window shuffle on
data stored in order"). Stored shuffled, every row group is a draw from the whole dataset.

How, without making the pack read its source at random: the source order is cut into blocks of one
row group's worth of consecutive samples, the blocks are dealt to the shards in a seeded order,
and each shard's samples are then shuffled. A part (one shard) still reads runs of consecutive
files (a remote zip is read in ~1 MB runs, not member by member), while each of its row groups
draws from the shard's rows_per_shard / rows_per_group blocks (128 at the default sizes), each
from anywhere in the source. A dataset of one shard is shuffled whole.

The order depends only on the number of samples, the sizes and the seed: a killed pack re-run
cuts the same parts (their fingerprints match) and goes on where it was.
"""

from __future__ import annotations

import numpy as np

ORDERS = ("shuffled", "source")
DEFAULT_ORDER = "shuffled"
# Fixed, not drawn: the stored order is part of what a re-pack must reproduce.
ORDER_SEED = 0


def stored_order(n: int, rows_per_shard: int, rows_per_group: int, order: str = DEFAULT_ORDER,
                 seed: int = ORDER_SEED) -> np.ndarray:
    """Positions into the source's sample list, in the order they are stored (a permutation of
    range(n)); the shards take them rows_per_shard at a time."""
    if order not in ORDERS:
        raise ValueError(f"order must be one of {', '.join(ORDERS)}, got {order!r}")
    positions = np.arange(n, dtype=np.int64)
    if order == "source" or n <= 1:
        return positions
    rng = np.random.default_rng([seed, n, rows_per_shard, rows_per_group])
    block = max(1, min(int(rows_per_group), int(rows_per_shard)))
    starts = np.arange(0, n, block)
    dealt = np.concatenate([positions[s : s + block] for s in starts[rng.permutation(len(starts))]])
    for s in range(0, n, rows_per_shard):
        part = dealt[s : s + rows_per_shard]
        dealt[s : s + rows_per_shard] = part[rng.permutation(len(part))]
    return dealt


def order_entry(order: str, rows_per_group: int, seed: int = ORDER_SEED) -> dict[str, object]:
    """What the manifest records of the stored order ("stored_order")."""
    if order == "source":
        return {"order": "source"}
    return {"order": order, "seed": seed, "block_rows": int(rows_per_group)}

