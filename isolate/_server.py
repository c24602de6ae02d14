"""What the native server runners (PostgreSQL, Redis) share: one process on a leased
port, one dir, run as the unprivileged run-as user when isolate runs as root."""

from __future__ import annotations

import secrets
import shutil
import signal
from collections.abc import Callable
from pathlib import Path

from ._binaries import Binary, reachable_copy
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
        self, name: str, binary: Binary, directory: Path, log_name: str, run_as: RunAs | None
    ) -> None:
        self.name = name
        self.binary = binary
        self.directory = directory
        self.run_as = run_as
        self.log_path = directory / log_name
        #: The server's admin (superuser) password, new for every server.
        self.password = secrets.token_urlsafe(18)
        self.lease: PortLease | None = None
        self._proc: ManagedProcess | None = None
        #: Called with its record the moment a process is spawned (before it is ready).
        self.on_spawn: Callable[[ProcessRecord], None] | None = None

    def _bin(self, name: str) -> str:
        """A program of the binary's bin dir, from where ``run_as`` can run it."""
        return str(reachable_copy(self.binary, self.run_as) / name)

    def _own(self, *paths: Path) -> None:
        """Give ``paths`` to the run-as user (the server writes there)."""
        if self.run_as is not None:
            for path in paths:
                self.run_as.chown(path)

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
        shutil.rmtree(self.directory, ignore_errors=True)
        return code

    def logs(self) -> str:
        return tail(self.log_path, 200)

    def record(self) -> ProcessRecord:
        return ProcessRecord(
            name=self.name,
            pid=self._proc.pid if self._proc else None,
            start_ticks=self._proc.start_ticks if self._proc else None,
            stop_signal=self.stop_signal,
            paths=[str(self.directory)],
        )
