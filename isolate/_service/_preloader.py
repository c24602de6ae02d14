"""The fork server's program: run by path (``python .../_preloader.py CONFIG``), so it
imports nothing of isolate, only the service's ``preload`` modules.

It then answers requests on stdin, one JSON object per line::

    {"argv": [...], "env": {...}, "cwd": "...", "log": "...", "entry": "module:function"}

by forking a child that becomes the service (own session, stdout/stderr appended to
``log``, ``sys.argv``/``os.environ``/working directory as asked, default signal
handlers) and calls ``entry``; its exit status is what ``entry`` returns or raises, as
for ``python -m``. On stdout it writes ``{"ready": pid}`` (or ``{"error": text}``) once,
``{"pid": n}`` (or ``{"error": text}``) per request, and ``{"exit": pid, "code": n}``
when a child ends (``code`` as :attr:`subprocess.Popen.returncode`: ``-N`` when killed by
signal N). It ends when stdin closes; children it leaves are registered with the run's
reaper by the worker that asked for them.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import select
import signal
import sys
import traceback
from collections.abc import Callable
from typing import Any


def _say(message: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


def unsafe_to_fork() -> list[str]:
    """Why this process must not be forked: threads or sockets (connections, listeners)."""
    reasons = []
    threading = sys.modules.get("threading")
    if threading is not None and threading.active_count() > 1:
        names = ", ".join(t.name for t in threading.enumerate() if t is not threading.main_thread())
        reasons.append(f"{threading.active_count() - 1} thread(s) running ({names})")
    sockets = 0
    with contextlib.suppress(OSError):
        for fd in os.listdir("/proc/self/fd"):
            with contextlib.suppress(OSError):
                sockets += os.readlink(f"/proc/self/fd/{fd}").startswith("socket:")
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


def _become_service(request: dict[str, Any], wakeup: tuple[int, int]) -> None:
    """In the forked child: turn into the service and never return."""
    code = 1
    try:
        os.setsid()
        signal.set_wakeup_fd(-1)
        for fd in wakeup:
            os.close(fd)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        log = os.open(request["log"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.dup2(log, 1)
        os.dup2(log, 2)
        os.close(log)
        os.close(null)
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
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


def _reap(children: set[int]) -> None:
    while children:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        children.discard(pid)
        _say({"exit": pid, "code": os.waitstatus_to_exitcode(status)})


def serve(config: dict[str, Any]) -> int:
    sys.path[0] = config["path0"]  # as `python -m` (the cwd) or `python script` would
    try:
        for module in config["preload"]:
            importlib.import_module(module)
    except BaseException:
        _say({"error": "importing the preload modules failed:\n" + traceback.format_exc()})
        return 1
    reasons = unsafe_to_fork()
    if reasons:
        _say({"error": "after importing " + ", ".join(config["preload"]) + ": " + "; ".join(reasons)})
        return 1
    wakeup = os.pipe()
    for fd in wakeup:
        os.set_blocking(fd, False)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    signal.set_wakeup_fd(wakeup[1])
    children: set[int] = set()
    _say({"ready": os.getpid()})
    pending = b""
    while True:
        try:
            readable, _, _ = select.select([0, wakeup[0]], [], [])
        except InterruptedError:
            continue
        if wakeup[0] in readable:
            with contextlib.suppress(BlockingIOError):
                os.read(wakeup[0], 4096)
            _reap(children)
        if 0 not in readable:
            continue
        data = os.read(0, 65536)
        if not data:
            return 0  # the worker is gone or done: what we forked is in its registry
        pending += data
        while b"\n" in pending:
            line, pending = pending.split(b"\n", 1)
            _fork(json.loads(line), wakeup, children)


def _fork(request: dict[str, Any], wakeup: tuple[int, int], children: set[int]) -> None:
    sys.stderr.flush()
    try:
        pid = os.fork()
    except OSError as exc:
        _say({"error": f"fork failed: {exc}"})
        return
    if pid == 0:
        _become_service(request, wakeup)
    children.add(pid)
    _say({"pid": pid})

if __name__ == "__main__":
    sys.exit(serve(json.loads(sys.argv[1])))
