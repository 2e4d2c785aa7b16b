"""The checkpointer decides and does everything about checkpoints; the trainer only asks.

- when: `should_save` (every N steps or T seconds by the chief's clock, agreed by every rank; a
  stop; a chunk's end);
- whether: the rank-agreed finite-loss gate (never save after a non-finite loss);
- what and where: the snapshot, the folder name (`storage/checkpoints.py` `fresh_name`), the write
  through workers/checkpoint_writer.py (one upload in flight), the lease check before the upload,
  cursor.json, retention, and what follows the commit (its metrics to the sink, the MLflow store copy);
- from where: restore from the newest usable checkpoint by step number, falling back past unusable
  ones, and the count of worker starts at the same step (restarts.json, NoProgressError).
"""

from __future__ import annotations

import logging
import tempfile
import time
from typing import Any

import torch

from common.recipe import Recipe
from storage import checkpoints, fs, lease
from storage.errors import StorageError
from storage.layout import CURSOR_JSON, RESTARTS_JSON
from workers import tracking_store
from workers.checkpoint_policy import CheckpointPolicy
from workers.checkpoint_writer import CheckpointWriter
from workers.session import Session
from workers.state import TrainState
from workers.train.divergence import LossWatch
from workers.train.errors import DivergedError, NoProgressError
from workers.train.sink import Sink, store_copy_uri
from workers.train.stops import Stop

log = logging.getLogger(__name__)

Point = tuple[str, float, int]


def read_optional_json(uri: str) -> dict[str, Any] | None:
    try:
        return fs.read_json(uri)
    except Exception:  # noqa: BLE001 - missing or torn: no information
        return None


class Checkpointer:
    """Saves and restores one trainer's `TrainState` in run storage (`config["run_dir"]`)."""

    def __init__(self, recipe: Recipe, config: dict[str, Any], session: Session, state: TrainState,
                 losses: LossWatch, sink: Sink) -> None:
        self.recipe = recipe
        self.session = session
        self.state = state
        self.losses = losses
        self.sink = sink
        self.run_dir: str = config["run_dir"]
        self.attempt = int(config.get("attempt", 1))
        self.world = session.world_size
        self.policy = CheckpointPolicy(recipe.checkpoint.every_steps, recipe.checkpoint.every_seconds)
        self.writer = CheckpointWriter(recipe.checkpoint.background)  # at most one upload in flight
        self._store_copy_uri = store_copy_uri(config, sink)
        self._lease_token: str | None = config.get("lease_token")  # the driver's (orchestrator/engine/lease.py)
        self._taken: set[str] = set()  # checkpoint folder names in run storage at the restore

    # ---------------------------------------------------------------- restore
    def scan(self) -> bool:
        """Note the checkpoint folders in run storage (a new one never takes their names); True if any."""
        folders = checkpoints.list_folders(self.run_dir)
        self._taken = set(folders)
        return bool(folders)

    def load(self) -> tuple[dict[str, Any], dict[str, Any]] | None:
        """(state, meta) of the newest usable checkpoint, or None; this worker start is counted."""
        # From run storage, newest usable first, on both backends: Ray's own pick (its controller's
        # latest) may be the torn one, and a run whose Ray snapshot was set aside has none.
        set_aside = self.recipe.execution.backend == "local" and self.session.is_chief
        loaded = checkpoints.load_newest_usable(self.run_dir, set_aside_unusable=set_aside)
        if self.session.is_chief:
            self.count_start(loaded[2].get("cursor", {}).get("global_step", 0) if loaded else 0)
        if loaded is None:
            return None
        return loaded[1], loaded[2]

    def count_start(self, step: int) -> None:
        """Count this worker-group start against the restore point: Ray Train restarts a group that
        fails the same way (a chunk that OOMs) up to max_failures times, forever with -1. Starts of
        this driver attempt that all restore the same step mean no restart is helping."""
        uri = fs.join(self.run_dir, RESTARTS_JSON)
        starts = [r for r in (read_optional_json(uri) or {}).get("starts", []) if r.get("attempt") == self.attempt]
        starts.append({"attempt": self.attempt, "step": int(step), "at": time.time()})
        limit = self.recipe.execution.max_restarts_without_progress
        same = 0
        for r in reversed(starts):
            if r["step"] != step:
                break
            same += 1
        restarts = same - 1  # the first start at this step is not a restart
        if restarts >= limit:
            raise NoProgressError(
                f"the workers restarted {restarts} times in a row from step {step} without saving a newer checkpoint "
                f"(execution.max_restarts_without_progress is {limit}); the cause is usually in the worker logs "
                "(out of memory: lower stages.*.chunk_size or batch_size, or give the workers more memory)")
        try:
            fs.write_json(uri, {"starts": starts[-100:]})
        except StorageError as exc:  # advisory: a miss only delays this stop by one restart
            log.warning("could not record this worker start: %s", exc)

    # ------------------------------------------------------------------ when
    def should_save(self, step: int, stop: Stop | None = None, chunk_end: bool = False) -> str | None:
        """The reason to checkpoint after `step`, or None: a stop's, a chunk end's, or the policy's
        (every N steps, or T seconds: all ranks must save at the same step, the chief's clock decides)."""
        if stop is not None:
            return stop.reason
        if chunk_end:
            return "chunk_end"
        return self._agree(self.policy.reason(step))

    def _agree(self, reason: str | None) -> str | None:
        if self.world == 1:
            return reason
        flag = torch.tensor([0 if reason is None else (1 if reason == "steps" else 2)], device=self.session.device)
        torch.distributed.broadcast(flag, src=0)
        return {0: None, 1: "steps", 2: "time"}[int(flag.item())]

    def _agree_flag(self, flag: bool) -> bool:
        """The chief's flag, on every rank (one broadcast; free with one worker)."""
        if self.world == 1:
            return flag
        t = torch.tensor([1 if flag else 0], device=self.session.device)
        torch.distributed.broadcast(t, src=0)
        return bool(t.item())

    # ------------------------------------------------------------------ save
    def save(self, reason: str) -> None:
        """Save a checkpoint at this step. With `checkpoint.background` (the default) the state is
        snapshotted here, tensors copied to CPU memory, and serialized, written and uploaded on the
        writer's thread while training goes on (workers/checkpoint_writer.py); otherwise all of it
        happens here. Either way the previous checkpoint lands first (at most one upload in flight),
        a checkpoint counts once its meta.json (written last) has landed, and what must follow the
        commit follows it: cursor.json, then this checkpoint's metrics to the sink (on this thread,
        at the next step's poll or at a wait), then the MLflow store copy."""
        c = self.state.cursor
        chief = self.session.is_chief
        if chief:
            self.losses.drain()
        # A rank-agreed decision, so that every rank stops together: never save after a non-finite loss.
        if self._agree_flag(chief and self.losses.streak > 0):
            raise self.losses.diverged() if chief else DivergedError("the chief found the loss not finite")
        name = checkpoints.fresh_name(c.global_step, self._taken)
        self._taken.add(name)
        metrics = {"global_step": c.global_step, "stage": c.stage, "chunk": c.chunk, "reason": reason}
        writer = self.writer
        writer.wait()
        if not chief:
            self.session.report(metrics, None, name)
            self.policy.saved()
            return
        sd = self.state.state_dict()
        sd["world_size"] = self.world
        if writer.background:
            sd = writer.snapshot(sd)  # training mutates the live tensors in place from the next step on
        meta = {"name": name, "reason": reason, "cursor": dict(sd["cursor"]), "saved_at": time.time(),
                "attempt": self.attempt, "losses_finite": self.losses.take_finite()}
        record = {"cursor": sd["cursor"], "chunk_log": sd["chunk_log"], "interruption_log": sd["interruption_log"],
                  "last_eval": sd["last_eval"], "world_size": self.world}
        carried = list(self.state.pending_metrics)  # the points this checkpoint holds, sent once it commits

        def write(local_dir: str) -> None:
            checkpoints.write_local(local_dir, sd, meta)
            if self._lease_token:
                # Fenced: the files go up only while the lease is still our driver's, so a driver that
                # lost it (its storage stalled past the TTL) can at worst waste compute, never commit.
                lease.check_holder(self.run_dir, self._lease_token)

        if writer.background:
            upload = self.session.start_upload(metrics, name, write)
        else:
            def upload() -> str | None:
                with tempfile.TemporaryDirectory(prefix="orch-ckpt-") as tmp:
                    write(tmp)
                    return self.session.report(metrics, tmp, name)

        def work() -> str | None:
            uri = upload()
            fs.write_json(fs.join(self.run_dir, CURSOR_JSON), {"checkpoint": uri, **record, "updated_at": time.time()},
                          durable=True)
            if self.recipe.execution.backend == "ray":
                # What a kill left half-written before this one is removed now (in-process, commit
                # does it, with the retention Ray Train's own num_to_keep does here).
                checkpoints.apply_retention(self.run_dir, name, keep=0)
            return uri

        self.policy.saved()  # not due again while this one uploads
        writer.submit(work, lambda uri: self._landed(uri, carried), name=name)

    def _landed(self, uri: str | None, carried: list[Point]) -> None:
        """After a checkpoint committed, on the training thread: its metrics to the sink, then (in
        the background, the writer's next job) the MLflow store copy."""
        self.policy.saved()  # the interval counts from the end of the save, as it did when saves were synchronous
        self.sink.log_metrics(carried)
        self.sink.set_tags({"orchestrator.checkpoint.latest": uri})
        # Only what this checkpoint carried: points added since (the next steps' losses) stay pending.
        pending = self.state.pending_metrics
        if pending[: len(carried)] == carried:
            del pending[: len(carried)]
        else:
            for point in carried:
                if point in pending:
                    pending.remove(point)
        # MLflow down: the points it has not taken stay pending, oldest first, and every
        # checkpoint carries them until they land (the sink skips those it already sent).
        pending[:0] = self.sink.undelivered()
        if self._store_copy_uri is not None:
            # Local mode (sqlite): the run's MLflow records go to run storage with every checkpoint.
            # The copy is taken after this checkpoint's points reached the store, so it holds them;
            # the driver cannot know when that write has landed. A cut before the copy leaves the
            # previous one, one checkpoint behind: the resume re-sends this checkpoint's points from
            # the checkpoint itself (Trainer.restore), so none is lost. It reads the sqlite file
            # directly (no MLflow call), and the next checkpoint, a stop and the run's end wait for it.
            self.writer.submit(self._copy_tracking_store, name="mlflow-store-copy")

    def _copy_tracking_store(self) -> None:
        if self._store_copy_uri is None:
            return
        try:
            tracking_store.save_copy(self._store_copy_uri, self.sink.run_id, self.run_dir)
        except StorageError as exc:  # training goes on; the previous copy (and the checkpoints) stand
            log.warning("could not copy the MLflow store into run storage: %s", exc)
        except Exception:  # noqa: BLE001 - sqlite or anything else: the same, with its traceback for a bug report
            log.warning("could not copy the MLflow store into run storage", exc_info=True)

    # ------------------------------------------------------------- hand-offs
    def poll(self) -> None:
        """A background checkpoint that landed: its completion (metrics to the sink) runs now."""
        self.writer.poll()

    def wait(self) -> None:
        """Until nothing is in flight (the run's end: the final checkpoint and its metrics land first)."""
        self.writer.wait()

    def settle(self) -> None:
        """Before a stop ends this attempt: its checkpoint (uploaded in the background, by the chief)
        has landed and its metrics reached the sink, on every rank."""
        self.writer.wait()
        if self.world > 1:
            self.session.barrier()

    def newest(self) -> str | None:
        """The URI of the newest complete checkpoint in run storage, or None."""
        names = checkpoints.list_complete(self.run_dir)
        return fs.join(self.run_dir, names[-1]) if names else None

    def close(self) -> None:
        # On the way out after an error: a checkpoint under way still lands (a committed one is
        # always whole); its own failure is logged, not raised over the error being raised.
        self.writer.close()
