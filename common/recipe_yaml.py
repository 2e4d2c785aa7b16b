"""Recipe files before they are typed: safe YAML loading, `--set a.b=value` overrides, and pydantic's
errors as one line per field. Shared by recipes, sweep files and study files (common/recipe.py types them)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from common.errors import RecipeError


def format_validation_error(source: str, err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"] if p not in ("function-after",))
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown field (check its spelling against the recipe reference in README)"
        if not loc:
            # Whole-recipe checks name their own fields: "stages.0.resolution: ..." per line.
            for line in msg.splitlines():
                field, sep, rest = line.partition(": ")
                lines.append(f"{source}: field '{field}': {rest}" if sep and " " not in field
                             else f"{source}: field '<root>': {line}")
            continue
        lines.append(f"{source}: field '{loc}': {msg}")
    return "\n".join(lines)


def _parse_override(item: str, where: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise RecipeError(f"{where}: expected KEY=VALUE, e.g. --set stages.spine.batch_size=64")
    key, _, raw = item.partition("=")
    if not key or any(not p for p in key.split(".")):
        raise RecipeError(f"{where}: bad key {key!r}")
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError as exc:
        raise RecipeError(f"{where}: value is not valid YAML ({exc.__class__.__name__})") from None
    return key.split("."), value


def apply_override(data: dict[str, Any], item: str, where: str | None = None) -> None:
    """Set a dotted key; list items are addressed by index or, for stages, by name.

    `where` starts an error's message (default: the --set option itself), so a key that comes from a
    sweep file is named there."""
    where = where or f"--set {item!r}"
    parts, value = _parse_override(item, where)
    node: Any = data
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if isinstance(node, list):
            idx = _list_index(node, part, where)
            if last:
                node[idx] = value
            else:
                node = node[idx]
        elif isinstance(node, dict):
            if last:
                node[part] = value
            else:
                node = node.setdefault(part, {})
        else:
            raise RecipeError(f"{where}: '{'.'.join(parts[:i])}' is a value, not a section")


def _list_index(node: list[Any], part: str, where: str) -> int:
    if part.lstrip("-").isdigit():
        idx = int(part)
        if not -len(node) <= idx < len(node):
            raise RecipeError(f"{where}: index {idx} out of range (there are {len(node)})")
        return idx
    for idx, x in enumerate(node):
        if isinstance(x, dict) and x.get("name") == part:
            return idx
    names = [x.get("name") for x in node if isinstance(x, dict)]
    raise RecipeError(f"{where}: no item named {part!r}; valid: {', '.join(map(str, names))}")


def load_recipe_dict(path: str, kind: str = "recipe", expect: str = "a recipe must be a YAML mapping with at least "
                                                                    "'run' and 'stages'") -> dict[str, Any]:
    p = Path(path)
    if p.is_dir():
        raise RecipeError(f"{path}: is a folder, not a {kind} file")
    if not p.is_file():
        raise RecipeError(f"{path}: {kind} file not found")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise RecipeError(f"{path}: malformed YAML{where}: {problem}") from None
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: {expect}")
    return data
