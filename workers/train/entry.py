"""The worker's entry point: Ray Train calls `train_loop` on every worker; the local backend calls
it in-process. It builds the trainer, runs it, and records a fatal failure for the driver."""

from __future__ import annotations

import logging
from typing import Any

from common.recipe import Recipe
from storage import fs
from storage.errors import MountDropped
from storage.layout import ERROR_JSON
from workers.preemption import TRAINING_ACTIVE, StopRequested
from workers.session import make_session
from workers.train.errors import FATAL_ERRORS, error_kind
from workers.train.trainer import Trainer

log = logging.getLogger(__name__)


def train_loop(config: dict[str, Any]) -> None:
    """Entry point: Ray Train calls it on every worker; the local backend calls it in-process."""
    recipe = Recipe.model_validate(config["recipe"])
    session = make_session(recipe.execution.backend, config["run_dir"], recipe.checkpoint.keep,
                           recipe.execution.use_tpu)
    trainer = Trainer(recipe, config, session)
    TRAINING_ACTIVE.set()
    try:
        trainer.fit()
    except StopRequested:
        if recipe.execution.backend == "ray":
            # The user's stop, checkpoint saved: end the worker without an error, or Ray Train
            # would restart the group and train on. The driver knows it asked (orchestrator/interrupt.py).
            log.warning("stopped at the user's request at step %d", trainer.state.cursor.global_step)
            return
        raise
    except FATAL_ERRORS as exc:
        # Keep the user-facing cause where the driver can read it, whatever Ray wraps it in;
        # the driver stops the run on it rather than let Ray restart into the same failure
        # (orchestrator/failure_policy.py). Any rank may hit it: its own slice is bad.
        kind = error_kind(exc)
        text = fs.mount_advice(exc) if isinstance(exc, MountDropped) else str(exc)
        try:
            record = {"error": text, "kind": kind, "rank": session.world_rank}
            fs.write_json(fs.join(config["run_dir"], ERROR_JSON), record)
        except Exception as exc2:  # noqa: BLE001 - the storage itself may be what failed; Ray still reports it
            log.warning("could not record the error in run storage: %s", exc2)
        raise
    finally:
        TRAINING_ACTIVE.clear()
        trainer.close()
