"""Process groups and sessions, stopped whole: every member is signalled whatever state
its leader is in.

A service started in its own session (``sh -c "server & wait"``, npm, a gunicorn master)
has children in the same group and session; they outlive a leader that died or was
killed and would keep its port. So a group is stopped by signalling every live process
whose process group *or* session is the leader's pid, until none is left.

The pid-reuse guard: Linux never hands out a pid while any process still has it as its
group or session id, so members found under a dead leader's pid are the leader's own. Only
if a *live* process now owns that pid with another start time was the pid reused, and
then the old group is empty and nothing is signalled. Without ``/proc`` (macOS) the
group is signalled with ``killpg`` while its leader is the recorded process.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import time
from collections.abc import Iterator

from .._retry import poll_until
from .liveness import HAVE_PROC, is_alive, pidfd_exited, pidfd_of, stat_fields

__all__ = ["children", "group_alive", "members", "send", "signal_group", "stop_group"]

logger = logging.getLogger(__name__)


def send(pid: int, start_ticks: int | None, sig: int) -> bool:
    """Signal the process ``pid`` that started at ``start_ticks``, never another that
    reuses its pid: through a pidfd (Linux 5.3+) taken before the start time is checked,
    else by pid right after the check. Whether it was signalled."""
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return False
    except (AttributeError, OSError):
        pidfd = None
    try:
        if not is_alive(pid, start_ticks):  # checked after the pidfd pinned the process
            return False
        if pidfd is not None:
            signal.pidfd_send_signal(pidfd, sig)
        else:
            os.kill(pid, sig)
        return True
    except (ProcessLookupError, PermissionError):
        return False
    finally:
        if pidfd is not None:
            os.close(pidfd)


def _processes() -> Iterator[tuple[int, list[str]]]:
    """Every live (not zombie) process and its ``/proc/<pid>/stat`` fields."""
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            fields = stat_fields(int(entry.name))
            if fields is not None and fields[0] not in {"Z", "X"}:
                yield int(entry.name), fields


def _reused(pid: int, start_ticks: int | None) -> bool:
    """Whether ``pid`` now names a live process other than the recorded one."""
    fields = stat_fields(pid)
    return (
        fields is not None and fields[0] not in {"Z", "X"}
        and start_ticks is not None and int(fields[19]) != start_ticks
    )  # fmt: skip


def members(pid: int, start_ticks: int | None) -> list[int]:
    """Live processes whose group or session ``pid`` leads (or led), itself included."""
    if not HAVE_PROC:
        return [pid] if is_alive(pid, start_ticks) else []
    if _reused(pid, start_ticks):
        return []
    return [p for p, fields in _processes() if int(fields[2]) == pid or int(fields[3]) == pid]


def children(pid: int, start_ticks: int | None) -> list[int]:
    """Live direct children of ``pid`` (the recorded process), e.g. the services a fork
    server forked into their own sessions; empty once it is gone."""
    if not HAVE_PROC or not is_alive(pid, start_ticks):
        return []
    return [p for p, fields in _processes() if int(fields[1]) == pid]


def live_leaders() -> set[int] | None:
    """The groups and sessions that have a live member (their leaders' pids, whether or
    not the leader still runs), in one pass; ``None`` without ``/proc``."""
    if not HAVE_PROC:
        return None
    return {int(led) for _, fields in _processes() for led in (fields[2], fields[3])}


def group_alive(pid: int, start_ticks: int | None) -> bool:
    """Whether the leader or any process of its group or session still runs."""
    return bool(members(pid, start_ticks))


def signal_group(pid: int, start_ticks: int | None, sig: int) -> int:
    """Send ``sig`` to every member (see :func:`members`); how many were signalled."""
    if not HAVE_PROC:
        if not is_alive(pid, start_ticks):
            return 0
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, sig)
        return 1
    if _reused(pid, start_ticks):
        return 0
    found = [(p, int(fields[19])) for p, fields in _processes() if pid in (int(fields[2]), int(fields[3]))]
    return sum(send(member, ticks, sig) for member, ticks in found)


def stop_group(pid: int, start_ticks: int | None, sig: int, timeout: float) -> bool:
    """``sig`` to the whole group and session led by ``pid``, SIGKILL to what is left
    after ``timeout``; returns whether it stopped gracefully."""
    deadline = time.monotonic() + timeout
    # Opened before signal_group checks that the pid is not reused: then it is the leader's.
    with pidfd_of(pid) as pidfd:
        if not signal_group(pid, start_ticks, sig):
            return True
        # A leader (a server's postmaster, a fork server) usually ends last, once its
        # children are gone: its exit is seen at once on its pidfd. Polling /proc looks
        # after pauses that double from 5 ms: a server that ended in 36 ms was seen at 75.
        if pidfd is not None:
            pidfd_exited(pidfd, deadline - time.monotonic())
    if poll_until(lambda: not group_alive(pid, start_ticks), max(deadline - time.monotonic(), 0.0)):
        return True
    logger.warning("process group %d ignored signal %d for %.1fs; killing", pid, sig, timeout)
    signal_group(pid, start_ticks, signal.SIGKILL)
    poll_until(lambda: not group_alive(pid, start_ticks), 5.0)
    return False
