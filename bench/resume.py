"""Back to training on a fresh machine: what a user whose Colab session expired goes through.

Made first, untimed: a run of recipes/quickstart.yaml (Ray backend, as in the notebook) SIGKILLed
after its first checkpoints, in a copy of this repository (a fresh clone); its local MLflow store
is then deleted (the VM's disk is gone), its run storage (runs/) and dataset (data/) are kept.
A new virtualenv gets torch from the wheel on disk, as Colab's runtime comes with its torch.

Timed, then, from a new virtualenv that holds only torch:
  install_s     the project installed into it with the constraints file: by default as the notebook's
                cell does it, `uv pip install` (Colab's runtime ships uv; a bare virtualenv does not,
                so `pip install uv` is timed too), from a cold uv cache; `--installer pip` times
                README command 1's `pip install -c constraints.txt -e .` instead
  startup_s     `orchestrator run recipes/quickstart.yaml` until the worker begins to restore:
                imports, recipe, dataset, lease, Ray, the worker group (MLflow's restore left out)
  restore_s     the MLflow store brought back from run storage (the driver) + the checkpoint
                loaded (the worker)
  first_step_s  the chunk's preload and the first training step after the restore
  total_s       the four together: fresh virtualenv with torch -> first resumed training step

Usage: python -m bench.resume --json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from bench import machine

REPO = Path(__file__).resolve().parents[1]
RECIPE = "recipes/quickstart.yaml"


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    return env


def _copy_repo(dest: Path) -> None:
    """The tracked and untracked (not ignored) files, as a fresh clone of this tree would hold."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO, check=True,
                           capture_output=True).stdout.decode().split("\0")
    for rel in filter(None, files):
        src = REPO / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


class Lines:
    """A child's merged output, each line with the time it arrived."""

    def __init__(self, proc: subprocess.Popen) -> None:
        self.lines: list[tuple[float, str]] = []
        self._t = threading.Thread(target=self._read, args=(proc,), daemon=True)
        self._t.start()

    def _read(self, proc: subprocess.Popen) -> None:
        for raw in proc.stdout:
            self.lines.append((time.time(), raw.decode(errors="replace").rstrip()))

    def text(self) -> str:
        return "\n".join(line for _, line in self.lines)


def _kill(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=60)


def _interrupted_run(src: Path, kill_after_step: int, timeout: float) -> dict:
    """The run to come back to: started with this machine's environment, SIGKILLed mid-run."""
    proc = subprocess.Popen([sys.executable, "-m", "orchestrator.cli", "run", RECIPE], cwd=src,
                            env={**_env(), "PYTHONPATH": str(src)}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    out = Lines(proc)
    cursor_path = src / "runs" / "quickstart" / "cursor.json"
    deadline = time.monotonic() + timeout
    try:
        while True:
            cur = (_read_json(cursor_path) or {}).get("cursor") or {}
            if cur.get("global_step", 0) >= kill_after_step:
                break
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the run to interrupt did not reach step {kill_after_step}:\n{out.text()[-3000:]}")
            time.sleep(0.2)
        time.sleep(3.0)  # a few steps past the checkpoint: mid-chunk, as a VM is lost
    finally:
        _kill(proc)
    return (_read_json(cursor_path) or {}).get("cursor") or {}  # the checkpoint the resume starts from


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--torch", default="torch==2.13.0",
                    help="what the new virtualenv holds before the project is installed (Colab's torch); pip finds "
                         "2.13.0's CPU wheel on this machine's disk")
    ap.add_argument("--kill-after-step", type=int, default=50, help="interrupt the first run past this step (a checkpoint)")
    ap.add_argument("--timeout", type=float, default=900)
    ap.add_argument("--installer", choices=("uv", "pip"), default="uv",
                    help="uv: the notebook's install cell (uv pip install; uv itself installed first and timed); "
                         "pip: README command 1's install")
    ap.add_argument("--no-compile", action="store_true",
                    help="pip install --no-compile (as the notebook does): no byte-compiling of every installed "
                         "module; those imported compile on first use")
    ap.add_argument("--keep", action="store_true", help="keep the working folder (printed)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)

    tmp = Path(tempfile.mkdtemp(prefix="bench-resume-"))
    try:
        src, venv = tmp / "orchestrator", tmp / "venv"
        src.mkdir()
        _copy_repo(src)
        # ---- untimed: the interrupted run, and the dataset it made (real data would live in a bucket)
        t = time.perf_counter()
        cursor = _interrupted_run(src, args.kill_after_step, args.timeout)
        first_run_s = time.perf_counter() - t
        rdir = src / "runs" / "quickstart"
        run_id = json.loads((rdir / "run.json").read_text())["mlflow_run_id"]
        copy = json.loads((rdir / "mlflow-store.json").read_text())
        (src / "mlflow.db").unlink()  # the VM's disk is gone; run storage and the dataset are not
        # ---- untimed: a new virtualenv with a torch in it, as a Colab runtime has
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
        subprocess.run([*pip, args.torch], check=True, env=_env())
        torch_version = subprocess.run([str(venv / "bin" / "python"), "-c", "import torch; print(torch.__version__)"],
                                       check=True, capture_output=True, text=True).stdout.strip()

        # ---- timed: install
        load_at_start = os.getloadavg()[0]  # other work on the machine slows every figure below
        t0 = time.time()
        if args.installer == "uv":
            # A cold cache of its own: nothing this machine downloaded before is reused.
            uv_env = {**_env(), "UV_CACHE_DIR": str(tmp / "uv-cache")}
            subprocess.run([*pip, "uv==0.13.9"], check=True, env=_env())  # as the notebook pins it
            subprocess.run([str(venv / "bin" / "uv"), "pip", "install", "-q", "--python", str(venv / "bin" / "python"),
                            *([] if args.no_compile else ["--compile-bytecode"]),
                            "-c", "constraints.txt", "-e", "."], cwd=src, check=True, env=uv_env)
        else:
            subprocess.run([*pip, *(["--no-compile"] if args.no_compile else []), "-c", "constraints.txt", "-e", "."],
                           cwd=src, check=True, env=_env())
        install_s = time.time() - t0
        torch_after = subprocess.run([str(venv / "bin" / "python"), "-c", "import torch; print(torch.__version__)"],
                                     check=True, capture_output=True, text=True).stdout.strip()

        # ---- timed: the same command as before, to the first training step
        progress = rdir / "progress.json"
        t_start = time.time()
        proc = subprocess.Popen([str(venv / "bin" / "orchestrator"), "run", RECIPE], cwd=src, env=_env(),
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
        out = Lines(proc)
        seen: dict[str, float] = {}
        step_at: dict | None = None
        deadline = time.monotonic() + args.timeout
        try:
            while step_at is None:
                p = _read_json(progress) or {}
                if p.get("updated_at", 0) >= t_start:
                    if p.get("phase") in ("restore", "preload"):
                        seen.setdefault(p["phase"], p["updated_at"])
                    if p.get("phase") == "train" and p.get("global_step", 0) > cursor.get("global_step", 0) and "preload" in seen:
                        step_at = p
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"the resumed run did not reach a training step:\n{out.text()[-3000:]}")
                time.sleep(0.05)
        finally:
            _kill(proc)
        text = out.text()
        m = re.search(r"MLflow: restored run (\w+) \((\d+) metric points\).* in ([0-9.]+) s", text)
        if not m or m.group(1) != run_id:
            raise RuntimeError(f"the MLflow store was not restored:\n{text[-3000:]}")
        store_s = float(m.group(3))
        begin, loaded = seen.get("restore", seen["preload"]), seen["preload"]
        startup_s = begin - t_start - store_s
        restore_s = store_s + (loaded - begin)
        first_step_s = step_at["updated_at"] - loaded
        result = {
            "machine": machine(),
            "python": platform.python_version(),
            "torch_in_venv": torch_version,
            "torch_after_install": torch_after,
            "recipe": RECIPE + " (execution.backend ray, as in the notebook)",
            "installer": args.installer,
            "no_compile": args.no_compile,
            "load_average_1m_at_start": round(load_at_start, 2),
            "install_s": round(install_s, 1),
            "startup_s": round(startup_s, 1),
            "restore_s": round(restore_s, 2),
            "restore_mlflow_s": round(store_s, 2),
            "restore_checkpoint_s": round(loaded - begin, 2),
            "first_step_s": round(first_step_s, 1),
            "total_s": round(install_s + startup_s + restore_s + first_step_s, 1),
            "resumed_from_step": cursor.get("global_step"),
            "first_step_reported": step_at["global_step"],
            "mlflow_run_id_same": m.group(1) == run_id,
            "mlflow_points_restored": int(m.group(2)),
            "mlflow_points_in_copy": copy.get("metrics"),
            "store_copy_bytes": copy.get("bytes"),
            "first_run_untimed_s": round(first_run_s, 1),
        }
    finally:
        if args.keep:
            print(f"kept {tmp}", file=sys.stderr)
        else:
            # A Ray worker of a killed driver can still write its progress for a moment after.
            for _ in range(4):
                shutil.rmtree(tmp, ignore_errors=True)
                if not tmp.exists():
                    break
                time.sleep(5)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        for k, v in result.items():
            print(f"{k:32s} {v}")
    return result


if __name__ == "__main__":
    main()
