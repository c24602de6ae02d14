"""A preloaded fork server per Python service and worker: ``start()`` forks it
instead of starting a new interpreter that re-imports the app.

The server (``_preloader.py``, run with the service's own interpreter) imports the
spec's ``preload`` modules once, refuses to serve if that left threads or sockets, and
forks one child per start; the child calls ``entry``. The worker talks to it over its
stdin/stdout; a reader thread turns its messages into :class:`ForkedChild` objects that
behave like :class:`subprocess.Popen` for :class:`~isolate._process.ManagedProcess`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import queue
import signal
import subprocess
import sys
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO

from .._errors import ConfigError, ServerStartError
from .._process import RunAs, as_user, tail
from .._retry import poll_until
from .._run.liveness import is_alive, process_start_ticks
from .._run.registry import ProcessRecord
from .spec import ServiceSpec

__all__ = ["ForkServer", "ForkedChild", "fork_unavailable", "python_argv"]

logger = logging.getLogger(__name__)

_PROGRAM = Path(__file__).with_name("_preloader.py")


def fork_unavailable(backend: str, setting: str) -> str | None:
    """Why services that name an ``entry`` start normally on this run, or ``None``."""
    if setting == "off":
        return "--isolate-fork-server=off"
    if backend != "native":
        return f"the {backend} backend runs services in containers"
    if sys.platform != "linux":
        return f"fork is unsafe on {sys.platform}"
    return None


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
    first, the child is watched by pid and start time, and its exit code is unknown
    (reported as ``-9``, killed).
    """

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.start_ticks = process_start_ticks(pid)
        self.returncode: int | None = None
        self._done = threading.Event()
        self._orphaned = False

    def _exited(self, code: int) -> None:
        self.returncode = code
        self._done.set()

    def _orphan(self) -> None:
        self._orphaned = True
        self.poll()

    def poll(self) -> int | None:
        if self.returncode is None and self._orphaned and not is_alive(self.pid, self.start_ticks):
            self._exited(-signal.SIGKILL)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if self._orphaned:
            poll_until(lambda: self.poll() is not None, 1e9 if timeout is None else timeout)
        elif not self._done.wait(timeout):
            raise subprocess.TimeoutExpired(str(self.pid), timeout or 0.0)
        if self.returncode is None:
            raise subprocess.TimeoutExpired(str(self.pid), timeout or 0.0)
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            os.kill(self.pid, sig)


class ForkServer:
    """One preloaded parent for ``spec`` on this worker (see module docs)."""

    def __init__(self, spec: ServiceSpec, instance: str, cwd: Path, log_path: Path,
                 run_as: RunAs | None) -> None:  # fmt: skip
        self.spec = spec
        self.name = f"forkserver-{instance}"
        self.log_path = log_path
        self.cwd = cwd
        self.run_as = run_as
        self._proc: subprocess.Popen[bytes] | None = None
        self._replies: queue.Queue[ForkedChild | str] = queue.Queue()
        self._children: dict[int, ForkedChild] = {}
        self._ready = threading.Event()
        self._failed: str | None = None  # why it cannot serve, once known
        self._lock = threading.Lock()  # one request (and its reply) at a time

    def start(self) -> None:
        """Launch it (not waiting: the preload runs while the worker does other things)."""
        _, path0 = python_argv(self.spec.command, self.cwd)
        config = {"preload": list(self.spec.preload), "path0": path0}
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ) if self.spec.inherit_env else {}
        with open(self.log_path, "ab") as log:
            if self.run_as is not None:
                self.run_as.chown(self.log_path)
            self._proc = subprocess.Popen(
                [self.spec.command[0], str(_PROGRAM), json.dumps(config)],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, env=env,
                cwd=self.cwd, start_new_session=True, **as_user(self.run_as),
            )  # fmt: skip
        assert self._proc.stdout is not None
        threading.Thread(target=self._read, args=(self._proc.stdout,), name=self.name, daemon=True).start()

    def record(self) -> ProcessRecord | None:
        if self._proc is None:
            return None
        return ProcessRecord(name=self.name, pid=self._proc.pid, start_ticks=process_start_ticks(self._proc.pid))

    def _read(self, stream: IO[bytes]) -> None:
        for line in stream:
            message = json.loads(line)
            if "exit" in message:
                child = self._children.pop(message["exit"], None)
                if child is not None:
                    child._exited(message["code"])
            elif "pid" in message:
                child = ForkedChild(message["pid"])
                self._children[child.pid] = child
                self._replies.put(child)
            elif "ready" in message:
                self._ready.set()
            elif self._ready.is_set():
                self._replies.put(str(message.get("error")))
            else:
                self._failed = str(message.get("error"))
                self._ready.set()
        gone = "the fork server exited"
        if not self._ready.is_set():
            self._failed = gone
            self._ready.set()
        self._replies.put(gone)
        for child in list(self._children.values()):  # nobody left to report their exit
            child._orphan()

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
        assert self._proc is not None and self._proc.stdin is not None and self.spec.entry
        sys_argv, _ = python_argv(argv, cwd)
        request = {"argv": sys_argv, "env": dict(env), "cwd": str(cwd), "log": str(log_path),
                   "entry": self.spec.entry}  # fmt: skip
        with self._lock:
            try:
                self._proc.stdin.write(json.dumps(request).encode() + b"\n")
                self._proc.stdin.flush()
                reply = self._replies.get(timeout=timeout)
            except (OSError, queue.Empty) as exc:
                reply = f"no answer: {exc or 'timed out'}"
        if isinstance(reply, str):
            raise ServerStartError(f"the fork server of {self.spec.name} could not fork: {reply}",
                                   log_tail=tail(self.log_path, 20))  # fmt: skip
        return reply

    def close(self) -> None:
        """Stop it (the children it forked are stopped by their own handles)."""
        if self._proc is None:
            return
        if self._proc.stdin is not None:
            with contextlib.suppress(OSError):
                self._proc.stdin.close()  # EOF: it exits by itself
        try:
            self._proc.wait(5)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        self._proc = None
