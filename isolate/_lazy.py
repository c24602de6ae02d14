"""Modules imported on first use: psycopg and redis cost ~0.15 s of CPU to import, paid by
the controller and every worker at start-up, most of which never touch them (the
controller never does). ``psycopg = lazy("psycopg")`` stands for the module and imports it
when an attribute is first read; type checkers see the real import (``TYPE_CHECKING``)."""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any

__all__ = ["lazy"]


class _LazyModule:
    __slots__ = ("_module", "_name")

    def __init__(self, name: str) -> None:
        self._name = name
        self._module: ModuleType | None = None

    def __getattr__(self, attr: str) -> Any:
        module = self._module
        if module is None:
            module = self._module = importlib.import_module(self._name)  # thread-safe
        return getattr(module, attr)

    def __repr__(self) -> str:
        return f"<lazy module {self._name!r}>"


def lazy(name: str) -> Any:
    """A stand-in for module ``name`` that imports it when first used."""
    return _LazyModule(name)
