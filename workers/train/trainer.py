"""The trainer: the chunk loop and the step, the same in a Ray Train worker and in-process."""

from __future__ import annotations

import functools
import logging
import os
import time
from typing import Any, NamedTuple

import torch

from common.plan import Plan, batches_for_rank, rank_slice, steps_per_chunk
from common.recipe import Recipe, StageSection
from storage import checkpoints, fs
from storage.layout import FINAL_JSON, PROGRESS_JSON
from storage.plans import load_plan
from storage.retry import RETRY_COUNTER
from storage.shards import open_dataset
from workers.data import ChunkPrefetcher, check_sizes, make_loader, stream_order
from workers.models.registry import build_from_recipe
from workers.precision import Precision, as_float
from workers.preemption import PreemptionMonitor, StopRequestWatch
from workers.progress import ProgressWriter
from workers.session import Session, configure_threads
from workers.state import TrainState
from workers.tasks import Batch, get_task
from workers.train import stops
from workers.train.checkpointer import Checkpointer, read_optional_json
from workers.train.divergence import LossWatch
from workers.train.evaluation import Evaluator, check_complete
from workers.train.interruptions import record_interruption
from workers.train.optim import make_optimizer, make_scheduler, trainable_params
from workers.train.sink import log_final, open_sink
from workers.train.stops import Stop
from workers.windows import Windows

log = logging.getLogger(__name__)

PERF_KEYS = ("perf/data_wait_fraction", "perf/storage_retries")


class Trainer:
    """Advances the run through its plan (stage, chunk, epoch, batch) one optimizer step at a time,
    and asks at each step: the stop monitor whether to stop (`stops.ask`), the checkpointer whether
    and when to save (`Checkpointer.should_save`). It decides neither; what survives a preemption
    is its `TrainState`, what leaves the process goes through the checkpointer (checkpoints) and the
    sink (metrics and pictures, only once the checkpoint holding them has committed)."""

    def __init__(self, recipe: Recipe, config: dict[str, Any], session: Session) -> None:
        self.recipe, self.session = recipe, session
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
        # The batch order's shuffle mode comes from the plan (a run keeps the one it started with).
        self.windows = Windows(self.dataset, self.plan, recipe)
        self.task = get_task(recipe.task)(recipe, config["task_info"])
        model = build_from_recipe(recipe.model, **self.task.model_kwargs()).to(self.device)
        # Precision, memory format, compilation: resolved once for this device (workers/precision.py).
        self.precision = Precision.resolve(recipe.execution, self.device, model)
        # `model` stays the un-compiled module: its state_dict is what checkpoints hold, either way.
        self._train_model = self.precision.prepare_model(model)
        self.state = TrainState(model=model, scaler=self.precision.make_scaler())
        self.ddp_model: torch.nn.Module = self._train_model
        self.attempt = int(config.get("attempt", 1))
        # The driver's stop request (Ctrl-C) is looked for by the chief only; the ranks agree in notice().
        stop = StopRequestWatch(self.run_dir if session.is_chief else None, self.attempt)
        self.preemption = PreemptionMonitor(recipe.execution.backend, self.world, self.device,
                                            recipe.checkpoint.preemption_poll_steps, stop=stop)
        self.sink = open_sink(config, session.is_chief)
        self.sink.set_tags(self.precision.tags())
        self.losses = LossWatch(recipe, self.state, self.task.train_keys)
        self.checkpointer = Checkpointer(recipe, config, session, self.state, self.losses, self.sink)
        self.evaluator = Evaluator(recipe, self.plan, self.dataset, self.task, session, self.sink)
        self._data_wait = 0.0
        self._steps_this_process = 0
        total_steps = sum(stage_steps(recipe, self.plan, s, self.world) for s in range(len(recipe.stages)))
        self.progress = ProgressWriter(self.run_dir, [st.name for st in recipe.stages],
                                       [sp.num_chunks for sp in self.plan.stages], total_steps, session.node_id)
        self.progress.precision = self.precision.describe()  # the driver shows it once, from progress.json

    def enter_stage(self, s: int) -> None:
        """Freeze/unfreeze for stage s, and build its optimizer and schedule if not built yet."""
        st = self.recipe.stages[s]
        params = trainable_params(self.state.model, st.trainable)
        if self.state.optimizer_stage != s:
            # With fp16's scaler, a fused optimizer takes the inf check on the device: no host sync per step.
            opt = make_optimizer(self.recipe, params, st.lr, fused=self.state.scaler is not None)
            self.state.optimizer = opt
            self.state.scheduler = make_scheduler(opt, st, stage_steps(self.recipe, self.plan, s, self.world))
            self.state.optimizer_stage = s
        self.ddp_model = self._train_model
        if self.world > 1:  # re-wrapped per stage: DDP only syncs the parameters that train in this stage
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.ddp_model = torch.nn.parallel.DistributedDataParallel(self._train_model, device_ids=ids)

    def restore(self) -> bool:
        """Load the newest usable checkpoint, if any, and record the interruption. True when resuming."""
        previous = read_optional_json(fs.join(self.run_dir, PROGRESS_JSON))  # the last sign of life before the cut
        if self.checkpointer.scan():
            self._progress("restore", force=True)  # the driver's line (and bench.resume) sees the restore begin
        loaded = self.checkpointer.load()
        if loaded is None:
            return False
        sd, meta = loaded
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
            record_interruption(self.state, meta, previous, self.attempt, self.sink)
        # Points this checkpoint carried may or may not have reached MLflow before the cut.
        self.sink.log_metrics(self.state.pending_metrics, dedupe=True)
        self.sink.resume({*self.task.metric_keys(self.task.info), *PERF_KEYS})
        # What MLflow did not take (it is down: workers/mlflow_sink.py) stays pending, so the
        # next checkpoint carries it.
        self.state.pending_metrics[:] = self.sink.undelivered()
        log.warning("resumed from %s at %s", meta.get("name"), c)
        return True

    def fit(self) -> None:
        if not self.restore():
            # A fresh run saves its starting point: whatever happens next (a diverged first stage,
            # a kill before the first interval), one checkpoint of finite weights exists.
            self.checkpoint("start")
        c = self.state.cursor
        while not c.done:
            if self.state.optimizer_stage != c.stage:
                self.enter_stage(c.stage)
            self.train_chunk(c.stage, c.chunk)
        self.finish()

    def _chunk_read(self, s: int, chunk: int, epoch: int = 0, start: int = 0) -> _ChunkRead:
        """What this rank reads of chunk (s, chunk) when training takes it up at (epoch, batch
        `start`): one place for train_chunk's read and the next chunk's prefetch."""
        ids = self.plan.stages[s].chunk_ids(chunk)
        contiguous = self.recipe.data.chunking == "row_groups"  # each rank reads only its own row groups
        order_of = functools.partial(batch_order, self.recipe.run.seed, self.world, self.rank, contiguous)
        mine = rank_slice(ids, self.world, self.rank, contiguous)
        bs = self.recipe.stages[s].batch_size
        win = self.windows.order(mine, len(ids), bs, self.world)
        batches = order_of(ids, bs, (s, chunk, epoch), win)[start:]
        return _ChunkRead(ids, mine, win, order_of, stream_order(mine, batches))

    def train_chunk(self, s: int, chunk: int) -> None:
        st: StageSection = self.recipe.stages[s]
        c, seed = self.state.cursor, self.recipe.run.seed
        self._progress("preload", force=True)
        t_chunk = time.perf_counter()
        read = self._chunk_read(s, chunk, c.epoch, c.batch)
        ids, mine, win, order_of = read.ids, read.mine, read.windows, read.order_of
        rows = self.prefetcher.get((s, chunk), mine, *read.stream)
        wait_s = time.perf_counter() - t_chunk
        nxt = next_chunk(self.plan, s, chunk)
        if nxt is not None and self.recipe.data.prefetch:
            ahead = self._chunk_read(*nxt)
            self.prefetcher.prefetch(nxt, ahead.mine, *ahead.stream)
        check_sizes(rows, self.recipe.data.image_size, self.dataset.describe)
        check_complete(rows, mine, self.dataset.describe)
        position = {int(sid): i for i, sid in enumerate(rows["sample_id"])}
        held: Stop | None = None  # a stop on the chunk's last step: the chunk-end checkpoint stands in for its own
        while c.epoch < st.epochs_per_chunk:
            batches = order_of(ids, st.batch_size, (s, chunk, c.epoch), win)
            todo = [[position[int(x)] for x in b] for b in batches[c.batch :]]
            samples = self.task.samples(rows, st.resolution, self.dataset.describe, train=True,
                                        flip_key=(seed, s, chunk, c.epoch))
            loader = make_loader(samples, batch_sampler=todo, num_workers=self.recipe.data.decode_workers,
                                 pin_memory=self.device.type == "cuda")
            self._progress("train", force=True)
            batches_left = iter(loader)
            while True:
                t0 = time.perf_counter()
                batch = next(batches_left, None)
                if batch is None:
                    break
                wait_s += time.perf_counter() - t0
                batch = self.task.to_device(batch, self.device)
                self._train_step(batch, st.forward)
                c.batch, c.global_step = c.batch + 1, c.global_step + 1
                c.samples_seen += len(batch.x) * self.world
                self.progress.rate.add(len(batch.x) * self.world)
                # The first step after a (re)start is reported at once: recovery time is measured to it.
                self._steps_this_process += 1
                _maybe_crash_for_tests(c.global_step)
                self._progress("train", force=self._steps_this_process == 1)
                if self._steps_this_process == 1:
                    self.sink.connect()  # MLflow's client, made in the background from here (mlflow_sink.py)
                self.checkpointer.poll()  # a background checkpoint that landed: its metrics go to MLflow now
                stop = stops.ask(self.preemption, self.prefetcher, c.global_step)
                if c.epoch == st.epochs_per_chunk - 1 and c.batch == len(batches):
                    held = stop
                    continue  # the chunk-end checkpoint follows at this very step
                reason = self.checkpointer.should_save(c.global_step, stop)
                if reason:
                    self.checkpoint(reason)
                if stop:
                    self._halt(stop)
            c.epoch, c.batch = c.epoch + 1, 0
        # Share of the chunk's wall time spent waiting on storage and decode, not on compute.
        self._data_wait = wait_s / max(time.perf_counter() - t_chunk, 1e-9)
        self._end_chunk(s, chunk, len(ids), held)

    def _train_step(self, batch: Batch, path: str) -> None:
        """One optimizer step on a batch already on the device (the task's to_device)."""
        prec = self.precision
        with prec.autocast():
            out = self.task.forward(self.ddp_model, prec.prepare_input(batch.x), path)
        if prec.low:
            # Losses in fp32, outside autocast (which would run e.g. SSIM's convolutions in bf16/fp16).
            out = as_float(out)
        losses = self.task.losses(out, batch)
        opt, scaler, sched = self.state.optimizer, self.state.scaler, self.state.scheduler
        opt.zero_grad(set_to_none=True)
        if scaler is None:
            losses[0].backward()
            opt.step()
        else:
            scaler.scale(losses[0]).backward()
            scaler.step(opt)  # skips the update on inf/nan gradients (found on the device)
            scaler.update()
        # A restarted epoch (the world size changed mid-chunk) adds steps the schedule did not
        # plan for; OneCycleLR raises past its last step, so it holds its final rate instead.
        if sched is not None and sched.last_epoch < getattr(sched, "total_steps", float("inf")):
            sched.step()
        if self.device.type == "xla":
            import torch_xla

            torch_xla.sync()  # cut the lazy graph at each step, as torch_xla's training loops do
        if self.session.is_chief:
            self.losses.add(self.state.cursor.global_step + 1, losses)

    def _end_chunk(self, s: int, chunk: int, n: int, stop: Stop | None) -> None:
        st, c = self.recipe.stages[s], self.state.cursor
        self._progress("eval", force=True)
        metrics = self.evaluator.evaluate(self.state.model, st)
        if self.session.is_chief:
            self.state.last_eval = metrics
            mem = self.prefetcher.memory()  # the chunk memory budget (workers/spool.py) and what it held
            perf = {"perf/data_wait_fraction": self._data_wait, "perf/storage_retries": float(RETRY_COUNTER["retries"]),
                    "perf/chunk_ram_mb": mem["peak_ram_bytes"] / 2**20,
                    "perf/chunk_spilled_mb": mem["spilled_bytes"] / 2**20,
                    "perf/chunk_budget_mb": mem["budget_bytes"] / 2**20}
            self.state.pending_metrics += [(k, v, c.global_step) for k, v in {**metrics, **perf}.items()]
        entry = self.state.chunk_entry(st.name, chunk)
        if entry is None:
            entry = {"stage": st.name, "chunk": chunk, "samples": n, "times_trained": 0}
            self.state.chunk_log.append(entry)
        entry.update(times_trained=entry["times_trained"] + 1, world_size=self.world, end_step=c.global_step)
        last_chunk = chunk + 1 == self.plan.stages[s].num_chunks
        if last_chunk and self.session.is_chief:
            self.evaluator.log_prediction_grid(self.state.model, s)
        c.chunk, c.epoch, c.batch = chunk + 1, 0, 0
        if last_chunk:
            c.stage, c.chunk = s + 1, 0
            c.done = c.stage == len(self.recipe.stages)
        # The checkpoint's reason is what a resume reads to name the interruption's cause.
        self.checkpoint(self.checkpointer.should_save(c.global_step, stop, chunk_end=True))
        if stop:
            self._halt(stop)

    def _halt(self, stop: Stop) -> None:
        """End this attempt, the stop's checkpoint (just asked for) landed on every rank."""
        self.checkpointer.settle()
        stop.end(self.state.cursor.global_step)

    def checkpoint(self, reason: str) -> None:
        """Save a checkpoint at this step (Checkpointer.save); progress.json says so first."""
        self._progress("checkpoint", force=True)
        self.checkpointer.save(reason)

    def finish(self) -> None:
        """Final record: weights hash, final eval, the model as an MLflow artifact."""
        self.checkpointer.wait()  # the final checkpoint (and its metrics) land before the run is called done
        if not self.session.is_chief:
            return
        model = self.state.model
        sha = checkpoints.weights_sha256(model.state_dict())
        final = {"checkpoint": self.checkpointer.newest(), "weights_sha256": sha, "metrics": self.state.last_eval,
                 "global_step": self.state.cursor.global_step}
        log_final(self.sink, model, final)
        fs.write_json(fs.join(self.run_dir, FINAL_JSON), final)
        self._progress("done", force=True)

    def _progress(self, phase: str, force: bool = False) -> None:
        if not self.session.is_chief or not self.progress.due(force):
            return
        self.losses.drain()
        self.progress.write(phase, self.state.cursor, self.losses.last_loss)

    def close(self) -> None:
        try:
            self.checkpointer.close()
        finally:
            self.prefetcher.close()
            self.progress.close()


def stage_steps(recipe: Recipe, plan: Plan, s: int, world: int) -> int:
    """The optimizer steps of stage s at this world size (its schedule's length)."""
    st, sp = recipe.stages[s], plan.stages[s]
    return sum(steps_per_chunk(len(sp.chunk_ids(c)), st.batch_size, st.epochs_per_chunk, world)
               for c in range(sp.num_chunks))


class _ChunkRead(NamedTuple):
    ids: Any  # the chunk's sample ids (every rank's)
    mine: Any  # this rank's slice of them: what it reads
    windows: Any  # the plan's window keys of that slice (workers/windows.py), or None
    order_of: Any  # (ids, batch_size, (stage, chunk, epoch), windows) -> this rank's batches of an epoch
    stream: tuple  # stream_order(mine, the batches from the cursor on): what the prefetcher streams by


def batch_order(seed: int, world: int, rank: int, contiguous: bool, ids: Any, batch_size: int,
                at: tuple[int, int, int], windows: Any = None) -> list:
    """A rank's batches of one epoch of a chunk (at = stage, chunk, epoch): the order training takes them,
    and so the order the chunk streams in (workers/chunks.py). `windows`: the plan's window keys of
    the rank's slice (workers/windows.py), None when the plan shuffles whole chunks."""
    return batches_for_rank(ids, batch_size, world, rank, [seed, 3, *at], contiguous=contiguous, windows=windows)


def next_chunk(plan: Plan, s: int, chunk: int) -> tuple[int, int] | None:
    """(stage, chunk) of the chunk after this one in the plan, or None after the last."""
    if chunk + 1 < plan.stages[s].num_chunks:
        return s, chunk + 1
    if s + 1 < len(plan.stages):
        return s + 1, 0
    return None


def _maybe_crash_for_tests(step: int) -> None:
    """Fault injection for tests, unset in normal use. ORCHESTRATOR_TEST_CRASH_AT_STEP: the worker
    process dies (as an OOM kill would) each time it reaches this step. ORCHESTRATOR_TEST_STEP_DELAY_S:
    each step takes that much longer, so a test's interrupt lands mid-chunk on any machine (a tiny
    model's chunk can train faster than the chief's 0.5 s look for a stop request)."""
    if os.environ.get("ORCHESTRATOR_TEST_CRASH_AT_STEP") == str(step):
        os.kill(os.getpid(), 9)
    delay = os.environ.get("ORCHESTRATOR_TEST_STEP_DELAY_S")
    if delay:
        time.sleep(float(delay))
