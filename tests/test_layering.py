"""Guards that keep the package's shape: layers import downward only, no import cycles, small modules.

The layers, top to bottom (README "Layout"):

    orchestrator/ (the driver)  ->  workers/ (what a Ray Train worker runs)  ->  storage/  ->  common/
    bench/ sits beside the driver and may use every layer; no layer imports bench/.

Every import counts, the ones inside functions too: a lazy import still ties the modules together (it
runs on the first call instead of at load), and "fixed" cycles tend to come back through them. The
graph is built from the source alone (ast), without importing anything, so it also covers modules
that need torch or Ray to import.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("common", "storage", "workers", "orchestrator", "bench")

# What each layer must never import (its own modules and the layers below it are fine).
FORBIDDEN: dict[str, tuple[str, ...]] = {
    "common": ("storage", "workers", "orchestrator", "bench"),
    "storage": ("workers", "orchestrator", "bench"),
    "workers": ("orchestrator", "bench"),
    "orchestrator": ("bench",),
}

MAX_LINES = 500
# A module over MAX_LINES says why it is one piece, in its docstring, with this phrase.
ONE_PIECE = "one piece"


@dataclass(frozen=True)
class Edge:
    """One import statement of module `src` that loads project module `dst`."""

    src: str
    dst: str
    path: str
    line: int

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.src} -> {self.dst}"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _project_files() -> dict[str, Path]:
    """Dotted module name -> file, for every .py of the layered packages (a package is its __init__)."""
    return {_module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


MODULES = _project_files()


def _known(name: str) -> str | None:
    """The project module that importing `name` ends at: the longest prefix of it that is a module.

    None for names outside the project (torch, ray, the standard library)."""
    parts = name.split(".")
    while parts:
        candidate = ".".join(parts)
        if candidate in MODULES:
            return candidate
        parts.pop()
    return None


def _base_package(module: str, level: int) -> str:
    """The package a relative import of `level` dots in `module` starts from."""
    is_package = MODULES[module].name == "__init__.py"
    parts = module.split(".") if is_package else module.split(".")[:-1]
    drop = level - 1
    if drop > len(parts):
        raise AssertionError(f"{MODULES[module]}: relative import above the top-level package")
    return ".".join(parts[: len(parts) - drop])


def _targets(module: str, node: ast.Import | ast.ImportFrom) -> Iterator[str]:
    """The project modules one import statement loads (only the one each name resolves to)."""
    if isinstance(node, ast.Import):
        for alias in node.names:
            if (dst := _known(alias.name)) is not None:
                yield dst
        return
    if node.level:
        base = _base_package(module, node.level)
        source = f"{base}.{node.module}" if node.module and base else (node.module or base)
    else:
        source = node.module or ""
    for alias in node.names:
        # `from pkg import sub` loads the submodule pkg.sub; `from mod import name` loads mod.
        sub = f"{source}.{alias.name}"
        dst = sub if sub in MODULES else _known(source)
        if dst is not None:
            yield dst


def _edges_of(module: str) -> list[Edge]:
    path = MODULES[module]
    rel = str(path.relative_to(ROOT))
    out = []
    for node in ast.walk(ast.parse(path.read_text(), rel)):
        if isinstance(node, ast.Import | ast.ImportFrom):
            out += [Edge(module, dst, rel, node.lineno) for dst in _targets(module, node) if dst != module]
    return out


# One edge per (statement line, target): `from m import a, b` is one dependency.
EDGES = sorted({e for m in MODULES for e in _edges_of(m)}, key=lambda e: (e.path, e.line, e.dst))


def _strongly_connected(nodes: list[str], edges: list[Edge]) -> list[list[str]]:
    """Tarjan's algorithm, iterative (no recursion limit to meet); components of two or more modules."""
    succ: dict[str, list[str]] = {n: [] for n in nodes}
    for e in edges:
        succ[e.src].append(e.dst)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    out: list[list[str]] = []
    for root in nodes:
        if root in index:
            continue
        work = [(root, iter(succ[root]))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is None:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    comp = []
                    while True:
                        top = stack.pop()
                        on_stack.discard(top)
                        comp.append(top)
                        if top == node:
                            break
                    if len(comp) > 1:
                        out.append(sorted(comp))
            elif child not in index:
                index[child] = low[child] = len(index)
                stack.append(child)
                on_stack.add(child)
                work.append((child, iter(succ[child])))
            elif child in on_stack:
                low[node] = min(low[node], index[child])
    return sorted(out)


def _layer(module: str) -> str:
    return module.split(".")[0]


# --- the resolver itself: if it misread imports, the guards below would pass on anything -------------------------


def test_the_graph_sees_every_import_form() -> None:
    """Absolute, relative, `import a.b`, `from pkg import sub` and function-local imports all become edges."""
    assert len(MODULES) > 50 and all(_layer(m) in PACKAGES for m in MODULES)
    some_pkg = next(m for m, p in MODULES.items() if p.name == "__init__.py" and "." in m)
    sub = next(m for m in MODULES if m.startswith(some_pkg + ".") and m.count(".") == some_pkg.count(".") + 1)
    leaf = sub.rsplit(".", 1)[1]
    parent = some_pkg.rsplit(".", 1)[0]
    cases = {
        f"import {sub}": sub,
        f"import {sub} as x": sub,
        f"from {some_pkg} import {leaf}": sub,                  # a submodule: the edge goes to it
        f"from {some_pkg} import not_a_module_name": some_pkg,  # a name: the edge goes to the package
        f"from . import {leaf}": sub,
        "from .. import x": parent,
        f"def f():\n    from .{leaf} import y": sub,
        "import os, numpy.linalg": None,
    }
    src = f"{some_pkg}.__probe__"
    MODULES[src] = MODULES[some_pkg].parent / "__probe__.py"
    try:
        for code, want in cases.items():
            got = [d for n in ast.walk(ast.parse(code)) if isinstance(n, ast.Import | ast.ImportFrom)
                   for d in _targets(src, n)]
            assert got == ([want] if want else []), (code, got)
        # From a package's __init__, one dot is the package itself.
        node = ast.parse(f"from . import {leaf}").body[0]
        assert isinstance(node, ast.ImportFrom)
        assert list(_targets(some_pkg, node)) == [sub]
    finally:
        del MODULES[src]


def test_cycle_finder_reports_every_cycle() -> None:
    edges = [Edge(a, b, "x.py", 1) for a, b in
             [("a", "b"), ("b", "c"), ("c", "a"), ("c", "d"), ("d", "e"), ("e", "d"), ("f", "a")]]
    assert _strongly_connected(list("abcdef"), edges) == [["a", "b", "c"], ["d", "e"]]


# --- the guards -----------------------------------------------------------------------------------------------------


def test_no_import_cycles() -> None:
    """No two project modules import each other, directly or around a loop, not even from inside a function."""
    cycles = _strongly_connected(list(MODULES), EDGES)
    report = []
    for comp in cycles:
        members = set(comp)
        inside = sorted((e for e in EDGES if e.src in members and e.dst in members), key=lambda e: (e.path, e.line))
        report.append(f"cycle through {', '.join(comp)}:\n" + "\n".join(f"    {e}" for e in inside))
    assert not cycles, f"{len(cycles)} import cycle(s):\n" + "\n".join(report)


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_layers_import_downward_only(layer: str) -> None:
    ups = [str(e) for e in EDGES if _layer(e.src) == layer and _layer(e.dst) in FORBIDDEN[layer]]
    assert not ups, f"{layer}/ imports from {', '.join(FORBIDDEN[layer])}:\n" + "\n".join(ups)


def test_common_is_torch_free() -> None:
    """common/ holds the values the driver and the workers share; the driver must not need torch to read them."""
    bad = []
    for module, path in MODULES.items():
        if _layer(module) != "common":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
            bad += [f"{path.relative_to(ROOT)}:{node.lineno} imports {n}" for n in names
                    if n == "torch" or n.startswith("torch.")]
    assert not bad, "\n".join(bad)


def test_model_modules_do_not_import_their_own_package() -> None:
    """A model module takes MODELS from workers.models.registry, never from the package that imports it."""
    bad = [str(e) for e in EDGES
           if e.src.startswith("workers.models.") and e.src.count(".") == 2 and e.dst == "workers.models"]
    assert not bad, "\n".join(bad)


def test_modules_are_small_or_say_why_not() -> None:
    """A module over 500 lines is split, or its docstring says why it is "one piece"."""
    big = []
    for path in MODULES.values():
        text = path.read_text()
        lines = text.count("\n") + (not text.endswith("\n") and bool(text))
        if lines <= MAX_LINES:
            continue
        doc = ast.get_docstring(ast.parse(text)) or ""
        if ONE_PIECE not in " ".join(doc.lower().split()):
            big.append(f"{path.relative_to(ROOT)}: {lines} lines, docstring does not say why it is one piece")
    assert not big, "\n".join(sorted(big))
