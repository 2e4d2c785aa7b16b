"""The one retry policy for storage I/O: transient faults back off, permanent ones fail fast."""

from __future__ import annotations

import errno
import logging
import threading

from tenacity import (
    RetryCallState,
    retry,
    retry_if_exception,
    stop_after_attempt,
    stop_after_delay,
    wait_random_exponential,
)

log = logging.getLogger(__name__)

RETRY_ATTEMPTS = 6
RETRY_MAX_WAIT_S = 8.0
RETRY_TOTAL_S = 60.0

# Counted so that runs can report how many retries they made (workers/loop.py logs it to MLflow
# as perf/storage_retries). Read it; only _log_retry writes it.
RETRY_COUNTER = {"retries": 0}
_COUNTER_LOCK = threading.Lock()


class StorageError(RuntimeError):
    """A storage failure that retrying will not fix; the message names the URI."""


_TRANSIENT_ERRNOS = {errno.ECONNRESET, errno.ECONNREFUSED, errno.ETIMEDOUT, errno.EPIPE, errno.EAGAIN, errno.ECONNABORTED}
# Exception classes (matched by name anywhere in the MRO, so that neither aiohttp nor requests
# has to be imported here) that mean "the connection broke or timed out": worth another try.
_TRANSIENT_NAMES = {
    "ClientConnectionError", "ServerDisconnectedError", "ClientPayloadError", "ServerTimeoutError",
    "ClientOSError", "TransientError", "ChunkedEncodingError", "ProxyError", "ReadTimeout",
    "ConnectTimeout", "ContentLengthError", "IncompleteRead", "RemoteDisconnected",
}
# Exceptions that say the request itself is wrong or not allowed: never retried.
_PERMANENT = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, FileExistsError, StorageError)


def is_transient(exc: BaseException) -> bool:
    """5xx, 408/429, timeouts and dropped connections are worth retrying; 4xx and missing paths are not."""
    if isinstance(exc, _PERMANENT):
        return False
    code = getattr(exc, "code", None) or getattr(exc, "status", None)
    if isinstance(code, int) and code >= 400:
        return code in (408, 429) or 500 <= code < 600
    if isinstance(exc, (TimeoutError, ConnectionError)):
        return True
    if isinstance(exc, OSError) and exc.errno in _TRANSIENT_ERRNOS:
        return True
    return any(cls.__name__ in _TRANSIENT_NAMES for cls in type(exc).__mro__)


def _log_retry(state: RetryCallState) -> None:
    with _COUNTER_LOCK:
        RETRY_COUNTER["retries"] += 1
    exc = state.outcome.exception() if state.outcome else None
    log.warning("storage: transient error (%s), retry %d", type(exc).__name__, state.attempt_number)


# Works on plain and async functions alike (tenacity picks AsyncRetrying for coroutines), so
# gcsfs's request coroutine goes through the same policy as synchronous calls (storage/gcs.py).
storage_retry = retry(
    retry=retry_if_exception(is_transient),
    wait=wait_random_exponential(multiplier=0.2, max=RETRY_MAX_WAIT_S),
    stop=stop_after_attempt(RETRY_ATTEMPTS) | stop_after_delay(RETRY_TOTAL_S),
    before_sleep=_log_retry,
    reraise=True,
)
