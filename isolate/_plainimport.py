"""isolate's own modules load from their bytecode caches, never assertion-rewritten.

pytest rewrites the asserts of every module in a distribution that declares a ``pytest11``
plugin, isolate's ~60 among them. Where it cannot cache what it rewrote
(``PYTHONDONTWRITEBYTECODE`` set, or a site-packages the test user cannot write), it parses,
rewrites and compiles them at every start, ~0.1 s of CPU in the xdist controller before
any worker can start. isolate's asserts are internal invariants that no test reads, so its
submodules are found as Python finds them without pytest: :class:`StandardImport`, ahead of
pytest's hook on ``sys.meta_path``, answers for ``isolate.*`` only. Importing this module
installs it (``isolate/__init__.py`` does that first).
"""

from __future__ import annotations

import contextlib
import importlib.machinery
import sys
from collections.abc import Sequence
from types import ModuleType

__all__ = ["StandardImport", "install"]


_PREFIX = __name__.rpartition(".")[0] + "."


class StandardImport:
    """A meta path finder for isolate's submodules: what the standard path finder finds."""

    @classmethod
    def find_spec(
        cls, name: str, path: Sequence[str] | None = None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if not name.startswith(_PREFIX):
            return None
        return importlib.machinery.PathFinder.find_spec(name, path, target)


def install() -> None:
    """Put :class:`StandardImport` first on ``sys.meta_path``: pytest puts its hook first
    when it configures, so the plugin calls this again once it has (in every process)."""
    if sys.meta_path[:1] != [StandardImport]:
        with contextlib.suppress(ValueError):
            sys.meta_path.remove(StandardImport)
        sys.meta_path.insert(0, StandardImport)


install()
