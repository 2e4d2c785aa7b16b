"""Screenshots of the MLflow UI for an experiment: the compare view of its runs and its charts.

    python -m tools.mlflow_screenshot EXPERIMENT [--tracking-uri sqlite:///mlflow.db] [--out docs/img]

Starts `mlflow ui` on loopback, opens the views in headless Chromium (Debian's `chromium`
package), writes PNGs and prints their paths. How we check that the UI really shows runs side
by side, with train/loss and eval charts per run, rather than trusting the API alone.
"""

from __future__ import annotations

import argparse
import json
import shutil
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if path := shutil.which(name):
            return path
    sys.exit("no chromium on PATH; `apt-get install chromium` (Debian) and run again")


def _shoot(browser: str, url: str, out: Path, budget_ms: int, size: str = "1600,1400") -> None:
    subprocess.run([browser, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                    "--hide-scrollbars",
                    f"--window-size={size}", f"--virtual-time-budget={budget_ms}", f"--screenshot={out}", url],
                   check=True, capture_output=True, timeout=180)


def main(argv: list[str] | None = None) -> list[str]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("experiment")
    ap.add_argument("--tracking-uri", default="sqlite:///mlflow.db")
    ap.add_argument("--out", default="docs/img")
    ap.add_argument("--wait-ms", type=int, default=60000,
                    help="Virtual time Chromium gives the page before the shot; raise it if charts are still loading.")
    args = ap.parse_args(argv)

    from mlflow.tracking import MlflowClient

    from orchestrator.tracking import resolve_tracking_uri

    uri = resolve_tracking_uri(args.tracking_uri)
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(args.experiment)
    if exp is None:
        sys.exit(f"no experiment {args.experiment!r} in {uri}")
    runs = [r for r in client.search_runs([exp.experiment_id]) if "orchestrator.run_name" in r.data.tags]
    browser = _chromium()
    port = _free_port()
    ui = subprocess.Popen([sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--host", "127.0.0.1",
                           "--port", str(port)],
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(120):
            try:
                urllib.request.urlopen(f"{base}/health", timeout=2)
                break
            except OSError:
                time.sleep(1)
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        q = urllib.parse.quote
        views = {
            "compare": f"{base}/#/compare-runs?runs={q(json.dumps([r.info.run_id for r in runs]))}"
                       f"&experiments={q(json.dumps([exp.experiment_id]))}",
            "charts": f"{base}/#/experiments/{exp.experiment_id}/runs?compareRunsMode=CHART",
        }
        written = []
        for name, url in views.items():
            path = out / f"mlflow_{args.experiment}_{name}.png"
            _shoot(browser, url, path, args.wait_ms)
            written.append(str(path))
            print(path)
        return written
    finally:
        ui.terminate()
        ui.wait(timeout=30)


if __name__ == "__main__":
    main()
