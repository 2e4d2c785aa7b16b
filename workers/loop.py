"""The training loop over the plan, the same in a Ray Train worker and in-process.

The loop only advances steps. What survives a preemption lives in `TrainState`; when to save
is `CheckpointPolicy`'s call; what leaves the process goes through `Session` (checkpoints)
and `MlflowSink` (metrics, images), the latter only after the checkpoint holding them commits.
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
import time
from collections.abc import Sequence
from typing import Any, NoReturn

import numpy as np
import torch

from common.plan import batches_for_rank, rank_slice, steps_per_chunk
from common.recipe import Recipe, StageSection
from storage import checkpoints, fs, lease
from storage.layout import CURSOR_JSON, ERROR_JSON, FINAL_JSON, PROGRESS_JSON, RESTARTS_JSON
from storage.plans import load_plan
from storage.retry import RETRY_COUNTER, MountDropped, StorageError, StorageUnavailable
from storage.shards import DatasetError, open_dataset
from workers import tracking_store
from workers.checkpoint_policy import CheckpointPolicy
from workers.checkpoint_writer import CheckpointWriter
from workers.data import ChunkPrefetcher, DataError, check_sizes, make_loader
from workers.models.registry import build_from_recipe
from workers.precision import Precision, as_float
from workers.preemption import (
    FATAL,
    GCE,
    INTERRUPT,
    TRAINING_ACTIVE,
    PreemptedError,
    PreemptionMonitor,
    StopRequested,
    StopRequestWatch,
)
from workers.progress import ProgressWriter
from workers.session import Session, configure_threads, make_session
from workers.state import TrainState
from workers.tasks import Batch, get_task

log = logging.getLogger(__name__)

class DivergedError(RuntimeError):
    """Non-finite losses, `execution.max_nonfinite_steps` in a row: no restart can fix a diverged run."""


class NoProgressError(RuntimeError):
    """The workers restarted `execution.max_restarts_without_progress` times without a new checkpoint."""


# Failures recorded for the driver (error.json). Those of a kind in orchestrator/failure_policy.py's
# NOT_RETRYABLE stop the run at once; StorageUnavailable (transient faults past their budget) is
# recorded too but left to Ray Train's restart, which resumes from the last checkpoint.
FATAL_ERRORS = (DataError, DatasetError, StorageError, DivergedError, NoProgressError, checkpoints.CheckpointCorruptError)


def error_kind(exc: BaseException) -> str:
    """The error.json kind of a recorded failure (orchestrator/failure_policy.py decides on it)."""
    if isinstance(exc, MountDropped):
        return "mount"
    if isinstance(exc, StorageUnavailable):
        return "unavailable"
    if isinstance(exc, (DataError, DatasetError)):
        return "data"
    if isinstance(exc, DivergedError):
        return "diverged"
    if isinstance(exc, NoProgressError):
        return "no_progress"
    if isinstance(exc, checkpoints.CheckpointCorruptError):
        return "checkpoint"
    return "storage"


def _stop_reason(notice: str) -> str:
    """The checkpoint reason a stop is saved under: `Trainer._record_interruption` reads it back."""
    return "error" if notice == FATAL else "interrupt" if notice == INTERRUPT else "preemption"


PERF_KEYS = ("perf/data_wait_fraction", "perf/storage_retries")


def train_loop(config: dict[str, Any]) -> None:
    """Entry point: Ray Train calls it on every worker; the local backend calls it in-process."""
    recipe = Recipe.model_validate(config["recipe"])
    session = make_session(recipe.execution.backend, config["run_dir"], recipe.checkpoint.keep, recipe.execution.use_tpu)
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
            fs.write_json(fs.join(config["run_dir"], ERROR_JSON), {"error": text, "kind": kind, "rank": session.world_rank})
        except Exception as exc2:  # noqa: BLE001 - the storage itself may be what failed; Ray still reports it
            log.warning("could not record the error in run storage: %s", exc2)
        raise
    finally:
        TRAINING_ACTIVE.clear()
        trainer.close()


class Trainer:
    def __init__(self, recipe: Recipe, config: dict[str, Any], session: Session) -> None:
        self.recipe = recipe
        self.session = session
        self.run_dir: str = config["run_dir"]
        self.rank, self.world = session.world_rank, session.world_size
        self.device = session.device
        configure_threads(recipe.execution.torch_threads or max(1, int(recipe.execution.cpus_per_worker)))
        if recipe.run.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
            torch.backends.cudnn.benchmark = False
        torch.manual_seed(recipe.run.seed)

        self.plan = load_plan(self.run_dir)
        self.dataset = open_dataset(config["data_uri"])
        self.prefetcher = ChunkPrefetcher(self.dataset)
        self.task = get_task(recipe.task)(recipe, config["task_info"])

        model = build_from_recipe(recipe.model, **self.task.model_kwargs()).to(self.device)
        # Precision, memory format, compilation: resolved once for this device (workers/precision.py).
        self.precision = Precision.resolve(recipe.execution, self.device, model)
        # `model` stays the un-compiled module: its state_dict is what checkpoints hold, either way.
        self._train_model = self.precision.prepare_model(model)
        self.state = TrainState(model=model, scaler=self.precision.make_scaler())
        self.ddp_model: torch.nn.Module = self._train_model
        self.policy = CheckpointPolicy(recipe.checkpoint.every_steps, recipe.checkpoint.every_seconds)
        self._ckpt_writer = CheckpointWriter(recipe.checkpoint.background)  # at most one upload in flight
        self.attempt = int(config.get("attempt", 1))
        # The driver's stop request (Ctrl-C) is looked for by the chief only; the ranks agree in notice().
        stop = StopRequestWatch(self.run_dir if session.is_chief else None, self.attempt)
        self.preemption = PreemptionMonitor(recipe.execution.backend, self.world, self.device, recipe.checkpoint.preemption_poll_steps,
                                            stop=stop)
        # A stop (notice, or FATAL with this rank's own error if it has one) that came on a chunk's
        # last step: the chunk-end checkpoint is taken first and stands in for the stop's.
        self._stop_at_chunk_end: tuple[str, BaseException | None] | None = None
        self.sink = None
        if session.is_chief and config.get("mlflow_run_id"):
            from workers.mlflow_sink import MlflowSink

            self.sink = MlflowSink(config["tracking_uri"], config["mlflow_run_id"], self.run_dir)
            self.sink.set_tags(self.precision.tags())
        self._store_copy_uri = config["tracking_uri"] if self.sink is not None and tracking_store.sqlite_path(config.get("tracking_uri")) else None
        self._loss_buf: list[tuple[int, Sequence[torch.Tensor]]] = []
        self._eval_rows: dict[str, Any] | None = None
        self._last_loss: float | None = None
        # Divergence: non-finite losses in a row, as drained (no extra host sync), and the first
        # of them; and whether every loss since the last checkpoint was finite (its meta says so).
        self._nonfinite_streak = 0
        self._first_nonfinite_step: int | None = None
        self._losses_finite = True
        # Losses come to the host in batches; at most this many steps pass unseen, so a diverged
        # run stops within 2x max_nonfinite_steps of its first NaN (flush_every_steps is 20).
        self._drain_every = min(recipe.tracking.flush_every_steps, recipe.execution.max_nonfinite_steps)
        self._taken: set[str] = set()  # checkpoint folder names in run storage at the restore
        self._lease_token: str | None = config.get("lease_token")  # the driver's (orchestrator/lease.py)
        self._data_wait = 0.0
        self._steps_this_process = 0
        total_steps = sum(self._stage_steps(s) for s in range(len(recipe.stages)))
        self.progress = ProgressWriter(self.run_dir, [st.name for st in recipe.stages],
                                       [sp.num_chunks for sp in self.plan.stages], total_steps, session.node_id)
        self.progress.precision = self.precision.describe()  # the driver shows it once, from progress.json

    # ----------------------------------------------------------------- set-up
    def describe(self, sample_id: int) -> str:
        return self.dataset.describe(sample_id)

    def enter_stage(self, s: int) -> None:
        """Freeze/unfreeze for stage s, and build its optimizer and schedule if not built yet."""
        st = self.recipe.stages[s]
        model = self.state.model
        if hasattr(model, "set_trainable"):
            model.set_trainable(st.trainable)
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        if self.state.optimizer_stage != s:
            # With fp16's scaler, a fused optimizer takes the inf check on the device: no host sync per step.
            self.state.optimizer = _make_optimizer(self.recipe, params, st.lr, fused=self.state.scaler is not None)
            self.state.scheduler = _make_scheduler(self.state.optimizer, st, self._stage_steps(s))
            self.state.optimizer_stage = s
        if self.world > 1:
            # Re-wrapped per stage: DDP only syncs the parameters that train in this stage.
            self.ddp_model = torch.nn.parallel.DistributedDataParallel(
                self._train_model, device_ids=[self.device.index] if self.device.type == "cuda" else None
            )
        else:
            self.ddp_model = self._train_model

    def _stage_steps(self, s: int) -> int:
        st, sp = self.recipe.stages[s], self.plan.stages[s]
        return sum(steps_per_chunk(len(sp.chunk_ids(c)), st.batch_size, st.epochs_per_chunk, self.world) for c in range(sp.num_chunks))

    def restore(self) -> bool:
        """Load the newest committed checkpoint, if any, and record the interruption. True when resuming."""
        previous = _read_optional_json(fs.join(self.run_dir, PROGRESS_JSON))  # the last sign of life before the cut
        folders = checkpoints.list_folders(self.run_dir)
        self._taken = set(folders)
        if self.session.is_chief and folders:
            self._progress("restore", force=True)  # the driver's line (and bench.resume) sees the restore begin
        # From run storage, newest usable first, on both backends: Ray's own pick (its controller's
        # latest) may be the torn one, and a run whose Ray snapshot was set aside has none.
        loaded = checkpoints.load_newest_usable(self.run_dir, set_aside_unusable=self.recipe.execution.backend == "local"
                                                and self.session.is_chief)
        if self.session.is_chief:
            self._check_restart_progress(loaded[2].get("cursor", {}).get("global_step", 0) if loaded else 0)
        if loaded is None:
            return False
        _, sd, meta = loaded
        self.state.load_model_and_progress(sd)
        c = self.state.cursor
        if not c.done:
            if c.batch and sd.get("world_size", self.world) != self.world:
                # Batches are cut per rank; with another world size the cut moves, so the epoch restarts.
                log.warning("world size changed %s -> %s mid-chunk: restarting epoch %d of the chunk",
                            sd.get("world_size"), self.world, c.epoch)
                # The redone batches get new global steps, so the run ends that many steps later.
                self.progress.total_steps += c.batch
                c.batch = 0
            self.enter_stage(c.stage)
            self.state.load_optimizer(sd)
            self._record_interruption(meta, previous)
        if self.sink is not None:
            # Points this checkpoint carried may or may not have reached MLflow before the cut.
            self.sink.log_metrics(self.state.pending_metrics, dedupe=True)
            self.sink.resume({*self.task.metric_keys(self.task.info), *PERF_KEYS})
        # What MLflow did not take (it is down: workers/mlflow_sink.py) stays pending, so the
        # next checkpoint carries it again.
        self.state.pending_metrics[:] = self.sink.undelivered() if self.sink is not None else []
        log.warning("resumed from %s at %s", meta.get("name"), c)
        return True

    def _check_restart_progress(self, step: int) -> None:
        """Count this worker-group start against the restore point: Ray Train restarts a group that
        fails the same way (a chunk that OOMs) up to max_failures times, forever with -1. Starts of
        this driver attempt that all restore the same step mean no restart is helping."""
        uri = fs.join(self.run_dir, RESTARTS_JSON)
        starts = [r for r in (_read_optional_json(uri) or {}).get("starts", []) if r.get("attempt") == self.attempt]
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

    def _record_interruption(self, meta: dict[str, Any], previous: dict[str, Any] | None) -> None:
        c = self.state.cursor
        c.interruptions += 1
        if meta.get("reason") == "preemption":
            cause = "preemption notice"
        elif meta.get("reason") == "error":
            cause = "stopped on an error"
        elif meta.get("reason") == "interrupt":
            cause = "interrupted by the user"
        elif int(meta.get("attempt", self.attempt)) != self.attempt:
            cause = "driver lost"
        else:
            cause = "worker lost"
        now = time.time()
        last_step = int(previous["global_step"]) if previous else c.global_step
        last_alive = float(previous["updated_at"]) if previous else meta.get("saved_at", now)
        record = {
            "n": c.interruptions, "cause": cause, "resumed_at_step": c.global_step,
            "steps_lost": max(0, last_step - c.global_step),
            "time_lost_s": round(max(0.0, last_alive - meta.get("saved_at", last_alive)), 3),
            # Downtime only means something within one driver attempt; a re-run may come days later.
            "downtime_s": round(now - last_alive, 3) if cause not in ("driver lost", "interrupted by the user") else None,
            "at": now,
        }
        self.state.interruption_log.append(record)
        if self.sink is not None:
            self.sink.set_tags({f"orchestrator.interruption.{c.interruptions}": json.dumps(record, sort_keys=True)})

    # ------------------------------------------------------------------- loop
    def fit(self) -> None:
        if not self.restore():
            # A fresh run saves its starting point: whatever happens next (a diverged first stage,
            # a kill before the first interval), one checkpoint of finite weights exists.
            self.checkpoint("start")
        c = self.state.cursor
        while not c.done:
            s = c.stage
            if self.state.optimizer_stage != s:
                self.enter_stage(s)
            self.train_chunk(s, c.chunk)
        self.finish()

    @property
    def _contiguous(self) -> bool:
        # Chunks of whole row groups: each rank takes a run of neighbours, so it reads only its own groups.
        return self.recipe.data.chunking == "row_groups"

    def _mine(self, ids: np.ndarray) -> np.ndarray:
        return rank_slice(ids, self.world, self.rank, self._contiguous)

    def train_chunk(self, s: int, chunk: int) -> None:
        st: StageSection = self.recipe.stages[s]
        sp = self.plan.stages[s]
        c = self.state.cursor
        ids = sp.chunk_ids(chunk)
        self._progress("preload", force=True)
        t_chunk = time.perf_counter()
        mine = self._mine(ids)
        rows = self.prefetcher.get((s, chunk), mine)
        wait_s = time.perf_counter() - t_chunk
        nxt = self._next_chunk(s, chunk)
        if nxt is not None and self.recipe.data.prefetch:
            nids = self.plan.chunk_ids(*nxt)
            self.prefetcher.prefetch(nxt, self._mine(nids))
        check_sizes(rows, self.recipe.data.image_size, self.describe)
        _check_complete(rows, mine, self.describe)
        position = {int(sid): i for i, sid in enumerate(rows["sample_id"])}
        seed = self.recipe.run.seed
        while c.epoch < st.epochs_per_chunk:
            batches = batches_for_rank(ids, st.batch_size, self.world, self.rank, [seed, 3, s, chunk, c.epoch],
                                       contiguous=self._contiguous)
            todo = [[position[int(x)] for x in b] for b in batches[c.batch :]]
            samples = self.task.samples(rows, st.resolution, self.describe, train=True, flip_key=(seed, s, chunk, c.epoch))
            loader = make_loader(samples, batch_sampler=todo, num_workers=self.recipe.data.decode_workers,
                                 pin_memory=self.device.type == "cuda")
            self._progress("train", force=True)
            batches_left = iter(loader)
            while True:
                t0 = time.perf_counter()
                try:
                    batch = next(batches_left)
                except StopIteration:
                    break
                wait_s += time.perf_counter() - t0
                batch = self.task.to_device(batch, self.device)
                self._train_step(batch, st.forward)
                c.batch += 1
                c.global_step += 1
                c.samples_seen += len(batch.x) * self.world
                self.progress.rate.add(len(batch.x) * self.world)
                # The first step after a (re)start is reported at once: recovery time is measured to it.
                self._steps_this_process += 1
                _maybe_crash_for_tests(c.global_step)
                self._progress("train", force=self._steps_this_process == 1)
                self._ckpt_writer.poll()  # a background checkpoint that landed: its metrics go to MLflow now
                chunk_ends_now = c.epoch == st.epochs_per_chunk - 1 and c.batch == len(batches)
                failed = self.prefetcher.failure()
                if not isinstance(failed, FATAL_ERRORS):
                    failed = None  # any other error is raised, as before, when the chunk is needed
                notice = self.preemption.notice(c.global_step, fatal=failed is not None)
                if chunk_ends_now:
                    self._stop_at_chunk_end = (notice, failed) if notice else None
                    continue  # the chunk-end checkpoint follows at this very step
                if notice:
                    self.checkpoint(_stop_reason(notice))
                    self._stop(notice, failed)
                reason = self._agree(self.policy.reason(c.global_step))
                if reason:
                    self.checkpoint(reason)
            c.epoch += 1
            c.batch = 0
        # Share of the chunk's wall time spent waiting on storage and decode, not on compute.
        self._data_wait = wait_s / max(time.perf_counter() - t_chunk, 1e-9)
        self._end_chunk(s, chunk, len(ids))

    def _train_step(self, batch: Batch, path: str) -> None:
        """One optimizer step on a batch already on the device (the task's to_device)."""
        prec = self.precision
        with prec.autocast():
            out = self.task.forward(self.ddp_model, prec.prepare_input(batch.x), path)
        if prec.low:
            # Losses in fp32, outside autocast (which would run e.g. SSIM's convolutions in bf16/fp16).
            out = as_float(out)
        losses = self.task.losses(out, batch)
        loss = losses[0]
        opt = self.state.optimizer
        opt.zero_grad(set_to_none=True)
        scaler = self.state.scaler
        if scaler is None:
            loss.backward()
            opt.step()
        else:
            scaler.scale(loss).backward()
            scaler.step(opt)  # skips the update on inf/nan gradients (found on the device)
            scaler.update()
        sched = self.state.scheduler
        # A restarted epoch (the world size changed mid-chunk) adds steps the schedule did not
        # plan for; OneCycleLR raises past its last step, so it holds its final rate instead.
        if sched is not None and sched.last_epoch < getattr(sched, "total_steps", float("inf")):
            sched.step()
        if self.device.type == "xla":
            import torch_xla

            torch_xla.sync()  # cut the lazy graph at each step, as torch_xla's training loops do
        if self.session.is_chief:
            # Kept as tensors: a .item() per step would sync the GPU every step.
            self._loss_buf.append((self.state.cursor.global_step + 1, [t.detach() for t in losses]))
            if len(self._loss_buf) >= self._drain_every:
                self._drain_losses()

    def _drain_losses(self) -> None:
        if not self._loss_buf:
            return
        vals = torch.stack([torch.stack(list(v)) for _, v in self._loss_buf]).float().cpu().tolist()
        for (step, _), row in zip(self._loss_buf, vals, strict=True):
            self.state.pending_metrics += [(k, v, step) for k, v in zip(self.task.train_keys, row, strict=True)]
            if math.isfinite(row[0]):
                self._nonfinite_streak = 0
            else:
                self._nonfinite_streak += 1
                self._losses_finite = False
                if self._nonfinite_streak == 1:
                    self._first_nonfinite_step = step
        self._last_loss = vals[-1][0]
        self._loss_buf.clear()
        if self._nonfinite_streak >= self.recipe.execution.max_nonfinite_steps:
            raise self._diverged()

    def _diverged(self) -> DivergedError:
        c = self.state.cursor
        st = self.recipe.stages[min(c.stage, len(self.recipe.stages) - 1)]
        return DivergedError(
            f"training diverged in stage '{st.name}' (stages.{st.name}.lr = {st.lr:g}): the loss is not finite since step "
            f"{self._first_nonfinite_step} ({self._nonfinite_streak} in a row, execution.max_nonfinite_steps is "
            f"{self.recipe.execution.max_nonfinite_steps}); stopped at step {c.global_step} without saving it. The "
            f"checkpoints kept are from before it (all finite). Lower stages.{st.name}.lr and start the run under a new "
            "name (--set run.name=...): a changed recipe does not resume under the old one")

    def _end_chunk(self, s: int, chunk: int, n: int) -> None:
        st = self.recipe.stages[s]
        c = self.state.cursor
        self._progress("eval", force=True)
        metrics = self.evaluate(s)
        if self.session.is_chief:
            self.state.last_eval = metrics
            perf = {"perf/data_wait_fraction": self._data_wait, "perf/storage_retries": float(RETRY_COUNTER["retries"])}
            self.state.pending_metrics += [(k, v, c.global_step) for k, v in {**metrics, **perf}.items()]
        entry = self.state.chunk_entry(st.name, chunk)
        if entry is None:
            entry = {"stage": st.name, "chunk": chunk, "samples": n, "times_trained": 0}
            self.state.chunk_log.append(entry)
        entry["times_trained"] += 1
        entry["world_size"] = self.world
        entry["end_step"] = c.global_step
        last_chunk = chunk + 1 == self.plan.stages[s].num_chunks
        if last_chunk and self.session.is_chief:
            self.log_prediction_grid(s)
        c.chunk, c.epoch, c.batch = chunk + 1, 0, 0
        if last_chunk:
            c.stage, c.chunk = s + 1, 0
            c.done = c.stage == len(self.recipe.stages)
        stop = self._stop_at_chunk_end
        # The checkpoint's reason is what a resume reads to name the interruption's cause.
        self.checkpoint(_stop_reason(stop[0]) if stop else "chunk_end")
        if stop:
            self._stop(*stop)

    def _stop(self, notice: str, failed: BaseException | None) -> NoReturn:
        """End this attempt once the stop's checkpoint is saved. FATAL raises this rank's own error
        (the driver reads it and stops the run), or a plain one when only another rank failed; a
        preemption notice raises PreemptedError, and Ray Train restarts from the checkpoint."""
        # The stop's checkpoint is uploaded in the background: it must have landed (and its metrics
        # reached MLflow) before anything ends this attempt, on every rank (the chief uploads).
        self._ckpt_writer.wait()
        if self.world > 1:
            self.session.barrier()
        step = self.state.cursor.global_step
        if notice == FATAL:
            if failed is not None:
                raise failed
            raise RuntimeError(f"another rank cannot fetch its part of the next chunk; stopped at step {step}")
        if notice == INTERRUPT:
            raise StopRequested(step)
        from workers import gce_notice

        # How much of GCE's ~30 s the checkpoint took, from the metadata server's notice to landed.
        took = f" {time.monotonic() - gce_notice.noticed_at:.2f} s after the notice" if notice == GCE and gce_notice.noticed_at else ""
        raise PreemptedError(f"preemption notice ({notice}) at step {step}: checkpoint saved{took}, resuming from it")

    def _next_chunk(self, s: int, chunk: int) -> tuple[int, int] | None:
        if chunk + 1 < self.plan.stages[s].num_chunks:
            return s, chunk + 1
        if s + 1 < len(self.plan.stages):
            return s + 1, 0
        return None

    def _agree_flag(self, flag: bool) -> bool:
        """The chief's flag, on every rank (one broadcast; free with one worker)."""
        if self.world == 1:
            return flag
        t = torch.tensor([1 if flag else 0], device=self.device)
        torch.distributed.broadcast(t, src=0)
        return bool(t.item())

    def _agree(self, reason: str | None) -> str | None:
        """All ranks must checkpoint at the same step; the chief's clock decides."""
        if self.world == 1:
            return reason
        flag = torch.tensor([0 if reason is None else (1 if reason == "steps" else 2)], device=self.device)
        torch.distributed.broadcast(flag, src=0)
        return {0: None, 1: "steps", 2: "time"}[int(flag.item())]

    # -------------------------------------------------------------- eval/save
    @torch.no_grad()
    def evaluate(self, s: int) -> dict[str, float]:
        """Metrics on the held-out split at stage s's resolution (chief only; others wait)."""
        if not self.session.is_chief:
            self.session.barrier()
            return {}
        st = self.recipe.stages[s]
        model = self.state.model
        model.eval()
        acc = self.task.evaluator()
        for raw in self._eval_loader(st):
            batch = self.task.to_device(raw, self.device)
            acc.update(self.task.forward(model, batch.x, st.forward), batch)
        model.train()
        self.session.barrier()
        return acc.compute()

    def _eval_loader(self, st: StageSection) -> torch.utils.data.DataLoader:
        if self._eval_rows is None:
            self._eval_rows = self.dataset.read_samples(self.plan.eval_ids)
            check_sizes(self._eval_rows, self.recipe.data.image_size, self.describe)
            _check_complete(self._eval_rows, self.plan.eval_ids, self.describe)
        ds = self.task.samples(self._eval_rows, st.resolution, self.describe, train=False)
        return make_loader(ds, batch_size=st.batch_size, num_workers=self.recipe.data.decode_workers)

    def checkpoint(self, reason: str) -> None:
        """Save a checkpoint at this step. With `checkpoint.background` (the default) the state is
        snapshotted here, tensors copied to CPU memory, and serialized, written and uploaded on the
        writer's thread while training goes on (workers/checkpoint_writer.py); otherwise all of it
        happens here. Either way the previous checkpoint lands first (at most one upload in flight),
        a checkpoint counts once its meta.json (written last) has landed, and what must follow the
        commit follows it: cursor.json, then this checkpoint's metrics to MLflow (on this thread,
        at the next step's poll or at a wait), then the MLflow store copy."""
        c = self.state.cursor
        self._progress("checkpoint", force=True)
        if self.session.is_chief:
            self._drain_losses()
        # A rank-agreed decision, so that every rank stops together: never save after a non-finite loss.
        if self._agree_flag(self.session.is_chief and self._nonfinite_streak > 0):
            raise self._diverged() if self.session.is_chief else DivergedError("the chief found the loss not finite")
        name = checkpoints.fresh_name(c.global_step, self._taken)
        self._taken.add(name)
        metrics = {"global_step": c.global_step, "stage": c.stage, "chunk": c.chunk, "reason": reason}
        writer = self._ckpt_writer
        writer.wait()
        if not self.session.is_chief:
            self.session.report(metrics, None, name)
            self.policy.saved()
            return
        sd = self.state.state_dict()
        sd["world_size"] = self.world
        if writer.background:
            sd = writer.snapshot(sd)  # training mutates the live tensors in place from the next step on
        meta = {"name": name, "reason": reason, "cursor": dict(sd["cursor"]), "saved_at": time.time(), "attempt": self.attempt,
                "losses_finite": self._losses_finite}
        self._losses_finite = True
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
            fs.write_json(fs.join(self.run_dir, CURSOR_JSON), {"checkpoint": uri, **record, "updated_at": time.time()}, durable=True)
            if self.recipe.execution.backend == "ray":
                # What a kill left half-written before this one is removed now (in-process, commit
                # does it, with the retention Ray Train's own num_to_keep does here).
                checkpoints.apply_retention(self.run_dir, name, keep=0)
            return uri

        self.policy.saved()  # not due again while this one uploads
        writer.submit(work, lambda uri: self._checkpoint_landed(uri, carried), name=name)

    def _checkpoint_landed(self, uri: str | None, carried: list[tuple[str, float, int]]) -> None:
        """After a checkpoint committed, on the training thread: its metrics to MLflow, then (in
        the background, the writer's next job) the MLflow store copy."""
        self.policy.saved()  # the interval counts from the end of the save, as it did when saves were synchronous
        if self.sink is not None:
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
        if self.sink is not None:
            # MLflow down: the points it has not taken stay pending, oldest first, and every
            # checkpoint carries them until they land (the sink skips those it already sent).
            pending[:0] = self.sink.undelivered()
        if self.sink is not None and self._store_copy_uri is not None:
            # Local mode (sqlite): the run's MLflow records go to run storage with every checkpoint.
            # The copy is taken after this checkpoint's points reached the store, so it holds them;
            # the driver cannot know when that write has landed. A cut before the copy leaves the
            # previous one, one checkpoint behind: the resume re-sends this checkpoint's points from
            # the checkpoint itself (Trainer.restore), so none is lost. It reads the sqlite file
            # directly (no MLflow call), and the next checkpoint, a stop and the run's end wait for it.
            self._ckpt_writer.submit(self._copy_tracking_store, name="mlflow-store-copy")

    def _copy_tracking_store(self) -> None:
        if self._store_copy_uri is None:
            return
        try:
            tracking_store.save_copy(self._store_copy_uri, self.sink.run_id, self.run_dir)
        except StorageError as exc:  # training goes on; the previous copy (and the checkpoints) stand
            log.warning("could not copy the MLflow store into run storage: %s", exc)
        except Exception:  # noqa: BLE001 - sqlite or anything else: the same, with its traceback for a bug report
            log.warning("could not copy the MLflow store into run storage", exc_info=True)

    def log_prediction_grid(self, s: int) -> None:
        if self.sink is None:
            return
        st = self.recipe.stages[s]
        n = self.recipe.tracking.grid_samples
        model = self.state.model
        model.eval()
        with torch.no_grad():
            samples = self.task.samples(self._eval_rows, st.resolution, self.describe, train=False)
            batch = self.task.to_device(next(iter(make_loader(samples, batch_size=n))), self.device)
            out = self.task.forward(model, batch.x, st.forward).cpu()
            batch = Batch(batch.x.cpu(), tuple(t.cpu() for t in batch.targets))
        model.train()
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, f"stage{s + 1}-{st.name}.png")
            self.task.picture(batch, out, path)
            self.sink.log_artifact(path, "predictions")

    def finish(self) -> None:
        """Final record: weights hash, final eval, the model as an MLflow artifact."""
        self._ckpt_writer.wait()  # the final checkpoint (and its metrics) land before the run is called done
        if not self.session.is_chief:
            return
        model = self.state.model
        sha = checkpoints.weights_sha256(model.state_dict())
        names = checkpoints.list_complete(self.run_dir)
        final = {
            "checkpoint": fs.join(self.run_dir, names[-1]) if names else None,
            "weights_sha256": sha,
            "metrics": self.state.last_eval,
            "global_step": self.state.cursor.global_step,
        }
        if self.sink is not None:
            with tempfile.TemporaryDirectory() as tmp:
                p = os.path.join(tmp, "state_dict.pt")
                torch.save(model.state_dict(), p)
                self.sink.log_artifact(p, "model")
                with open(os.path.join(tmp, "final.json"), "w") as f:
                    json.dump(final, f, indent=2)
                self.sink.log_artifact(os.path.join(tmp, "final.json"))
            self.sink.set_tags({"orchestrator.weights_sha256": sha})
            self.sink.close()  # a bounded wait for an MLflow that is down; the run completes either way
        fs.write_json(fs.join(self.run_dir, FINAL_JSON), final)
        self._progress("done", force=True)

    def _progress(self, phase: str, force: bool = False) -> None:
        if not self.session.is_chief or not self.progress.due(force):
            return
        self._drain_losses()
        self.progress.write(phase, self.state.cursor, self._last_loss)

    def close(self) -> None:
        try:
            # On the way out after an error: a checkpoint under way still lands (a committed one is
            # always whole); its own failure is logged, not raised over the error being raised.
            self._ckpt_writer.close()
        finally:
            self.prefetcher.close()
            self.progress.close()


def _make_optimizer(recipe: Recipe, params: list[torch.nn.Parameter], lr: float, fused: bool = False) -> torch.optim.Optimizer:
    """fused: the fused kernels, which let GradScaler.step skip a step without a .item() (fp16 only:
    elsewhere the default implementation, so fp32 and bf16 weights stay what they always were)."""
    o = recipe.optimizer
    extra = {"fused": True} if fused else {}
    if o.name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=o.momentum, weight_decay=o.weight_decay, **extra)
    return torch.optim.AdamW(params, lr=lr, weight_decay=o.weight_decay, **extra)


# OneCycleLR divides by the length of its warm-up and its anneal phase; a stage of a handful of
# steps (a small subset of a big recipe's data) has no room for either, and gets a constant rate.
ONECYCLE_MIN_STEPS = 10


def _make_scheduler(opt: torch.optim.Optimizer, st: StageSection, total_steps: int) -> Any:
    if st.scheduler == "onecycle" and total_steps < ONECYCLE_MIN_STEPS:
        log.warning("stage %r has %d steps, too few for a one-cycle schedule: training at a constant lr %g",
                    st.name, total_steps, st.lr)
        return None
    if st.scheduler == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=st.lr, total_steps=max(total_steps, 1), pct_start=0.2)
    return None


def _check_complete(rows: dict[str, Any], ids: np.ndarray, describe: Any) -> None:
    """A run never silently trains on fewer samples than its plan says."""
    got = np.asarray(rows["sample_id"], dtype=np.int64)
    if len(got) != len(ids) or not np.array_equal(np.sort(got), np.sort(np.asarray(ids, dtype=np.int64))):
        missing = sorted(set(map(int, ids)) - set(map(int, got)))[:5]
        raise DataError(f"{describe(missing[0]) if missing else 'dataset'}: {len(ids) - len(got)} planned samples missing from the shards (e.g. {missing})")


def _maybe_crash_for_tests(step: int) -> None:
    """Fault injection for the restarts-without-progress test: the worker process dies (as an OOM
    kill would) each time it reaches this step. Unset in normal use."""
    if os.environ.get("ORCHESTRATOR_TEST_CRASH_AT_STEP") == str(step):
        os.kill(os.getpid(), 9)


def _read_optional_json(uri: str) -> dict[str, Any] | None:
    try:
        return fs.read_json(uri)
    except Exception:  # noqa: BLE001 - missing or torn: no information
        return None
