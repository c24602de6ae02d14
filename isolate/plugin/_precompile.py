"""Test modules and conftests assertion-rewritten once, in the zygote, for every forked
worker (``--isolate-fork-workers``).

Each worker imports its conftests and test modules itself (they may read the worker's
environment at import), and pytest rewrites their asserts as it imports them. Where pytest
cannot cache what it rewrote (``PYTHONDONTWRITEBYTECODE`` set, or a directory the test user
cannot write), every worker parses, rewrites and compiles the same files again: ~0.12 s of
CPU per worker for the example's eleven files, all workers at once on a small machine.

The zygote has the time: it waits between the launchers' requests. So it rewrites the files
a worker will (the conftests and the files matching ``python_files`` under the run's
arguments, or ``testpaths``) while it has nothing else to do, the same way pytest does
(pytest's own rewrite, with the controller's configuration); a worker forked after that
takes the code for a file from it if the file still holds exactly the source it was made
from, and otherwise rewrites the file as it always would. Only the rewriting is shared:
each worker still imports (runs) every module itself.
"""

from __future__ import annotations

import contextlib
import fnmatch
import glob
import logging
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

__all__ = ["MAX_BYTES", "MAX_FILES", "RewrittenModules"]

logger = logging.getLogger(__name__)

#: The most files, and bytes of source, the zygote rewrites ahead (a larger suite shares
#: the first ones; its workers rewrite the rest as before).
MAX_FILES = 2000
MAX_BYTES = 32 << 20

_REWRITE_MODULE = "_pytest.assertion.rewrite"
_REWRITE_FUNCTION = "_rewrite_test"  # (path, config) -> what pytest compiles the module to


class RewrittenModules:
    """The rewritten code of a run's test modules and conftests, made in the zygote."""

    def __init__(self, early_config: pytest.Config) -> None:
        self._config = early_config
        self._module: Any = sys.modules.get(_REWRITE_MODULE)
        rewrite = getattr(self._module, _REWRITE_FUNCTION, None)
        rewrites = callable(rewrite) and early_config.getoption("assertmode", "rewrite") == "rewrite"
        #: pytest's rewrite, where this run rewrites asserts the way this module knows.
        self._rewrite: Callable[[Path, pytest.Config], object] | None = rewrite if rewrites else None
        self._todo = self._candidates()  # a generator: the walk happens step by step
        self.code: dict[str, tuple[bytes, object]] = {}  # path: (its source, pytest's result)
        self._bytes = 0

    def step(self) -> bool:
        """Rewrite the next file; ``False`` once there is nothing left to do."""
        rewrite = self._rewrite
        if rewrite is None or len(self.code) >= MAX_FILES or self._bytes >= MAX_BYTES:
            return False
        for path in self._todo:
            if not _uncached(path):
                continue
            with contextlib.suppress(Exception):  # a file pytest cannot parse: the worker reports it
                source = path.read_bytes()
                self.code[str(path)] = (source, rewrite(path, self._config))
                self._bytes += len(source)
            return True
        return False

    def install(self) -> None:
        """In a forked worker: pytest takes a file's code from here while its source is
        unchanged."""
        if not self.code or self._rewrite is None:
            return
        original, code = self._rewrite, self.code

        def rewrite_test(fn: Path, config: pytest.Config) -> object:
            made = code.get(str(fn))
            if made is not None:
                with contextlib.suppress(OSError):
                    if Path(fn).read_bytes() == made[0]:
                        return made[1]
            return original(fn, config)

        rewrite_test.shared = code  # type: ignore[attr-defined]  # what a test can look at
        setattr(self._module, _REWRITE_FUNCTION, rewrite_test)

    def _candidates(self) -> Iterator[Path]:
        """The files a worker will rewrite: conftests above and under the run's paths, then
        the test files under them, in the order pytest collects."""
        config = self._config
        patterns = [*config.getini("python_files"), "conftest.py"]
        skip = config.getini("norecursedirs")
        roots = self._roots()
        seen: set[Path] = set()
        for root in roots:
            for parent in reversed([root, *root.parents] if root.is_dir() else list(root.parents)):
                conftest = parent / "conftest.py"
                if parent.is_relative_to(config.rootpath) and conftest not in seen and conftest.is_file():
                    seen.add(conftest)
                    yield conftest
        for root in roots:
            if root.is_file():
                if root not in seen and root.suffix == ".py":
                    seen.add(root)
                    yield root
                continue
            for path in _walk(root, patterns, skip):
                if path not in seen:
                    seen.add(path)
                    yield path

    def _roots(self) -> list[Path]:
        """The paths the run was given (``path::test`` counts as the path), else
        ``testpaths`` as pytest would use it, else the invocation directory."""
        config = self._config
        here = config.invocation_params.dir
        given = getattr(getattr(config, "known_args_namespace", None), "file_or_dir", None) or []
        paths = [here / str(arg).partition("::")[0] for arg in given]
        if not given and here == config.rootpath:
            for pattern in config.getini("testpaths"):
                paths.extend(Path(p) for p in sorted(glob.iglob(str(config.rootpath / pattern), recursive=True)))
        return [p.resolve() for p in (paths or [here]) if p.exists()]


def _walk(directory: Path, patterns: list[str], skip: list[str]) -> Iterator[Path]:
    try:
        entries = sorted(os.scandir(directory), key=lambda e: e.name)
    except OSError:
        return
    for entry in entries:
        if entry.is_dir(follow_symlinks=False):
            if entry.name == "__pycache__" or any(fnmatch.fnmatch(entry.name, p) for p in skip):
                continue
            if os.path.exists(os.path.join(entry.path, "pyvenv.cfg")):  # a virtualenv
                continue
            yield from _walk(Path(entry.path), patterns, skip)
        elif entry.name.endswith(".py") and any(fnmatch.fnmatch(entry.name, p) for p in patterns):
            yield Path(entry.path)


def _uncached(path: Path) -> bool:
    """pytest will rewrite ``path`` at every import: it may not write its bytecode, or
    cannot write it there."""
    if sys.dont_write_bytecode:
        return True
    cache = path.parent / "__pycache__"
    return not os.access(cache if cache.exists() else path.parent, os.W_OK)
