"""The layers import downward only: orchestrator/ (driver) -> workers/, storage/ -> common/.

Nothing in storage/, workers/ or common/ may import orchestrator/ (not even inside a function),
and no model module imports the models package itself (the old workers.models <-> unet cycle).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _imports(path: Path) -> list[tuple[int, str, list[str]]]:
    """(line, module, imported names) of every import in the file, nested ones included."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name, []) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append((node.lineno, node.module, [a.name for a in node.names]))
    return out


@pytest.mark.parametrize("layer", ["storage", "workers", "common"])
def test_lower_layers_never_import_the_driver(layer: str) -> None:
    ups = [f"{p.relative_to(ROOT)}:{line} imports {mod}"
           for p in sorted((ROOT / layer).rglob("*.py"))
           for line, mod, _ in _imports(p) if mod == "orchestrator" or mod.startswith("orchestrator.")]
    assert not ups, "\n".join(ups)


def test_storage_knows_no_task_or_worker() -> None:
    """Storage sits below the tasks: it reads columns and codecs from the manifest, nothing more."""
    ups = [f"{p.relative_to(ROOT)}:{line} imports {mod}"
           for p in sorted((ROOT / "storage").rglob("*.py"))
           for line, mod, _ in _imports(p) if mod == "workers" or mod.startswith("workers.")]
    assert not ups, "\n".join(ups)


def test_model_modules_do_not_import_their_own_package() -> None:
    """A model module takes MODELS from workers.models.registry, never from the package that imports it."""
    submodules = {p.stem for p in (ROOT / "workers" / "models").glob("*.py")}
    bad = [f"{p.relative_to(ROOT)}:{line} imports {names} from workers.models"
           for p in sorted((ROOT / "workers" / "models").glob("*.py")) if p.name != "__init__.py"
           for line, mod, names in _imports(p) if mod == "workers.models" and set(names) - submodules]
    assert not bad, "\n".join(bad)
