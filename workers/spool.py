"""Where a chunk's encoded pieces live when memory is not the place: a RAM budget shared by the
chunk training and the one prefetched, and piece files on local disk (the spool) that the budget
spills to and that DataLoader decode processes read while the rest of the chunk lands.

A piece file holds one landed piece's columns as read_samples gave them: per bytes column an
int64 (offset, length) index and one blob (values that are one object, a shared background,
are written once and indexed twice), per array column its raw array. It is written under a
temporary name and renamed, so a reader that sees the name sees the whole file. Values are read
back with pread, not mmap: a mapping's touched pages count in every decode process's PSS for as
long as it is held, and a chunk's batches touch every piece, so PSS would grow with the chunk
again; pread leaves them in the page cache, which the kernel reclaims under pressure.

The spool sits beside the shard cache (storage/cache.py's directory) in a directory per process
(`<host>-<pid>-<token>`); it is removed on close, and a later process removes those of processes
on this host that are gone (a crash or a kill), so a crash leaves no chunk behind for long.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import shutil
import socket
import threading
import time
import uuid
from typing import Any

import numpy as np

from storage.cache import CACHE_DIR_ENV, DEFAULT_CACHE_DIR
from storage.lease import pid_alive
from storage.shards.groups import Packed

log = logging.getLogger(__name__)

SPOOL_DIR_ENV = "ORCHESTRATOR_SPOOL_DIR"
CHUNK_MEMORY_ENV = "ORCHESTRATOR_CHUNK_MEMORY"  # bytes, or with a K/M/G suffix: "512M"
SPOOL_WAIT_ENV = "ORCHESTRATOR_SPOOL_WAIT_S"
# The budget for the encoded bytes of the chunk training and the one prefetched, when not set:
# this share of the memory available when the worker starts, between a floor and a cap. A 12.7 GB
# Colab runtime has ~10 GB available at start, of which the model, CUDA, the decode processes and
# the batches need most: 15 % is ~1.5 GB, so a 50K x 25 KB (1.25 GB) chunk stays in RAM but its
# prefetched next one goes to disk instead of doubling the worker's memory.
MEMORY_SHARE = 0.15
MEMORY_FLOOR = 256 * 2**20
MEMORY_CAP = 8 * 2**30
# How long a decode process waits for a piece that has not landed: a piece is retried by
# storage/retry.py for minutes before it fails (and then its error file comes), so this only
# ends a wait on a parent that stopped writing without saying why.
DEFAULT_WAIT_S = 1800.0
_MAGIC = b"ORSPOOL1"
_SUFFIXES = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


class SpoolError(RuntimeError):
    """A decode process could not get a piece of its chunk (the parent went away, or gave up)."""


def parse_bytes(text: str) -> int:
    """'536870912', '512M', '1.5G' -> bytes."""
    t = text.strip().upper().removesuffix("B").removesuffix("I")
    if t and t[-1] in _SUFFIXES:
        return int(float(t[:-1]) * _SUFFIXES[t[-1]])
    return int(float(t))


def available_memory() -> int:
    """Memory available to this process now: /proc/meminfo's MemAvailable on Linux (read directly:
    importing psutil cost ~9 ms of a worker's first chunk), else psutil when present (a bench/test
    extra, not a runtime dependency), else free pages."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:
        pass
    return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))


def default_budget(memory_bytes: int | None = None) -> int:
    """The chunk memory budget: CHUNK_MEMORY_ENV, else MEMORY_SHARE of `memory_bytes` (a worker's
    memory; by default the memory available now)."""
    env = os.environ.get(CHUNK_MEMORY_ENV)
    if env:
        try:
            return max(0, parse_bytes(env))
        except ValueError:
            raise ValueError(f"{CHUNK_MEMORY_ENV}={env!r} is not a size: set it to bytes or a size such as 512M "
                             "or 2G, or unset it for the default") from None
    memory = available_memory() if memory_bytes is None else memory_bytes
    return int(min(MEMORY_CAP, max(MEMORY_FLOOR, memory * MEMORY_SHARE)))


def spool_free_bytes(root: str | None = None) -> int:
    """Free bytes on the disk the spool (`root`, by default spool_root()) is or would be made on."""
    path = os.path.abspath(root or spool_root())
    while not os.path.exists(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    return int(shutil.disk_usage(path).free)


def spool_root() -> str:
    """SPOOL_DIR_ENV, else `spool` beside the shard cache's directory (~/.cache/orchestrator/spool)."""
    env = os.environ.get(SPOOL_DIR_ENV)
    if env:
        return os.path.abspath(os.path.expanduser(env))
    cache = os.path.abspath(os.path.expanduser(os.environ.get(CACHE_DIR_ENV) or DEFAULT_CACHE_DIR))
    return os.path.join(os.path.dirname(cache), "spool")


class MemoryBudget:
    """Bytes of encoded pieces held in RAM, against a budget; what went to disk instead."""

    def __init__(self, budget_bytes: int) -> None:
        self.budget_bytes = int(budget_bytes)
        self.ram_bytes = 0
        self.peak_ram_bytes = 0
        self.spilled_bytes = 0  # all the pieces written to the spool so far (not what is there now)
        self._lock = threading.Lock()

    def take(self, n: int, force: bool = False) -> bool:
        """Count n more bytes in RAM if they fit (or `force`: there is nowhere else to put them);
        False, nothing counted, if they do not."""
        with self._lock:
            if self.ram_bytes + n > self.budget_bytes and not force:
                return False
            self.ram_bytes += n
            self.peak_ram_bytes = max(self.peak_ram_bytes, self.ram_bytes)
            return True

    def give_back(self, n: int) -> None:
        with self._lock:
            self.ram_bytes -= n

    def spilled(self, n: int) -> None:
        with self._lock:
            self.spilled_bytes += n

    def as_dict(self) -> dict[str, int]:
        return {"budget_bytes": self.budget_bytes, "ram_bytes": self.ram_bytes,
                "peak_ram_bytes": self.peak_ram_bytes, "spilled_bytes": self.spilled_bytes}


_libc_trim: Any = None


def trim_memory() -> None:
    """Hand the heap's free pages back to the OS (glibc's malloc_trim; elsewhere nothing).

    A landed piece's fetched ranges and parsed row groups (~3x its bytes, two pieces in flight) are
    freed once it lands, but glibc keeps such freed memory in its arenas: after a 207 MB chunk
    landed, the process's PSS stayed ~200 MB above what it held (bench.peer's set, 224 px), the
    same whether the pieces were held or spilled. Trimmed after each piece, PSS is what is held.
    """
    global _libc_trim
    if _libc_trim is None:
        try:
            import ctypes

            _libc_trim = ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError):
            _libc_trim = False
    if _libc_trim:
        _libc_trim(0)


# -- pieces ------------------------------------------------------------------------------------------


def piece_nbytes(values: dict[str, Any]) -> int:
    """What a landed piece's columns hold: arrays' bytes, and each distinct bytes object once."""
    total, seen = 0, set()
    for v in values.values():
        if isinstance(v, (np.ndarray, Packed)):
            total += v.nbytes
            continue
        for x in v:
            if x is not None and id(x) not in seen:
                seen.add(id(x))
                total += len(x)
    return total


class RamPiece:
    """A landed piece held in memory: its columns as read_samples gave them."""

    def __init__(self, values: dict[str, Any], nbytes: int) -> None:
        self.values, self.nbytes = values, nbytes

    def names(self) -> list[str]:
        return list(self.values)

    def value(self, name: str, row: int) -> Any:
        return self.values[name][row]

    def take(self, name: str, rows: np.ndarray) -> np.ndarray:
        v = self.values[name]
        if isinstance(v, np.ndarray):
            return v[rows]
        out = np.empty(len(rows), dtype=object)
        out[:] = [v[r] for r in rows.tolist()]
        return out


class FilePiece:
    """A landed piece in a spool file: the small parts (indexes, arrays) in memory, each bytes
    value read when asked for (pread: one copy, straight into the bytes object)."""

    def __init__(self, path: str, footer: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
        self.path = path
        self._footer = footer
        self._arrays = arrays  # array columns, and each bytes column's (offset, length) index
        self._fd: tuple[int, int] | None = None  # (pid, fd): a forked copy opens its own

    def _fileno(self) -> int:
        pid = os.getpid()
        if self._fd is None or self._fd[0] != pid:
            self._fd = (pid, os.open(self.path, os.O_RDONLY))
        return self._fd[1]

    def _bytes(self, name: str, row: int) -> bytes | None:
        off, n = (int(x) for x in self._arrays[name][row])
        if n < 0:
            return None
        start = self._footer["columns"][name]["blob"] + off
        fd, parts, got = self._fileno(), [], 0
        while got < n:  # pread of a regular file returns it all unless at its end; loop anyway
            chunk = os.pread(fd, n - got, start + got)
            if not chunk:
                raise SpoolError(f"{self.path}: spool file is shorter than its index says")
            parts.append(chunk)
            got += len(chunk)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def names(self) -> list[str]:
        return list(self._footer["columns"])

    def value(self, name: str, row: int) -> Any:
        if self._footer["columns"][name]["kind"] == "array":
            return self._arrays[name][row]
        return self._bytes(name, row)

    def take(self, name: str, rows: np.ndarray) -> np.ndarray:
        if self._footer["columns"][name]["kind"] == "array":
            return self._arrays[name][rows]
        out = np.empty(len(rows), dtype=object)
        out[:] = [self._bytes(name, r) for r in rows.tolist()]
        return out

    def close(self) -> None:
        if self._fd is not None and self._fd[0] == os.getpid():
            os.close(self._fd[1])
        self._fd = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_fd": None}


def write_piece(path: str, values: dict[str, Any]) -> FilePiece:
    """Write a landed piece's columns to `path` (temporary name, then renamed) and return it as a
    FilePiece. Layout: sections, a JSON footer, its length (8 bytes), the magic."""
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    footer: dict[str, Any] = {"columns": {}}
    arrays: dict[str, np.ndarray] = {}
    try:
        with open(tmp, "wb") as f:
            for name, v in values.items():
                if isinstance(v, np.ndarray):
                    arr = np.ascontiguousarray(v)
                    footer["columns"][name] = {"kind": "array", "dtype": arr.dtype.str, "shape": list(arr.shape),
                                               "data": f.tell()}
                    f.write(arr.tobytes())
                    arrays[name] = arr.copy()
                    continue
                if isinstance(v, Packed):  # already end to end: one write (storage/shards/groups.py)
                    blob_at = f.tell()
                    f.write(v.blob)
                    footer["columns"][name] = {"kind": "bytes", "blob": blob_at, "index": f.tell(), "rows": len(v)}
                    index = np.ascontiguousarray(v.index, dtype=np.int64)
                    f.write(index.tobytes())
                    arrays[name] = index
                    continue
                index = np.empty((len(v), 2), dtype=np.int64)
                blob_at, size, where = f.tell(), 0, {}
                for i, x in enumerate(v):
                    if x is None:
                        index[i] = (0, -1)
                        continue
                    at = where.get(id(x))
                    if at is None:  # one object (a shared value) is written once
                        at = where[id(x)] = size
                        f.write(x)
                        size += len(x)
                    index[i] = (at, len(x))
                footer["columns"][name] = {"kind": "bytes", "blob": blob_at, "index": f.tell(), "rows": len(v)}
                f.write(index.tobytes())
                arrays[name] = index
            meta = json.dumps(footer).encode()
            f.write(meta)
            f.write(len(meta).to_bytes(8, "little"))
            f.write(_MAGIC)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.remove(tmp)
        except OSError:
            pass
        raise
    return FilePiece(path, footer, arrays)


def read_piece(path: str) -> FilePiece:
    """A piece file written by write_piece (in another process, or before a fork)."""
    with open(path, "rb") as f:
        f.seek(-16, os.SEEK_END)
        tail = f.read(16)
        if tail[8:] != _MAGIC:
            raise SpoolError(f"{path}: not a spool piece (damaged, or written by another version)")
        n = int.from_bytes(tail[:8], "little")
        f.seek(-16 - n, os.SEEK_END)
        footer = json.loads(f.read(n))
        arrays: dict[str, np.ndarray] = {}
        for name, col in footer["columns"].items():
            if col["kind"] == "array":
                dtype, shape = np.dtype(col["dtype"]), tuple(col["shape"])
                f.seek(col["data"])
                arrays[name] = np.frombuffer(f.read(dtype.itemsize * int(np.prod(shape))), dtype).reshape(shape)
            else:
                f.seek(col["index"])
                arrays[name] = np.frombuffer(f.read(16 * int(col["rows"])), np.int64).reshape(-1, 2)
    return FilePiece(path, footer, arrays)


def write_error(path: str, exc: BaseException) -> None:
    """The piece's error, for a decode process waiting on it: pickled as it is (the same type and
    message there), or as a SpoolError saying what it was when it cannot be pickled."""
    try:
        data = pickle.dumps(exc)
        pickle.loads(data)
    except Exception:  # noqa: BLE001 - an error that does not survive pickling still gets its message across
        data = pickle.dumps(SpoolError(f"{type(exc).__name__}: {exc}"))
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def read_error(path: str) -> BaseException:
    with open(path, "rb") as f:
        return pickle.loads(f.read())


def wait_for_piece(path: str, error_path: str, parent: int, what: str) -> FilePiece:
    """In a decode process: the piece file once it is there (polling, a few ms apart for the first
    second), its error if the parent wrote one instead; SpoolError if the parent is gone, the chunk's spool
    was removed (the chunk is over) or SPOOL_WAIT_ENV seconds pass."""
    limit = float(os.environ.get(SPOOL_WAIT_ENV) or DEFAULT_WAIT_S)
    t0, pause = time.monotonic(), 0.002
    folder = os.path.dirname(path)
    while True:
        if os.path.exists(path):
            return read_piece(path)
        if os.path.exists(error_path):
            raise read_error(error_path)
        if os.getppid() != parent:
            raise SpoolError(f"{what}: the training process that fetches this chunk is gone")
        if not os.path.isdir(folder):
            raise SpoolError(f"{what}: the chunk's spool {folder} was removed (the chunk was closed)")
        if time.monotonic() - t0 > limit:
            raise SpoolError(f"{what}: not landed after {limit:.0f} s ({SPOOL_WAIT_ENV} sets the limit)")
        time.sleep(pause)
        # A few ms apart while the chunk starts (a first batch waits on this poll, not the 50 ms of
        # a long wait); a piece still missing after a second is a slow fetch: then 50 ms.
        pause = min(pause * 1.5, 0.005 if time.monotonic() - t0 < 1.0 else 0.05)


# -- the spool directory -----------------------------------------------------------------------------


class Spool:
    """This process's spool directory: a subdirectory per chunk, made when first needed."""

    def __init__(self, root: str | None = None) -> None:
        self.root = root or spool_root()
        self._host = socket.gethostname().replace(os.sep, "_")
        self._dir: str | None = None
        self._owner = os.getpid()
        self._count = 0
        self._lock = threading.Lock()
        self.usable = True
        remove_stale(self.root, self._host)

    @property
    def path(self) -> str | None:
        return self._dir

    def chunk_dir(self) -> str | None:
        """A new, empty directory for one chunk's pieces; None (logged once) if the spool cannot
        be written: the pieces then stay in RAM, as before the budget."""
        with self._lock:
            if not self.usable:
                return None
            try:
                if self._dir is None:
                    self._dir = os.path.join(self.root, f"{self._host}-{os.getpid()}-{uuid.uuid4().hex[:8]}")
                    os.makedirs(self._dir)
                self._count += 1
                out = os.path.join(self._dir, f"chunk-{self._count}")
                os.makedirs(out)
                return out
            except OSError as exc:
                self.usable = False
                log.warning("chunk spool: cannot write %s (%s); a chunk's pieces stay in memory", self.root, exc)
                return None

    def remove(self) -> None:
        if self._dir is not None and os.getpid() == self._owner:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None


def remove_stale(root: str, host: str) -> None:
    """Remove the spool directories of this host's processes that are gone (killed, crashed)."""
    try:
        entries = list(os.scandir(root))
    except OSError:
        return
    for e in entries:
        h, _, rest = e.name.rpartition("-")[0].rpartition("-")
        if h != host or not rest.isdigit() or not e.is_dir() or pid_alive(int(rest)):
            continue
        log.info("chunk spool: removing %s, left by a process that is gone", e.path)
        shutil.rmtree(e.path, ignore_errors=True)
