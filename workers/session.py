"""The worker's view of its execution backend: rank, device, checkpoint restore and report.

`RaySession` goes through Ray Train (`ray.train.report`, `ray.train.get_checkpoint`);
`LocalSession` runs the same loop in-process with no cluster, committing checkpoints to run
storage itself. The loop only talks to this interface.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from typing import Any

import torch

from storage import checkpoints, fs


class Session:
    world_rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")
    node_id: str | None = None

    @property
    def is_chief(self) -> bool:
        return self.world_rank == 0

    def restore_dir(self) -> contextlib.AbstractContextManager[str | None]:
        raise NotImplementedError

    def report(self, metrics: dict[str, Any], checkpoint_dir: str | None, name: str) -> str | None:
        """Persist a checkpoint (chief only) and return its URI in run storage."""
        raise NotImplementedError

    def barrier(self) -> None:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.barrier()


class LocalSession(Session):
    """In-process, one worker, no Ray: checkpoints are committed to run storage directly."""

    def __init__(self, run_dir: str, keep: int) -> None:
        self.run_dir = run_dir
        self.keep = keep

    @contextlib.contextmanager
    def restore_dir(self) -> Iterator[str | None]:
        names = checkpoints.list_complete(self.run_dir)
        if not names:
            yield None
            return
        with tempfile.TemporaryDirectory() as tmp:
            yield checkpoints.download(fs.join(self.run_dir, names[-1]), tmp)

    def report(self, metrics: dict[str, Any], checkpoint_dir: str | None, name: str) -> str | None:
        if checkpoint_dir is None:
            return None
        return checkpoints.commit(checkpoint_dir, self.run_dir, name, self.keep)


class RaySession(Session):
    """Inside a Ray Train worker."""

    def __init__(self, run_dir: str, use_tpu: bool = False) -> None:
        import ray
        import ray.train
        import ray.train.torch

        ctx = ray.train.get_context()
        self.run_dir = run_dir
        self.world_rank = ctx.get_world_rank()
        self.world_size = ctx.get_world_size()
        self.device = xla_device() if use_tpu else ray.train.torch.get_device()
        self.node_id = ray.get_runtime_context().get_node_id()

    @contextlib.contextmanager
    def restore_dir(self) -> Iterator[str | None]:
        import ray.train

        ckpt = ray.train.get_checkpoint()
        if ckpt is None:
            yield None
            return
        with ckpt.as_directory() as d:
            yield d

    def report(self, metrics: dict[str, Any], checkpoint_dir: str | None, name: str) -> str | None:
        import ray.train

        ckpt = ray.train.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        ray.train.report(metrics, checkpoint=ckpt, checkpoint_dir_name=name)
        if ckpt is None:
            return None
        # report() returns once the files are uploaded, but the controller registers the
        # checkpoint later; a driver lost in between resumes from the previous one. Wait for the
        # commit, so whatever the caller does next (send metrics to MLflow) follows a durable state.
        ray.train.get_all_reported_checkpoints(consistency_mode=ray.train.CheckpointConsistencyMode.COMMITTED)
        return fs.join(self.run_dir, name)


def xla_device():
    """The TPU as a torch device. The TPU path is kept minimal and is untested here (no TPU,
    and no torch_xla wheel matches torch 2.13): one process per TPU host, no XLA SPMD."""
    try:
        import torch_xla
    except ImportError:
        raise RuntimeError("execution.use_tpu is set but torch_xla is not installed on this worker; "
                           "install the torch_xla release that matches its torch version") from None
    return torch_xla.device()


def make_session(backend: str, run_dir: str, keep: int, use_tpu: bool = False) -> Session:
    if backend == "ray":
        return RaySession(run_dir, use_tpu)
    return LocalSession(run_dir, keep)


def configure_threads(n: int) -> None:
    if n > 0:
        torch.set_num_threads(n)
        os.environ.setdefault("OMP_NUM_THREADS", str(n))
