"""GCE's own preemption notice: the metadata server's `instance/preempted`, watched from a thread.

GCE publishes its decision to take a Spot VM back on the metadata server (`instance/preempted`
turns `TRUE`) before the ACPI shutdown that becomes the worker's SIGTERM, so watching it gives the
just-in-time checkpoint more of the ~30 s notice. The watcher only sets PREEMPTED; the loop reads
it where it reads every other notice (workers/preemption.py, PreemptionMonitor), so a notice from
here, a SIGTERM and a Ray drain all make the same single checkpoint and stop.

The watcher runs where a metadata server is: GCE_METADATA_HOST names one (as for Google's client
libraries; tests and emulators use it), or the machine says it is a Compute Engine VM (its DMI
product name, what google-auth checks). Anywhere else no thread starts and nothing waits.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import urllib.request
from pathlib import Path

log = logging.getLogger(__name__)

HOST_ENV = "GCE_METADATA_HOST"
# The metadata server's fixed address on GCE: no DNS lookup on the way to the notice.
DEFAULT_HOST = "169.254.169.254"
PATH = "/computeMetadata/v1/instance/preempted"
DMI_PRODUCT = Path("/sys/class/dmi/id/product_name")
# One blocking request lasts at most this long (the server answers at once when the value changes);
# a new one follows at once. Errors back off up to RETRY_MAX_S between tries.
WAIT_S = 300
RETRY_MAX_S = 30.0

PREEMPTED = threading.Event()
noticed_at: float | None = None  # time.monotonic() when PREEMPTED was set
_started = False
_lock = threading.Lock()


def metadata_host() -> str | None:
    """Where the metadata server is, or None off GCE (a file read; no network)."""
    host = os.environ.get(HOST_ENV)
    if host:
        return host
    try:
        if DMI_PRODUCT.read_text().strip().startswith("Google"):
            return DEFAULT_HOST
    except OSError:
        pass
    return None


def start() -> bool:
    """Start this process's watcher once (a daemon thread); False where there is no metadata server."""
    global _started
    with _lock:
        if _started:
            return True
        host = metadata_host()
        if host is None:
            return False
        _started = True
    threading.Thread(target=watch, args=(host,), name="gce-preempted-watch", daemon=True).start()
    return True


def _get(host: str, etag: str | None) -> tuple[str, str | None]:
    """The value of instance/preempted and its ETag; with an ETag, blocks until the value changes."""
    query = f"?wait_for_change=true&timeout_sec={WAIT_S}&last_etag={etag}" if etag else ""
    req = urllib.request.Request(f"http://{host}{PATH}{query}", headers={"Metadata-Flavor": "Google"})
    with urllib.request.urlopen(req, timeout=WAIT_S + 30) as resp:  # noqa: S310 - a fixed http URL
        if resp.headers.get("Metadata-Flavor") != "Google":
            raise OSError(f"{host} is not a GCE metadata server")
        return resp.read().decode().strip(), resp.headers.get("ETag")


def watch(host: str) -> None:
    """Watch instance/preempted on `host` until it turns TRUE, then set PREEMPTED (start() runs this on a thread)."""
    global noticed_at
    etag: str | None = None
    backoff = 1.0
    while True:
        try:
            value, etag = _get(host, etag)
            backoff = 1.0
        except Exception as exc:  # noqa: BLE001 - the metadata server went away for a while: try again
            log.debug("metadata server %s: %s", host, exc)
            etag = None
            time.sleep(backoff)
            backoff = min(backoff * 2, RETRY_MAX_S)
            continue
        if value.upper() == "TRUE":
            noticed_at = time.monotonic()
            PREEMPTED.set()
            log.warning("GCE preemption notice (metadata server instance/preempted=TRUE)")
            return
        if etag is None:  # a server that cannot block (no ETag): ask again, not in a tight loop
            time.sleep(1.0)
