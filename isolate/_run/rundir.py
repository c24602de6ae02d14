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

from .._errors import ConfigError, ServerStartError
from .._fs import owned_by_me
from .liveness import Owner
from .notices import NOTICE
from .registry import ProcessRegistry

__all__ = ["RUN_PREFIX", "RunDir", "stale_runs", "write_json"]

logger = logging.getLogger(__name__)

RUN_PREFIX = "isolate-run-"


def write_json(path: Path, data: Mapping[str, object]) -> None:
    """Write ``data`` atomically (readers never see half a file), readable by this user only."""
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(json.dumps(data))
    tmp.replace(path)


class RunDir:
    """The directory of one run, shared by the controller and its workers."""

    def __init__(self, base: Path, run_id: str) -> None:
        self.base = base
        self.run_id = run_id
        self.path = base / f"{RUN_PREFIX}{run_id}"
        self.registry = ProcessRegistry(self.path / "registry", self.path)
        self.timings_path = self.path / "timings.jsonl"
        self.notices_path = self.path / "notices.jsonl"
        #: Set by :meth:`reap`: the run had labelled containers (see :meth:`mark_containers`).
        self.had_containers = False

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    def create(self, owner: Owner, **facts: str) -> None:
        """Make the dir (0711) and record its owner (controller only).

        A dir of that name that this user did not make (planted by someone else in a
        shared base dir) is an error, never adopted.
        """
        self.base.mkdir(parents=True, exist_ok=True)
        try:
            self.path.mkdir(mode=0o711)
        except FileExistsError:
            self._reuse()
            self.path.mkdir(mode=0o711)
        os.chmod(self.path, 0o711)
        write_json(self.path / "owner.json", {**owner.to_json(), **facts, "created": time.time()})

    def _reuse(self) -> None:
        """The run id names an existing dir: remove it if it is a dead run of this user's,
        else refuse (a live run's id is never adopted, a kept run is kept)."""
        hint = "use another --isolate-run-id (or none: a new id per run), or another --isolate-base-dir"
        owner = self.owner()
        if owner is None:
            raise ConfigError(f"run dir {self.path} exists and is not a run of this user's", hint=hint)
        if self.is_kept():
            raise ConfigError(f"run {self.run_id} is a kept run (--isolate-keep)",
                              hint=f"python -m isolate cleanup {self.run_id} removes it; or {hint}")  # fmt: skip
        if not owner.gone():
            raise ConfigError(f"run id {self.run_id} is in use by a live run (pid {owner.pid})",
                              hint=f"two runs at once cannot share a run id: {hint}")  # fmt: skip
        logger.warning("isolate: reaping the dead run %s whose id this run reuses", self.run_id, extra=NOTICE)
        self.reap()

    def facts(self) -> dict[str, object]:
        """What the controller recorded (owner, backend, creation time); empty if
        unreadable, malformed, or not written by this user in a dir of this user's (a
        run dir planted by someone else is never ours)."""
        owner_file = self.path / "owner.json"
        if not (owned_by_me(self.path) and owned_by_me(owner_file)):
            return {}
        try:
            data = json.loads(owner_file.read_text())
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def owner(self) -> Owner | None:
        """The recorded owner, ``None`` if there is no trustworthy record (see :meth:`facts`)."""
        return Owner.parse(self.facts())

    def mark_stopping(self) -> None:
        """The run is being reaped: workers start nothing more (see :meth:`stopping`)."""
        with contextlib.suppress(OSError):
            write_json(self.path / "stopping.json", {"since": time.time()})

    def stopping(self) -> bool:
        return self.state("stopping") is not None

    def mark_lost(self, why: str) -> None:
        """Record that the run lost its lease on an external server: every worker fails
        its next test with this (see :meth:`lost`)."""
        write_json(self.path / "lost.json", {"why": why})

    def lost(self) -> str | None:
        """Why the run lost its lease, if it did (a stat per call: cheap enough per test)."""
        state = self.state("lost")
        return str(state["why"]) if state else None

    @property
    def kept_dir(self) -> Path:
        return self.path / "kept"

    def mark_kept(self, worker: str, info: Mapping[str, object]) -> None:
        """Record that a worker's stack stays up after the run (``--isolate-keep``)."""
        self.kept_dir.mkdir(mode=0o700, exist_ok=True)
        write_json(self.kept_dir / f"{worker}.json", info)

    def kept(self) -> list[dict[str, object]]:
        """What the run's workers kept; empty if nothing."""
        found = []
        for path in sorted(self.kept_dir.glob("*.json")) if owned_by_me(self.kept_dir) else ():
            with contextlib.suppress(OSError, ValueError):
                found.append(dict(json.loads(path.read_text())))
        return found

    def is_kept(self) -> bool:
        return owned_by_me(self.kept_dir)

    def exists(self) -> bool:
        return self.path.is_dir()

    def mark_containers(self) -> None:
        """Record that containers carry this run's labels although its backend is not
        docker (a testcontainers container of a native run): its reapers remove them too."""
        marker = self.path / "containers"
        if not marker.exists():
            write_json(marker, {"labelled": True})

    def has_containers(self) -> bool:
        return owned_by_me(self.path / "containers")

    def require(self) -> None:
        """Raise unless the controller created the dir."""
        if not self.exists():
            raise ConfigError(
                f"run dir {self.path} does not exist",
                hint="the isolate plugin must be active in the controller process too; "
                "do not disable it with -p no:isolate only on workers",
            )

    def worker_dir(self, slug: str) -> Path:
        """A directory private to one worker process (logs): 0700, this user's; a
        demoted service writes its log through the descriptor it is started with."""
        path = self.path / "workers" / f"{slug}-{os.getpid()}"
        for part in (path.parent, path):
            with contextlib.suppress(FileExistsError):
                part.mkdir(mode=0o700)
        return path

    def state(self, name: str) -> dict[str, object] | None:
        """What :meth:`shared` recorded for ``name``, if anything (and the file is ours)."""
        path = self.path / f"{name}.json"
        if not owned_by_me(path):
            return None
        with contextlib.suppress(OSError, ValueError):
            return dict(json.loads(path.read_text()))
        return None

    def shared(self, name: str, start: Callable[[], Mapping[str, object]]) -> dict[str, object]:
        """Run ``start`` once per run, whoever asks first; every caller gets its state.

        The state (JSON-serialisable) is kept in ``<name>.json``; concurrent callers
        wait on ``<name>.lock`` while the first one starts it.
        A failed start is recorded: every later caller gets the same error, with the
        first one's message and log tail, instead of trying again.
        """
        self.require()
        state_file = self.path / f"{name}.json"
        failed_file = self.path / f"{name}.failed.json"
        with FileLock(str(self.path / f"{name}.lock")):
            if state_file.exists():
                return dict(json.loads(state_file.read_text()))
            if failed_file.exists():
                failure = json.loads(failed_file.read_text())
                raise ServerStartError(
                    f"{name} failed to start in worker {failure['worker']}: {failure['message']}",
                    log_tail=failure.get("log_tail"), hint=failure.get("hint") or None,
                )
            try:
                state = dict(start())
            except Exception as exc:
                write_json(failed_file, {
                    "worker": os.environ.get("PYTEST_XDIST_WORKER", "main"),
                    "message": getattr(exc, "message", str(exc)),
                    "log_tail": getattr(exc, "log_tail", None),
                    "hint": getattr(exc, "hint", None),
                })  # fmt: skip
                raise
            write_json(state_file, state)
            return state

    def remove(self) -> None:
        """Remove the dir (what it registered must be stopped already)."""
        shutil.rmtree(self.path, ignore_errors=True)

    def reap(self, timeout: float = 10.0) -> list[str]:
        """Stop what its registry holds and remove the dir; the names reaped."""
        self.had_containers = self.has_containers()
        reaped = self.registry.reap(timeout)
        self.remove()
        return reaped


def stale_runs(base: Path) -> list[RunDir]:
    """This user's run dirs under ``base`` whose owner has ended (run dirs of other
    users, and unreadable or malformed owner records, are left alone)."""
    found = []
    for path in sorted(base.glob(RUN_PREFIX + "*")):
        run = RunDir(base, path.name[len(RUN_PREFIX) :])
        owner = run.owner()
        if owner is not None and owner.gone() and not run.is_kept():  # kept runs stay
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


#: The directory of an xdist controller's zygote (``plugin/_zygote.py``): its socket and log.
ZYGOTE_PREFIX = "isolate-zygote-"


def _listening_paths() -> set[str]:
    """Paths of the Unix sockets some process on this machine has bound."""
    try:
        lines = Path("/proc/net/unix").read_text().splitlines()[1:]
    except OSError:
        return set()
    return {fields[7] for fields in (line.split() for line in lines) if len(fields) > 7}


def stale_zygote_dirs(tmp: Path, min_age: float = 60.0) -> list[Path]:
    """This user's zygote dirs under ``tmp`` that no process listens in any more (a zygote
    killed with its controller by SIGKILL cannot remove its own). A dir younger than
    ``min_age`` seconds is left alone: its controller may be about to bind its socket."""
    bound = _listening_paths()
    found = []
    for path in sorted(tmp.glob(ZYGOTE_PREFIX + "*")):
        with contextlib.suppress(OSError):
            if path.is_symlink() or not owned_by_me(path) or time.time() - path.lstat().st_mtime < min_age:
                continue
            if str(path / "sock") not in bound:
                found.append(path)
    return found


def remove_stale_zygote_dirs(tmp: Path, dry_run: bool = False) -> list[Path]:
    """Remove what :func:`stale_zygote_dirs` finds; the dirs (that would be) removed."""
    dirs = stale_zygote_dirs(tmp)
    for path in [] if dry_run else dirs:
        logger.info("removing the directory of a gone zygote: %s", path)
        shutil.rmtree(path, ignore_errors=True)
    return dirs
