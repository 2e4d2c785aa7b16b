"""What a task is, in one torch-free value: the `TaskSpec`, and the registry a recipe's `task:` resolves in.

A task's knowledge used to be spread over the recipe, its validator, the packers, the synthesizers,
the data commands and `orchestrator compare`. Each of those now reads it from the task's spec:

  columns          the packed dataset's per-sample columns and their codecs (storage encodes by codec alone)
  index_extras     index columns (beyond storage's own) the task's samples bring, read at train time
  meta             dataset meta keys the task reads, with the value each takes when a manifest has none
  loss_sections    the recipe's `loss.<section>` terms the task trains with, and the kind of loss each takes
  layouts          the source layouts `orchestrator data pack --task NAME` reads (`sources`: in words)
  synth            import path of the synthetic generator (`orchestrator data synth --task NAME`)
  worker           import path of the worker half (a workers.tasks.base.Task subclass), imported by
                   workers/ only: common/ never imports what it names
  compare_columns  `orchestrator compare`'s columns: (title, metric key, "max" | "min" | None)

Modelled on torchtitan's `TrainSpec`: the registry (`register_task_spec`, `get_task_spec`) and the
built-in specs live in common/tasks.py; a package outside this one registers its own through the
`orchestrator.tasks` entry point group, or a recipe names one by import path (`task: mypkg.kp:KEYPOINTS`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

# The kinds of loss a loss section takes: "dense" losses score one channel of logits against a
# target in [0, 1]; "labels" losses score class logits against integer labels.
LossKind = Literal["dense", "labels"]


@dataclass(frozen=True)
class LossSlot:
    """One recipe loss section (`loss.<name>`): the kind of loss it takes and its default terms."""

    kind: LossKind
    default: Mapping[str, float]
    description: str = ""


@dataclass(frozen=True)
class TaskSpec:
    """Everything the driver, the packers and the recipe need to know about a task, without torch."""

    name: str
    description: str
    columns: tuple[tuple[str, str], ...]  # (column name, codec), codec one of storage.columns.CODECS
    loss_sections: Mapping[str, LossSlot]
    worker: str  # "module:attribute" of the Task subclass
    train_keys: tuple[str, ...] = ("train/loss",)
    compare_columns: tuple[tuple[str, str, str | None], ...] = ()
    index_extras: tuple[str, ...] = ()
    meta: Mapping[str, Any] = field(default_factory=dict)
    layouts: tuple[str, ...] = ()
    sources: str = ""  # what `data pack --task NAME` takes, in words (its error messages say so)
    synth: str | None = None  # "module:attribute" of a chunk generator (storage.synth_tasks' contract)
    default_image_size: int = 64
    min_image_size: int = 16
    channels: int = 3  # image channels the synthetic generator writes
    augmentations: tuple[str, ...] = ("hflip",)  # data.* augmentations the task applies

    @property
    def column_names(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.columns)

    def codec_of(self, column: str) -> str:
        return dict(self.columns)[column]
