"""What the README promises about installing: ranges in pyproject.toml (so an environment's own
torch stays), exact versions in constraints.txt (what CI runs), and the two commands that use it."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import Version

REPO = Path(__file__).resolve().parents[1]


def _pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def _constraints() -> dict[str, Version]:
    pins = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            req = Requirement(line)
            (spec,) = req.specifier
            assert spec.operator == "==", line
            pins[req.name.lower().replace("_", "-")] = Version(spec.version)
    return pins


def _deps() -> list[Requirement]:
    p = _pyproject()["project"]
    return [Requirement(d) for d in p["dependencies"] + p["optional-dependencies"]["test"]]


def test_every_dependency_is_a_range_and_its_pin_lies_in_it():
    pins = _constraints()
    for req in _deps():
        name = req.name.lower().replace("_", "-")
        assert not any(s.operator == "=="
                       for s in req.specifier), f"{req}: pyproject declares ranges; pins go to constraints.txt"
        assert name in pins, f"{req.name} has no exact version in constraints.txt"
        assert req.specifier.contains(pins[name],
                                      prereleases=True), f"constraints.txt's {name}=={pins[name]} is outside {req}"


def test_python_311_to_313_and_a_newer_torch_is_left_alone():
    assert all(SpecifierSet(_pyproject()["project"]["requires-python"]).contains(v)
               for v in ("3.11.7", "3.12.1", "3.13.0"))
    assert not SpecifierSet(_pyproject()["project"]["requires-python"]).contains("3.14.0")
    (torch,) = [r for r in _deps() if r.name == "torch"]
    # A range from the oldest tested torch, Colab's 2.11 (the core of the suite runs on it, README "Python
    # and torch versions"), so the installer keeps Colab's torch; CI's 2.13.0 and 2.14.1 lie in it.
    for v in ("2.11.0", "2.11.0+cu128", "2.13.0", "2.14.1"):
        assert torch.specifier.contains(v), v
    assert not torch.specifier.contains("2.10.0")
    assert _constraints()["torch"] == Version("2.13.0")  # the CPU wheel these machines carry on disk


def test_the_floors_are_colabs_versions():
    """Each floor Colab pins is declared at Colab's version (the oldest tested), so Colab's stays."""
    floors = {"torch": "2.11", "numpy": "2.0", "pyarrow": "18.1", "fsspec": "2025.3", "gcsfs": "2025.3",
              "pillow": "11.3"}
    deps = {r.name.lower(): r for r in _deps()}
    for name, floor in floors.items():
        (spec,) = [s for s in deps[name].specifier if s.operator == ">="]
        assert spec.version == floor, f"{name}: {deps[name]}"


def test_readme_commands_use_the_constraints_and_ci_runs_the_test_command_verbatim():
    readme = (REPO / "README.md").read_text()
    ci = (REPO / ".ci" / "run").read_text()
    install = "pip install -c constraints.txt -e . && orchestrator run recipes/quickstart.yaml"
    test = "pip install -c constraints.txt -e '.[test]' && python -m pytest"
    assert install in readme and test in readme
    assert re.search(rf"^{re.escape(test)}$", ci, re.M), ".ci/run must run the README's test command verbatim"
