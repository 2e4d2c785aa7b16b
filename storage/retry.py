"""The retry policies for storage I/O: transient faults back off, permanent ones fail fast.

Two budgets. `storage_retry` (a minute) serves every call; `durable_retry` (minutes) serves the
writes a run cannot go on without: checkpoint files, cursor.json, the MLflow store copy. A
transient fault that outlasts its budget becomes `StorageUnavailable`, which the run treats as
worth a restart (a Ray worker restarts; the next `orchestrator run` resumes), never as a
permanent failure: only 401/403/404-class errors and their local equivalents are that.
A local path that answers ENOTCONN (Colab's Drive mount when it drops) is a `MountDropped`.
"""

from __future__ import annotations

import errno
import logging
import os
import threading

from tenacity import (
    RetryCallState,
    retry,
    retry_if_exception,
    stop_after_delay,
    wait_random_exponential,
)

from storage.errors import StorageError

log = logging.getLogger(__name__)

RETRY_MAX_WAIT_S = 8.0


def _budget(env: str, default_s: float) -> float:
    try:
        return float(os.environ.get(env, default_s))
    except ValueError:
        return default_s


# How long one call rides out transient faults before it gives up: long enough for a GCS blip or
# a Drive remount (20 s outages were measured to pass); a 403 or a missing bucket never waits.
RETRY_TOTAL_S = _budget("ORCHESTRATOR_STORAGE_RETRY_S", 60.0)
# The writes a run cannot do without wait longer: an overnight run should outlast an outage of
# minutes (then stop with a clear line, losing nothing) rather than fail at its first minute.
DURABLE_RETRY_S = _budget("ORCHESTRATOR_DURABLE_RETRY_S", 300.0)

# Counted so that runs can report how many retries they made (workers/train/ logs it to MLflow
# as perf/storage_retries). Read it; only _log_retry writes it.
RETRY_COUNTER = {"retries": 0}
_COUNTER_LOCK = threading.Lock()


_TRANSIENT_ERRNOS = {
    errno.ECONNRESET, errno.ECONNREFUSED, errno.ETIMEDOUT, errno.EPIPE, errno.EAGAIN, errno.ECONNABORTED,
}
# What a FUSE mount answers while its daemon is gone or reconnecting (Colab's Drive mount:
# "Transport endpoint is not connected"); a stale NFS-style handle is the same story.
MOUNT_ERRNOS = {errno.ENOTCONN, errno.ESTALE, errno.EHOSTDOWN}
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
    if isinstance(exc, OSError) and (exc.errno in _TRANSIENT_ERRNOS or exc.errno in MOUNT_ERRNOS):
        return True
    return any(cls.__name__ in _TRANSIENT_NAMES for cls in type(exc).__mro__)


def is_mount_drop(exc: BaseException) -> bool:
    return isinstance(exc, OSError) and exc.errno in MOUNT_ERRNOS


def _log_retry(state: RetryCallState) -> None:
    with _COUNTER_LOCK:
        RETRY_COUNTER["retries"] += 1
    exc = state.outcome.exception() if state.outcome else None
    # One line per call that meets a fault, not one per retry: an outage of a minute would
    # otherwise print dozens. The caller reports a call that gives up.
    level = logging.WARNING if state.attempt_number == 1 else logging.DEBUG
    what = f"{state.args[0]}: " if state.args and isinstance(state.args[0], str) else ""
    log.log(level, "storage: %stransient error (%s: %s), retrying", what, type(exc).__name__,
            " ".join(str(exc).split())[:160] if exc else "")


def _policy(budget_s: float):
    return retry(
        retry=retry_if_exception(is_transient),
        wait=wait_random_exponential(multiplier=0.2, max=RETRY_MAX_WAIT_S),
        # The delay binds (attempts do not): a budget of seconds is what the docs promise.
        stop=stop_after_delay(budget_s),
        before_sleep=_log_retry,
        reraise=True,
    )


storage_retry = _policy(RETRY_TOTAL_S)
durable_retry = _policy(DURABLE_RETRY_S)
