"""Registries at the extension points: selectors, raters, scorers, eval sets, export formats.

Config choices, CLI choices and the reports derive from these, so a new
selector is one file with one registration line::

    from gleaner.registry import register
    from gleaner.tasks.select.selectors import Selector

    def shortest(data, request):  # (Candidates, SelectRequest) -> Manifest
        ...

    register("selector", "shortest")(Selector(run=shortest, default_sort="length"))

Built-in entries live in the modules pyproject.toml names in the ``gleaner.builtins``
entry-point group, one per kind (imported the first time a registry is used).
Others come from plugins: modules named in the ``GLEANER_PLUGINS`` environment
variable (comma-separated), or installed packages exposing the ``gleaner.plugins``
entry-point group; importing a plugin runs its ``register`` lines.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import os
from collections.abc import Callable, Iterator
from typing import Any, Generic, TypeVar

T = TypeVar("T")
PLUGINS_ENV = "GLEANER_PLUGINS"
ENTRY_POINT_GROUP = "gleaner.plugins"

BUILTINS_GROUP = "gleaner.builtins"  # entry points: kind -> the module registering its entries


def builtin_modules(kind: str) -> list[str]:
    """The modules whose import registers ``kind``'s built-in entries (pyproject.toml's
    ``gleaner.builtins`` entry points named ``kind`` or ``kind.<module>``), so this shared
    layer names no stage module."""
    return [e.value for e in importlib.metadata.entry_points(group=BUILTINS_GROUP)
            if e.name == kind or e.name.startswith(f"{kind}.")]


class Registry(Generic[T]):
    """Named entries of one kind; ``get`` names the known ones when asked for another."""

    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, T] = {}
        self._loaded = False

    def add(self, name: str, entry: T) -> T:
        if name in self._entries and self._entries[name] is not entry:
            raise ValueError(f"{self.kind} {name!r} is registered twice")
        self._entries[name] = entry
        return entry

    def _load(self) -> None:
        if self._loaded:
            return
        self._loaded = True
        for module in builtin_modules(self.kind):
            importlib.import_module(module)
        load_plugins()

    def get(self, name: str) -> T:
        self._load()
        try:
            return self._entries[name]
        except KeyError:
            known = ", ".join(self.names()) or "none"
            raise ValueError(f"unknown {self.kind} {name!r}; known: {known}") from None

    def names(self) -> list[str]:
        self._load()
        return sorted(self._entries)

    def items(self) -> Iterator[tuple[str, T]]:
        self._load()
        yield from sorted(self._entries.items())

    def __contains__(self, name: str) -> bool:
        self._load()
        return name in self._entries


_REGISTRIES: dict[str, Registry[Any]] = {}
_PLUGINS_LOADED: set[str] = set()


def registry(kind: str) -> Registry[Any]:
    if kind not in _REGISTRIES:
        _REGISTRIES[kind] = Registry(kind)
    return _REGISTRIES[kind]


def register(kind: str, name: str) -> Callable[[T], T]:
    """Decorator: ``@register("selector", "deita")`` adds the object under that name."""

    def add(entry: T) -> T:
        return registry(kind).add(name, entry)

    return add


def load_plugins() -> None:
    """Import plugin modules (GLEANER_PLUGINS, then the entry points), each once."""
    names = [n.strip() for n in os.environ.get(PLUGINS_ENV, "").split(",") if n.strip()]
    for name in names:
        if name not in _PLUGINS_LOADED:
            _PLUGINS_LOADED.add(name)
            importlib.import_module(name)
    for entry_point in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        if entry_point.value not in _PLUGINS_LOADED:
            _PLUGINS_LOADED.add(entry_point.value)
            entry_point.load()
