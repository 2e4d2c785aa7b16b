"""When to checkpoint: every N steps, every T seconds, and always at a chunk end."""

from __future__ import annotations

import time


class CheckpointPolicy:
    def __init__(self, every_steps: int, every_seconds: float, clock=time.monotonic) -> None:
        self.every_steps = every_steps
        self.every_seconds = every_seconds
        self.clock = clock
        self.last_time = clock()

    def reason(self, global_step: int) -> str | None:
        """Why a checkpoint is due after `global_step`, or None."""
        if global_step % self.every_steps == 0:
            return "steps"
        if self.clock() - self.last_time >= self.every_seconds:
            return "time"
        return None

    def saved(self) -> None:
        self.last_time = self.clock()
