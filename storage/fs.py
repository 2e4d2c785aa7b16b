"""URI -> fsspec filesystem resolution and the handful of file operations the project uses.

URIs stay strings throughout: `gs://bucket/x` must never pass through `pathlib.Path`.
Local paths (including a mounted Google Drive) are made absolute so that Ray workers,
which run in other directories, see the same files.
"""

from __future__ import annotations

import functools
import json
import os
import posixpath
import uuid
from collections.abc import Callable
from typing import Any, TypeVar

import fsspec
from fsspec.asyn import AsyncFileSystem  # here, not on a chunk's first read (~5 ms of a first batch)
from fsspec.core import url_to_fs

from common.redact import redact_text
from storage.errors import MountDropped, StorageError, StorageUnavailable
from storage.retry import durable_retry, is_mount_drop, is_transient, storage_retry

# gs:// and gcs:// resolve to gcsfs under the project's retry policy (see storage/gcs.py); a
# string so that gcsfs is imported only when a bucket is used.
for _proto in ("gs", "gcs"):
    fsspec.register_implementation(_proto, "storage.gcs.GCSFileSystem", clobber=True)

T = TypeVar("T")


def is_local(uri: str) -> bool:
    return "://" not in uri or uri.startswith("file://")


def normalize(uri: str) -> str:
    """Absolute local path for local URIs (file:// stripped); other URIs unchanged, minus a trailing '/'."""
    if uri.startswith("file://"):
        uri = uri[len("file://") :]
    if "://" not in uri:
        return os.path.abspath(os.path.expanduser(uri))
    return uri.rstrip("/")


def join(uri: str, *parts: str) -> str:
    if is_local(uri):
        return os.path.join(normalize(uri), *parts)
    return posixpath.join(uri.rstrip("/"), *parts)


def filesystem(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem for `uri` and the path within it."""
    return url_to_fs(normalize(uri))


def reset_filesystems() -> None:
    """Forget cached gcsfs instances, which keep the endpoint they were made with (tests and
    benchmarks that move STORAGE_EMULATOR_HOST)."""
    from storage.gcs import GCSFileSystem

    GCSFileSystem.clear_instance_cache()


def describe_error(exc: BaseException) -> str:
    """One short phrase for a storage exception: what went wrong, in the user's terms."""
    text = str(exc).split("\n", 1)[0]
    code = getattr(exc, "code", None) or getattr(exc, "status", None)
    if isinstance(exc, FileNotFoundError):
        return "not found (check the bucket and path)"
    if isinstance(exc, PermissionError) or text.startswith("Forbidden") or code == 403:
        return "permission denied (403); check the credentials and the bucket's access rights"
    if code == 401:
        return "not authenticated (401); check the credentials (GOOGLE_APPLICATION_CREDENTIALS or gcloud auth)"
    if is_transient(exc):
        return f"still failing after retries ({type(exc).__name__}: {text})"
    return f"{type(exc).__name__}: {text}"


def mount_advice(exc: MountDropped) -> str:
    """The user-facing line for a dropped mount: Colab's Drive mount is the one users meet."""
    return (f"{exc}: the mount holding it dropped (a Google Drive mount does this). Nothing is lost: remount it (in "
            "Colab: drive.mount('/content/drive', force_remount=True)), then run the same command again to resume from "
            "the last checkpoint")


def _wrap(uri: str, exc: BaseException) -> StorageError:
    if is_local(uri) and is_mount_drop(exc):
        return MountDropped(f"{normalize(uri)}: the mount is not answering ({os.strerror(exc.errno)})", normalize(uri))
    if is_transient(exc):
        return StorageUnavailable(redact_text(f"{uri}: {describe_error(exc)}"))
    return StorageError(redact_text(f"{uri}: {describe_error(exc)}"))


def _named(fn: Callable[..., T],
           policy: Callable[[Callable[..., T]], Callable[..., T]] = storage_retry) -> Callable[..., T]:
    """A retry policy, then any failure but "not found" becomes a StorageError naming the URI
    (`StorageUnavailable` when it was transient faults that outlasted the budget).

    FileNotFoundError passes through unchanged: callers use it to mean "absent" (a lease, a
    checkpoint); everything else (403, a bucket that is gone, retries used up) is one message.
    """
    retried = policy(fn)

    @functools.wraps(fn)
    def call(uri: str, *args: Any, **kwargs: Any) -> T:
        try:
            return retried(uri, *args, **kwargs)
        except (FileNotFoundError, StorageError):
            raise
        except Exception as exc:  # noqa: BLE001 - one clear message whatever the backend raised
            raise _wrap(uri, exc) from exc

    return call


@_named
def exists(uri: str) -> bool:
    """Whether `uri` exists; a 403 or an unreachable store raises StorageError instead of saying no.

    fsspec's own exists() answers False for any error, which would turn a permission problem
    into a misleading "not found".
    """
    fs, path = filesystem(uri)
    try:
        fs.info(path)
        return True
    except (FileNotFoundError, NotADirectoryError):
        return False


@_named
def read_bytes(uri: str) -> bytes:
    fs, path = filesystem(uri)
    return fs.cat_file(path)


@_named
def size(uri: str) -> int:
    fs, path = filesystem(uri)
    return int(fs.info(path)["size"])


def _write_bytes(uri: str, data: bytes) -> None:
    """Write atomically where the filesystem allows it: a temp name, then a rename.

    Object stores replace an object atomically on upload, so they write directly.
    """
    fs, path = filesystem(uri)
    if is_local(uri):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    else:
        fs.pipe_file(path, data)


write_bytes = _named(_write_bytes)
# The writes a run cannot go on without (checkpoint files, cursor.json, the MLflow store copy):
# they ride out minutes of outage (storage/retry.py DURABLE_RETRY_S) instead of one.
write_bytes_durable = _named(_write_bytes, durable_retry)


def read_json(uri: str) -> Any:
    return json.loads(read_bytes(uri))


def write_json(uri: str, obj: Any, durable: bool = False) -> None:
    data = json.dumps(obj, indent=2, sort_keys=True).encode()
    (write_bytes_durable if durable else write_bytes)(uri, data)


@_named
def makedirs(uri: str) -> None:
    fs, path = filesystem(uri)
    fs.makedirs(path, exist_ok=True)


@_named
def listdir(uri: str) -> list[str]:
    """Base names under `uri` (empty when it does not exist)."""
    fs, path = filesystem(uri)
    if not fs.exists(path):
        return []
    return sorted(posixpath.basename(p.rstrip("/")) for p in fs.ls(path, detail=False))


@_named
def remove(uri: str, recursive: bool = False) -> None:
    fs, path = filesystem(uri)
    if fs.exists(path):
        fs.rm(path, recursive=recursive)


# Parallel reads for filesystems without an async API (local disk, a Drive FUSE mount).
LOCAL_READ_THREADS = 8


def cat_ranges(fs: fsspec.AbstractFileSystem, paths: list[str], starts: list[int | None],
               ends: list[int | None]) -> list[Any]:
    """Bytes of each (path, start, end) on one filesystem, all requests in flight together.

    Async filesystems (gcsfs) gather them on their event loop; others (local disk, Drive FUSE
    mounts) read them from a small thread pool to hide per-file latency. Failures come back in
    place of the bytes, as with fsspec's cat_ranges(on_error="return").
    """
    from concurrent.futures import ThreadPoolExecutor

    if isinstance(fs, AsyncFileSystem):
        return fs.cat_ranges(list(paths), list(starts), list(ends), on_error="return")

    def one(i: int) -> Any:
        try:
            return fs.cat_file(paths[i], start=starts[i], end=ends[i])
        except Exception as exc:  # noqa: BLE001 - returned, like cat_ranges(on_error="return")
            return exc

    if len(paths) <= 1:
        return [one(i) for i in range(len(paths))]
    with ThreadPoolExecutor(max_workers=min(LOCAL_READ_THREADS, len(paths))) as pool:
        return list(pool.map(one, range(len(paths))))


def probe_writable(uri: str) -> None:
    """Write and delete a probe file so an unwritable location fails in the first second."""
    probe = join(uri, f".probe-{uuid.uuid4().hex[:8]}")
    try:
        makedirs(uri)
        write_bytes(probe, b"ok")
        remove(probe)
    except Exception as exc:  # noqa: BLE001 - one clear message whatever the backend raised
        raise StorageError(f"{uri}: cannot write there ({type(exc).__name__}: {exc}); check the path and "
                           "credentials") from exc


def pyarrow_filesystem(uri: str):
    """(pyarrow filesystem, path) for Ray Train's RunConfig; None filesystem for local paths."""
    if is_local(uri):
        return None, normalize(uri)
    import pyarrow.fs as pafs

    fs, path = filesystem(uri)
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), path
