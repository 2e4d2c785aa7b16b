"""Compatibility: the training loop now lives in workers/train/ (a trainer that asks, components
that decide). The names other code and tests import from here are re-exported unchanged."""

from __future__ import annotations

from workers.train.entry import train_loop
from workers.train.errors import FATAL_ERRORS, DivergedError, NoProgressError, error_kind
from workers.train.optim import ONECYCLE_MIN_STEPS
from workers.train.optim import make_optimizer as _make_optimizer
from workers.train.optim import make_scheduler as _make_scheduler
from workers.train.trainer import PERF_KEYS, Trainer

__all__ = ["FATAL_ERRORS", "ONECYCLE_MIN_STEPS", "PERF_KEYS", "DivergedError", "NoProgressError", "Trainer",
           "_make_optimizer", "_make_scheduler", "error_kind", "train_loop"]
