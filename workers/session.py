"""The worker's view of its execution backend: rank, device and checkpoint report.

Restores read run storage directly (storage/checkpoints.py `load_newest_usable`) on both backends.
`RaySession` goes through Ray Train (`ray.train.report`);
`LocalSession` runs the same loop in-process with no cluster, committing checkpoints to run
storage itself. The loop only talks to this interface.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
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

    def report(self, metrics: dict[str, Any], checkpoint_dir: str | None, name: str) -> str | None:
        """Persist a checkpoint (chief only) and return its URI in run storage."""
        raise NotImplementedError

    def start_upload(self, metrics: dict[str, Any], name: str, write: Callable[[str], None]) -> Callable[[], str]:
        """Begin a background checkpoint (chief only; the other ranks call `report(metrics, None, name)`
        at the same step). What must happen on the training thread happens here; the returned
        function does the rest (`write(local_dir)` serializes the checkpoint into a new local folder,
        then the upload, meta.json last, and the wait for the commit), may run on another thread,
        and returns the checkpoint's URI once committed."""
        raise NotImplementedError

    def barrier(self) -> None:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.barrier()


class LocalSession(Session):
    """In-process, one worker, no Ray: checkpoints are committed to run storage directly."""

    def __init__(self, run_dir: str, keep: int) -> None:
        self.run_dir = run_dir
        self.keep = keep

    def report(self, metrics: dict[str, Any], checkpoint_dir: str | None, name: str) -> str | None:
        if checkpoint_dir is None:
            return None
        return checkpoints.commit(checkpoint_dir, self.run_dir, name, self.keep)

    def start_upload(self, metrics: dict[str, Any], name: str, write: Callable[[str], None]) -> Callable[[], str]:
        def upload() -> str:
            tmp = tempfile.mkdtemp(prefix="orch-ckpt-")
            try:
                write(tmp)
                return checkpoints.commit(tmp, self.run_dir, name, self.keep)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)

        return upload


COMMIT_POLL_S = 2.0  # how long one wait for Ray Train's commit of a background checkpoint lasts


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

    def start_upload(self, metrics: dict[str, Any], name: str, write: Callable[[str], None]) -> Callable[[], str]:
        """Ray Train's own asynchronous upload (`CheckpointUploadMode.ASYNC`), called on the training
        thread like every report: it syncs the folder name across ranks (a collective, which must
        keep its order against the loop's other collectives, so it cannot move to another thread),
        then uploads on Ray's upload thread. ASYNC alone expects the folder already written, which
        would leave torch.save of the whole state on the training thread; so the folder starts
        empty and `checkpoint_upload_fn` fills it (`write`) on Ray's upload thread before the
        default upload (the run's storage filesystem, meta.json last). The returned function waits
        for the controller's commit, the rule `report` keeps."""
        import ray.train

        local = tempfile.mkdtemp(prefix="orch-ckpt-")
        failed: list[BaseException] = []

        def write_then_upload(ckpt: Any, dir_name: str) -> Any:
            try:
                write(ckpt.path)
                # The default upload, as SYNC and ASYNC do without an upload function (a DeveloperAPI).
                return ray.train.get_context().get_storage().persist_current_checkpoint(ckpt, dir_name)
            except BaseException as exc:
                failed.append(exc)  # Ray raises it in the training thread too; the wait below stops on it
                raise

        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(local), checkpoint_dir_name=name,
                         checkpoint_upload_mode=ray.train.CheckpointUploadMode.ASYNC,
                         delete_local_checkpoint_after_upload=True, checkpoint_upload_fn=write_then_upload)

        def committed() -> str:
            try:
                while True:
                    # Blocks until this report is committed, or the timeout: then look again, so an
                    # upload that failed ends the wait instead of holding it forever.
                    reported = ray.train.get_all_reported_checkpoints(
                        consistency_mode=ray.train.CheckpointConsistencyMode.COMMITTED, timeout_s=COMMIT_POLL_S)
                    if any(os.path.basename(r.checkpoint.path.rstrip("/")) == name for r in reported if r.checkpoint):
                        return fs.join(self.run_dir, name)
                    if failed:
                        raise RuntimeError(f"checkpoint {name}: upload to {self.run_dir} failed: "
                                           f"{failed[0]}") from failed[0]
            finally:
                shutil.rmtree(local, ignore_errors=True)  # Ray deletes it after a successful upload

        return committed


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
