"""Held-out evaluation at a chunk's end and the prediction grid at a stage's end (chief only)."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from common.plan import Plan
from common.recipe import Recipe, StageSection
from workers.data import DataError, check_sizes, make_loader
from workers.session import Session
from workers.tasks import Batch
from workers.train.sink import Sink, records


def check_complete(rows: dict[str, Any], ids: np.ndarray, describe: Callable[[Any], str]) -> None:
    """A run never silently trains on fewer samples than its plan says."""
    got = np.asarray(rows["sample_id"], dtype=np.int64)
    if len(got) != len(ids) or not np.array_equal(np.sort(got), np.sort(np.asarray(ids, dtype=np.int64))):
        missing = sorted(set(map(int, ids)) - set(map(int, got)))[:5]
        raise DataError(f"{describe(missing[0]) if missing else 'dataset'}: {len(ids) - len(got)} planned samples "
                        f"missing from the shards (e.g. {missing})")


class Evaluator:
    """The plan's eval samples, read once, through the task's evaluator and picture."""

    def __init__(self, recipe: Recipe, plan: Plan, dataset: Any, task: Any, session: Session, sink: Sink) -> None:
        self.recipe, self.plan, self.dataset, self.task = recipe, plan, dataset, task
        self.session = session
        self.device = session.device
        self.sink = sink
        # Drawn only for a sink that keeps it: its data loader takes a seed from the global RNG.
        self.pictures = records(sink)
        self._rows: dict[str, Any] | None = None

    @torch.no_grad()
    def evaluate(self, model: torch.nn.Module, st: StageSection) -> dict[str, float]:
        """Metrics on the held-out split at stage st's resolution (chief only; others wait)."""
        if not self.session.is_chief:
            self.session.barrier()
            return {}
        model.eval()
        acc = self.task.evaluator()
        for raw in self._loader(st):
            batch = self.task.to_device(raw, self.device)
            acc.update(self.task.forward(model, batch.x, st.forward), batch)
        model.train()
        self.session.barrier()
        return acc.compute()

    def _loader(self, st: StageSection) -> torch.utils.data.DataLoader:
        describe = self.dataset.describe
        if self._rows is None:
            self._rows = self.dataset.read_samples(self.plan.eval_ids)
            check_sizes(self._rows, self.recipe.data.image_size, describe)
            check_complete(self._rows, self.plan.eval_ids, describe)
        ds = self.task.samples(self._rows, st.resolution, describe, train=False)
        return make_loader(ds, batch_size=st.batch_size, num_workers=self.recipe.data.decode_workers)

    def log_prediction_grid(self, model: torch.nn.Module, s: int) -> None:
        """The model's predictions on the first eval samples, as a picture for the sink (after
        `evaluate`, which reads them)."""
        if not self.pictures:
            return
        st = self.recipe.stages[s]
        n = self.recipe.tracking.grid_samples
        model.eval()
        with torch.no_grad():
            samples = self.task.samples(self._rows, st.resolution, self.dataset.describe, train=False)
            batch = self.task.to_device(next(iter(make_loader(samples, batch_size=n))), self.device)
            out = self.task.forward(model, batch.x, st.forward).cpu()
            batch = Batch(batch.x.cpu(), tuple(t.cpu() for t in batch.targets))
        model.train()
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, f"stage{s + 1}-{st.name}.png")
            self.task.picture(batch, out, path)
            self.sink.log_artifact(path, "predictions")
