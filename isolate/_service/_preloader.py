"""The fork server's program: run by path (``python .../_preloader.py CONFIG``), so it
imports nothing of isolate, only the service's ``preload`` modules (and the standard
library).

Its stdout and stderr are the service log from the first instruction: a ``print()`` in a
preloaded module lands there. It talks to its worker on a private socket (``CONFIG["fd"]``,
``SOCK_SEQPACKET``: one JSON object per message), never on stdout. Requests::

    {"argv": [...], "env": {...}, "cwd": "...", "entry": "module:function"}

each with the service log's descriptor attached (``SCM_RIGHTS``): the worker opened it,
so this process writes the log without being able to open it by name. It forks a child
that becomes the service (own session, stdout/stderr on that descriptor,
``sys.argv``/``os.environ``/working directory as asked, default signal handlers) and calls
``entry``; its exit status is what ``entry`` returns or raises, as for ``python -m``.
Replies: ``{"ready": pid}`` (or ``{"error": text}``) once, ``{"pid": n}`` (or
``{"error": text}``) per request, and ``{"exit": pid, "code": n}`` when a child ends
(``code`` as :attr:`subprocess.Popen.returncode`: ``-N`` when killed by signal N). It ends
when the socket reaches end-of-file (the worker closed it, or died) and, on Linux, when
the thread that started it ends (``PR_SET_PDEATHSIG``); the children it leaves are
registered with the run's reaper by the worker that asked for them.

Run with ``CONFIG["hub_fd"]`` instead, it is the *run's* fork server for a spec: it imports
the preload once and listens on that socket (``SOCK_SEQPACKET``, in the run dir) for the
workers; each sends ``{"env": {...}}`` with its channel and its log attached, and gets
``{"pid": n}``, the process forked to serve it as above (on that channel, with that log as
its stdout and stderr, that environment). A connection from a uid not in
``CONFIG["clients"]`` is closed unanswered. It runs until the run's end stops it.

Run with ``CONFIG["connect"]`` instead, it is the fork server *inside a service's
container* (the docker backend): the container's command. It connects to the worker's
socket at that path (a directory of the worker's, bind-mounted into the container),
imports the preload and serves that channel as above, except that requests carry no
descriptor (a child keeps the container's stdout and stderr, which are the container's
log), nor ``env`` or ``cwd`` (a child keeps the container's working directory, and gets
``setenv``, the service's environment, on top of the container's). ``{"signal": n, "pid": p,
"group": bool}`` signals one of its children (or the child's process group); a pid it has
reaped, or never forked, is left alone. When the channel ends it exits once its children
have (so the container lives as long as its service, as without it).
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import select
import signal
import socket
import struct
import sys
import traceback
from collections.abc import Callable
from typing import Any

_MAX_MESSAGE = 1 << 20


def _die_with_parent(parent: int) -> None:
    """Linux: be SIGKILLed when the worker (the thread that started us) ends."""
    if sys.platform == "linux":
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)
    if os.getppid() != parent:  # it ended before the line above
        os._exit(1)


class Channel:
    """The socket to the worker."""

    def __init__(self, fd: int) -> None:
        self.sock = socket.socket(fileno=fd)

    def say(self, message: dict[str, Any]) -> None:
        self.sock.send(json.dumps(message).encode())

    def hear(self) -> tuple[dict[str, Any] | None, list[int]]:
        """The next request and the descriptors it carries; ``None`` at end-of-file."""
        data, fds, _, _ = socket.recv_fds(self.sock, _MAX_MESSAGE, 4)
        if not data:
            for fd in fds:
                os.close(fd)
            return None, []
        return json.loads(data), fds


def unsafe_to_fork(own: int = -1) -> list[str]:
    """Why this process must not be forked: threads or sockets (connections, listeners)
    other than ``own``, the channel to the worker."""
    reasons = []
    threading = sys.modules.get("threading")
    if threading is not None and threading.active_count() > 1:
        names = ", ".join(t.name for t in threading.enumerate() if t is not threading.main_thread())
        reasons.append(f"{threading.active_count() - 1} thread(s) running ({names})")
    sockets = 0
    with contextlib.suppress(OSError):
        for fd in os.listdir("/proc/self/fd"):
            with contextlib.suppress(OSError):
                sockets += int(fd) != own and os.readlink(f"/proc/self/fd/{fd}").startswith("socket:")
    if sockets:
        reasons.append(f"{sockets} socket(s) open (a connection or listener made at import)")
    return reasons


def _entry(spec: str) -> Callable[[], object]:
    module, _, attr = spec.partition(":")
    target: Any = importlib.import_module(module)
    for part in attr.split("."):
        target = getattr(target, part)
    if not callable(target):
        raise TypeError(f"entry {spec!r} is not callable")
    return target  # type: ignore[no-any-return]


def _exit_code(exc: SystemExit) -> int:
    if exc.code is None:
        return 0
    if isinstance(exc.code, int):
        return exc.code
    print(exc.code, file=sys.stderr)
    return 1


def _become_service(request: dict[str, Any], log: int | None, closing: tuple[int, ...]) -> None:
    """In the forked child: turn into the service and never return."""
    code = 1
    try:
        os.setsid()
        signal.set_wakeup_fd(-1)
        for fd in closing:  # the worker's channel and the wake-up pipe are not the service's
            os.close(fd)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.close(null)
        if log is not None:
            os.dup2(log, 1)
            os.dup2(log, 2)
            os.close(log)
        if "cwd" in request:
            os.chdir(request["cwd"])
        if "env" in request:
            os.environ.clear()
            os.environ.update(request["env"])
        os.environ.update(request.get("setenv") or {})  # in a container: on top of its own
        sys.argv = list(request["argv"])
        result = _entry(request["entry"])()
        code = result if isinstance(result, int) else 0
    except SystemExit as exc:
        code = _exit_code(exc)
    except KeyboardInterrupt:
        code = 128 + signal.SIGINT
    except BaseException:
        traceback.print_exc()
    finally:
        with contextlib.suppress(BaseException):
            if "logging" in sys.modules:
                sys.modules["logging"].shutdown()
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)


def _reap(channel: Channel, children: set[int]) -> None:
    while children:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        children.discard(pid)
        channel.say({"exit": pid, "code": os.waitstatus_to_exitcode(status)})


def serve(config: dict[str, Any]) -> int:
    if "hub_fd" in config:
        return _hub(config)
    if "connect" in config:
        return _contained(config)
    channel = Channel(config["fd"])
    if config.get("die_with_parent"):
        _die_with_parent(config["parent"])
    failure = _preload(config, own=config["fd"])
    if failure:
        channel.say({"error": failure})
        return 1
    return _serve_channel(channel)


def _contained(config: dict[str, Any]) -> int:
    """In the service's container: connect to the worker, preload, serve."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    sock.connect(config["connect"])
    channel = Channel(sock.detach())
    failure = _preload(config, own=channel.sock.fileno())
    if failure:
        channel.say({"error": failure})
        return 1
    return _serve_channel(channel, linger=True)


def _linger(children: set[int]) -> None:
    """The worker is gone (or keeps its failed run's services up): serve no more, and end
    when the children have ended."""
    while children:
        try:
            children.discard(os.waitpid(-1, 0)[0])
        except ChildProcessError:
            return


def _preload(config: dict[str, Any], own: int) -> str | None:
    """Import the preload modules; why this process cannot serve, or ``None``."""
    sys.path[0] = config["path0"]  # as `python -m` (the cwd) or `python script` would
    try:
        for module in config["preload"]:
            importlib.import_module(module)
    except BaseException:
        return "importing the preload modules failed:\n" + traceback.format_exc()
    reasons = unsafe_to_fork(own=own)
    if reasons:
        return "after importing " + ", ".join(config["preload"]) + ": " + "; ".join(reasons)
    return None


def _serve_channel(channel: Channel, linger: bool = False) -> int:
    """Fork a service per request on ``channel`` until it reaches end-of-file (then, with
    ``linger``, wait for the children first)."""
    wakeup = os.pipe()
    for fd in wakeup:
        os.set_blocking(fd, False)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    signal.set_wakeup_fd(wakeup[1])
    children: set[int] = set()
    # poll, not select: a preload that keeps over 1,021 descriptors open puts the channel
    # and the pipe above select's limit (FD_SETSIZE).
    poller = select.poll()
    for fd in (channel.sock.fileno(), wakeup[0]):
        poller.register(fd, select.POLLIN)
    channel.say({"ready": os.getpid()})
    while True:
        readable = {fd for fd, _ in poller.poll()}
        if wakeup[0] in readable:
            with contextlib.suppress(BlockingIOError):
                os.read(wakeup[0], 4096)
            _reap(channel, children)
        if channel.sock.fileno() not in readable:
            continue
        request, fds = channel.hear()
        if request is None and linger:  # in a container: it lives as long as its service
            _linger(children)
        if request is None:  # the worker is gone or done: what we forked is in its registry
            # Out at once: this process only imported the app (it never ran it), and tearing
            # the interpreter down would keep the worker waiting ~0.1 s at its end.
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(0)
        if "signal" in request:
            _signal(request, fds, children)
        else:
            _fork(channel, request, fds, (channel.sock.fileno(), *wakeup), children)


def _signal(request: dict[str, Any], fds: list[int], children: set[int]) -> None:
    """Signal a child of ours that we have not reaped (so its pid is still its own)."""
    for fd in fds:
        os.close(fd)
    pid = int(request["pid"])
    if pid in children:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            (os.killpg if request.get("group") else os.kill)(pid, int(request["signal"]))


def _hub(config: dict[str, Any]) -> int:
    """The run's fork server for the workers whose services share an interpreter, preload,
    directory, user and environment: it imports the preload once, then forks, for each
    worker that connects, the process that serves that worker (its channel and log come
    with the request; ``{"pid": n}`` answers it). It runs until the run's end stops it."""
    listener = socket.socket(fileno=config["hub_fd"])
    failure, output = _captured(lambda: _preload(config, own=config["hub_fd"]))
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # the workers' servers are nobody's to wait for
    clients = {int(uid) for uid in config["clients"]}
    while True:
        conn, _ = listener.accept()
        fds: list[int] = []
        try:
            data, fds, _, _ = socket.recv_fds(conn, _MAX_MESSAGE, 2)
            creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
            if struct.unpack("3i", creds)[1] not in clients or len(fds) != 2 or not data:
                continue  # not a worker of this run: nothing is forked, the connection closes
            sys.stdout.flush()
            sys.stderr.flush()
            pid = os.fork()
            if pid == 0:
                listener.close()
                conn.close()
                _become_server(json.loads(data), fds, failure, output)
            conn.send(json.dumps({"pid": pid}).encode())
        except (OSError, ValueError) as exc:
            print(f"isolate fork server: a request failed: {exc}", file=sys.stderr)
        finally:
            for fd in fds:
                os.close(fd)
            conn.close()


def _captured(work: Callable[[], str | None]) -> tuple[str | None, bytes]:
    """``work()`` and what it wrote to stdout and stderr (also written to our own log), so
    that each worker's service log holds what the preload printed, as its own parent's
    would. In a memfd: importing ``tempfile`` (and ``random`` with it) here made every
    restart of a forked service ~20 ms slower."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = (os.dup(1), os.dup(2))
    capture = os.memfd_create("isolate-preload-output")
    try:
        os.dup2(capture, 1)
        os.dup2(capture, 2)
        try:
            result = work()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            for fd, target in zip(saved, (1, 2), strict=True):
                os.dup2(fd, target)
                os.close(fd)
        output = os.pread(capture, os.fstat(capture).st_size, 0)
    finally:
        os.close(capture)
    os.write(1, output)
    return result, output


def _become_server(request: dict[str, Any], fds: list[int], failure: str | None, output: bytes) -> None:
    """In a child of the run's fork server: serve one worker, on its channel and its log
    (which gets what the preload printed first), with its environment. Never returns."""
    code = 1
    try:
        channel_fd, log = fds
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        os.dup2(log, 1)
        os.dup2(log, 2)
        os.close(log)
        if output:
            os.write(1, output)
        os.environ.clear()
        os.environ.update(request["env"])
        channel = Channel(channel_fd)
        if failure:
            channel.say({"error": failure})
        else:
            code = _serve_channel(channel)
    except BaseException:
        traceback.print_exc()
    finally:
        with contextlib.suppress(BaseException):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)


def _fork(channel: Channel, request: dict[str, Any], fds: list[int], closing: tuple[int, ...],
          children: set[int]) -> None:  # fmt: skip
    if len(fds) > 1 or (not fds and "env" in request):
        for fd in fds:
            os.close(fd)
        channel.say({"error": f"a request carries {len(fds)} descriptors, not the log's one"})
        return
    log = fds[0] if fds else None  # none: in a container, whose log is our stdout
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        pid = os.fork()
    except OSError as exc:
        if log is not None:
            os.close(log)
        channel.say({"error": f"fork failed: {exc}"})
        return
    if pid == 0:
        _become_service(request, log, closing)
    if log is not None:
        os.close(log)
    children.add(pid)
    channel.say({"pid": pid})


if __name__ == "__main__":
    sys.exit(serve(json.loads(sys.argv[1])))
