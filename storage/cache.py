"""A bounded local disk cache of fetched shard bytes, so a restarted worker does not fetch them again."""

from __future__ import annotations

import logging
import os
import shutil
import threading
import uuid

log = logging.getLogger(__name__)

CACHE_MODE_ENV = "ORCHESTRATOR_CACHE"  # auto (default) | on | off
CACHE_DIR_ENV = "ORCHESTRATOR_CACHE_DIR"
CACHE_BYTES_ENV = "ORCHESTRATOR_CACHE_BYTES"
DEFAULT_CACHE_DIR = os.path.join("~", ".cache", "orchestrator", "shards")
DEFAULT_CACHE_BYTES = 16 * 2**30
# Never take more than this share of the free disk by default: a full disk breaks checkpoints.
DEFAULT_FREE_DISK_SHARE = 0.5
# Evict down to this share of the budget, so that eviction does not run on every put.
EVICT_TO_SHARE = 0.9
# Local paths that are really remote (Colab's Google Drive FUSE mount): worth caching.
_SLOW_LOCAL_PREFIXES = ("/content/drive", "/gdrive")


class ByteCache:
    """Files named by key under `root`, at most `max_bytes` in all (least recently used go first).

    Keys carry the shard's sha256 (from the manifest) and the byte range, so a re-packed dataset
    never hits a stale entry and two URIs of one shard share it. Callers check what they get
    against the samples' checksums (storage/shards/reader.py), so a damaged entry costs a re-fetch,
    never bad data.
    """

    def __init__(self, root: str, max_bytes: int) -> None:
        self.root = os.path.abspath(os.path.expanduser(root))
        self.max_bytes = int(max_bytes)
        os.makedirs(self.root, exist_ok=True)
        self._lock = threading.Lock()
        self._total = sum(e.stat().st_size for e in os.scandir(self.root) if e.is_file())
        self.hits = 0
        self.misses = 0

    def _path(self, key: str) -> str:
        return os.path.join(self.root, key)

    def get(self, key: str) -> bytes | None:
        path = self._path(key)
        try:
            with open(path, "rb") as f:
                data = f.read()
            os.utime(path)  # marks it recently used for eviction
        except FileNotFoundError:
            self.misses += 1
            return None
        self.hits += 1
        return data

    def put(self, key: str, data: bytes) -> None:
        if len(data) > self.max_bytes:
            return
        path = self._path(key)
        # temp name + rename: a worker killed mid-write leaves no half entry under the real name.
        tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
        try:
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        except OSError as exc:
            # A full or read-only cache disk must not stop training: the bytes are in memory.
            log.warning("shard cache: cannot write %s (%s); continuing without caching it", path, exc)
            try:
                os.remove(tmp)
            except OSError:
                pass
            return
        with self._lock:
            self._total += len(data)
            over = self._total > self.max_bytes
        if over:
            self._evict()

    def discard(self, key: str) -> None:
        try:
            size = os.path.getsize(self._path(key))
            os.remove(self._path(key))
        except OSError:
            return
        with self._lock:
            self._total -= size

    def _evict(self) -> None:
        entries = []
        for e in os.scandir(self.root):
            try:
                st = e.stat()
            except FileNotFoundError:  # another process evicted it first
                continue
            entries.append((st.st_mtime, st.st_size, e.path))
        entries.sort()
        total = sum(size for _, size, _ in entries)
        target = self.max_bytes * EVICT_TO_SHARE
        for _, size, path in entries:
            if total <= target:
                break
            try:
                os.remove(path)
                total -= size
            except OSError:
                pass
        with self._lock:
            self._total = total

    @property
    def total_bytes(self) -> int:
        return self._total


def _default_budget(root: str) -> int:
    probe = root
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    return int(min(DEFAULT_CACHE_BYTES, shutil.disk_usage(probe).free * DEFAULT_FREE_DISK_SHARE))


def cache_for(dataset_uri: str) -> ByteCache | None:
    """The shard cache to use for a dataset, from the environment; None when caching is off.

    auto: on for object stores (gs://, ...) and Drive mounts; off for local disk, where a copy
    would only double the reads, and for memory:// (tests), which is already in memory.
    """
    mode = os.environ.get(CACHE_MODE_ENV, "auto").lower()
    if mode == "off":
        return None
    if mode == "auto":
        local = "://" not in dataset_uri or dataset_uri.startswith("file://")
        if dataset_uri.startswith("memory://") or (local and not dataset_uri.startswith(_SLOW_LOCAL_PREFIXES)):
            return None
    root = os.path.abspath(os.path.expanduser(os.environ.get(CACHE_DIR_ENV) or DEFAULT_CACHE_DIR))
    budget = os.environ.get(CACHE_BYTES_ENV)
    try:
        return ByteCache(root, int(budget) if budget else _default_budget(root))
    except OSError as exc:
        log.warning("shard cache: cannot use %s (%s); preloading without a local cache", root, exc)
        return None
