"""Small name registries: YAML says ``method.name: dynamic_conpet``, never an import path."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")


class Registry:
    """A lower-case name -> factory map with helpful errors."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, Any] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator: register ``obj`` under ``name`` (lower-case, unique)."""

        def wrap(obj: T) -> T:
            if name != name.lower():
                raise ValueError(f"{self.kind} name '{name}' must be lower-case")
            if name in self._items:
                raise ValueError(f"{self.kind} '{name}' is already registered")
            self._items[name] = obj
            return obj

        return wrap

    def get(self, name: str) -> Any:
        """Look a name up; an unknown one lists the valid names."""
        _import_builtins()
        if name not in self._items:
            from conpet_lightning.config import ConfigError

            raise ConfigError(f"unknown {self.kind} '{name}'; registered: {', '.join(sorted(self._items))}")
        return self._items[name]

    def names(self) -> list[str]:
        """All registered names."""
        _import_builtins()
        return sorted(self._items)


METHODS = Registry("method")
CALLBACKS = Registry("callback")


_IMPORTED = False


def _import_builtins() -> None:
    """Import every module of ``methods/`` and ``callbacks/``, whose decorators fill the registries.

    Discovery is by package walk, so a new method or callback is its module alone (no list to extend); it runs once,
    lazily, so importing the package stays cheap.
    """
    global _IMPORTED
    if _IMPORTED:
        return
    _IMPORTED = True
    import importlib
    import pkgutil

    import conpet_lightning.callbacks
    import conpet_lightning.methods

    for package in (conpet_lightning.methods, conpet_lightning.callbacks):
        for info in pkgutil.walk_packages(package.__path__, prefix=f"{package.__name__}."):
            importlib.import_module(info.name)
