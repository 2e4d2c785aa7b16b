"""Bring your own: objects named by import path ("module:attribute") or by an installed entry point.

A recipe may name a model, a task or a loss that the package does not ship, e.g.
`model: {name: mypkg.nets:TinyUNet}`; a package may instead register names through the entry point
groups `orchestrator.tasks`, `orchestrator.models` and `orchestrator.losses`. These helpers only
resolve; what is resolved is checked by the caller's registry. A failure is a ValueError with a
one-line message (pydantic validators and the recipe checks turn it into "field '...': ...").
"""

from __future__ import annotations

import importlib
import re
from importlib.metadata import entry_points
from typing import Any

# module.path:attribute (attribute may be dotted: a class attribute).
_IMPORT_PATH = re.compile(r"^[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*:[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*$")


def is_import_path(name: str) -> bool:
    return bool(_IMPORT_PATH.match(name))


def resolve_import_path(path: str, kind: str) -> Any:
    """The object at "module:attribute"; ValueError naming what is missing and what to do."""
    if not is_import_path(path):
        raise ValueError(f"{path!r} is not an import path; write module.path:attribute")
    module_name, _, attr = path.partition(":")
    try:
        obj: Any = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        raise ValueError(f"{kind} {path!r}: cannot import module {exc.name!r}; install the package that holds "
                         f"it or add its folder to PYTHONPATH") from None
    except Exception as exc:  # the user's module itself failed: say how, in one line
        raise ValueError(f"{kind} {path!r}: importing {module_name} failed: {type(exc).__name__}: {exc}") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"{kind} {path!r}: {module_name} has no attribute {attr!r}; check the name after ':'")
        obj = getattr(obj, part)
    return obj


def entry_point_names(group: str) -> list[str]:
    return sorted({ep.name for ep in entry_points(group=group)})


def load_entry_point(group: str, name: str) -> Any:
    for ep in entry_points(group=group):
        if ep.name == name:
            try:
                return ep.load()
            except Exception as exc:
                raise ValueError(f"entry point {name!r} of {group} ({ep.value}) failed to load: "
                                 f"{type(exc).__name__}: {exc}") from None
    raise ValueError(f"no entry point {name!r} in {group}")
