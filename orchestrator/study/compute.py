"""Where a study's model compute runs: Ray tasks (execution.backend ray), or in this process
through the worker-side module (backend local, as the tests use). The driver module itself runs
no forward pass: it calls workers/study.py's functions through `call` and `evaluate`."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from common.errors import RunError
from common.study import StudySpec
from orchestrator.engine import root_cause
from orchestrator.study.files import Item


class Compute:
    def __init__(self, spec: StudySpec, address: str | None) -> None:
        self.spec, self.address = spec, address
        self.local = spec.execution.backend == "local"
        self._ray_ready = False
        if self.local:  # one study's model in this process at a time
            from workers import study as worker

            worker._CONTEXTS.clear()

    def _ray(self) -> Any:
        import ray

        if not self._ray_ready:
            from orchestrator.launcher import init_ray

            init_ray(self.address)
            self._ray_ready = True
        return ray

    def box(self, payload: dict[str, Any]) -> list[Any]:
        """The payload as the tasks take it: boxed in a list, so that Ray passes the reference
        through instead of fetching (and unpickling) the model for every task."""
        return [payload] if self.local else [self._ray().put(payload)]

    def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """fn(*args), in one Ray task or here."""
        if self.local:
            return fn(*args)
        ray = self._ray()
        task = ray.remote(num_cpus=self.spec.execution.cpus_per_task, max_retries=3)(fn)
        try:
            return ray.get(task.remote(*args))
        except Exception as exc:  # noqa: BLE001 - RayTaskError wraps the worker's own
            raise RunError(f"study '{self.spec.name}': {fn.__name__} failed: {root_cause(exc)}; "
                           "re-run the same command to retry") from exc

    def batches(self, todo: list[Item]) -> list[list[Item]]:
        # References (every layer at once) go alone; layers in groups of layers_per_task.
        k = self.spec.execution.layers_per_task
        refs = [[it] for it in todo if it.index is None]
        layers = [it for it in todo if it.index is not None]
        return refs + [layers[i : i + k] for i in range(0, len(layers), k)]

    def evaluate(self, box: list[Any], todo: list[Item], delay: float,
                 on_result: Callable[[Item, dict[str, Any]], None]) -> None:
        """Every item of `todo` scored (workers.study.evaluate_items), each result handed to
        on_result as it comes back."""
        from workers.study import evaluate_items

        if self.local:
            for batch in self.batches(todo):
                results = evaluate_items(box, [it.task_item() for it in batch], delay)
                for item, res in zip(batch, results, strict=True):
                    on_result(item, res)
            return
        ray = self._ray()
        ex = self.spec.execution
        slots = ex.num_workers or max(1, int(ray.cluster_resources().get("CPU", 1) // ex.cpus_per_task))
        task = ray.remote(num_cpus=ex.cpus_per_task, max_retries=3)(evaluate_items)
        pending: dict[Any, list[Item]] = {}
        queue = self.batches(todo)
        # A few more tasks than slots are in flight: workers never wait on the driver, and a cut
        # loses at most that many layers' work.
        while queue or pending:
            while queue and len(pending) < 2 * slots:
                batch = queue.pop(0)
                pending[task.remote(box, [it.task_item() for it in batch], delay)] = batch
            ready, _ = ray.wait(list(pending), num_returns=1)
            for r in ready:
                batch = pending.pop(r)
                try:
                    results = ray.get(r)
                except Exception as exc:  # noqa: BLE001 - RayTaskError wraps the worker's own
                    raise RunError(f"study '{self.spec.name}': evaluating {batch[0].id} failed: {root_cause(exc)}; "
                                   "re-run the same command to retry the missing layers") from exc
                for item, res in zip(batch, results, strict=True):
                    on_result(item, res)
