"""Colab's runtime as a fixture, and what the notebook's install cell does to it.

Colab publishes the `pip freeze` of its runtime images; two are kept in `tests/fixtures/colab/` (GPU image of
2026-08-19 on Python 3.13.15, and the older runtime 2026.07 on Python 3.12.13, which users can still pin).
From a freeze this module makes

- `stub_site(freeze, dest)`: a folder of `*.dist-info` entries, one per package at Colab's version (metadata
  only, no code), which an installer sees as what is already installed;
- `install_plan(...)`: the notebook's own install command (`uv pip install --system -e .`, read from the
  notebook) as a dry run for Colab's Python against that folder: which of Colab's packages it would replace,
  with which versions, and what it would add;
- `constraints(freeze)`: the freeze as pip/uv constraints (what `bench.resume --colab` installs first, so the
  timed install cell starts from Colab's versions, not the project's pins).

The resolver asks live PyPI, so the plan is pinned to PyPI as it stood on `EXCLUDE_NEWER`
(`uv --exclude-newer`): the same answer every day, until a dependency bump in `pyproject.toml` changes it.

    python -m bench.colab [--runtime 2026.07] [--exclude-newer YYYY-MM-DD]   # prints the plan as JSON
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "fixtures" / "colab"
NOTEBOOK = REPO / "notebooks" / "colab_quickstart.ipynb"

# runtime -> (freeze, Python version of that image)
RUNTIMES = {
    "2026-08-19": (FIXTURES / "pip-freeze.gpu.2026-08-19.txt", "3.13"),
    "2026.07": (FIXTURES / "pip-freeze.gpu.runtime-2026.07.txt", "3.12"),
}
DEFAULT_RUNTIME = "2026-08-19"
# PyPI as of this day; see the module's docstring.
EXCLUDE_NEWER = "2026-12-01"
PLATFORM = "x86_64-manylinux_2_35"  # Colab: Ubuntu 22.04 (glibc 2.35), x86_64

# Colab's ML stack: nothing here may be replaced by the install. Names (normalized) or prefixes ending in '*'.
ML_STACK = (
    "torch", "torchvision", "torchaudio", "torchcodec", "torchao", "torchdata", "torchtune", "triton", "nvidia-*",
    "numpy", "scipy", "pandas", "pyarrow", "protobuf", "pillow", "scikit-learn", "scikit-image", "matplotlib",
    "jax", "jaxlib", "jax-*", "flax", "optax", "chex", "orbax-*", "ml-dtypes",
    "tensorflow", "tensorflow-*", "tf-keras", "keras", "tensorboard", "tensorboard-*", "tf-*", "h5py",
    "grpcio", "grpcio-*", "googleapis-common-protos",
)


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def in_ml_stack(name: str) -> bool:
    n = normalize(name)
    return any(n == p or (p.endswith("*") and n.startswith(p[:-1])) for p in ML_STACK)


def read_freeze(freeze: Path) -> dict[str, str]:
    """name (normalized) -> version. Lines installed from a URL (`name @ url`: google-colab, a spaCy model,
    RAPIDS wheels) carry no version and no dependency of the project's; they are left out."""
    pins = {}
    for line in freeze.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#") or " @ " in line:
            continue
        name, version = line.split("==")
        pins[normalize(name)] = version
    return pins


def constraints(freeze: Path, *, drop: tuple[str, ...] = ()) -> str:
    """The freeze as constraints, without the torch family and CUDA libraries (their `+cu128` builds are
    not on PyPI: `bench.resume --colab` installs its own torch first) and without `drop`."""
    skip = {normalize(d) for d in drop}
    out = []
    for name, version in sorted(read_freeze(freeze).items()):
        if name in skip or name.startswith(("nvidia-", "jax-cuda", "cuda-")) or "+" in version:
            continue
        if name in ("torch", "torchvision", "torchaudio", "torchcodec", "torchao", "triton"):
            continue
        out.append(f"{name}=={version}")
    return "\n".join(out) + "\n"


def stub_site(freeze: Path, dest: Path) -> Path:
    """One `name-version.dist-info` (METADATA with Name and Version) per freeze line: to an installer, a
    site-packages holding Colab's packages at Colab's versions."""
    dest.mkdir(parents=True, exist_ok=True)
    for name, version in read_freeze(freeze).items():
        info = dest / f"{name.replace('-', '_')}-{version}.dist-info"
        info.mkdir(exist_ok=True)
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
        (info / "INSTALLER").write_text("pip\n")
        (info / "RECORD").write_text("")
    return dest


def notebook_install_command() -> list[str]:
    """The `uv pip install` line of the notebook's install cell, as argv (without the leading `!`)."""
    nb = json.loads(NOTEBOOK.read_text())
    for cell in nb["cells"]:
        if cell["cell_type"] != "code":
            continue
        for line in "".join(cell["source"]).splitlines():
            if line.startswith("!uv pip install"):
                return line[1:].split()
    raise LookupError(f"{NOTEBOOK}: no `!uv pip install` line in a code cell")


def uv_bin() -> str:
    try:
        from uv import find_uv_bin  # the `uv` package of the test extra

        return find_uv_bin()
    except ImportError:
        found = shutil.which("uv")
        if not found:
            raise RuntimeError("uv not found: pip install uv (it is in the project's test extra)") from None
        return found


@dataclass
class Plan:
    runtime: str
    python: str
    exclude_newer: str
    command: list[str]
    replaced: dict[str, list[str]] = field(default_factory=dict)  # name -> [Colab's version, new version]
    added: dict[str, str] = field(default_factory=dict)  # name -> version (the project itself left out)
    removed: list[str] = field(default_factory=list)

    @property
    def replaced_ml_stack(self) -> list[str]:
        return sorted(n for n in self.replaced if in_ml_stack(n)) + sorted(n for n in self.removed if in_ml_stack(n))


def parse_plan(text: str) -> tuple[dict[str, list[str]], dict[str, str], list[str]]:
    """uv's dry-run lines ` - name==old` / ` + name==new` -> (replaced, added, removed)."""
    minus, plus = {}, {}
    for line in text.splitlines():
        m = re.match(r"^ ([-+]) ([A-Za-z0-9_.\-]+)(?:==(\S+)| @ )", line)
        if m:
            (minus if m[1] == "-" else plus)[normalize(m[2])] = m[3] or ""
    plus.pop("orchestrator", None)
    replaced = {n: [minus[n], plus[n]] for n in sorted(minus) if n in plus}
    added = {n: plus[n] for n in sorted(plus) if n not in minus}
    removed = sorted(n for n in minus if n not in plus)
    return replaced, added, removed


def install_plan(runtime: str = DEFAULT_RUNTIME, exclude_newer: str = EXCLUDE_NEWER, *, workdir: Path | None = None,
                 cache_dir: Path | None = None, timeout: float = 120) -> Plan:
    """The notebook's install command, as a dry run for the runtime's Python and platform, with the runtime's
    packages present (stub_site). Needs PyPI (and uv)."""
    freeze, python = RUNTIMES[runtime]
    cmd = notebook_install_command()
    # The notebook's `--system` (Colab's own Python) becomes `--target` the stand-in site-packages; `-q` and
    # `--compile-bytecode` change nothing in what is resolved.
    args = [a for a in cmd[3:] if a not in ("--system", "-q", "--compile-bytecode")]
    with tempfile.TemporaryDirectory(prefix="colab-plan-", dir=workdir) as tmp:
        site = stub_site(freeze, Path(tmp) / "site-packages")
        env = {**os.environ, "UV_CACHE_DIR": str(cache_dir or Path(tmp) / "uv-cache"),
               "UV_NO_CONFIG": "1", "NO_COLOR": "1"}
        for k in ("UV_INDEX_URL", "UV_EXTRA_INDEX_URL", "UV_INDEX", "UV_FIND_LINKS", "UV_CONSTRAINT", "UV_OVERRIDE",
                  "UV_EXCLUDE_NEWER", "UV_PYTHON"):
            env.pop(k, None)
        run = [uv_bin(), "pip", "install", "--dry-run", "--target", str(site), "--python-version", python,
               "--python-platform", PLATFORM, "--exclude-newer", exclude_newer,
               "--index-url", "https://pypi.org/simple", *args]
        proc = subprocess.run(run, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(run)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    replaced, added, removed = parse_plan(proc.stdout + "\n" + proc.stderr)
    return Plan(runtime, python, exclude_newer, cmd, replaced, added, removed)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runtime", choices=sorted(RUNTIMES), default=DEFAULT_RUNTIME)
    ap.add_argument("--exclude-newer", default=EXCLUDE_NEWER, help="PyPI as of this date (YYYY-MM-DD)")
    ap.add_argument("--constraints", action="store_true",
                    help="print the runtime's freeze as a constraints file instead (tools/colab_check.sh), less the "
                         "packages the install must upgrade (aiohttp, yarl: Ray's `default` extra)")
    args = ap.parse_args(argv)
    if args.constraints:
        sys.stdout.write(constraints(RUNTIMES[args.runtime][0], drop=("aiohttp", "yarl")))
        return {}
    plan = install_plan(args.runtime, args.exclude_newer)
    out = {**asdict(plan), "replaced_ml_stack": plan.replaced_ml_stack}
    json.dump(out, sys.stdout, indent=1)
    print()
    return out


if __name__ == "__main__":
    main()
