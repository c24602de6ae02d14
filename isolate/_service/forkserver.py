"""A preloaded fork server per Python service and worker: ``start()`` forks it
instead of starting a new interpreter that re-imports the app.

The server (``_preloader.py``, run with the service's own interpreter) imports the
spec's ``preload`` modules once, refuses to serve if that left threads or sockets, and
forks one child per start; the child calls ``entry``. By default the import is done once
per run: the run's fork server (started by the first worker to ask, in ``run.shared``)
forks each worker's server from its preloaded self. The worker talks to it over its
private socket; a reader thread turns its messages into :class:`ForkedChild` objects that
behave like :class:`subprocess.Popen` for :class:`~isolate._process.ManagedProcess`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from .._errors import ConfigError, ServerStartError
from .._fs import open_log
from .._process import RunAs, tail
from .._retry import poll_until
from .._run.liveness import is_alive, open_pidfd, pidfd_exited, pidfd_of, process_start_ticks
from .._run.registry import ProcessRecord
from .hubs import HubRecipe, launch_preloader, mark_used, start_hub
from .spec import ServiceSpec

if TYPE_CHECKING:
    from .._config import Settings

__all__ = ["ForkServer", "ForkedChild", "RunHost", "fork_unavailable", "forks_from_the_runs", "local_services", "python_argv"]

logger = logging.getLogger(__name__)


class RunHost(Protocol):
    """Where a run's fork server lives: the run dir (``RunDir``)."""

    @property
    def path(self) -> Path: ...

    def shared(self, name: str, start: Callable[[], Mapping[str, object]]) -> dict[str, object]: ...


def fork_unavailable(backend: str, setting: str) -> str | None:
    """Why services that name an ``entry`` start normally on this run as local processes,
    or ``None`` (in containers, :func:`~isolate._service.containerfork.forks_in_container`
    decides)."""
    if setting == "off":
        return "--isolate-fork-server=off"
    if backend != "native":
        return f"the {backend} backend runs services in containers"
    if sys.platform != "linux":
        return f"fork is unsafe on {sys.platform}"
    return None


def local_services(backend: str, settings: Settings) -> bool:
    """Whether a run of ``backend`` (the resolved one, never ``auto``) runs its services
    as local processes: the native backend's, or docker's with
    ``--isolate-docker-services=native``."""
    return backend == "native" or settings.docker_services == "native"


def forks_from_the_runs(backend: str, settings: Settings) -> bool:
    """Whether the services of a run of ``backend`` that name an ``entry`` fork from the
    run's fork servers (one preload per run): local services that fork, with
    ``--isolate-fork-server=auto`` and no ``--isolate-env`` (which gives each worker its
    own values)."""
    forks = local_services(backend, settings) and fork_unavailable("native", settings.fork_server) is None
    return forks and settings.fork_server == "auto" and not settings.env


def python_argv(command: Sequence[str], cwd: Path) -> tuple[list[str], str]:
    """``sys.argv`` and ``sys.path[0]`` that ``command`` (``python -m MOD ...`` or
    ``python SCRIPT ...``) would give the program."""
    args = list(command[1:])
    if len(args) >= 2 and args[0] == "-m":
        return [args[1], *args[2:]], str(cwd)
    if args and not args[0].startswith("-"):
        return args, str((cwd / args[0]).parent)
    return ["-c", *args], str(cwd)


class ForkedChild:
    """A forked service process, as much of :class:`subprocess.Popen` as isolate uses.

    Its exit code comes from the fork server (its parent). Should the fork server die
    first (or its messages stop making sense), the child is watched by pid and start time,
    and its exit code is unknown (reported as ``-9``, killed). Signals go through a pidfd
    where the kernel has them, so a pid its parent reaped and the system reused is never
    signalled.
    """

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self._pidfd = open_pidfd(pid)
        self.start_ticks = process_start_ticks(pid)
        self.returncode: int | None = None
        self._changed = threading.Event()  # it exited, or became an orphan
        self._orphaned = False

    def _exited(self, code: int) -> None:
        self.returncode = code
        self._changed.set()
        if self._pidfd is not None:
            with contextlib.suppress(OSError):
                os.close(self._pidfd)
            self._pidfd = None

    def _orphan(self) -> None:
        self._orphaned = True
        self._changed.set()
        self.poll()

    def poll(self) -> int | None:
        if self.returncode is None and self._orphaned and not is_alive(self.pid, self.start_ticks):
            self._exited(-signal.SIGKILL)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise subprocess.TimeoutExpired(str(self.pid), timeout or 0.0)
            if self._orphaned:  # nobody will tell: watch it
                poll_until(lambda: self.poll() is not None, 1.0 if left is None else min(left, 1.0))
            else:
                self._changed.wait(left)
        assert self.returncode is not None
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.poll() is not None:
            return
        if self._pidfd is not None:
            signal.pidfd_send_signal(self._pidfd, sig)
        elif is_alive(self.pid, self.start_ticks):
            os.kill(self.pid, sig)


def _wait_gone(pid: int, start_ticks: int | None, timeout: float) -> bool:
    """Wait until ``pid`` (not our child) has ended: on its pidfd, which becomes readable
    the moment it does, else by polling."""
    with pidfd_of(pid) as pidfd:
        if pidfd is None:
            return poll_until(lambda: not is_alive(pid, start_ticks), timeout)
        if not is_alive(pid, start_ticks):  # gone, or the pid names another process now
            return True
        return pidfd_exited(pidfd, timeout)


class ForkServer:
    """One preloaded parent for ``spec`` on this worker (see module docs)."""

    def __init__(self, spec: ServiceSpec, instance: str, cwd: Path, log_path: Path,
                 run_as: RunAs | None, env: Mapping[str, str] | None = None, *, shared: bool = False) -> None:  # fmt: skip
        self.spec = spec
        #: Served by the run's fork server (one preload per run), where the run has one.
        self.shared = shared
        self.name = f"forkserver-{instance}"
        self.log_path = log_path
        self.cwd = cwd
        self.run_as = run_as
        #: What it runs with (the worker's environment without isolate's secrets).
        self.env = dict(env) if env is not None else {}
        user = (run_as.uid, run_as.gid) if run_as is not None else None
        #: What it (or the run's fork server for it) is started from.
        self.recipe = HubRecipe(spec.command[0], tuple(spec.preload), python_argv(spec.command, cwd)[1], str(cwd),
                                user, spec.inherit_env)  # fmt: skip
        self._proc: subprocess.Popen[bytes] | None = None  # our own preloaded parent
        self._server: tuple[int, int | None] | None = None  # or the run fork server's child
        self._sock: socket.socket | None = None
        self._hub_sock: socket.socket | None = None  # where the run's fork server answers first
        self._reader: threading.Thread | None = None
        self._replies: queue.Queue[ForkedChild | str] = queue.Queue()
        self._children: dict[int, ForkedChild] = {}
        self._ready = threading.Event()
        self._failed: str | None = None  # why it cannot serve, once known
        self._gone: str | None = None  # why it stopped serving after it was ready
        self._lock = threading.Lock()  # one request (and its reply) at a time
        self._hub_record: ProcessRecord | None = None  # the run's fork server, if we started it

    def start(self, host: RunHost | None = None) -> None:
        """Launch it (not waiting: the preload runs while the worker does other things).
        With ``host`` and :attr:`shared`, the run's fork server for this spec (started by
        the first worker to ask) forks the one that serves this worker; else we start our own."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        log = open_log(self.log_path)
        try:
            hub = self._ask_hub(host, theirs, log) if host is not None and self.shared else None
            if hub is None:
                self._proc = launch_preloader(self.recipe, {
                    "fd": theirs.fileno(), "parent": os.getpid(),
                    # PR_SET_PDEATHSIG follows the thread that forks: only the main one
                    # lives as long as the worker.
                    "die_with_parent": threading.current_thread() is threading.main_thread(),
                }, theirs.fileno(), log, self.env, self.run_as)  # fmt: skip
        finally:
            os.close(log)
            theirs.close()
        self._sock, self._hub_sock = ours, hub
        reader = (self._read_via, (hub, ours)) if hub is not None else (self._read, (ours,))
        self._reader = threading.Thread(target=reader[0], args=reader[1], name=self.name, daemon=True)
        self._reader.start()

    def _ask_hub(self, host: RunHost, theirs: socket.socket, log: int) -> socket.socket | None:
        """Ask the run's fork server for this spec (started if need be) to fork the process
        that serves this worker on ``theirs`` and ``log``; the connection its answer comes
        on, or ``None`` where it cannot (we start our own)."""
        key = self.recipe.key(self.env)
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            state = host.shared(f"forkserver-{key}", lambda: self._start_hub(host.path, key))
            conn.connect(str(state["socket"]))
            socket.send_fds(conn, [json.dumps({"env": self.env}).encode()], [theirs.fileno(), log])
        except Exception as exc:  # no run fork server: this worker preloads its own
            logger.info("isolate: %s: the run's fork server cannot serve (%s)", self.name, exc)
            conn.close()
            return None
        with contextlib.suppress(OSError):  # the next run starts it ahead (or not: no harm)
            mark_used(host.path, key)
        return conn

    def _start_hub(self, directory: Path, key: str) -> dict[str, object]:
        """Start the run's fork server (see :func:`~isolate._service.hubs.start_hub`)."""
        state, self._hub_record = start_hub(directory, self.recipe, key, self.env, self.run_as)
        return state

    def _read_via(self, hub: socket.socket, ours: socket.socket) -> None:
        """The run's fork server answers with the pid of the process it forked for us once
        its preload is done; then read our channel as usual."""
        try:
            with hub:
                reply = hub.recv(4096)
            pid = int(json.loads(reply)["pid"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            self._done(f"the run's fork server did not answer ({type(exc).__name__}: {exc})")
            return
        self._server = (pid, process_start_ticks(pid))
        self._read(ours)

    def record(self) -> ProcessRecord | None:
        """What the run's reaper must stop: our own preloaded parent (this worker's), or
        the run's fork server if this worker started it (the run's)."""
        if self._proc is not None:
            return ProcessRecord(name=self.name, pid=self._proc.pid, start_ticks=process_start_ticks(self._proc.pid))
        return self._hub_record

    def _read(self, sock: socket.socket) -> None:
        """Turn its messages into children and exits. Whatever ends this (end-of-file, a
        message that makes no sense), the fork server is done: nothing more is asked of
        it, and its children are watched by pid from then on."""
        why = "the fork server exited"
        try:
            while data := sock.recv(1 << 20):
                self._handle(json.loads(data))
        except Exception as exc:  # any failure here ends the fork server
            why = f"its messages could not be read ({type(exc).__name__}: {exc})"
            logger.warning("isolate: %s: %s", self.name, why)
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)  # it reads end-of-file and exits
        self._done(why)

    def _done(self, why: str) -> None:
        """It serves no more: before it was ready (a failure) or after (gone)."""
        if not self._ready.is_set():
            self._failed = why
            self._ready.set()
        else:
            self._gone = why
        self._replies.put(why)
        for child in list(self._children.values()):  # nobody left to report their exit
            child._orphan()

    def _handle(self, message: dict[str, object]) -> None:
        if "exit" in message:
            child = self._children.pop(int(message["exit"]), None)  # type: ignore[call-overload]
            if child is not None:
                child._exited(int(message["code"]))  # type: ignore[call-overload]
        elif "pid" in message:
            child = ForkedChild(int(message["pid"]))  # type: ignore[call-overload]
            self._children[child.pid] = child
            self._replies.put(child)
        elif "ready" in message:
            self._ready.set()
        elif self._ready.is_set():
            self._replies.put(str(message.get("error")))
        else:
            self._failed = str(message.get("error"))
            self._ready.set()

    def wait_ready(self, timeout: float) -> None:
        """Block until the preload is done; :class:`ConfigError` if it failed or is unsafe."""
        if not self._ready.wait(timeout):
            self._failed = f"the preload did not finish within {timeout:.0f}s"
        if self._failed:
            raise ConfigError(
                f"service {self.spec.name!r}: the fork server cannot serve: {self._failed}",
                log_tail=tail(self.log_path, 20),
                hint="preload only modules that import without starting threads or opening "
                "connections (do that in the entry), or drop ServiceSpec.entry to start the "
                "service as a new process",
            )

    def spawn(self, argv: Sequence[str], env: Mapping[str, str], cwd: Path, log_path: Path,
              timeout: float = 10.0) -> ForkedChild:  # fmt: skip
        """Fork a child that runs the entry; it is running when this returns."""
        self.wait_ready(timeout)
        if self._gone is not None:
            raise ServerStartError(
                f"the fork server of {self.spec.name} could not fork: {self._gone}",
                log_tail=tail(self.log_path, 20),
                hint="something ended the fork server (see its log above); "
                "--isolate-fork-server=off starts the service as a new process instead",
            )
        assert self._sock is not None and self.spec.entry
        sys_argv, _ = python_argv(argv, cwd)
        request = {"argv": sys_argv, "env": dict(env), "cwd": str(cwd), "entry": self.spec.entry}
        with self._lock:
            log = open_log(log_path)
            try:
                socket.send_fds(self._sock, [json.dumps(request).encode()], [log])
                reply = self._replies.get(timeout=timeout)
            except (OSError, queue.Empty) as exc:
                reply = f"no answer: {exc or 'timed out'}"
            finally:
                os.close(log)
        if isinstance(reply, str):
            raise ServerStartError(f"the fork server of {self.spec.name} could not fork: {reply}",
                                   log_tail=tail(self.log_path, 20))  # fmt: skip
        return reply

    def close(self) -> None:
        """Stop it (the children it forked are stopped by their own handles)."""
        if self._sock is not None:
            for sock in (self._sock, self._hub_sock):
                if sock is not None:
                    with contextlib.suppress(OSError):
                        sock.shutdown(socket.SHUT_RDWR)  # end-of-file: it exits by itself
            if self._reader is not None:
                # Our reader reads end-of-file now and stops; closing the socket under it
                # would make its next read fail ("Bad file descriptor").
                self._reader.join(5)
            self._sock.close()
            self._sock = self._hub_sock = None
        if self._proc is not None:
            try:
                self._proc.wait(5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
            self._proc = None
        elif self._server is not None:  # the run fork server's child: not ours to wait for
            pid, ticks = self._server
            if not _wait_gone(pid, ticks, 5):
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
            self._server = None
