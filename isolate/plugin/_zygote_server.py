"""The zygote of ``--isolate-fork-workers`` (see :mod:`isolate.plugin._zygote`): a copy of
the xdist controller that forks a worker per launcher request until the controller is gone,
and what each forked worker does to become what ``python -u -c BOOTSTRAP`` would be.

Runs in the forked copy only; imports nothing of pytest (it is already loaded there).
"""

from __future__ import annotations

import atexit
import contextlib
import gc
import inspect
import io
import os
import selectors
import shutil
import signal
import socket
import struct
import sys
import threading
import time
import traceback
import types
from collections.abc import Callable, Mapping
from pathlib import Path
from types import CodeType
from typing import Any, NoReturn

from ._zygote_client import decode

__all__ = ["DRAIN_S", "Server"]

#: What an interpreter reads from its environment when it starts: a worker whose values
#: differ from the zygote's starts as a new interpreter.
_STARTUP_VARS = ("LANG", "LANGUAGE", "TZ", "COVERAGE_PROCESS_START")  # the last: coverage's startup hook
#: isolate's own imports that a worker makes only when a test asks (its clients).
_PRELOAD = ("psycopg", "redis")
#: How long the zygote waits for its workers after the controller is gone.
DRAIN_S = 10.0
#: How long, from the first request on, a request waits for the idle work to be done
#: before its worker is forked: a worker forked earlier does the rest itself, again.
AHEAD_S = 1.0


def _startup_env(env: Mapping[str, str]) -> dict[str, str]:
    return {k: v for k, v in env.items() if k.startswith(("PYTHON", "LC_")) or k in _STARTUP_VARS}


class Server:
    """The zygote: forks a worker per request until the controller is gone."""

    def __init__(self, listener: socket.socket, lifeline: int, log: Path,
                 idle: Callable[[], bool] | None = None, in_worker: Callable[[], None] | None = None) -> None:  # fmt: skip
        """``idle`` does one step of work while no request waits (``False``: none left);
        ``in_worker`` runs in each forked worker before it becomes one."""
        self.listener = listener
        self.lifeline = lifeline
        self.log = log
        self.startup = _startup_env(os.environ)
        self.children: dict[int, socket.socket] = {}  # a worker's pid: its launcher
        self.selector = selectors.DefaultSelector()
        self.refusal: str | None = None
        self.idle = idle
        self.busy = idle is not None  # idle work left to do
        self.ahead_until: float | None = None  # requests wait for it until then
        self.in_worker = in_worker
        self.gateway: tuple[str, CodeType] | None = None  # see _bootstrap

    def note(self, line: str) -> None:
        with self.log.open("a") as f:
            f.write(line + "\n")

    def serve(self) -> None:
        null = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):  # let go of the controller's pipes and terminal
            os.dup2(null, fd)
        os.close(null)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        wake_r, wake_w = os.pipe()
        os.set_blocking(wake_w, False)
        signal.set_wakeup_fd(wake_w)
        for sig in (signal.SIGCHLD, signal.SIGTERM):
            signal.signal(sig, lambda signum, frame: None)
        self.wake = (wake_r, wake_w)
        self.preload()
        self.selector.register(self.listener, selectors.EVENT_READ, "accept")
        self.selector.register(self.lifeline, selectors.EVENT_READ, "lifeline")
        self.selector.register(wake_r, selectors.EVENT_READ, "signal")
        closing_at: float | None = None
        while closing_at is None or self.children:
            timeout = None if closing_at is None else max(0.0, closing_at + DRAIN_S - time.monotonic())
            events = self.selector.select(0 if self.busy and closing_at is None else timeout)
            if not events and self.busy and closing_at is None:
                self.busy = self.idle_step()
            for key, _ in events:
                if key.data == "accept":
                    self.accept()
                elif key.data == "signal":
                    signals = os.read(wake_r, 512)
                    self.reap()
                    if signal.SIGTERM in signals and closing_at is None:
                        closing_at = self.close_down()
                elif key.data == "lifeline":
                    if closing_at is None:
                        closing_at = self.close_down()
                else:  # a launcher's connection: it ended before its worker did
                    self.client_gone(key.fileobj, key.data)  # type: ignore[arg-type]
            if closing_at is not None and time.monotonic() > closing_at + DRAIN_S:
                for pid in self.children:
                    os.kill(pid, signal.SIGKILL)
                self.reap(block=True)

    def work_ahead(self) -> None:
        """Before a worker is forked: finish the idle work, within ``AHEAD_S`` of the first
        request (the worker would otherwise redo what is left, beside the zygote)."""
        if self.ahead_until is None:
            self.ahead_until = time.monotonic() + AHEAD_S
        while self.busy and time.monotonic() < self.ahead_until:
            self.busy = self.idle_step()

    def idle_step(self) -> bool:
        """One step of the idle work; ``False`` when done or failed."""
        assert self.idle is not None
        try:
            more = self.idle()
        except Exception as exc:  # work ahead is never worth a worker
            self.note(f"idle work stopped: {type(exc).__name__}: {exc}")
            return False
        if not more:
            self.note("idle work done")
        return more

    def preload(self) -> None:
        for name in _PRELOAD:
            with contextlib.suppress(ImportError):
                __import__(name)
        with contextlib.suppress(Exception):  # else each worker compiles it, as before
            import execnet.gateway_base

            source = inspect.getsource(execnet.gateway_base)
            self.gateway = source, compile(source, "<string>", "exec", dont_inherit=True)
        if threading.active_count() > 1:
            self.refusal = "the zygote's imports started a thread"

    def close_down(self) -> float:
        """No more workers: the socket closes and the directory goes now (a SIGKILL may
        follow a SIGTERM before the workers are drained)."""
        self.selector.unregister(self.listener)
        self.listener.close()
        self.selector.unregister(self.lifeline)
        shutil.rmtree(self.log.parent, ignore_errors=True)
        return time.monotonic()

    def accept(self) -> None:
        conn, _ = self.listener.accept()
        fds: list[int] = []
        try:
            conn.settimeout(10)
            request, fds = self.receive(conn)
            reason = self.refusal or self.differs(conn, request, fds)
            if reason:
                self.note(f"refused {reason}")
                conn.sendall(f"no {reason}\n".encode())
                conn.close()
                return
            self.work_ahead()
            # What the worker inherits, its collections never walk: less CPU, and the pages
            # stay shared instead of being copied when the collector touches each object.
            gc.freeze()
            pid = os.fork()
            if pid == 0:
                self.become_worker(fds, request)
            self.children[pid] = conn
            conn.sendall(f"ok {pid}\n".encode())
            self.note(f"forked {pid}")
            self.selector.register(conn, selectors.EVENT_READ, pid)
        except (OSError, ValueError) as exc:
            conn.close()
            self.note(f"refused {exc}")
        finally:
            for fd in fds:
                os.close(fd)

    @staticmethod
    def receive(conn: socket.socket) -> tuple[dict[str, Any], list[int]]:
        data, fds, _flags, _addr = socket.recv_fds(conn, 1 << 16, 3)
        if len(data) < 4:
            raise ValueError("a malformed request")
        size = struct.unpack("!I", data[:4])[0]
        body = data[4:]
        while len(body) < size:
            chunk = conn.recv(size - len(body))
            if not chunk:
                raise ValueError("a truncated request")
            body += chunk
        return decode(body), fds

    def differs(self, conn: socket.socket, request: dict[str, Any], fds: list[int]) -> str | None:
        """Why a worker forked for ``request`` would not be what a new interpreter is."""
        creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        if struct.unpack("3i", creds)[1] != os.getuid():
            return "a request from another user"
        import execnet.gateway_io

        argv = request.get("argv")
        boot = execnet.gateway_io.popen_bootstrapline
        if len(fds) != 3 or argv not in (["-u", "-c", boot], ["-u", "-B", "-c", boot]):
            return f"a worker command this zygote does not know ({argv})"
        theirs = _startup_env(request.get("env") or {})
        changed = sorted(k for k in set(theirs) | set(self.startup) if theirs.get(k) != self.startup.get(k))
        if changed:
            return f"{', '.join(changed)} changed after the controller started"
        return None

    def reap(self, *, block: bool = False) -> None:
        while self.children:
            try:
                pid, status = os.waitpid(-1, 0 if block else os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            conn = self.children.pop(pid, None)
            if conn is not None and conn.fileno() >= 0:
                self.selector.unregister(conn)
                with contextlib.suppress(OSError):
                    conn.sendall(f"exit {os.waitstatus_to_exitcode(status)}\n".encode())
                conn.close()

    def client_gone(self, conn: socket.socket, pid: int) -> None:
        """xdist killed the launcher: the worker goes too, as the process xdist started."""
        self.selector.unregister(conn)
        conn.close()  # reap() sees it closed, and tells no one
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)

    def become_worker(self, fds: list[int], request: dict[str, Any]) -> NoReturn:
        """In the forked child: become ``python -u [-B] -c BOOTSTRAP`` with the launcher's
        stdio, directory and environment. Never returns into the controller's frames."""
        code = 1
        try:
            self.selector.close()
            self.listener.close()
            for conn in self.children.values():
                conn.close()
            for fd in (self.lifeline, *self.wake):
                os.close(fd)
            signal.set_wakeup_fd(-1)
            _signals_of(request)
            for target, fd in enumerate(fds):
                os.dup2(fd, target)
                os.close(fd)
            fds.clear()
            os.chdir(request["cwd"])
            os.umask(int(request.get("umask", 0o022)))
            os.environ.clear()
            os.environ.update(request["env"])
            # pytest's rewrite hook of the controller: the worker's config installs its own.
            sys.meta_path[:] = [h for h in sys.meta_path if type(h).__module__ != "_pytest.assertion.rewrite"]
            if self.in_worker is not None:
                with contextlib.suppress(Exception):  # help ahead, never a worker's failure
                    self.in_worker()
            _fresh_stdio()
            _reseed()
            sys.argv = ["-c"]
            sys.dont_write_bytecode = "-B" in request["argv"] or bool(os.environ.get("PYTHONDONTWRITEBYTECODE"))
            main = types.ModuleType("__main__")
            main.__dict__["__builtins__"] = __builtins__
            sys.modules["__main__"] = main
            code = _run(request["argv"][-1], main.__dict__, self.gateway)
        finally:
            os._exit(code)


def _fresh_stdio() -> None:
    """stdin, stdout and stderr on fds 0-2 as ``python -u`` makes them."""
    model = sys.__stdout__ or sys.stdout
    encoding = getattr(model, "encoding", None) or "utf-8"
    sys.stdin = io.TextIOWrapper(io.BufferedReader(io.FileIO(0, "r", closefd=False)), encoding=encoding)
    setattr(sys, "__stdin__", sys.stdin)  # noqa: B010 - typeshed makes it Final
    for fd, name, errors in ((1, "stdout", "strict"), (2, "stderr", "backslashreplace")):
        stream = io.TextIOWrapper(io.FileIO(fd, "w", closefd=False), encoding=encoding, errors=errors,
                                  line_buffering=os.isatty(fd), write_through=True)  # fmt: skip
        setattr(sys, name, stream)
        setattr(sys, f"__{name}__", stream)


def _signals_of(request: dict[str, Any]) -> None:
    """The signal dispositions and mask a new interpreter started by the launcher would
    have: what the launcher found ignored stays ignored (SIGINT too: a run started in the
    background ignores Ctrl-C), SIGINT is otherwise Python's KeyboardInterrupt, the rest
    default; blocked as the launcher's were."""
    ignored = {int(s) for s in request.get("ignored") or ()}
    for sig in signal.valid_signals():
        if sig in (signal.SIGKILL, signal.SIGSTOP):
            continue
        if sig in ignored:
            handler: Any = signal.SIG_IGN
        else:
            handler = signal.default_int_handler if sig == signal.SIGINT else signal.SIG_DFL
        with contextlib.suppress(OSError, ValueError):  # the few the kernel keeps
            signal.signal(sig, handler)
    signal.pthread_sigmask(signal.SIG_SETMASK, [int(s) for s in request.get("blocked") or ()])


def _reseed() -> None:
    """Reseed what a fork would share with its siblings: the standard library's ``random``
    reseeds itself after a fork; numpy's global generator (if a plugin imported it) does not,
    and workers drawing "unique" values from it would draw the same ones."""
    numpy_random = sys.modules.get("numpy.random")
    if numpy_random is not None:
        with contextlib.suppress(Exception):
            numpy_random.seed()


def _bootstrap(namespace: dict[str, Any], gateway: tuple[str, CodeType]) -> None:
    """Do what execnet's bootstrap line (``import sys;exec(eval(sys.stdin.readline()))``)
    does, but for compiling execnet's gateway again: what the controller sends starts with
    its source, which the zygote compiled once (``gateway``) for all its workers (~8 ms of
    CPU each, while xdist waits for the worker before it starts the next one). The rest is
    compiled where it stands in the source (its line numbers), in the same namespace."""
    namespace["sys"] = sys
    source = eval(sys.stdin.readline())  # noqa: S307 - what the bootstrap line does
    prefix, compiled = gateway
    if not (isinstance(source, str) and source.startswith(prefix + "\n")):
        exec(compile(source, "<string>", "exec", dont_inherit=True), namespace)  # noqa: S102
        return
    exec(compiled, namespace)  # noqa: S102 - the controller's gateway source, compiled
    rest = "\n" * prefix.count("\n") + source[len(prefix) :]
    exec(compile(rest, "<string>", "exec", dont_inherit=True), namespace)  # noqa: S102


def _run(source: str, namespace: dict[str, Any], gateway: tuple[str, CodeType] | None = None) -> int:
    """Run ``source`` as ``python -c`` does and end as it would: the exit code, after the
    other threads, the exit handlers and a last garbage collection. With ``gateway``,
    execnet's bootstrap line runs as :func:`_bootstrap` says."""
    code = 0
    try:
        import execnet.gateway_io

        if gateway is not None and source == execnet.gateway_io.popen_bootstrapline:
            _bootstrap(namespace, gateway)
        else:
            exec(compile(source, "<string>", "exec", dont_inherit=True), namespace)  # noqa: S102 - execnet's bootstrap line
    except SystemExit as exc:
        if exc.code is None or isinstance(exc.code, int):
            code = exc.code or 0
        else:
            print(exc.code, file=sys.stderr)
            code = 1
    except KeyboardInterrupt:
        traceback.print_exc()
        code = -signal.SIGINT
    except BaseException:  # an uncaught exception ends the program
        traceback.print_exc()
        code = 1
    shutdown = getattr(threading, "_shutdown", None)
    if shutdown is not None:
        with contextlib.suppress(BaseException):
            shutdown()
    with contextlib.suppress(BaseException):
        atexit._run_exitfuncs()
    gc.collect()  # the interpreter's final collection (isolate's fast exit froze what it skips)
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(BaseException):
            stream.flush()
    if code < 0:
        signal.signal(-code, signal.SIG_DFL)
        os.kill(os.getpid(), -code)
    return code
