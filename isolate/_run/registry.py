"""The run's registry: every process isolate starts, so the controller can reap it.

A record is written the moment a process is spawned; the controller (or, if it died,
the run's watchdog) stops whatever is still registered when the run ends, crashed
workers' leftovers included. Containers are not recorded here: the Docker backend
finds them by their run label.

The reaper trusts only what this user wrote: record files owned by the current user
and writable by nobody else, processes whose start time matches the record (no kill of
a reused pid), and paths inside the run dir. Anything else is skipped with a warning.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .._fs import owned_by_me
from .._retry import poll_until
from .groups import children, group_alive, live_leaders, members, send, stop_group
from .liveness import is_alive, process_start_ticks

__all__ = ["ProcessRecord", "ProcessRegistry", "stop_tree"]

logger = logging.getLogger(__name__)


def stop_tree(pid: int, start_ticks: int | None, sig: int, timeout: float) -> None:
    """Stop the group and session led by ``pid`` and, first found, its children that
    lead sessions of their own (the services a fork server forked)."""
    own = set(members(pid, start_ticks))
    kids = [(kid, process_start_ticks(kid)) for kid in children(pid, start_ticks) if kid not in own]
    stop_group(pid, start_ticks, sig, timeout)
    if not kids:
        return
    # A parent that stops its children (PostgreSQL's eight lead sessions of their own) has
    # left nothing of them: one pass over /proc finds what is left, not one per child.
    live = live_leaders()
    for kid, ticks in kids:
        if live is None or kid in live:
            stop_group(kid, ticks, signal.SIGTERM, timeout)


@dataclass
class ProcessRecord:
    """What the reaper needs to stop a process (group) nobody else will stop."""

    name: str
    pid: int | None = None
    start_ticks: int | None = None
    stop_signal: int = signal.SIGTERM
    paths: list[str] = field(default_factory=list)
    owner_pid: int = field(default_factory=os.getpid)
    #: The pid leads its own process group (signal the group), else only the process.
    group: bool = True
    #: ``worker``: dies with the worker that made it (a replaced worker's leftovers are
    #: reaped when its successor starts); ``run``: shared, lives until the run ends.
    scope: str = "worker"
    owner_ticks: int | None = field(default_factory=lambda: process_start_ticks(os.getpid()))
    #: A worker: frozen (SIGSTOP) before anything of the run is reaped, so it cannot start
    #: a process after the reaper's pass, then killed.
    freeze: bool = False


def _stop(record: ProcessRecord, timeout: float) -> None:
    assert record.pid is not None
    if record.group:
        stop_tree(record.pid, record.start_ticks, record.stop_signal, timeout)
        return
    pid, ticks = record.pid, record.start_ticks
    sig = signal.SIGKILL if record.freeze else record.stop_signal  # a frozen worker ends now
    if send(pid, ticks, sig) and not poll_until(lambda: not is_alive(pid, ticks), timeout):
        send(pid, ticks, signal.SIGKILL)


class ProcessRegistry:
    """Records of live processes and dirs in a run dir (``root``), for the reaper."""

    def __init__(self, directory: Path, root: Path | None = None) -> None:
        self.directory = directory
        self.root = root or directory.parent

    def _file(self, name: str) -> Path:
        return self.directory / f"{name}.json"

    def register(self, record: ProcessRecord) -> None:
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        tmp = self._file(record.name).with_suffix(f".tmp{os.getpid()}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(json.dumps(asdict(record)))
        tmp.replace(self._file(record.name))

    def unregister(self, name: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self._file(name).unlink()

    def records(self) -> Iterator[ProcessRecord]:
        """Every record this user wrote (others are skipped with a warning)."""
        if not owned_by_me(self.directory):
            if self.directory.exists():
                logger.warning("not reaping %s: not this user's, or writable by others", self.directory)
            return
        for path in sorted(self.directory.glob("*.json")):
            if not owned_by_me(path):
                logger.warning("skipping registry record %s: not this user's", path)
                continue
            try:
                yield ProcessRecord(**json.loads(path.read_text()))
            except (OSError, ValueError, TypeError) as exc:
                logger.warning("skipping malformed registry record %s: %s", path, exc)

    def _inside(self, raw: str) -> Path | None:
        path = Path(os.path.normpath(raw))
        root = Path(os.path.normpath(self.root))
        return path if path.is_absolute() and path.is_relative_to(root) and path != root else None

    def reap_dead_workers(self, timeout: float = 10.0) -> list[str]:
        """Stop the worker-scoped processes whose worker has died (a crashed worker's
        service and Redis), at once rather than at the end of the run."""
        dead = [
            r for r in self.records()
            if r.scope == "worker" and not is_alive(r.owner_pid, r.owner_ticks)
        ]  # fmt: skip
        return self._reap(dead, timeout)

    def reap(self, timeout: float = 10.0) -> list[str]:
        """Stop everything of the run (workers first, PostgreSQL last) and remove its
        paths; the names reaped. A process is only signalled if its start time matches.

        Workers still alive (the controller died, or an interruption is cut short) are
        frozen first, so none starts anything after the pass; what they spawned without
        having registered it yet (their children) is stopped with them; and the registry
        is read again until a pass finds nothing new.
        """
        reaped: list[str] = []
        for _ in range(5):
            records = list(self.records())
            frozen = [r for r in records if r.freeze and r.pid and send(r.pid, r.start_ticks, signal.SIGSTOP)]
            known = {r.pid for r in records}
            strays = [ProcessRecord(name=f"child-{kid}-of-{r.name}", pid=kid, start_ticks=process_start_ticks(kid))
                      for r in frozen for kid in children(r.pid, r.start_ticks) if kid not in known]  # type: ignore[arg-type]  # fmt: skip
            done = self._reap(records, timeout)
            done += self._reap(strays, timeout, registered=False)
            reaped += done
            if not done and not strays:
                break
        return reaped

    def _reap(self, records: list[ProcessRecord], timeout: float, *, registered: bool = True) -> list[str]:
        reaped = []
        # Frozen workers after what they started; PostgreSQL last (workers' schemas).
        order = sorted(records, key=lambda r: (r.freeze, r.group, r.name == "postgres", r.name))
        for record in order:
            if record.pid is not None and record.start_ticks is not None:
                alive = group_alive if record.group else is_alive
                if alive(record.pid, record.start_ticks):  # a dead leader's group, too
                    _stop(record, timeout)
                    reaped.append(record.name)
            elif record.pid is not None:
                logger.warning("not stopping pid %s of %s: no start time to verify it", record.pid, record.name)
            for raw in record.paths:
                inside = self._inside(raw)
                if inside is None:
                    logger.warning("not removing %s of %s: outside the run dir", raw, record.name)
                elif inside.is_dir() and not inside.is_symlink():
                    shutil.rmtree(inside, ignore_errors=True)  # never follows a symlink
                else:
                    with contextlib.suppress(OSError):
                        inside.unlink()
            if registered:
                self.unregister(record.name)
        return reaped
