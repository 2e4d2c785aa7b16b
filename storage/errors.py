"""Storage's errors: what a caller above storage catches, in one module that imports nothing.

DatasetError is also importable from storage.shards, ShardFetchError from storage.shards.fetch (which
raise them).
"""

from __future__ import annotations


class StorageError(RuntimeError):
    """A storage failure that retrying will not fix; the message names the URI."""


class StorageUnavailable(StorageError):
    """Transient faults that outlasted their retry budget: the store is there but not answering.
    Worth a restart of the run (not of this call); the message names the URI."""


class MountDropped(StorageUnavailable):
    """A local path answering ENOTCONN and its kin: the mount under it (a Drive mount) dropped."""

    def __init__(self, message: str, path: str) -> None:
        super().__init__(message)
        self.path = path


class DatasetError(RuntimeError):
    """A dataset URI that cannot be used as one; the message names the URI and what to do."""


class ShardFetchError(DatasetError, StorageError):
    """A shard that cannot be fetched or fails its checksums twice; the message names its URI.

    A DatasetError too, so the worker reports it to the driver as a data failure."""
