"""`orchestrator data pack`: a raw source (the seed layout, or a CSV/Parquet manifest) -> a packed
dataset, resumably (one committed part per shard) and in parallel (Ray tasks or processes).

`--task` picks what the dataset holds: mask_depth (the seed layout; the default), classification,
segmentation or depth (their layouts are in storage/layouts/). Every task goes through the same
parts, records, resume and report; only how a sample's files become column values differs.

  driver.py      pack(): plan, run the parts not committed yet, write index and manifest
  parts.py       cutting the plan into parts (one shard each) and running them (Ray, processes)
  records.py     the state under DEST/.pack/: part tasks, index rows, commit records, reuse, cleanup
  reading.py     reading a part's source files
  mask_depth.py  mask_depth's sample parts and its shared backgrounds (format /4)
  tasks.py       the other tasks' parts (columns from their specs) and manifest meta
  sizes.py       shard and row-group sizes
  result.py      PackResult, PackError
"""

from __future__ import annotations

from storage.layouts.base import BadSample  # importable from here as before
from storage.pack.driver import pack, plan_pack_source
from storage.pack.mask_depth import MASK_THRESHOLD, background_ids, prepare_sample
from storage.pack.parts import default_workers, run_part
from storage.pack.records import PACK_VERSION, STATE_DIR, PartTask
from storage.pack.result import PackError, PackResult
from storage.pack.sizes import choose_sizes, mean_sample_bytes
from storage.pack.tasks import TASK_COLUMNS, task_meta

__all__ = [
    "MASK_THRESHOLD",
    "PACK_VERSION",
    "STATE_DIR",
    "TASK_COLUMNS",
    "BadSample",
    "PackError",
    "PackResult",
    "PartTask",
    "background_ids",
    "choose_sizes",
    "default_workers",
    "mean_sample_bytes",
    "pack",
    "plan_pack_source",
    "prepare_sample",
    "run_part",
    "task_meta",
]
