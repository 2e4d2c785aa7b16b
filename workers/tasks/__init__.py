"""The task registry: a recipe's `task:` names one of these (see base.py for what a task owns).

A new task is one module with a Task subclass, registered here.
"""

from __future__ import annotations

from common.registry import Registry
from workers.tasks.base import Batch, Task, TaskDataError
from workers.tasks.classification import ClassificationTask
from workers.tasks.depth import DepthTask
from workers.tasks.mask_depth import MaskDepthTask
from workers.tasks.segmentation import SegmentationTask

TASKS: Registry[type[Task]] = Registry("task")
for _task in (MaskDepthTask, DepthTask, SegmentationTask, ClassificationTask):
    TASKS.register(_task.name)(_task)

__all__ = ["TASKS", "Batch", "Task", "TaskDataError", "get_task"]


def get_task(name: str) -> type[Task]:
    return TASKS.get(name)
