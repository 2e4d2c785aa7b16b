"""The worker half of each task: a recipe's `task:` names a spec (common.tasks), whose `worker`
import path names the Task subclass here (see base.py for what a task owns).

Nothing here lists the tasks: a new one is a spec in common/tasks.py and a module in this package.
"""

from __future__ import annotations

from common.plugins import resolve_import_path
from common.tasks import get_task_spec
from workers.tasks.base import Batch, Task, TaskDataError

__all__ = ["Batch", "Task", "TaskDataError", "get_task"]

_resolved: dict[str, type[Task]] = {}


def get_task(name: str) -> type[Task]:
    """The worker half of the task `name` (a registered task or a TaskSpec's import path).

    The spec is the one place a task's columns, loss sections, train keys and compare columns are
    declared: the Task class takes them from there."""
    if name not in _resolved:
        spec = get_task_spec(name)
        cls = resolve_import_path(spec.worker, "task worker")
        if not (isinstance(cls, type) and issubclass(cls, Task)):
            raise ValueError(f"task {name!r}: its worker {spec.worker!r} is not a workers.tasks.base.Task subclass")
        _resolved[name] = cls.bind(spec)
    return _resolved[name]
