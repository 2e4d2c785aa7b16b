"""The task seam: everything that knows what a sample *means*.

A task turns a chunk's stored columns into model inputs and targets, owns its losses, its eval
metrics and their trivial baseline, its prediction picture for MLflow and its columns in
`orchestrator compare`. The training loop only asks the task; storage below it only knows
columns and codecs (declared in the dataset's manifest).

Two sides:
- driver (class methods, no torch device): `data_info(dataset, train_ids)` reads what the task
  needs from the dataset's manifest and index (classes, the baseline constant) once per run; the
  result is JSON and travels to every worker in the run config.
- worker (an instance per Trainer): `samples` (decode + augment of one chunk), `to_device`,
  `losses`, `evaluator`, `picture`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar, NamedTuple, Protocol

import numpy as np
import torch
from torch import Tensor

from common.recipe import Recipe
from common.task_spec import TaskSpec


class Batch(NamedTuple):
    """A batch on the training device: the model input and the task's targets."""

    x: Tensor
    targets: tuple[Tensor, ...]


class Evaluator(Protocol):
    def update(self, out: Tensor, batch: Batch) -> None: ...

    def compute(self) -> dict[str, float]: ...


class TaskDataError(ValueError):
    """A dataset that does not hold what the task reads; the message names the dataset and the fix."""


class Task:
    """Base class of the worker halves of tasks; `get_task` binds one to its spec (common.tasks)."""

    spec: ClassVar[TaskSpec]
    # Taken from the spec by from_spec, the one place they are declared:
    name: ClassVar[str]
    # Dataset columns the task reads at train time (checked against the manifest before a run starts).
    columns: ClassVar[tuple[str, ...]]
    # Recipe loss sections the task trains with (`loss.mask`, `loss.depth`, `loss.labels`, or its own).
    loss_sections: ClassVar[tuple[str, ...]]
    # Train metric keys, "train/loss" (the total) first, in the order `losses` returns them.
    train_keys: ClassVar[tuple[str, ...]]
    # `orchestrator compare`: (column title, metric key, "max" | "min" | None).
    compare_columns: ClassVar[tuple[tuple[str, str, str | None], ...]]

    def __init_subclass__(cls, spec: TaskSpec | None = None, **kwargs: Any) -> None:
        """`class DepthTask(Task, spec=DEPTH)`: the declarations above come from the task's spec."""
        super().__init_subclass__(**kwargs)
        if spec is not None:
            cls.bind(spec)

    @classmethod
    def bind(cls, spec: TaskSpec) -> type[Task]:
        """Set the spec's declarations on this class (itself, so that it pickles by name); one worker
        class serves one task."""
        bound = cls.__dict__.get("spec")
        if bound is not None and bound.name != spec.name:
            raise ValueError(f"{cls.__qualname__} is the worker of task {bound.name!r}, not of {spec.name!r}")
        cls.spec, cls.name, cls.columns = spec, spec.name, spec.column_names
        cls.loss_sections, cls.train_keys = tuple(spec.loss_sections), spec.train_keys
        cls.compare_columns = spec.compare_columns
        return cls

    def __init__(self, recipe: Recipe, info: dict[str, Any]) -> None:
        self.recipe = recipe
        self.info = info

    # ------------------------------------------------------------------ driver side
    @classmethod
    def check_dataset(cls, dataset: Any) -> None:
        """Fail before any worker starts when the dataset holds other columns than the task reads."""
        stored = [c.name for c in getattr(dataset, "columns", ())] or ["fg_bg", "bg", "mask", "depth"]
        task = getattr(dataset, "task", "mask_depth")
        missing = [c for c in cls.columns if c not in stored]
        if task != cls.name or missing:
            raise TaskDataError(
                f"{dataset.uri}: holds a {task!r} dataset (columns {', '.join(stored)}), but the recipe's task is "
                f"{cls.name!r}, which reads {', '.join(cls.columns)}; set `task: {task}` in the recipe or point "
                "data.uri "
                f"at a dataset packed with `orchestrator data pack SOURCE DEST --task {cls.name}`"
            )

    @classmethod
    def data_info(cls, dataset: Any, train_ids: np.ndarray) -> dict[str, Any]:
        """What the workers need to know about the data (JSON): classes, the baseline constant."""
        return {}

    @classmethod
    def metric_keys(cls, info: dict[str, Any]) -> set[str]:
        """Every metric key the task logs (MLflow dedupe on resume reads these)."""
        return set(cls.train_keys)

    def model_kwargs(self) -> dict[str, Any]:
        """Constructor arguments the data decides (in_channels, num_classes); the model takes those it has."""
        return {}

    # ------------------------------------------------------------------ worker side
    def samples(self, rows: dict[str, Any], resolution: int, describe: Any, train: bool,
                flip_key: tuple[int, ...] = ()) -> torch.utils.data.Dataset:
        """The chunk's (or eval split's) samples, decoded a batch at a time by `__getitems__`.
        `train` turns on the recipe's augmentation, seeded per sample by `flip_key`. Keep `rows`
        as the dataset's `.rows` (ImageSamples does): make_loader finds a chunk still streaming in
        there, shares it with the decode processes and tells it when the first batch is out."""
        raise NotImplementedError

    def to_device(self, raw: Any, device: torch.device | str) -> Batch:
        raise NotImplementedError

    def forward(self, model: torch.nn.Module, x: Tensor, path: str) -> Tensor:
        inner = model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model
        return model(x, path=path) if getattr(inner, "paths", None) else model(x)

    def losses(self, out: Tensor, batch: Batch) -> Sequence[Tensor]:
        """The total loss first, then each part's, in `train_keys` order."""
        raise NotImplementedError

    def evaluator(self) -> Evaluator:
        raise NotImplementedError

    def picture(self, batch: Batch, out: Tensor, path: str) -> None:
        """The prediction picture of a few eval samples (CPU tensors), written as a PNG."""
        raise NotImplementedError
