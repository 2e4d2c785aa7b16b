"""Checkpoint files: one state file plus a meta.json carrying its sha256 (written last).

Both backends name checkpoint folders `ckpt-<global step>` under the run directory: Ray Train
persists them through `ray.train.report(checkpoint_dir_name=...)`; the in-process backend
commits them here, with the same completion rule.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import pickle
import re
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
    """A checkpoint that cannot be resumed from, whatever the storage says: a torn or empty
    meta.json, a state file missing or not matching its checksum, or one `weights_only` refuses.
    Storage that does not answer is not this: that raises StorageError, and nothing is skipped."""


def checkpoint_name(global_step: int) -> str:
    return f"{PREFIX}{global_step:09d}"


# `ckpt-<step>`, or `ckpt-<step>-r<n>` for a step saved again after a resume from an older
# checkpoint (the newer one at that step was unusable): a name is never reused, because Ray
# Train's checkpoint manager would otherwise delete the new folder along with the old entry.
_NAME = re.compile(rf"^{PREFIX}(\d+)(?:-r(\d+))?$")


def step_of(name: str) -> int | None:
    """The global step a checkpoint folder is named for; None for anything else in the run dir."""
    m = _NAME.match(name)
    return int(m.group(1)) if m else None


def _order(name: str) -> tuple[int, int]:
    m = _NAME.match(name)
    return int(m.group(1)), int(m.group(2) or 0)


def fresh_name(global_step: int, taken: set[str]) -> str:
    """The folder name for a new checkpoint at this step: `checkpoint_name`, unless a folder of
    that name exists (an unusable checkpoint a resume skipped), then the next free `-r<n>`."""
    name = checkpoint_name(global_step)
    n = 0
    while name in taken:
        n += 1
        name = f"{checkpoint_name(global_step)}-r{n}"
    return name


def write_local(directory: str, state: dict[str, Any], meta: dict[str, Any]) -> None:
    """Serialize `state` into a local folder; meta.json records the state file's sha256."""
    os.makedirs(directory, exist_ok=True)
    buf = io.BytesIO()
    torch.save(state, buf)
    # no copy of the bytes: a checkpoint is hundreds of MB (written in the background, see workers/checkpoint_writer.py)
    data = buf.getbuffer()
    with open(os.path.join(directory, STATE_FILE), "wb") as f:
        f.write(data)
    digest = hashlib.sha256(data).hexdigest()
    data.release()
    fs.write_json(os.path.join(directory, META_FILE), {**meta, "state_sha256": digest})


def read_local(directory: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(state, meta) from a local checkpoint folder, verifying the checksum first.

    Raises CheckpointCorruptError, with the reason, for a checkpoint no retry can make usable."""
    try:
        meta = json.loads(fs.read_bytes(os.path.join(directory, META_FILE)))
        if not isinstance(meta, dict):
            raise ValueError("not a JSON object")
    except FileNotFoundError:
        raise CheckpointCorruptError("meta.json is missing") from None
    except ValueError as exc:  # a Drive sync or a threaded upload lands small files first: empty or torn
        raise CheckpointCorruptError(f"meta.json is empty or torn ({type(exc).__name__})") from None
    try:
        data = fs.read_bytes(os.path.join(directory, STATE_FILE))
    except FileNotFoundError:
        raise CheckpointCorruptError("state.pt is missing") from None
    if hashlib.sha256(data).hexdigest() != meta.get("state_sha256"):
        raise CheckpointCorruptError("state.pt does not match the sha256 in meta.json (torn or half-synced)")
    try:
        # weights_only: a checkpoint from storage must never run code on load.
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, TypeError) as exc:
        reason = " ".join(str(exc).split())[:200]
        raise CheckpointCorruptError(f"state.pt cannot be loaded with weights_only=True ({type(exc).__name__}: "
                                     f"{reason})") from None
    return state, meta


def list_folders(run_dir: str) -> list[str]:
    """Names of every checkpoint folder under `run_dir`, complete or not, by step (oldest first)."""
    names = [n for n in fs.listdir(run_dir) if step_of(n) is not None]
    return sorted(names, key=_order)


def list_complete(run_dir: str) -> list[str]:
    """Names of complete checkpoints (their marker, meta.json, landed) under `run_dir`, by step,
    oldest first. Complete is not usable: `read_local` checks that."""
    return [n for n in list_folders(run_dir) if fs.exists(fs.join(run_dir, n, META_FILE))]


def commit(local_dir: str, run_dir: str, name: str, keep: int) -> str:
    """Copy a local checkpoint folder into run storage (meta.json last), then apply retention.
    The writes ride out minutes of storage outage (fs.write_bytes_durable)."""
    dest = fs.join(run_dir, name)
    for fname in sorted(os.listdir(local_dir), key=lambda n: n == META_FILE):
        if fname == META_FILE:
            _maybe_pause_for_tests(name)
        with open(os.path.join(local_dir, fname), "rb") as f:
            fs.write_bytes_durable(fs.join(dest, fname), f.read())
    apply_retention(run_dir, name, keep)
    return dest


def _healthy(run_dir: str, name: str) -> bool:
    """Whether a checkpoint's losses were finite. Checkpoints from before the flag count as healthy."""
    try:
        return bool(read_meta(run_dir, name).get("losses_finite", True))
    except Exception:  # noqa: BLE001 - unreadable: not the one to keep
        return False


def apply_retention(run_dir: str, newest: str, keep: int) -> None:
    """After `newest` committed: delete complete checkpoints beyond the newest `keep`, but never the
    newest healthy one (finite losses), and delete folders a kill left half-written (no meta.json)
    older than `newest`. Failures are logged: a failed purge must not fail training."""
    folders = list_folders(run_dir)
    complete = [n for n in folders if fs.exists(fs.join(run_dir, n, META_FILE))]
    doomed = [n for n in folders if n not in complete and _order(n) < _order(newest)]
    old = [n for n in complete if _order(n) <= _order(newest)][:-keep] if keep > 0 else []
    if old:
        kept = [n for n in complete if n not in old]
        if not any(_healthy(run_dir, n) for n in kept):
            spare = next((n for n in reversed(old) if _healthy(run_dir, n)), None)
            if spare is not None:
                old.remove(spare)
    for name in old + doomed:
        try:
            fs.remove(fs.join(run_dir, name), recursive=True)
        except Exception as exc:  # noqa: BLE001 - a failed purge must not fail training
            log.warning("could not delete old checkpoint %s: %s", name, exc)


def set_aside(run_dir: str, name: str) -> None:
    """Make an unusable checkpoint look half-written (its marker removed), so no later resume tries
    it again and the next commit's clean-up deletes it."""
    try:
        fs.remove(fs.join(run_dir, name, META_FILE))
    except Exception as exc:  # noqa: BLE001 - it is skipped all the same; only the warning repeats
        log.warning("could not set aside unusable checkpoint %s: %s", name, exc)


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
    """Fetch a checkpoint folder from run storage into `local_dir` (a file it lacks stays absent
    there, for `read_local` to name)."""
    if fs.is_local(uri):
        return fs.normalize(uri)
    os.makedirs(local_dir, exist_ok=True)
    for fname in (STATE_FILE, META_FILE):
        try:
            data = fs.read_bytes(fs.join(uri, fname))
        except FileNotFoundError:
            continue
        with open(os.path.join(local_dir, fname), "wb") as f:
            f.write(data)
    return local_dir


def load_newest_usable(run_dir: str, set_aside_unusable: bool) -> tuple[str, dict[str, Any], dict[str, Any]] | None:
    """(name, state, meta) of the newest checkpoint that can be resumed from, or None for a run
    with no complete checkpoint. Each unusable one on the way is skipped with one warning line
    naming its folder and the reason, and set aside when asked (`set_aside`: not on Ray, whose
    checkpoint manager may still list it); storage that does not answer raises StorageError
    instead, so that a dropped mount never costs a good checkpoint."""
    import tempfile

    unusable: list[str] = []
    for name in reversed(list_complete(run_dir)):
        try:
            with tempfile.TemporaryDirectory(prefix="orch-restore-") as tmp:
                state, meta = read_local(download(fs.join(run_dir, name), tmp))
        except CheckpointCorruptError as exc:
            log.warning("checkpoint %s is unusable: %s; trying the one before it", fs.join(run_dir, name), exc)
            unusable.append(name)
            continue
        for bad in unusable if set_aside_unusable else []:
            set_aside(run_dir, bad)
        return name, state, meta
    if unusable:
        raise CheckpointCorruptError(f"{run_dir}: none of its checkpoints can be resumed from ({', '.join(unusable)}); "
                                     "start a new run.name")
    return None


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
