"""One liveness policy for everything a run leaves: is its owner still running?

A run's *owner* is the process that opened it (the xdist controller, or the only
pytest process). Its run dir records the owner (``owner.json``) and so do the
labels of its containers; both are judged by :meth:`Owner.gone`, so a run dir and
a container of the same run are always judged alike.
"""

from __future__ import annotations

import contextlib
import os
import select
import socket
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

__all__ = ["Owner", "is_alive", "open_pidfd", "pidfd_exited", "pidfd_of", "process_start_ticks", "stat_fields"]


#: Linux: read ``/proc`` directly (cheap, and what the kernel says); elsewhere (macOS,
#: with Docker Desktop) ask psutil.
HAVE_PROC = Path("/proc/self/stat").exists()


def stat_fields(pid: int) -> list[str] | None:
    """The fields of ``/proc/<pid>/stat`` after the command name (state first), or ``None``.

    Read with one ``read(2)`` into bytes: a stop scans every process's file this way
    (:mod:`isolate._run.groups`), about four times faster than through a text file object."""
    try:
        fd = os.open(f"/proc/{pid}/stat", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        raw = os.read(fd, 4096)  # ~300 bytes; the kernel hands the whole file to one read
    except OSError:
        return None
    finally:
        os.close(fd)
    return raw[raw.rfind(b")") + 2 :].decode("ascii", "replace").split()


def _psutil_state(pid: int) -> tuple[bool, int | None]:
    """(running and not a zombie, start time in centiseconds) from psutil."""
    import psutil

    try:
        proc = psutil.Process(pid)
        with proc.oneshot():
            running = proc.status() not in (psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD)
            return running, round(proc.create_time() * 100)
    except (psutil.Error, ValueError):
        return False, None


def process_start_ticks(pid: int) -> int | None:
    """When ``pid`` started (clock ticks since boot on Linux, centiseconds since the epoch
    elsewhere): with the pid, it names one process, so a reused pid is never mistaken."""
    if not HAVE_PROC:
        return _psutil_state(pid)[1]
    fields = stat_fields(pid)
    return int(fields[19]) if fields else None


def is_alive(pid: int, start_ticks: int | None = None) -> bool:
    """True if ``pid`` runs (not a zombie) and, when given, started at ``start_ticks``."""
    if not HAVE_PROC:
        running, ticks = _psutil_state(pid)
        return running and (start_ticks is None or ticks == start_ticks)
    fields = stat_fields(pid)
    if fields is None or fields[0] in {"Z", "X"}:
        return False
    return start_ticks is None or int(fields[19]) == start_ticks


def open_pidfd(pid: int) -> int | None:
    """A pidfd of ``pid`` (Linux 5.3+), or ``None`` where there is none (another platform,
    an older kernel, a pid that is not running)."""
    try:
        return os.pidfd_open(pid)
    except (AttributeError, OSError):
        return None


@contextlib.contextmanager
def pidfd_of(pid: int) -> Iterator[int | None]:
    """:func:`open_pidfd` for a ``with`` block, closed after it."""
    pidfd = open_pidfd(pid)
    try:
        yield pidfd
    finally:
        if pidfd is not None:
            os.close(pidfd)


def pidfd_exited(pidfd: int, timeout: float) -> bool:
    """Whether the process of ``pidfd`` exits within ``timeout`` seconds (its pidfd becomes
    readable then). Polls, not ``select``: a worker may hold more than the 1,024 descriptors
    ``select`` takes, and a pidfd opened late is numbered above them."""
    poller = select.poll()
    poller.register(pidfd, select.POLLIN)
    return bool(poller.poll(max(timeout, 0.0) * 1000))


def _read(path: str) -> str:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return ""


def _pidns() -> str:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return ""


@dataclass(frozen=True)
class Owner:
    """The process a run belongs to, and where it runs."""

    pid: int
    start_ticks: int | None
    host: str = ""
    boot_id: str = ""
    pidns: str = ""

    @classmethod
    def current(cls) -> Owner:
        """This process."""
        pid = os.getpid()
        return cls(pid, process_start_ticks(pid), socket.gethostname(),
                   _read("/proc/sys/kernel/random/boot_id"), _pidns())  # fmt: skip

    @classmethod
    def parse(cls, data: Any) -> Owner | None:
        """An owner from its JSON or labels form, ``None`` if it is not one."""
        if not isinstance(data, dict):
            return None
        try:
            pid = int(data["pid"])
            raw_ticks = data.get("start_ticks")
            ticks = int(raw_ticks) if raw_ticks not in (None, "") else None
        except (KeyError, TypeError, ValueError):
            return None
        text = {k: str(data.get(k) or "") for k in ("host", "boot_id", "pidns")}
        return cls(pid, ticks, **text) if pid > 0 else None

    def to_json(self) -> dict[str, object]:
        return asdict(self)

    def to_strings(self) -> dict[str, str]:
        """Every field as a string (container labels)."""
        return {k: "" if v is None else str(v) for k, v in asdict(self).items()}

    def gone(self) -> bool:
        """Whether the owner has certainly ended.

        Judged only for owners on this machine and in this PID namespace (another
        CI job sharing a Docker engine has pids we cannot see): gone if the machine
        rebooted since, or its pid is dead or reused.
        """
        here = Owner.current()
        if self.boot_id and self.boot_id != here.boot_id:
            return self.host == here.host  # rebooted since (else: another machine)
        if self.pidns and self.pidns != here.pidns:
            return False
        return not is_alive(self.pid, self.start_ticks)
