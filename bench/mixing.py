"""How well the window shuffle mixes a batch, for data stored in its source's order against data
stored as `data pack` stores it (storage/pack/order.py), at the source's scale.

Usage: python -m bench.mixing --json

No shard is written: the plan and the windows are computed from an index alone (as a run computes
them: common/plan.py make_plan and batches_for_rank, workers/windows.py Windows), over an index laid
out the way `data pack` lays one out for the given sizes and stored order. Each sample's label is
its source group (a background of the source's mask-depth set, numbered background by background;
a class of an ImageFolder). The figure is the median number of distinct groups in a batch of the
first chunk, one rank; the whole-chunk shuffle (data.shuffle: chunk) is the baseline in the same run.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bench import machine
from common.plan import batches_for_rank, make_plan
from common.recipe import load_recipe
from storage.pack.order import stored_order
from storage.pack.sizes import choose_sizes
from workers.windows import Windows

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "unet224.yaml"


class _Column:
    def __init__(self, values: np.ndarray) -> None:
        self._values = values

    def to_numpy(self) -> np.ndarray:
        return self._values


class _Index:
    def __init__(self, columns: dict[str, np.ndarray]) -> None:
        self._columns = columns

    def column(self, name: str) -> _Column:
        return _Column(self._columns[name])


class IndexOnly:
    """The parts of an opened dataset the plan and the windows read: ids, shard and row group of each
    id, the manifest's shard sizes. Sample id = source position."""

    def __init__(self, n: int, sample_bytes: int, order: str) -> None:
        rps, rpg = choose_sizes(sample_bytes, None, None)
        stored = stored_order(n, rps, rpg, order)  # stored slot k holds source position stored[k]
        slot = np.empty(n, dtype=np.int64)
        slot[stored] = np.arange(n)
        self.sample_ids = np.arange(n, dtype=np.int64)
        self._columns = {"shard": slot // rps, "row_group": (slot % rps) // rpg}
        self.index = _Index(self._columns)
        shards = []
        for start in range(0, n, rps):
            rows = min(rps, n - start)
            shards.append({"rows": rows, "bytes": rows * sample_bytes, "row_groups": -(-rows // rpg)})
        self.manifest = {"rows_per_group": rpg, "shards": shards}

    def index_values(self, column: str, ids: np.ndarray) -> np.ndarray:
        return self._columns[column][np.asarray(ids, dtype=np.int64)]


@dataclass(frozen=True)
class Case:
    name: str
    samples: int
    groups: int  # backgrounds or classes, each a run of samples/groups consecutive source positions
    sample_bytes: int
    chunking: str
    stage: int  # which of unet224.yaml's stages gives chunk size and batch


CASES = (
    Case("unet224 row_groups, stage 1 (50K, batch 256), 100 backgrounds", 1_200_000, 100, 25_000, "row_groups", 0),
    Case("unet224 row_groups, stage 3 (100K, batch 64), 100 backgrounds", 1_200_000, 100, 25_000, "row_groups", 2),
    Case("samples chunking, 50K, batch 256, 100 backgrounds", 1_200_000, 100, 25_000, "samples", 0),
    Case("ImageNet-like ImageFolder, 1,000 classes of 110 KB, 100K chunk, batch 256", 1_280_000, 1000, 110_000,
         "samples", 2),
)


def groups_a_batch(case: Case, order: str, shuffle: str) -> float:
    ds = IndexOnly(case.samples, case.sample_bytes, order)
    overrides = ["data.uri=/nowhere", f"data.chunking={case.chunking}", f"data.shuffle={shuffle}"]
    recipe = load_recipe(str(RECIPE), overrides)
    stage = recipe.stages[case.stage]
    if case.name.startswith("ImageNet"):
        stage = stage.model_copy(update={"batch_size": 256})
    groups = None
    if case.chunking == "row_groups":
        groups = (ds.index_values("shard", ds.sample_ids) << 32) | ds.index_values("row_group", ds.sample_ids)
    plan = make_plan(recipe, ds.sample_ids, groups)
    ids = plan.stages[case.stage].chunk_ids(0)
    contiguous = case.chunking == "row_groups"
    windows = Windows(ds, plan).order(ids, len(ids), stage.batch_size, 1)
    label = ids * case.groups // case.samples
    where = {int(i): int(g) for i, g in zip(ids.tolist(), label.tolist(), strict=True)}
    batches = batches_for_rank(ids, stage.batch_size, 1, 0, [0, 1, case.stage, 0, 0], contiguous=contiguous,
                               windows=windows)
    return float(np.median([len({where[int(i)] for i in b.tolist()}) for b in batches]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true", help="print the JSON document only")
    args = parser.parse_args()
    rows = []
    for case in CASES:
        row = {"case": case.name,
               "chunk_shuffle": groups_a_batch(case, "source", "chunk"),
               "window_source_order": groups_a_batch(case, "source", "window"),
               "window_pack_shuffled": groups_a_batch(case, "shuffled", "window")}
        rows.append(row)
        if not args.json:
            print(row, flush=True)
    print(json.dumps({"bench": "mixing", "machine": machine(), "median_groups_a_batch": rows},
                     indent=2))


if __name__ == "__main__":
    main()
