"""Native processes: starting (as an unprivileged user when root), stopping,
and a registry that lets the run's owner reap whatever a crashed worker left.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import pwd
import shutil
import signal
import stat
import subprocess
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tenacity import Retrying, retry_if_result, stop_after_delay, wait_exponential

from ._errors import ConfigError

__all__ = [
    "ManagedProcess",
    "ProcessRecord",
    "ProcessRegistry",
    "RunAs",
    "is_alive",
    "poll_until",
    "process_start_ticks",
    "resolve_run_as",
    "stop_process_group",
]

logger = logging.getLogger(__name__)


def poll_until(
    predicate: Callable[[], object], timeout: float, *, initial: float = 0.005, maximum: float = 0.1
) -> bool:
    """Poll ``predicate()`` with exponential back-off until true or ``timeout``.

    Returns whether it became true, so callers decide what a timeout means.
    """
    retrying = Retrying(
        retry=retry_if_result(lambda ok: not ok),
        wait=wait_exponential(multiplier=initial, max=maximum),
        stop=stop_after_delay(timeout),
        retry_error_callback=lambda state: False,
        reraise=False,
    )
    return bool(retrying(predicate))


@dataclass(frozen=True)
class RunAs:
    """The unprivileged user server processes run as (only when we are root)."""

    name: str
    uid: int
    gid: int

    def chown(self, path: Path) -> None:
        os.chown(path, self.uid, self.gid)

    def can_reach(self, path: Path, *, execute: bool = False) -> bool:
        """Whether this user can traverse to ``path`` and read (or execute) it."""
        return can_access(path, self.uid, self.gid, execute=execute)


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


def resolve_run_as(name: str) -> RunAs | None:
    """The user to demote to when running as root, else ``None``."""
    if os.geteuid() != 0:
        return None
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        raise ConfigError(
            f"run_as user {name!r} does not exist",
            hint="create it (useradd --system NAME) or set --isolate-run-as / ISOLATE_RUN_AS "
            "to an existing unprivileged user such as nobody",
        ) from None
    if entry.pw_uid == 0:
        raise ConfigError(
            f"run_as user {name!r} is root; PostgreSQL refuses to run as root",
            hint="set --isolate-run-as to an unprivileged user such as nobody",
        )
    return RunAs(name=name, uid=entry.pw_uid, gid=entry.pw_gid)


def process_start_ticks(pid: int) -> int | None:
    """Start time of ``pid`` in clock ticks since boot (guards against pid reuse)."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = raw[raw.rfind(")") + 2 :].split()
    return int(fields[19])


def _state(pid: int) -> str | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return raw[raw.rfind(")") + 2 :].split()[0]


def is_alive(pid: int, start_ticks: int | None = None) -> bool:
    """True if ``pid`` runs (not a zombie) and, when given, started at ``start_ticks``."""
    state = _state(pid)
    if state is None or state in {"Z", "X"}:
        return False
    return start_ticks is None or process_start_ticks(pid) == start_ticks


def stop_process_group(pid: int, start_ticks: int | None, sig: int, timeout: float) -> bool:
    """Send ``sig`` to the process group led by ``pid``, SIGKILL it after ``timeout``.

    Returns True if it stopped gracefully.
    """
    if not is_alive(pid, start_ticks):
        return True
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)
    if poll_until(lambda: not is_alive(pid, start_ticks), timeout):
        return True
    logger.warning("process group %d ignored signal %d for %.1fs; killing", pid, sig, timeout)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)
    poll_until(lambda: not is_alive(pid, start_ticks), 5.0)
    return False


class ManagedProcess:
    """One child process in its own session, its output appended to a log file."""

    def __init__(
        self,
        argv: Sequence[str],
        *,
        log_path: Path,
        env: Mapping[str, str] | None = None,
        cwd: str | Path | None = None,
        run_as: RunAs | None = None,
    ) -> None:
        self.argv = list(argv)
        self.log_path = log_path
        self.env = dict(env) if env is not None else None
        self.cwd = cwd
        self.run_as = run_as
        self._popen: subprocess.Popen[bytes] | None = None
        self.start_ticks: int | None = None

    @property
    def pid(self) -> int | None:
        return self._popen.pid if self._popen else None

    def start(self) -> None:
        """Launch the process (it must not be running)."""
        if self.running:
            raise RuntimeError(f"{self.argv[0]} already running (pid {self.pid})")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            if self.run_as is not None:
                with contextlib.suppress(OSError):
                    self.run_as.chown(self.log_path)
            run_as = self.run_as
            self._popen = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.env,
                cwd=self.cwd,
                start_new_session=True,
                user=run_as.uid if run_as else None,
                group=run_as.gid if run_as else None,
                extra_groups=[] if run_as else None,
            )
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
        try:
            return self._popen.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> int | None:
        """Signal, wait up to ``timeout``, then SIGKILL the whole group. Exit code."""
        if self._popen is None:
            return None
        if self._popen.poll() is None:
            self.send_signal(sig)
            if self.wait(timeout) is None:
                return self.kill()
            # Reap helpers left in the group (e.g. a shell's children).
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self._popen.pid, signal.SIGKILL)
        return self._popen.returncode

    def kill(self) -> int | None:
        """SIGKILL the process group at once and reap it. Exit code."""
        if self._popen is None:
            return None
        if self._popen.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self._popen.pid, signal.SIGKILL)
        return self._popen.wait()


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


@dataclass
class ProcessRecord:
    """What the reaper needs to stop a process nobody else will stop."""

    name: str
    pid: int | None = None
    start_ticks: int | None = None
    stop_signal: int = signal.SIGTERM
    container: str | None = None
    paths: list[str] = field(default_factory=list)
    owner_pid: int = field(default_factory=os.getpid)


class ProcessRegistry:
    """Records of live processes/containers/dirs in a run dir, for the reaper."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def _file(self, name: str) -> Path:
        return self.directory / f"{name}.json"

    def register(self, record: ProcessRecord) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        tmp = self._file(record.name).with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(record)))
        tmp.replace(self._file(record.name))

    def unregister(self, name: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self._file(name).unlink()

    def records(self) -> Iterator[ProcessRecord]:
        for path in sorted(self.directory.glob("*.json")):
            with contextlib.suppress(OSError, ValueError, TypeError):
                yield ProcessRecord(**json.loads(path.read_text()))

    def reap(self, timeout: float = 10.0) -> list[str]:
        """Stop every recorded process and container, remove their paths; names reaped."""
        from ._docker_reap import remove_container  # local: only needs docker when used

        reaped = []
        for record in self.records():
            if record.pid is not None and is_alive(record.pid, record.start_ticks):
                stop_process_group(record.pid, record.start_ticks, record.stop_signal, timeout)
                reaped.append(record.name)
            if record.container is not None and remove_container(record.container):
                reaped.append(record.name)
            for raw in record.paths:
                shutil.rmtree(raw, ignore_errors=True)
            self.unregister(record.name)
        return reaped

