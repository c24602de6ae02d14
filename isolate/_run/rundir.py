"""A run's directory: owner record, registry, timings, start-once shared servers.

``<base dir>/isolate-run-<run id>/`` is created by the run's controller and shared by
its workers. :func:`stale_runs` is the one scanner of leftovers, used by the plugin at
session start and by ``python -m isolate cleanup``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Mapping
from pathlib import Path

from filelock import FileLock

from .._errors import ConfigError
from .liveness import Owner
from .registry import ProcessRegistry

__all__ = ["RUN_PREFIX", "RunDir", "stale_runs", "write_json"]

logger = logging.getLogger(__name__)

RUN_PREFIX = "isolate-run-"


def write_json(path: Path, data: Mapping[str, object]) -> None:
    """Write ``data`` atomically (readers never see half a file)."""
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(data))
    tmp.replace(path)


class RunDir:
    """The directory of one run, shared by the controller and its workers."""

    def __init__(self, base: Path, run_id: str) -> None:
        self.base = base
        self.run_id = run_id
        self.path = base / f"{RUN_PREFIX}{run_id}"
        self.registry = ProcessRegistry(self.path / "registry")
        self.timings_path = self.path / "timings.jsonl"

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    def create(self, owner: Owner) -> None:
        """Make the dir (0711) and record its owner (controller only)."""
        self.path.mkdir(mode=0o711, parents=True, exist_ok=True)
        os.chmod(self.path, 0o711)
        write_json(self.path / "owner.json", {**owner.to_json(), "created": time.time()})

    def owner(self) -> Owner | None:
        """The recorded owner, ``None`` if unreadable or malformed."""
        try:
            return Owner.parse(json.loads((self.path / "owner.json").read_text()))
        except (OSError, ValueError):
            return None

    def exists(self) -> bool:
        return self.path.is_dir()

    def require(self) -> None:
        """Raise unless the controller created the dir."""
        if not self.exists():
            raise ConfigError(
                f"run dir {self.path} does not exist",
                hint="the isolate plugin must be active in the controller process too; "
                "do not disable it with -p no:isolate only on workers",
            )

    def worker_dir(self, slug: str) -> Path:
        """A directory private to one worker process (logs)."""
        path = self.path / "workers" / f"{slug}-{os.getpid()}"
        path.mkdir(parents=True, exist_ok=True)
        return path

    def shared(self, name: str, start: Callable[[], Mapping[str, object]]) -> dict[str, object]:
        """Run ``start`` once per run, whoever asks first; every caller gets its state.

        The state (JSON-serialisable) is kept in ``<name>.json``; concurrent callers
        wait on ``<name>.lock`` while the first one starts it.
        """
        self.require()
        state_file = self.path / f"{name}.json"
        with FileLock(str(self.path / f"{name}.lock")):
            if state_file.exists():
                return dict(json.loads(state_file.read_text()))
            state = dict(start())
            write_json(state_file, state)
            return state

    def reap(self, timeout: float = 10.0) -> list[str]:
        """Stop what its registry holds and remove the dir; the names reaped."""
        reaped = self.registry.reap(timeout)
        shutil.rmtree(self.path, ignore_errors=True)
        return reaped


def stale_runs(base: Path) -> list[RunDir]:
    """Run dirs under ``base`` whose owner has ended (unreadable owners are left alone)."""
    found = []
    for path in sorted(base.glob(RUN_PREFIX + "*")):
        run = RunDir(base, path.name[len(RUN_PREFIX) :])
        owner = run.owner()
        if owner is not None and owner.gone():
            found.append(run)
    return found


def reap_stale_runs(base: Path, timeout: float = 10.0) -> list[RunDir]:
    """Reap every stale run under ``base``; the runs reaped."""
    runs = stale_runs(base)
    for run in runs:
        logger.warning("reaping stale isolate run %s (owner gone)", run.path)
        with contextlib.suppress(OSError):
            run.reap(timeout)
    return runs
