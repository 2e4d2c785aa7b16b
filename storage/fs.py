"""URI -> fsspec filesystem resolution and the handful of file operations the project uses.

URIs stay strings throughout: `gs://bucket/x` must never pass through `pathlib.Path`.
Local paths (including a mounted Google Drive) are made absolute so that Ray workers,
which run in other directories, see the same files.
"""

from __future__ import annotations

import json
import os
import posixpath
import uuid
from typing import Any

import fsspec
from fsspec.core import url_to_fs

from storage.retry import StorageError, storage_retry


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


def _wrap(uri: str, exc: BaseException) -> StorageError:
    if isinstance(exc, FileNotFoundError):
        return StorageError(f"{uri}: not found")
    if isinstance(exc, PermissionError):
        return StorageError(f"{uri}: permission denied; check the credentials for this bucket or path")
    return StorageError(f"{uri}: {type(exc).__name__}: {exc}")


@storage_retry
def exists(uri: str) -> bool:
    fs, path = filesystem(uri)
    return fs.exists(path)


@storage_retry
def _read(uri: str) -> bytes:
    fs, path = filesystem(uri)
    return fs.cat_file(path)


def read_bytes(uri: str) -> bytes:
    try:
        return _read(uri)
    except FileNotFoundError:
        raise
    except (PermissionError, OSError) as exc:
        raise _wrap(uri, exc) from exc


@storage_retry
def write_bytes(uri: str, data: bytes) -> None:
    """Write atomically where the filesystem allows it: a temp name, then a rename.

    Object stores replace an object atomically on upload, so they write directly.
    """
    fs, path = filesystem(uri)
    parent = posixpath.dirname(path) if not is_local(uri) else os.path.dirname(path)
    if is_local(uri):
        os.makedirs(parent, exist_ok=True)
        tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    else:
        fs.pipe_file(path, data)


def read_json(uri: str) -> Any:
    return json.loads(read_bytes(uri))


def write_json(uri: str, obj: Any) -> None:
    write_bytes(uri, json.dumps(obj, indent=2, sort_keys=True).encode())


@storage_retry
def makedirs(uri: str) -> None:
    fs, path = filesystem(uri)
    fs.makedirs(path, exist_ok=True)


@storage_retry
def listdir(uri: str) -> list[str]:
    """Base names under `uri` (empty when it does not exist)."""
    fs, path = filesystem(uri)
    if not fs.exists(path):
        return []
    return sorted(posixpath.basename(p.rstrip("/")) for p in fs.ls(path, detail=False))


@storage_retry
def remove(uri: str, recursive: bool = False) -> None:
    fs, path = filesystem(uri)
    if fs.exists(path):
        fs.rm(path, recursive=recursive)


def probe_writable(uri: str) -> None:
    """Write and delete a probe file so an unwritable location fails in the first second."""
    probe = join(uri, f".probe-{uuid.uuid4().hex[:8]}")
    try:
        makedirs(uri)
        write_bytes(probe, b"ok")
        remove(probe)
    except Exception as exc:  # noqa: BLE001 - one clear message whatever the backend raised
        raise StorageError(f"{uri}: cannot write there ({type(exc).__name__}: {exc}); check the path and credentials") from exc


def pyarrow_filesystem(uri: str):
    """(pyarrow filesystem, path) for Ray Train's RunConfig; None filesystem for local paths."""
    if is_local(uri):
        return None, normalize(uri)
    import pyarrow.fs as pafs

    fs, path = filesystem(uri)
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), path
