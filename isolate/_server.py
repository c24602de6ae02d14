"""What the native server runners (PostgreSQL, Redis) share: one process on a leased
port, one dir, run as the unprivileged run-as user when isolate runs as root."""

from __future__ import annotations

import os
import secrets
import shutil
import signal
from collections.abc import Callable, Mapping
from pathlib import Path

from ._binaries import Binary, reachable_copy
from ._fs import hand_over
from ._ports import PortLease
from ._process import ManagedProcess, RunAs, tail
from ._run.registry import ProcessRecord

__all__ = ["NativeServer"]


class NativeServer:
    """What the native server runners share: one process on a leased port, one dir.

    Subclasses start ``_proc`` on ``lease`` and set ``server`` once it is ready.
    """

    stop_signal: int = signal.SIGTERM

    def __init__(
        self, name: str, binary: Binary, directory: Path, run_as: RunAs | None,
        env: Mapping[str, str] | None = None,
    ) -> None:  # fmt: skip
        self.name = name
        #: The environment it runs with (isolate's secrets already left out).
        self.env = dict(os.environ if env is None else env)
        self.binary = binary
        self.directory = directory
        self.run_as = run_as
        #: Beside ``directory``, in the run dir: root's, so the run-as user writes it only
        #: through the descriptor it is started with.
        self.log_path = directory.with_name(f"{directory.name}.log")
        #: The server's admin (superuser) password, new for every server.
        self.password = secrets.token_urlsafe(18)
        self.lease: PortLease | None = None
        self._proc: ManagedProcess | None = None
        #: Called with its record the moment a process is spawned (before it is ready).
        self.on_spawn: Callable[[ProcessRecord], None] | None = None

    def _bin(self, name: str) -> str:
        """A program of the binary's bin dir, from where ``run_as`` can run it."""
        return str(reachable_copy(self.binary, self.run_as) / name)

    def _make_dir(self, path: Path) -> None:
        """``path``, new and empty, 0700 and this user's (an old one of ours is replaced)."""
        shutil.rmtree(path, ignore_errors=True)
        path.mkdir(mode=0o700)

    def _hand_over(self, path: Path, *, content: bool = True) -> None:
        """Give a tree root finished building to the run-as user (the server writes
        there); root never touches it by path again, but to remove it. ``content=False``:
        only ``path`` itself (what is in it was given as it was made)."""
        if self.run_as is not None:
            hand_over(path, self.run_as.uid, self.run_as.gid, content=content)

    def _spawned(self, proc: ManagedProcess, lease: PortLease) -> None:
        self._proc, self.lease = proc, lease
        if self.on_spawn is not None:
            self.on_spawn(self.record())

    @property
    def is_running(self) -> bool:
        return self._proc is not None and self._proc.running

    def stop(self, timeout: float | None = None) -> int | None:
        """Stop (its stop signal, then SIGKILL), give the port back, remove its dir."""
        code = self._proc.stop(self.stop_signal, timeout or 10.0) if self._proc else None
        if self.lease is not None:
            self.lease.release()
        shutil.rmtree(self.directory, ignore_errors=True)  # fd-based: follows no symlink
        return code

    def logs(self) -> str:
        return tail(self.log_path, 200)

    def record(self) -> ProcessRecord:
        return ProcessRecord(
            name=self.name,
            pid=self._proc.pid if self._proc else None,
            start_ticks=self._proc.start_ticks if self._proc else None,
            stop_signal=self.stop_signal,
            paths=[str(self.directory), str(self.log_path)],
        )
