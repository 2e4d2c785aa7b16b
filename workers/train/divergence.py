"""Divergence: the chief's losses, kept on the device and brought to the host in batches, and the
streak of non-finite ones that stops a run (`execution.max_nonfinite_steps`)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from common.recipe import Recipe
from workers.state import TrainState
from workers.train.errors import DivergedError


class LossWatch:
    """The loss buffer of the chief. Each drained loss becomes pending metrics (they ride in the next
    checkpoint); a non-finite one extends the streak, a finite one ends it."""

    def __init__(self, recipe: Recipe, state: TrainState, train_keys: Sequence[str]) -> None:
        self.recipe = recipe
        self.state = state  # not its pending list: a restore replaces that list
        self.train_keys = list(train_keys)
        self.max_nonfinite = recipe.execution.max_nonfinite_steps
        # Losses come to the host in batches; at most this many steps pass unseen, so a diverged
        # run stops within 2x max_nonfinite_steps of its first NaN (flush_every_steps is 20).
        self.drain_every = min(recipe.tracking.flush_every_steps, self.max_nonfinite)
        self._buf: list[tuple[int, Sequence[torch.Tensor]]] = []
        self.last_loss: float | None = None
        # Non-finite losses in a row, as drained (no extra host sync), and the first of them.
        self.streak = 0
        self.first_nonfinite_step: int | None = None
        self._finite_since_save = True  # every loss since the last checkpoint was finite (its meta says so)

    def add(self, step: int, losses: Sequence[torch.Tensor]) -> None:
        """The losses of `step`, kept as tensors (a .item() per step would sync the GPU every step)."""
        self._buf.append((step, [t.detach() for t in losses]))
        if len(self._buf) >= self.drain_every:
            self.drain()

    def drain(self) -> None:
        """Bring the buffered losses to the host; raises DivergedError once the streak is too long."""
        if not self._buf:
            return
        vals = torch.stack([torch.stack(list(v)) for _, v in self._buf]).float().cpu().tolist()
        pending = self.state.pending_metrics
        for (step, _), row in zip(self._buf, vals, strict=True):
            pending += [(k, v, step) for k, v in zip(self.train_keys, row, strict=True)]
            if math.isfinite(row[0]):
                self.streak = 0
            else:
                self.streak += 1
                self._finite_since_save = False
                if self.streak == 1:
                    self.first_nonfinite_step = step
        self.last_loss = vals[-1][0]
        self._buf.clear()
        if self.streak >= self.max_nonfinite:
            raise self.diverged()

    def take_finite(self) -> bool:
        """Whether every loss since the previous call was finite (a checkpoint's `losses_finite`)."""
        finite, self._finite_since_save = self._finite_since_save, True
        return finite

    def diverged(self) -> DivergedError:
        c = self.state.cursor
        st = self.recipe.stages[min(c.stage, len(self.recipe.stages) - 1)]
        return DivergedError(
            f"training diverged in stage '{st.name}' (stages.{st.name}.lr = {st.lr:g}): the loss is not finite "
            f"since step {self.first_nonfinite_step} ({self.streak} in a row, execution.max_nonfinite_steps is "
            f"{self.max_nonfinite}); stopped at step {c.global_step} without saving it. The checkpoints kept are "
            f"from before it (all finite). Lower stages.{st.name}.lr and start the run under a new name "
            "(--set run.name=...): a changed recipe does not resume under the old one")
