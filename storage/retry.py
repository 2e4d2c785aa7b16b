"""The one retry policy for storage I/O: transient faults back off, permanent ones fail fast."""

from __future__ import annotations

import errno
import logging

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

# Counted so that runs can report how many retries they made.
RETRY_COUNTER = {"retries": 0}


class StorageError(RuntimeError):
    """A storage failure that retrying will not fix; the message names the URI."""


_TRANSIENT_ERRNOS = {errno.ECONNRESET, errno.ECONNREFUSED, errno.ETIMEDOUT, errno.EPIPE, errno.EAGAIN}


def is_transient(exc: BaseException) -> bool:
    """5xx, timeouts and dropped connections are worth retrying; 4xx and missing paths are not."""
    if isinstance(exc, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, StorageError)):
        return False
    if isinstance(exc, (TimeoutError, ConnectionError)):
        return True
    if isinstance(exc, OSError) and exc.errno in _TRANSIENT_ERRNOS:
        return True
    code = getattr(exc, "code", None) or getattr(exc, "status", None)
    if isinstance(code, int):
        return code in (408, 429) or 500 <= code < 600
    name = type(exc).__name__
    return name in {"ClientConnectionError", "ServerDisconnectedError", "ClientPayloadError", "TransientError"}


def _log_retry(state: RetryCallState) -> None:
    RETRY_COUNTER["retries"] += 1
    exc = state.outcome.exception() if state.outcome else None
    log.warning("storage: transient error (%s), retry %d", type(exc).__name__, state.attempt_number)


storage_retry = retry(
    retry=retry_if_exception(is_transient),
    wait=wait_random_exponential(multiplier=0.2, max=RETRY_MAX_WAIT_S),
    stop=stop_after_attempt(RETRY_ATTEMPTS) | stop_after_delay(RETRY_TOTAL_S),
    before_sleep=_log_retry,
    reraise=True,
)
