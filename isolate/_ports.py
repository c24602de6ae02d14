"""Dynamic ports that are never handed out twice while in use.

portpicker finds a port that is free right now; a lease makes the choice stick
across processes: each port has a lock file in a machine-wide directory, held
(filelock, an ``flock`` underneath) for as long as the port is owned. Another worker, or another run
on the same machine, skips a port whose lock it cannot take. The kernel drops
the lock when the owner dies, so a crashed worker leaks nothing.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from pathlib import Path

import portpicker
from filelock import FileLock, Timeout

from ._errors import PortUnavailableError

__all__ = ["PortLease", "reserve_port"]

logger = logging.getLogger(__name__)


def _lock_dir() -> Path:
    path = Path(tempfile.gettempdir()) / "isolate-ports"
    if not path.is_dir():
        with contextlib.suppress(FileExistsError):
            path.mkdir(mode=0o1777)
            os.chmod(path, 0o1777)
    return path


class PortLease:
    """Exclusive ownership of a TCP port on 127.0.0.1 until :meth:`release`."""

    def __init__(self, port: int, lock: FileLock) -> None:
        self.port = port
        self._lock: FileLock | None = lock

    @property
    def held(self) -> bool:
        return self._lock is not None

    def release(self) -> None:
        """Give the port back (idempotent)."""
        if self._lock is not None:
            self._lock.release(force=True)
            self._lock = None

    def __repr__(self) -> str:
        return f"PortLease(port={self.port}, held={self.held})"


def _try_lock(port: int) -> FileLock | None:
    """The port's lock, held, or ``None`` if another lease holds it."""
    lock = FileLock(str(_lock_dir() / f"{port}.lock"), mode=0o666, thread_local=False)
    try:
        lock.acquire(timeout=0)
    except (Timeout, PermissionError):
        return None
    return lock


def reserve_port(attempts: int = 100) -> PortLease:
    """Pick a free port and lease it; raise :class:`PortUnavailableError` if none."""
    for _ in range(attempts):
        try:
            port = portpicker.pick_unused_port()
        except portpicker.NoFreePortFoundError:
            continue
        lock = _try_lock(port)
        if lock is None:
            continue
        # Re-check under the lease: the port may have been taken between the
        # pick and the lock by a process that does not use leases.
        if not portpicker.is_port_free(port):
            lock.release(force=True)
            continue
        logger.debug("reserved port %d", port)
        return PortLease(port, lock)
    raise PortUnavailableError(f"no free port found after {attempts} attempts")
