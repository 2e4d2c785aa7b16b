"""How fast a permanent storage error stops a run: `python -m bench.failfast --json`.

The dataset lives in gcp-storage-emulator behind our fault proxy (tests/fault_proxy.py). The
proxy turns every request into a 403 either before the run starts or once the run is in its
second stage, and we time from that moment to the exit of `orchestrator run`, in-process and
on Ray Train (where a restart-happy failure policy would cost several worker-group restarts).
The baseline, from the same run, is the same run with no fault: how long one start-up takes.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.conftest import TINY_SAMPLES, tiny_recipe  # noqa: E402
from tests.fault_proxy import FaultProxy  # noqa: E402
from tests.gcs_emulator import make_bucket, point_gcsfs_at, start_emulator, stop_emulator  # noqa: E402


def _run(workdir: Path, recipe: dict, proxy: FaultProxy, forbid_at_stage: int | None) -> dict:
    workdir.mkdir(parents=True)
    (workdir / "r.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    env = dict(os.environ, PYTHONPATH=str(REPO), ORCHESTRATOR_CACHE="off")
    t0 = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "orchestrator.cli", "run", "r.yaml"], cwd=workdir, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    fault_at = None
    proxy.reset_counters()
    if forbid_at_stage is None:
        proxy.configure(forbid=True)
        fault_at = t0
    else:
        cursor = workdir / "runs" / "tiny" / "cursor.json"
        while proc.poll() is None and fault_at is None:
            try:
                if json.loads(cursor.read_text())["cursor"]["stage"] >= forbid_at_stage:
                    proxy.configure(forbid=True)
                    fault_at = time.monotonic()
            except (FileNotFoundError, json.JSONDecodeError, KeyError):
                pass
            time.sleep(0.05)
    if fault_at is not None:
        # Time from the first 403 actually served, not from the switch: a run between two
        # chunk fetches makes no request for a while, and that wait is not the failure's cost.
        while proc.poll() is None and proxy.counters.forbidden == 0:
            time.sleep(0.01)
        fault_at = time.monotonic() if proxy.counters.forbidden else fault_at
    _, err = proc.communicate(timeout=600)
    end = time.monotonic()
    proxy.configure(forbid=False)
    line = next((ln for ln in err.splitlines() if ln.startswith("error:")), "")
    return {"rc": proc.returncode, "seconds_to_exit": round(end - (fault_at or t0), 2),
            "names_uri": "gs://" in line and "403" in line}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    emu, url = start_emulator()
    out: dict = {"bench": "failfast", "machine": f"{platform.machine()} {os.cpu_count()} cores"}
    try:
        with FaultProxy(url) as proxy, tempfile.TemporaryDirectory() as tmp:
            point_gcsfs_at(proxy.url)
            bucket = f"bench-{uuid.uuid4().hex[:8]}"
            make_bucket(bucket)
            from storage.synth import synthesize

            uri = f"gs://{bucket}/tiny"
            synthesize(uri, TINY_SAMPLES, seed=0, image_size=64, rows_per_group=32, rows_per_shard=128, workers=1)
            for backend in ("local", "ray"):
                recipe = tiny_recipe(uri, execution={"backend": backend, "num_workers": 1, "cpus_per_worker": 1})
                recipe["stages"][1]["epochs_per_chunk"] = 3
                base = _run(Path(tmp) / f"{backend}-ok", recipe, proxy, forbid_at_stage=99)
                out[f"{backend}_no_fault_run_s"] = base["seconds_to_exit"]
                start = _run(Path(tmp) / f"{backend}-start", recipe, proxy, forbid_at_stage=None)
                mid = _run(Path(tmp) / f"{backend}-mid", recipe, proxy, forbid_at_stage=1)
                out[f"{backend}_403_at_start_s"] = start["seconds_to_exit"]
                out[f"{backend}_403_mid_run_s"] = mid["seconds_to_exit"]
                out[f"{backend}_exit_codes"] = [start["rc"], mid["rc"]]
                out[f"{backend}_errors_name_the_uri"] = start["names_uri"] and mid["names_uri"]
    finally:
        stop_emulator(emu)
    print(json.dumps(out) if args.json else json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
