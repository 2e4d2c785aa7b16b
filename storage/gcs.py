"""gcsfs with the project's retry policy: every GCS request backs off and is counted the same way."""

from __future__ import annotations

import gcsfs

from storage.retry import storage_retry


def _ours(name: str):
    """gcsfs's coroutine `name` without gcsfs's retry loop (`__wrapped__`), under storage_retry."""
    method = getattr(gcsfs.GCSFileSystem, name)
    return storage_retry(getattr(method, "__wrapped__", method))


# gcsfs retries 5xx and dropped connections itself, 6 times with sleeps of up to 16 s, neither
# counted nor bounded by storage/retry.py. Routing each HTTP request through storage_retry
# instead puts transient faults in RETRY_COUNTER (perf/storage_retries) and makes permanent ones
# (403, a missing bucket, bad credentials) fail on the first answer.
class GCSFileSystem(gcsfs.GCSFileSystem):
    """gcsfs.GCSFileSystem whose requests retry under storage.retry.storage_retry only."""

    _request = _ours("_request")
    _get_file_request = _ours("_get_file_request")
    _get_file_concurrent = _ours("_get_file_concurrent")
