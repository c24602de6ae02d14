"""Native processes: started in their own session (as an unprivileged user when
isolate runs as root), waited on until ready, stopped as a whole process group.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pwd
import shutil
import signal
import stat
import subprocess
import sys
import threading
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from ._errors import ConfigError, ServerStartError
from ._fs import open_log
from ._retry import READY_LAG, poll_until
from ._run.groups import group_alive, signal_group
from ._run.liveness import pidfd_exited, pidfd_of, process_start_ticks
from ._run.notices import NOTICE

__all__ = [
    "DEDICATED_USER",
    "ManagedProcess",
    "RunAs",
    "as_user",
    "can_access",
    "die_with_parent",
    "inherited_env",
    "listening_ports",
    "resolve_run_as",
    "stdin_pipe",
    "tail",
    "wait_started",
]

logger = logging.getLogger(__name__)


def tail(path: Path, lines: int = 30, max_bytes: int = 64 * 1024) -> str:
    """Last ``lines`` lines of a text file (empty if missing)."""
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(0, size - max_bytes))
            data = fh.read()
    except OSError:
        return ""
    return "\n".join(data.decode("utf-8", "replace").splitlines()[-lines:])


@dataclass(frozen=True)
class RunAs:
    """The unprivileged user server processes run as (only when we are root)."""

    name: str
    uid: int
    gid: int

    def can_reach(self, path: Path, *, execute: bool = False) -> bool:
        """Whether this user can traverse to ``path`` and read (or execute) it."""
        return can_access(path, self.uid, self.gid, execute=execute)


def as_user(run_as: RunAs | None) -> dict[str, Any]:
    """``subprocess`` arguments that start a process as ``run_as`` (none: as ourselves)."""
    if run_as is None:
        return {}
    return {"user": run_as.uid, "group": run_as.gid, "extra_groups": []}


_PR_SET_PDEATHSIG = 1


def die_with_parent() -> Callable[[], None] | None:
    """A ``preexec_fn`` that makes the child SIGKILLed when this process dies
    (``PR_SET_PDEATHSIG``), or ``None`` where that cannot hold: off Linux, and when not
    called from the main thread (the signal follows the thread that forked the child,
    and only the main thread lives as long as the process). It runs after ``user=``'s
    change of user, so the setting stays; it does nothing but one ``prctl`` call, resolved
    here, not in the child."""
    if sys.platform != "linux" or threading.current_thread() is not threading.main_thread():
        return None
    import ctypes

    prctl = ctypes.CDLL(None, use_errno=True).prctl
    parent = os.getpid()

    def preexec() -> None:
        prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != parent:  # died before the line above
            os._exit(1)

    return preexec


def inherited_env(secrets: Collection[str | None] = ()) -> dict[str, str]:
    """This process's environment as what isolate starts inherits it: without isolate's
    own variables (``ISOLATE_*``: ``ISOLATE_PG_DSN`` and ``ISOLATE_REDIS_URL`` hold an
    external server's admin credentials) and without any variable whose value is one of
    ``secrets`` (the same DSN or URL under another name). The code under test and the
    servers run as another user, whose processes can read ``/proc/<pid>/environ``."""
    drop = {s for s in secrets if s}
    return {k: v for k, v in os.environ.items() if not k.startswith("ISOLATE_") and v not in drop}


def stdin_pipe(data: bytes, run_as: RunAs | None) -> int:
    """The read end of a pipe that already holds ``data`` (and its end-of-file), for a
    child's stdin: how secrets reach a server (Valkey's config, initdb's password)
    without a file. The pipe is ``run_as``'s, so a program that reopens ``/dev/stdin``
    may. Keep ``data`` below the pipe buffer (64 KiB)."""
    read, write = os.pipe()
    try:
        os.write(write, data)
    finally:
        os.close(write)
    if run_as is not None:
        os.fchown(read, run_as.uid, run_as.gid)
    return read


def can_access(path: Path, uid: int, gid: int, *, execute: bool = False) -> bool:
    """Permission-bit check of ``path`` and all its ancestors for ``uid``/``gid``."""

    def allowed(st: os.stat_result, bit_user: int, bit_group: int, bit_other: int) -> bool:
        if st.st_uid == uid:
            return bool(st.st_mode & bit_user)
        if st.st_gid == gid:
            return bool(st.st_mode & bit_group)
        return bool(st.st_mode & bit_other)

    path = path.resolve()
    for parent in reversed(path.parents):
        if not allowed(parent.stat(), stat.S_IXUSR, stat.S_IXGRP, stat.S_IXOTH):
            return False
    st = path.stat()
    if execute:
        return allowed(st, stat.S_IXUSR, stat.S_IXGRP, stat.S_IXOTH)
    return allowed(st, stat.S_IRUSR, stat.S_IRGRP, stat.S_IROTH)


#: The default run-as user: isolate's own, made on first use when isolate runs as root.
DEDICATED_USER = "isolate"
_NOLOGIN = next((p for p in ("/usr/sbin/nologin", "/sbin/nologin", "/bin/false") if os.path.exists(p)), "/bin/false")


def resolve_run_as(name: str) -> RunAs | None:
    """The user to demote to when running as root, else ``None``.

    The default, ``isolate``, is a system user of isolate's own, made on first use (no
    login, no home): the servers' peers are then only isolate's own processes, not every
    daemon that runs as ``nobody``. Any other name must exist.
    """
    if os.geteuid() != 0:
        return None
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        if name != DEDICATED_USER:
            raise ConfigError(
                f"run_as user {name!r} does not exist",
                hint="create it (useradd --system NAME) or set --isolate-run-as / ISOLATE_RUN_AS "
                f"to an existing unprivileged user, or leave it at {DEDICATED_USER!r}, which isolate makes",
            ) from None
        entry = _make_dedicated_user()
    if entry.pw_uid == 0:
        raise ConfigError(
            f"run_as user {name!r} is root; PostgreSQL refuses to run as root",
            hint="set --isolate-run-as to an unprivileged user such as nobody",
        )
    return RunAs(name=entry.pw_name, uid=entry.pw_uid, gid=entry.pw_gid)


def _make_dedicated_user() -> pwd.struct_passwd:
    """Make the system user ``isolate`` (its own group, no home, no login shell); runs
    that make it at the same moment both end up with the one user."""
    useradd = shutil.which("useradd") or next(
        (p for p in ("/usr/sbin/useradd", "/sbin/useradd") if os.path.exists(p)), None)  # fmt: skip
    argv = [useradd or "useradd", "--system", "--user-group", "--no-create-home", "--home-dir", "/nonexistent",
            "--shell", _NOLOGIN, "--comment", "isolate test servers", DEDICATED_USER]  # fmt: skip
    why = "useradd was not found"
    found: list[pwd.struct_passwd] = []

    def made() -> bool:  # True when the user exists, or when trying again is pointless
        nonlocal why
        if useradd is not None:
            try:
                done = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
                why = (done.stderr or done.stdout).strip() or f"useradd exited with {done.returncode}"
            except (OSError, subprocess.SubprocessError) as exc:
                why = str(exc)
        with contextlib.suppress(KeyError):
            found.append(pwd.getpwnam(DEDICATED_USER))
        # another useradd holding /etc/passwd's lock is worth waiting for; nothing else is
        return bool(found) or useradd is None or "lock" not in why

    poll_until(made, 30, initial=0.05, maximum=1.0)
    if found:
        entry = found[0]
        logger.warning("isolate made the system user %r (uid %d; no login, no home) to run its "
                       "servers as; `userdel %s` removes it", DEDICATED_USER, entry.pw_uid, DEDICATED_USER, extra=NOTICE)  # fmt: skip
        return entry
    raise ConfigError(
        f"isolate runs as root and could not make its run-as user {DEDICATED_USER!r}: {why}",
        hint=f"create it (useradd --system --user-group --no-create-home {DEDICATED_USER}), or set "
        "--isolate-run-as / ISOLATE_RUN_AS to an existing unprivileged user (nobody, say)",
    )


class Child(Protocol):
    """What :class:`ManagedProcess` needs of a started process (a ``Popen`` has it)."""

    pid: int
    returncode: int | None

    def poll(self) -> int | None: ...
    def wait(self, timeout: float | None = None) -> int: ...
    def send_signal(self, sig: int) -> None: ...


class Spawner(Protocol):
    """Starts a process some other way than a new ``Popen`` (the fork server)."""

    def spawn(self, argv: Sequence[str], env: Mapping[str, str], cwd: Path, log_path: Path,
              timeout: float = ...) -> Child: ...  # fmt: skip


class ManagedProcess:
    """One child process in its own session, its output appended to a log file
    (started by ``spawner`` instead, when one is given)."""

    def __init__(
        self,
        argv: Sequence[str],
        *,
        log_path: Path,
        env: Mapping[str, str] | None = None,
        cwd: str | Path | None = None,
        run_as: RunAs | None = None,
        spawner: Spawner | None = None,
        stdin: bytes | None = None,
        die_with_parent: bool = False,
    ) -> None:
        self.argv = list(argv)
        self.log_path = log_path
        self.env = dict(env) if env is not None else None
        self.cwd = cwd
        self.run_as = run_as
        self.spawner = spawner
        #: What the process reads on its stdin (then end-of-file) at every start.
        self.stdin = stdin
        #: Linux: SIGKILL it when the process that started it dies (see :func:`die_with_parent`).
        self.die_with_parent = die_with_parent
        self._popen: Child | None = None
        self.start_ticks: int | None = None
        #: The last process's group and session were seen empty (a stop or kill ended
        #: them): none can join an empty one, so the next start need not look again.
        self._group_ended = False

    @property
    def pid(self) -> int | None:
        return self._popen.pid if self._popen else None

    def start(self) -> None:
        """Launch the process (it must not be running)."""
        if self.running:
            raise RuntimeError(f"{self.argv[0]} already running (pid {self.pid})")
        if self._popen is not None and not self._group_ended:
            self._end_group()  # what a leader that died left (it may hold the port)
        self._group_ended = False
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        if self.spawner is not None:
            assert self.env is not None and self.cwd is not None
            self._popen = self.spawner.spawn(self.argv, self.env, Path(self.cwd), self.log_path)
            self.start_ticks = process_start_ticks(self._popen.pid)
            return
        log = open_log(self.log_path)  # ours: the process writes it through this fd only
        stdin = subprocess.DEVNULL if self.stdin is None else stdin_pipe(self.stdin, self.run_as)
        try:
            self._popen = subprocess.Popen(
                self.argv,
                stdin=stdin,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.env,
                cwd=self.cwd,
                start_new_session=True,
                preexec_fn=die_with_parent() if self.die_with_parent else None,
                **as_user(self.run_as),
            )
        finally:
            os.close(log)
            if stdin != subprocess.DEVNULL:
                os.close(stdin)
        self.start_ticks = process_start_ticks(self._popen.pid)

    @property
    def running(self) -> bool:
        return self._popen is not None and self._popen.poll() is None

    @property
    def returncode(self) -> int | None:
        return self._popen.poll() if self._popen else None

    def send_signal(self, sig: int) -> None:
        """Send ``sig`` to the process (not waiting)."""
        if self._popen is not None and self._popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self._popen.send_signal(sig)

    def wait(self, timeout: float) -> int | None:
        """Wait up to ``timeout`` seconds for exit; the exit code or None."""
        if self._popen is None:
            return None
        if isinstance(self._popen, subprocess.Popen) and self._popen.returncode is None:
            # Popen.wait(timeout) looks after pauses that double up to 50 ms: a graceful stop
            # was seen up to that late. A pidfd is readable the moment the process exits;
            # opened before it is reaped, it is our child's.
            with pidfd_of(self._popen.pid) as pidfd:
                if pidfd is not None and self._popen.poll() is None and not pidfd_exited(pidfd, timeout):
                    return None
        try:
            return self._popen.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> int | None:
        """Signal the process, wait up to ``timeout``, then SIGKILL the whole group; and
        whatever its group or session still holds once it is gone (a shell's children,
        a dead master's workers), however it ended. Exit code."""
        if self._popen is None:
            return None
        if self._popen.poll() is None:
            self.send_signal(sig)
            if self.wait(timeout) is None:
                return self.kill()
        self._end_group()
        return self._popen.returncode

    def kill(self) -> int | None:
        """SIGKILL the whole group and session at once and reap it. Exit code."""
        if self._popen is None:
            return None
        signal_group(self._popen.pid, self.start_ticks, signal.SIGKILL)
        code = self._popen.wait()
        self._end_group()
        return code

    def _end_group(self) -> None:
        """SIGKILL what is left of its group and session, and wait until it is gone (it
        may hold the port the next start needs)."""
        assert self._popen is not None
        pid, ticks = self._popen.pid, self.start_ticks
        self._group_ended = not signal_group(pid, ticks, signal.SIGKILL) or poll_until(
            lambda: not group_alive(pid, ticks), 5.0
        )


def wait_started(
    proc: ManagedProcess, ready: Callable[[], bool], timeout: float, *, what: str, hint: str
) -> None:
    """Poll ``ready()`` until it passes; if ``proc`` exits or time runs out, raise
    :class:`ServerStartError` with its log tail (a bind failure in it makes the start
    policy retry on another port). A process that never got ready is killed.
    """
    poll_until(lambda: not proc.running or ready(), timeout, lag=READY_LAG)
    if proc.running and ready():
        return
    log = tail(proc.log_path, 20)
    if proc.running:
        proc.kill()
        raise ServerStartError(
            f"{what} did not get ready within {timeout:.0f}s", log_tail=log,
            hint="raise the start timeout or read the log lines above",
        )  # fmt: skip
    raise ServerStartError(
        f"{what} exited during start-up", log_tail=log, exit_code=proc.returncode, hint=hint
    )


def listening_ports(pid: int) -> set[int]:
    """TCP ports that ``pid`` and its descendants listen on (empty if unknown)."""
    import psutil

    ports: set[int] = set()
    try:
        root = psutil.Process(pid)
        for proc in [root, *root.children(recursive=True)]:
            with contextlib.suppress(psutil.Error):
                for conn in proc.net_connections(kind="tcp"):
                    if conn.status == psutil.CONN_LISTEN and conn.laddr:
                        ports.add(int(conn.laddr.port))
    except psutil.Error:
        pass
    return ports
