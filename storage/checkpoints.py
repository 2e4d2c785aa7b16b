"""Checkpoint files: one state file plus a meta.json carrying its sha256 (written last).

Both backends name checkpoint folders `ckpt-<global step>` under the run directory: Ray Train
persists them through `ray.train.report(checkpoint_dir_name=...)`; the in-process backend
commits them here, with the same completion rule.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import shutil
from typing import Any

import pyarrow.fs as pafs
import torch

from storage import fs

log = logging.getLogger(__name__)

STATE_FILE = "state.pt"
META_FILE = "meta.json"  # written last: a folder without it is an abandoned partial write
PREFIX = "ckpt-"


class CheckpointCorruptError(RuntimeError):
    """A checkpoint whose state file does not match its recorded checksum."""


def checkpoint_name(global_step: int) -> str:
    return f"{PREFIX}{global_step:09d}"


def write_local(directory: str, state: dict[str, Any], meta: dict[str, Any]) -> None:
    """Serialize `state` into a local folder; meta.json records the state file's sha256."""
    os.makedirs(directory, exist_ok=True)
    buf = io.BytesIO()
    torch.save(state, buf)
    data = buf.getbuffer()  # no copy of the bytes: a checkpoint is hundreds of MB (written in the background, see workers/checkpoint_writer.py)
    with open(os.path.join(directory, STATE_FILE), "wb") as f:
        f.write(data)
    digest = hashlib.sha256(data).hexdigest()
    data.release()
    fs.write_json(os.path.join(directory, META_FILE), {**meta, "state_sha256": digest})


def read_local(directory: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(state, meta) from a local checkpoint folder, verifying the checksum first."""
    meta = fs.read_json(os.path.join(directory, META_FILE))
    with open(os.path.join(directory, STATE_FILE), "rb") as f:
        data = f.read()
    if hashlib.sha256(data).hexdigest() != meta.get("state_sha256"):
        raise CheckpointCorruptError(f"{directory}: state.pt does not match the sha256 in meta.json")
    # weights_only: a checkpoint from storage must never run code on load.
    state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    return state, meta


def list_complete(run_dir: str) -> list[str]:
    """Names of complete checkpoints under `run_dir`, oldest first."""
    names = [n for n in fs.listdir(run_dir) if n.startswith(PREFIX) and not n.endswith(".tmp")]
    return [n for n in sorted(names) if fs.exists(fs.join(run_dir, n, META_FILE))]


def commit(local_dir: str, run_dir: str, name: str, keep: int) -> str:
    """Copy a local checkpoint folder into run storage (meta.json last), then apply retention."""
    dest = fs.join(run_dir, name)
    for fname in sorted(os.listdir(local_dir), key=lambda n: n == META_FILE):
        if fname == META_FILE:
            _maybe_pause_for_tests(name)
        with open(os.path.join(local_dir, fname), "rb") as f:
            fs.write_bytes(fs.join(dest, fname), f.read())
    for old in list_complete(run_dir)[:-keep]:
        try:
            fs.remove(fs.join(run_dir, old), recursive=True)
        except Exception as exc:  # noqa: BLE001 - a failed purge must not fail training
            log.warning("could not delete old checkpoint %s: %s", old, exc)
    return dest


def _maybe_pause_for_tests(name: str) -> None:
    """Fault injection for the kill-mid-checkpoint test: hold the write of one named checkpoint
    between its state file and its completion marker. Unset in normal use."""
    if os.environ.get("ORCHESTRATOR_TEST_PAUSE_CHECKPOINT") == name:
        import time

        time.sleep(float(os.environ.get("ORCHESTRATOR_TEST_PAUSE_S", "60")))


def pausing_local_filesystem() -> Any:
    """Fault injection for the kill-mid-checkpoint test on Ray: a local pyarrow filesystem whose
    writes hold, like `commit` above, before the named checkpoint's completion marker. Ray Train
    uploads checkpoint folders itself; this puts the pause inside that upload. None in normal use."""
    if not os.environ.get("ORCHESTRATOR_TEST_PAUSE_CHECKPOINT"):
        return None
    return pafs.PyFileSystem(_PauseBeforeMarker(fs.filesystem("file:///")[0]))


class _PauseBeforeMarker(pafs.FSSpecHandler):
    def open_output_stream(self, path: str, metadata: Any) -> Any:
        if os.path.basename(path) == META_FILE:
            _maybe_pause_for_tests(os.path.basename(os.path.dirname(path)))
        return super().open_output_stream(path, metadata)


def download(uri: str, local_dir: str) -> str:
    """Fetch a checkpoint folder from run storage into `local_dir`."""
    if fs.is_local(uri):
        return fs.normalize(uri)
    os.makedirs(local_dir, exist_ok=True)
    for fname in (STATE_FILE, META_FILE):
        with open(os.path.join(local_dir, fname), "wb") as f:
            f.write(fs.read_bytes(fs.join(uri, fname)))
    return local_dir


def read_meta(run_dir: str, name: str) -> dict[str, Any]:
    return fs.read_json(fs.join(run_dir, name, META_FILE))


def weights_sha256(state_dict: dict[str, torch.Tensor]) -> str:
    """sha256 over the state_dict, keys sorted, each tensor's contiguous CPU bytes (CONTRACT.md)."""
    h = hashlib.sha256()
    for key in sorted(state_dict):
        t = state_dict[key].detach().cpu().contiguous().reshape(-1)
        h.update(t.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def clear_local(directory: str) -> None:
    shutil.rmtree(directory, ignore_errors=True)
