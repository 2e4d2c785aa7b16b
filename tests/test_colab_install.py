"""The notebook's install cell on Colab's runtime: it adds, and replaces nothing of Colab's ML stack.

Colab's published `pip freeze` (tests/fixtures/colab) stands in for the runtime: `bench.colab` makes a
site-packages of its packages' metadata, and the notebook's own `uv pip install ... -e .` runs as a dry run
for Colab's Python against it. The resolver asks PyPI (marker `network`), as it stood on
`bench.colab.EXCLUDE_NEWER`, so the plan is the same every day; a dependency bump that would replace Colab's
torch, numpy, protobuf (any of `bench.colab.ML_STACK`), or that changes what else is upgraded or added, fails
here until the lists below (and the notebook's text) say so.
"""

from __future__ import annotations

import json
import tomllib

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

from bench import colab

# Every package of Colab's the install upgrades, and why. Nothing else may be replaced.
UPGRADED = {
    "2026-08-19": {
        # Ray's `default` extra is needed on a notebook: cluster mode's Ray Jobs client (orchestrator/jobs.py)
        # and, in local mode, the dashboard's State API that Ray Train V2's placement-group cleaner asks
        # (orchestrator/launcher.py). ray 2.60's `default` asks aiohttp>=3.14.4 (Colab: 3.14.3) ...
        "aiohttp": "ray[default] 2.60 needs aiohttp>=3.14.4",
        "yarl": "aiohttp 3.14.5 needs yarl>=1.25.1",
        # mlflow-skinny -> databricks-sdk 0.167 (new to Colab) needs certifi>=2026.10.19.
        "certifi": "databricks-sdk (via mlflow) needs certifi>=2026.10.19",
        # ray[default] -> opentelemetry-exporter-prometheus (new to Colab); uv takes its newest, 0.66b2,
        # which pins opentelemetry-sdk 1.45.x, and the sdk takes api and semantic-conventions along.
        "opentelemetry-api": "ray[default]'s opentelemetry-exporter-prometheus 0.66b2 needs 1.45",
        "opentelemetry-sdk": "ray[default]'s opentelemetry-exporter-prometheus 0.66b2 needs 1.45",
        "opentelemetry-semantic-conventions": "opentelemetry-sdk 1.45 needs 0.66b2",
    },
    "2026.07": {
        "aiohttp": "ray[default] 2.60 needs aiohttp>=3.14.4",
        "yarl": "aiohttp 3.14.5 needs yarl>=1.25.1",
        "certifi": "databricks-sdk (via mlflow) needs certifi>=2026.10.19",
        "packaging": "ray[default]'s virtualenv needs packaging>=26.3 (Colab 2026.07: 26.2)",
    },
}

# What the install adds (Colab has none of these). Ray with its `default` and `train` extras, MLflow, and
# simplejpeg (the workers' JPEG decode) are the project's own; the rest is what they need.
ADDED_BOTH = {
    "ray", "aiohttp-cors", "colorful", "opencensus", "opencensus-context", "opentelemetry-exporter-prometheus",
    "opentelemetry-proto", "py-spy", "virtualenv", "distlib", "python-discovery", "tensorboardx",
    "mlflow", "mlflow-skinny", "mlflow-tracing", "alembic", "databricks-sdk", "docker", "flask-cors", "graphene",
    "graphql-core", "graphql-relay", "gunicorn", "huey", "skops",
    "simplejpeg",
}
ADDED = {
    "2026-08-19": ADDED_BOTH | {"gitpython", "gitdb", "smmap"},  # mlflow-skinny's GitPython (2026.07 has it)
    "2026.07": ADDED_BOTH,
}


def test_the_fixture_freezes_are_colabs_and_its_ml_stack_satisfies_the_project_as_it_is():
    """Offline: every requirement of the project that Colab's runtime already meets at its own version is met
    (torch 2.11.0+cu128, numpy 2.1.3 / 2.0.2, pyarrow 18.1.0, fsspec/gcsfs 2025.3.0, pillow 11.3.0 ...), so
    the installer has no reason to replace them; only Ray, MLflow and simplejpeg are missing."""
    deps = [Requirement(d)
            for d in tomllib.loads((colab.REPO / "pyproject.toml").read_text())["project"]["dependencies"]]
    for runtime, (freeze, _python) in colab.RUNTIMES.items():
        pins = colab.read_freeze(freeze)
        assert pins["torch"].startswith("2.11.0+cu"), runtime
        missing = []
        for req in deps:
            name = colab.normalize(req.name)
            if name not in pins:
                missing.append(name)
                continue
            assert req.specifier.contains(Version(pins[name]), prereleases=True), (
                f"Colab {runtime} has {name}=={pins[name]}, outside the project's {req}: the install would replace it")
        assert sorted(missing) == ["mlflow", "ray", "simplejpeg"], (runtime, missing)


def test_stub_site_and_plan_parsing(tmp_path):
    site = colab.stub_site(colab.RUNTIMES["2026-08-19"][0], tmp_path / "site")
    meta = (site / "torch-2.11.0+cu128.dist-info" / "METADATA").read_text()
    assert "Name: torch\nVersion: 2.11.0+cu128" in meta
    assert (site / "numpy-2.1.3.dist-info").is_dir() and (site / "protobuf-5.29.6.dist-info").is_dir()
    out = " - aiohttp==3.14.3\n + aiohttp==3.14.5\n + ray==2.60.0\n - numpy==2.1.3\n + numpy==2.3.0\n" \
          " + orchestrator @ file:///x\n - torchvision==0.26.0+cu128\n"
    replaced, added, removed = colab.parse_plan(out)
    assert replaced == {"aiohttp": ["3.14.3", "3.14.5"], "numpy": ["2.1.3", "2.3.0"]}
    assert added == {"ray": "2.60.0"} and removed == ["torchvision"]
    assert colab.in_ml_stack("numpy") and colab.in_ml_stack("nvidia-cudnn-cu12") and colab.in_ml_stack(
        "tensorflow-text")
    assert colab.in_ml_stack("jax-cuda12-plugin") and colab.in_ml_stack("Protobuf") and not colab.in_ml_stack("aiohttp")


def test_the_plan_is_the_notebooks_own_install_command():
    cmd = colab.notebook_install_command()
    assert cmd[:4] == ["uv", "pip", "install", "--system"] and cmd[-2:] == ["-e", "."], cmd
    # No constraints or extras in the cell: what the dry run resolves is what a user's cell resolves.
    assert not any(a in ("-c", "--constraint", "-r") or a.startswith("--constraint") for a in cmd), cmd


@pytest.fixture(scope="module")
def uv_cache(tmp_path_factory):
    """One cold cache for both runtimes: nothing from the machine's own uv cache."""
    return tmp_path_factory.mktemp("uv-cache")


@pytest.mark.network
@pytest.mark.parametrize("runtime", sorted(colab.RUNTIMES))
def test_install_into_colab_replaces_nothing_of_its_ml_stack(runtime, tmp_path, uv_cache):
    plan = colab.install_plan(runtime, workdir=tmp_path, cache_dir=uv_cache)
    assert plan.replaced_ml_stack == [], f"the install would replace Colab's {plan.replaced_ml_stack}: {plan.replaced}"
    assert plan.removed == []
    assert set(plan.replaced) == set(UPGRADED[runtime]), (
        "the packages of Colab's that the install upgrades changed; list each with why (UPGRADED here, the "
        f"notebook's install cell, README): {json.dumps(plan.replaced)}")
    assert set(plan.added) == ADDED[runtime], f"added packages changed: {sorted(set(plan.added) ^ ADDED[runtime])}"
    assert plan.added["ray"] == "2.60.0" and plan.added["mlflow"].startswith("3.17.")


def test_the_notebook_names_every_upgrade():
    nb = json.loads(colab.NOTEBOOK.read_text())
    text = "\n".join("".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "markdown")
    for runtime, upgraded in UPGRADED.items():
        for name in upgraded:
            assert name in text, f"the notebook does not name {name}, which the install upgrades on Colab {runtime}"
