"""Dynamic ports that are never handed out twice while in use.

Ports are picked outside the kernel's ephemeral range (read from the system), so an
outgoing connection anywhere on the machine is never handed a port a stopped service
is waiting to get back; portpicker checks it is free right now. A lease makes the
choice stick across processes: each port has a lock file in a machine-wide directory,
``flock``-ed for as long as the port is owned and unlinked (still locked) when the lease
ends, so lock files do not pile up. Whoever locks a file checks, under the lock, that the
name still points at the file it opened; a file its releaser unlinked in between is not a
lease. Another worker, or another run on the same machine, skips a port whose lock it
cannot take. A process whose ``TMPDIR`` is not ``/tmp`` takes the port's lock in
``/tmp/isolate-ports`` too, so runs with different ``TMPDIR``s see each other's leases. The kernel drops the lock when the owner dies, so a crashed worker leaks
nothing but its lock file, which the next lease of that port removes.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import random
import tempfile
from pathlib import Path

import portpicker

from ._errors import PortUnavailableError
from ._fs import MACHINE_TMP, machine_dir, make_shared_dir, open_lock_file, own_dir, same_file
from ._run.notices import NOTICE

__all__ = [
    "MACHINE_LOCK_DIR", "LeaseFile", "PortLease", "candidate_ports", "ephemeral_range", "lock_dir",
    "machine_lock_dir", "reserve_port", "try_lease",
]  # fmt: skip

logger = logging.getLogger(__name__)


def lock_dir() -> Path:
    """``$TMPDIR/isolate-ports``, shared by every user and run so leases hold across
    them; if someone else planted that name, a directory of this user's own."""
    path = Path(tempfile.gettempdir()) / "isolate-ports"
    if make_shared_dir(path):
        return path
    logger.warning("%s is not a shared lease dir isolate can trust; using a private one", path, extra=NOTICE)
    return own_dir(path.with_name(f"isolate-ports-{os.geteuid()}"))


#: The lease dir every run on this machine sees, whatever its ``TMPDIR``.
MACHINE_LOCK_DIR = MACHINE_TMP / "isolate-ports"


def machine_lock_dir(primary: Path) -> Path | None:
    """Where a lease is taken too when this process's lease dir ``primary`` is not
    :data:`MACHINE_LOCK_DIR` (its ``TMPDIR`` is elsewhere): ports are the machine's, so two
    runs with different ``TMPDIR``s (CI shards, another user's shell) must see each other's
    leases. ``None`` where ``primary`` is that dir, there is no ``/tmp``, or the dir there is
    not one isolate can trust (planted by another user)."""
    if primary == MACHINE_LOCK_DIR:
        return None
    return machine_dir(MACHINE_LOCK_DIR.name, untrusted="port leases are seen only by runs with this TMPDIR")


class LeaseFile:
    """A held lock file; :meth:`release` unlinks it, then drops the lock."""

    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self._fd: int | None = fd

    def release(self, *, unlink: bool = True) -> None:
        """Unlink (while still locked, so nobody can take the old file for a lease) and
        unlock; idempotent. Another user's file, which a sticky dir will not let us
        unlink, stays for its owner to remove."""
        if self._fd is None:
            return
        if unlink:
            with contextlib.suppress(OSError):
                os.unlink(self.path)
        os.close(self._fd)
        self._fd = None


def try_lease(path: Path) -> LeaseFile | None:
    """The lock file at ``path``, locked, or ``None`` if someone holds it (or its name
    was unlinked by its releaser after we opened it, or it is not ours to open)."""
    fd = open_lock_file(path)
    if fd is None:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        if not same_file(fd, path):
            raise FileNotFoundError(path)  # released and unlinked between our open and lock
    except OSError:
        os.close(fd)
        return None
    return LeaseFile(path, fd)


class PortLease:
    """Exclusive ownership of a TCP port on 127.0.0.1 until :meth:`release`."""

    def __init__(self, port: int, lock: LeaseFile, *also: LeaseFile) -> None:
        self.port = port
        self._lock: LeaseFile | None = lock
        self._also = also  # its lock in the machine's lease dir too (see machine_lock_dir)

    @property
    def held(self) -> bool:
        return self._lock is not None

    def release(self) -> None:
        """Give the port back (idempotent); its lock files go with it."""
        if self._lock is not None:
            for lock in (*self._also, self._lock):
                lock.release()
            self._lock = None

    def __repr__(self) -> str:
        return f"PortLease(port={self.port}, held={self.held})"


def _try_lock(port: int, directory: Path | None = None) -> LeaseFile | None:
    """The port's lease (in ``directory``, the lease dir by default), held, or ``None``
    if another lease holds it."""
    return try_lease((directory or lock_dir()) / f"{port}.lock")


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
    """Pick a free port outside the ephemeral range and lease it; raise
    :class:`PortUnavailableError` if none. If every free port's lock in the shared lease
    dir is another user's (pre-created or held), lease in a private dir instead."""
    ranges = candidate_ports(ephemeral_range())
    shared = lock_dir()  # checked once per reservation, not once per candidate
    machine = machine_lock_dir(shared)
    lease, locked_out = _reserve(ranges, shared, attempts, machine)
    if lease is not None:
        return lease
    private = shared.with_name(f"isolate-ports-{os.geteuid()}")
    if locked_out and shared != private:
        logger.warning("isolate: every free port's lock in %s is held or owned by someone else; "
                       "leasing in %s (leases there are not seen by other users' runs)", shared, private, extra=NOTICE)  # fmt: skip
        lease, _ = _reserve(ranges, own_dir(private), attempts, machine)
        if lease is not None:
            return lease
    raise PortUnavailableError(f"no free port found after {attempts} attempts")


def _reserve(ranges: list[range], directory: Path, attempts: int,
             machine: Path | None = None) -> tuple[PortLease | None, bool]:  # fmt: skip
    """A lease in ``directory`` (and in ``machine``, the machine's lease dir, if given), or
    ``None`` and whether every free port found was locked."""
    free = locked = 0
    for _ in range(attempts):
        try:
            port = _pick(ranges)
        except portpicker.NoFreePortFoundError:
            continue
        if not portpicker.is_port_free(port):
            continue
        free += 1
        lock = _try_lock(port, directory)
        also = _try_lock(port, machine) if lock is not None and machine is not None else None
        if lock is None or (machine is not None and also is None):  # a run with another TMPDIR has it
            if lock is not None:
                lock.release()
            locked += 1
            continue
        # Re-check under the lease: the port may have been taken between the
        # pick and the lock by a process that does not use leases.
        lease = PortLease(port, lock, *([also] if also is not None else []))
        if not portpicker.is_port_free(port):
            lease.release()
            continue
        logger.debug("reserved port %d", port)
        return lease, False
    return None, free > 0 and locked == free
