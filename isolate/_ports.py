"""Dynamic ports that are never handed out twice while in use.

Ports are picked outside the kernel's ephemeral range (read from the system), so an
outgoing connection anywhere on the machine is never handed a port a stopped service
is waiting to get back; portpicker checks it is free right now. A lease makes the
choice stick across processes: each port has a lock file in a machine-wide directory, held
(filelock, an ``flock`` underneath) for as long as the port is owned. Another worker, or another run
on the same machine, skips a port whose lock it cannot take. The kernel drops
the lock when the owner dies, so a crashed worker leaks nothing.
"""

from __future__ import annotations

import logging
import os
import random
import stat
import tempfile
from pathlib import Path

import portpicker
from filelock import FileLock, Timeout

from ._errors import PortUnavailableError
from ._fs import own_dir

__all__ = ["PortLease", "candidate_ports", "ephemeral_range", "reserve_port"]

logger = logging.getLogger(__name__)


def _shared_lock_dir(path: Path) -> bool:
    """A lease dir every user can share: a real directory (no symlink) of root's or
    ours, sticky and world-writable (nobody can remove another user's lock files)."""
    try:
        st = path.lstat()
    except OSError:
        return False
    return (
        stat.S_ISDIR(st.st_mode) and st.st_uid in (0, os.geteuid())
        and st.st_mode & 0o1777 == 0o1777
    )  # fmt: skip


def _lock_dir() -> Path:
    """``$TMPDIR/isolate-ports``, shared by every user and run so leases hold across
    them; if someone else planted that name, a directory of this user's own."""
    path = Path(tempfile.gettempdir()) / "isolate-ports"
    try:
        path.mkdir(mode=0o1777)
        os.chmod(path, 0o1777)  # we made it: no symlink to follow
    except FileExistsError:
        pass
    if _shared_lock_dir(path):
        return path
    logger.warning("%s is not a shared lease dir isolate can trust; using a private one", path)
    return own_dir(path.with_name(f"isolate-ports-{os.geteuid()}"))


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


def _try_lock(port: int, directory: Path | None = None) -> FileLock | None:
    """The port's lock (in ``directory``, the lease dir by default), held, or ``None``
    if another lease holds it."""
    lock = FileLock(str((directory or _lock_dir()) / f"{port}.lock"), mode=0o666, thread_local=False)
    try:
        lock.acquire(timeout=0)
    except (Timeout, OSError):  # held, or a lock file of another user's we cannot open
        return None
    return lock


#: Ports below this are left to well-known and registered services.
_LOWEST = 15000
_EPHEMERAL_FILE = Path("/proc/sys/net/ipv4/ip_local_port_range")


def ephemeral_range(path: Path = _EPHEMERAL_FILE) -> tuple[int, int]:
    """The kernel's ephemeral port range (IANA's 49152-65535 where it cannot be read)."""
    try:
        low, high = (int(v) for v in path.read_text().split())
    except (OSError, ValueError):
        return 49152, 65535
    return low, high


def candidate_ports(ephemeral: tuple[int, int]) -> list[range]:
    """Where to look for a port: from 15000 up to 65535, minus the ephemeral range."""
    low, high = ephemeral
    ranges = [range(_LOWEST, min(low, 65536)), range(max(high + 1, _LOWEST), 65536)]
    return [r for r in ranges if len(r) > 0]


def _pick(ranges: list[range]) -> int:
    if not ranges:  # the ephemeral range covers everything: let the kernel choose
        return int(portpicker.pick_unused_port())
    chosen = random.choices(ranges, weights=[len(r) for r in ranges])[0]
    return random.choice(chosen)


def reserve_port(attempts: int = 200) -> PortLease:
    """Pick a free port outside the ephemeral range and lease it;
    raise :class:`PortUnavailableError` if none."""
    ranges = candidate_ports(ephemeral_range())
    directory = _lock_dir()  # checked once per reservation, not once per candidate
    for _ in range(attempts):
        try:
            port = _pick(ranges)
        except portpicker.NoFreePortFoundError:
            continue
        if not portpicker.is_port_free(port):
            continue
        lock = _try_lock(port, directory)
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

