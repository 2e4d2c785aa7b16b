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

Colab-like mode, `--colab [RUNTIME]` (RUNTIME: 2026-08-19, the default, or 2026.07; bench/colab.py):
the new virtualenv holds, before anything is timed, Colab's torch (`--torch`: the wheel of Colab's version,
e.g. PyPI's torch 2.11.0 for the runtime's Python) and every package of the project's dependency closure that
Colab's published freeze (tests/fixtures/colab) holds, at Colab's version (numpy 2.1.3, pyarrow 18.1.0,
protobuf 5.29.6, pandas, scipy, aiohttp 3.14.3, ...), not the project's pins. The timed install is then
the notebook's install cell as it is: `pip install uv==0.13.9` (the freeze has no uv) and
`uv pip install -q --compile-bytecode -e .`, without constraints.txt. Run it with the interpreter of the
runtime (Python 3.13 for 2026-08-19), from an environment that holds the project and Colab's torch, so the
interrupted run is made with them too:

  PYTHONPATH=$PWD /work/venvs/py313-t211/bin/python -m bench.resume --colab --torch torch-2.11.0-...whl --json

It adds to the result what the install added and replaced (`added`, `replaced`, by name and version), the
bytes it added to site-packages and the bytes in uv's cold cache afterwards (what it downloaded, unpacked).

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

from bench import colab, machine

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


def _site_packages(python: Path) -> Path:
    return Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               check=True, capture_output=True, text=True).stdout.strip())


def _dists(site: Path) -> dict[str, str]:
    """name (normalized) -> version of every *.dist-info in a site-packages."""
    out = {}
    for info in site.glob("*.dist-info"):
        meta = info / "METADATA"
        if meta.is_file():
            head = meta.read_text(errors="replace").split("\n\n", 1)[0]
            name = re.search(r"^Name: (.+)$", head, re.M)
            version = re.search(r"^Version: (.+)$", head, re.M)
            if name and version:
                out[colab.normalize(name[1].strip())] = version[1].strip()
    return out


def _bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink()) if path.exists() else 0


def _colab_packages(runtime: str, tmp: Path) -> tuple[list[str], Path]:
    """Colab's packages that the project's closure has (constraints.txt names the closure), and the freeze as
    a constraints file (without the torch family: --torch brings Colab's torch)."""
    freeze = colab.RUNTIMES[runtime][0]
    present = colab.read_freeze(freeze)
    closure = {colab.normalize(line.split("==")[0]) for line in (REPO / "constraints.txt").read_text().splitlines()
               if "==" in line and not line.startswith("#")}
    names = sorted(n for n in closure & set(present) if n not in ("torch", "torchvision", "torchaudio", "triton"))
    cfile = tmp / "colab-constraints.txt"
    cfile.write_text(colab.constraints(freeze))
    return names, cfile


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
    ap.add_argument("--kill-after-step", type=int, default=50,
                    help="interrupt the first run past this step (a checkpoint)")
    ap.add_argument("--timeout", type=float, default=900)
    ap.add_argument("--installer", choices=("uv", "pip"), default="uv",
                    help="uv: the notebook's install cell (uv pip install; uv itself installed first and timed); "
                         "pip: README command 1's install")
    ap.add_argument("--no-compile", action="store_true",
                    help="pip install --no-compile (as the notebook does): no byte-compiling of every installed "
                         "module; those imported compile on first use")
    ap.add_argument("--colab", nargs="?", const=colab.DEFAULT_RUNTIME, choices=sorted(colab.RUNTIMES),
                    help="Colab-like: the virtualenv holds Colab's packages at Colab's versions (the freeze in "
                         "tests/fixtures/colab) and --torch, and the timed install is the notebook's cell as it is")
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
        colab_names: list[str] = []
        if args.colab:
            # Colab's torch and Colab's versions of the packages the project needs that Colab already has.
            colab_names, cfile = _colab_packages(args.colab, tmp)
            subprocess.run([*pip, args.torch, *colab_names, "-c", str(cfile)], check=True, env=_env())
        else:
            subprocess.run([*pip, args.torch], check=True, env=_env())
        site = _site_packages(venv / "bin" / "python")
        before, site_bytes_before = _dists(site), _bytes(site)
        torch_version = subprocess.run([str(venv / "bin" / "python"), "-c", "import torch; print(torch.__version__)"],
                                       check=True, capture_output=True, text=True).stdout.strip()

        # ---- timed: install
        load_at_start = os.getloadavg()[0]  # other work on the machine slows every figure below
        t0 = time.time()
        if args.installer == "uv":
            # A cold cache of its own: nothing this machine downloaded before is reused.
            uv_env = {**_env(), "UV_CACHE_DIR": str(tmp / "uv-cache")}
            subprocess.run([*pip, "uv==0.13.9"], check=True, env=_env())  # as the notebook pins it
            # Colab-like: the notebook's cell as it is (no constraints: Colab's own versions stay where they fit).
            subprocess.run([str(venv / "bin" / "uv"), "pip", "install", "-q", "--python", str(venv / "bin" / "python"),
                            *([] if args.no_compile else ["--compile-bytecode"]),
                            *([] if args.colab else ["-c", "constraints.txt"]), "-e", "."],
                           cwd=src, check=True, env=uv_env)
        else:
            subprocess.run([*pip, *(["--no-compile"] if args.no_compile else []), "-c", "constraints.txt", "-e", "."],
                           cwd=src, check=True, env=_env())
        install_s = time.time() - t0
        after = _dists(site)
        install_figures = {
            "added": {n: v for n, v in sorted(after.items()) if n not in before and n != "orchestrator"},
            "replaced": {n: [before[n], after[n]] for n in sorted(before) if n in after and after[n] != before[n]},
            "removed": sorted(set(before) - set(after)),
            "site_packages_bytes_added": _bytes(site) - site_bytes_before,
            "uv_cache_bytes": _bytes(tmp / "uv-cache") if args.installer == "uv" else None,
        }
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
                    if (p.get("phase") == "train" and p.get("global_step", 0) > cursor.get("global_step", 0)
                            and "preload" in seen):
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
            "colab_runtime": args.colab,
            "colab_packages_present": len(colab_names),
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
            "packages_before_install": len(before),
            "n_added": len(install_figures["added"]),
            **install_figures,
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
