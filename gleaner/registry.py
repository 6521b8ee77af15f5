"""Registries at the extension points: selectors, raters, scorers, eval sets, export formats.

Config choices, CLI choices and the reports derive from these, so a new
selector is one file with one registration line::

    from gleaner.registry import register

    @register("selector", "toy")
    def select_toy(data, settings): ...

Built-in entries live in the modules named in :data:`BUILTINS` (imported the
first time a registry is used). Others come from plugins: modules named in the
``GLEANER_PLUGINS`` environment variable (comma-separated), or installed
packages exposing the ``gleaner.plugins`` entry-point group; importing a plugin
runs its ``register`` lines.
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

# kind -> the modules whose import registers the built-in entries
BUILTINS: dict[str, tuple[str, ...]] = {
    "selector": ("gleaner.tasks.select.selectors",),
    "signal": ("gleaner.tasks.select.signals",),
    "rater": ("gleaner.tasks.rate.raters",),
    "scorer": ("gleaner.tasks.deita.score",),
    "generation_backend": ("gleaner.tasks.evaluate.backends",),
    "eval_set": ("gleaner.tasks.evaluate.eval_sets",),
    "export_format": ("gleaner.tasks.publish.export",),
    "response_source": ("gleaner.tasks.compare.sources",),
}


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
        for module in BUILTINS.get(self.kind, ()):
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
