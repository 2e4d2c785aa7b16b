"""Name -> object registries, so that recipes only name models, losses and metrics.

Besides its registered names, a registry resolves the names a user brings (common/plugins.py):
an import path ("mypkg.nets:TinyUNet") and, when the registry has an entry point group, the names
installed packages register there. Built-in names resolve first, exactly as before.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, Generic, TypeVar, cast

from common.plugins import entry_point_names, is_import_path, load_entry_point, resolve_import_path

T = TypeVar("T")


class UnknownNameError(KeyError):
    """An unknown registry name; the message lists the valid ones."""

    def __str__(self) -> str:  # KeyError would repr() the message with quotes
        return str(self.args[0])


class Registry(Generic[T]):
    """A small named registry. `kind` appears in error messages ("unknown loss 'x'").

    `entry_points`: the entry point group where installed packages add names (e.g. "orchestrator.models");
    `accepts`: a check of what an import path or entry point resolved to (a message when it does not fit)."""

    def __init__(self, kind: str, entry_points: str | None = None,
                 accepts: Callable[[Any], str | None] | None = None) -> None:
        self.kind = kind
        self.group = entry_points
        self.accepts = accepts
        self._items: dict[str, T] = {}
        self._plugins: dict[str, T] = {}  # import paths and entry points resolved so far
        self._entry_points_read = False

    def register(self, name: str) -> Callable[[T], T]:
        def deco(obj: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._items[name] = obj
            return obj

        return deco

    def _entry_point_names(self) -> list[str]:
        return [n for n in entry_point_names(self.group) if n not in self._items] if self.group else []

    def _unknown(self, name: str) -> str:
        valid = ", ".join(sorted([*self._items, *self._entry_point_names()]))
        return f"unknown {self.kind} {name!r}; valid: {valid}"

    def resolve(self, name: str) -> T:
        """The object `name` names: registered, an import path, or an entry point; else ValueError."""
        if name in self._items:
            return self._items[name]
        if name in self._plugins:
            return self._plugins[name]
        if is_import_path(name):
            obj = resolve_import_path(name, self.kind)
        elif self.group and name in entry_point_names(self.group):
            obj = load_entry_point(self.group, name)
        else:
            raise ValueError(self._unknown(name))
        why = self.accepts(obj) if self.accepts else None
        if why:
            raise ValueError(f"{self.kind} {name!r}: {why}")
        self._plugins[name] = cast(T, obj)
        return self._plugins[name]

    def get(self, name: str) -> T:
        try:
            return self.resolve(name)
        except ValueError as exc:
            raise UnknownNameError(str(exc)) from None

    def check(self, name: str) -> str:
        """`name` if it resolves; else ValueError (what pydantic validators raise) listing the valid ones."""
        self.resolve(name)
        return name

    def names(self) -> list[str]:
        return sorted(self._items)

    def in_order(self) -> list[str]:
        """The names in registration order (help texts list built-ins in their own order)."""
        return list(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())
