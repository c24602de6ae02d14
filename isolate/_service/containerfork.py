"""The fork server inside a service's container (docker backend): the worker's end.

A service that names an ``entry`` and whose container command runs Python
(``python -m MOD ...`` or ``python SCRIPT ...``) gets a container whose command is
isolate's fork server (``_preloader.py``, copied into a directory of the worker's that is
bind-mounted at :data:`MOUNT`), run by that same interpreter. It connects to the worker's
socket there, imports ``preload`` once, and each start of the service forks a child that
calls ``entry`` with the service's ``env`` on top of the container's environment, and the
container's working directory, stdout and stderr.
So the container is created and started once per worker; a stop or kill ends the
service process (the child), not the container, and the next start forks again instead
of starting the container and re-importing the app.

The socket is in the worker's private directory (0700 on the host: only this user and
the processes of the container reach it), and the server answers on it only the
connection its container makes. Signals go through the fork server, which signals only
children it has not reaped: a pid of the container is never signalled from the host.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import socket
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path, PurePosixPath
from typing import Any

from .._errors import ConfigError, ServiceError
from .forkserver import python_argv

__all__ = ["MOUNT", "ContainerForks", "forks_in_container", "host_pid"]

logger = logging.getLogger(__name__)

#: Where the worker's directory (the socket and the fork server's program) is in the container.
MOUNT = "/isolate-fork"
_PROGRAM = Path(__file__).with_name("_preloader.py")
_PYTHON = re.compile(r"python[0-9.]*")
_INITS = {"tini", "tini-static", "dumb-init", "docker-init", "catatonit"}  # they run the command as it is
_SOCKET_PATH_MAX = 100  # sun_path is 108 bytes on Linux


def forks_in_container(entry: str | None, argv: Sequence[str], entrypoint: Sequence[str], setting: str,
                       base_url: str) -> str | None:  # fmt: skip
    """Why a container running ``argv`` (after its image's ``entrypoint``) starts its
    service as a new process rather than by forking a preloaded parent inside it, or
    ``None`` (it forks)."""
    if entry is None:
        return "it names no ServiceSpec.entry"
    if setting == "off":
        return "--isolate-fork-server=off"
    if not argv or not _PYTHON.fullmatch(PurePosixPath(argv[0]).name):
        return "its container command does not run python (python -m MODULE or python SCRIPT)"
    if entrypoint and PurePosixPath(entrypoint[0]).name not in _INITS:
        return f"its image's ENTRYPOINT ({entrypoint[0]}) is not an init that runs the command"
    if sys.platform != "linux" or not base_url.startswith("http+docker://"):
        return "the engine is not this machine's (its socket cannot be mounted)"
    return None


def host_pid(init: int, pid: int) -> int | None:
    """The host pid of process ``pid`` of a container whose init is host pid ``init``:
    the descendant of ``init`` whose innermost pid (``NSpid``) is ``pid``, or ``None``."""
    todo, seen = [init], set()
    while todo:
        parent = todo.pop()
        seen.add(parent)
        try:
            for line in Path(f"/proc/{parent}/status").read_text().splitlines():
                if line.startswith("NSpid:") and parent != init and line.split()[-1] == str(pid):
                    return parent
            for task in Path(f"/proc/{parent}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split() if int(c) not in seen]
        except (OSError, ValueError):
            continue  # gone meanwhile, or not ours to read
    return None


class ContainerForks:
    """The worker's end of one container's fork server (see the module docs)."""

    def __init__(self, directory: Path, name: str, entry: str, preload: Sequence[str],
                 argv: Sequence[str], workdir: str) -> None:  # fmt: skip
        self.directory = directory
        self.name = name
        self.entry = entry
        self.workdir = Path(workdir or "/")
        self.made_for = list(argv)  # the command it was started for
        self.sys_argv, path0 = python_argv(argv, self.workdir)
        self.python = argv[0]
        self.config = {"connect": f"{MOUNT}/s", "preload": list(preload), "path0": path0}
        self._listener: socket.socket | None = None
        self._sock: socket.socket | None = None
        self._reader: threading.Thread | None = None
        self._changed = threading.Condition()
        self._codes: dict[int, int | None] = {}  # our children: None while they run
        self._replies: list[dict[str, Any]] = []
        self._ready = False
        self._gone: str | None = None  # why the channel ended

    # -- the container's side ------------------------------------------------------

    def command(self) -> list[str]:
        """The container's command: its Python running the fork server."""
        return [self.python, f"{MOUNT}/_preloader.py", json.dumps(self.config)]

    def mounts(self) -> list[Any]:
        """The worker's directory, read-only at :data:`MOUNT`."""
        from docker.types import Mount

        return [Mount(target=MOUNT, source=str(self.directory), type="bind", read_only=True)]

    def listen(self) -> None:
        """Make the directory (0711: the container's user, whoever it is, reaches what it
        is told the names of) with the program and the socket (0666) the container
        connects to."""
        self.close()
        self.directory.mkdir(mode=0o711)
        os.chmod(self.directory, 0o711)
        shutil.copyfile(_PROGRAM, self.directory / "_preloader.py")
        os.chmod(self.directory / "_preloader.py", 0o644)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        path = str(self.directory / "s")
        dirfd = os.open(self.directory, os.O_RDONLY | os.O_DIRECTORY)
        try:  # a long path is bound through the directory's descriptor
            listener.bind(path if len(path) <= _SOCKET_PATH_MAX else f"/proc/self/fd/{dirfd}/s")
            os.chmod("s", 0o666, dir_fd=dirfd)
        finally:
            os.close(dirfd)
        listener.listen(1)
        self._listener = listener

    # -- the channel -----------------------------------------------------------------

    @property
    def connected(self) -> bool:
        """The container's fork server is connected and has not gone."""
        return self._sock is not None and self._gone is None

    def connect(self, timeout: float, exited: Callable[[], str | None]) -> None:
        """Take the connection of the container just started and wait for its preload;
        ``exited()`` says why the container stopped meanwhile (else ``None``)."""
        assert self._listener is not None
        self.disconnect()
        deadline = time.monotonic() + timeout
        self._listener.settimeout(0.05)
        while self._sock is None:
            with contextlib.suppress(TimeoutError):
                self._sock, _ = self._listener.accept()
                break
            why = exited()
            if why is not None or time.monotonic() > deadline:
                self._fail(why or f"its fork server did not connect within {timeout:.0f}s")
        self._sock.settimeout(None)
        self._gone, self._ready = None, False
        self._codes.clear()  # a new container: its pids start again
        self._reader = threading.Thread(target=self._read, args=(self._sock,), name=f"forks-{self.name}", daemon=True)
        self._reader.start()
        with self._changed:
            self._changed.wait_for(lambda: self._ready or self._gone is not None, max(0.0, deadline - time.monotonic()))
        if not self._ready:
            self._fail(self._gone or f"its preload did not finish within {timeout:.0f}s")

    def _fail(self, why: str) -> None:
        self.disconnect()
        raise ConfigError(
            f"service {self.name!r}: the fork server in its container cannot serve: {why}",
            hint="preload only modules that import without starting threads, opening "
            "connections or reading the service's env (which comes with each start), in an "
            "image whose python is 3.9 or newer; or drop ServiceSpec.entry "
            "(or set --isolate-fork-server=off) to start its container's command as it is",
        )

    def _read(self, sock: socket.socket) -> None:
        why = "its fork server exited (so did its container)"
        try:
            while data := sock.recv(1 << 20):
                self._handle(json.loads(data))
        except Exception as exc:  # any failure ends the channel
            why = f"its messages could not be read ({type(exc).__name__}: {exc})"
            logger.warning("isolate: %s: %s", self.name, why)
        with self._changed:
            self._gone = self._gone or why  # an error it sent first says more
            for pid, code in self._codes.items():  # the container is gone: so are they
                if code is None:
                    self._codes[pid] = -9
            self._changed.notify_all()

    def _handle(self, message: dict[str, Any]) -> None:
        with self._changed:
            if "exit" in message:
                if int(message["exit"]) in self._codes:
                    self._codes[int(message["exit"])] = int(message["code"])
            elif "ready" in message:
                self._ready = True
            elif self._ready:
                self._replies.append(message)
            else:
                self._gone = str(message.get("error"))
            self._changed.notify_all()

    def runs(self, argv: Sequence[str]) -> bool:
        """Fork ``argv`` from now on, if it runs what this fork server preloaded for (the
        same python, the same ``sys.path[0]``): a command rendered after the container
        started (``{port}`` in it, say); whether it does."""
        sys_argv, path0 = python_argv(argv, self.workdir)
        if not argv or argv[0] != self.python or path0 != self.config["path0"]:
            return False
        self.sys_argv = sys_argv
        return True

    def spawn(self, timeout: float = 10.0, env: Mapping[str, str] | None = None) -> int:
        """Fork the service (``env`` set on top of the container's environment); its pid
        (in the container), running when this returns."""
        if not self.connected:
            raise ServiceError(f"the fork server in {self.name}'s container is gone: {self._gone}")
        assert self._sock is not None
        request: dict[str, Any] = {"argv": self.sys_argv, "entry": self.entry}
        if env is not None:
            request["setenv"] = dict(env)
        with self._changed:
            self._replies.clear()
            self._sock.send(json.dumps(request).encode())
            self._changed.wait_for(lambda: bool(self._replies) or self._gone is not None, timeout)
            reply = self._replies.pop() if self._replies else {"error": self._gone or "no answer"}
            if "pid" not in reply:
                raise ServiceError(f"the fork server in {self.name}'s container could not fork: {reply.get('error')}")
            pid = int(reply["pid"])
            self._codes[pid] = None  # a pid of an earlier child of this container's, maybe
            return pid

    def signal(self, pid: int, sig: int, *, group: bool = False) -> None:
        """Signal child ``pid`` (or its process group), if it still runs."""
        if self.code(pid) is None and self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.send(json.dumps({"signal": int(sig), "pid": pid, "group": group}).encode())

    def code(self, pid: int) -> int | None:
        """Child ``pid``'s exit code (``-N``: killed by signal N), ``None`` while it runs."""
        with self._changed:
            return self._codes.get(pid, -9)

    def wait(self, pid: int, timeout: float) -> int | None:
        with self._changed:
            self._changed.wait_for(lambda: self._codes.get(pid, -9) is not None, timeout)
            return self._codes.get(pid, -9)

    # -- the end ------------------------------------------------------------------------

    def disconnect(self) -> None:
        """End the channel (the container's fork server exits, and its container)."""
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.shutdown(socket.SHUT_RDWR)
            if self._reader is not None:
                self._reader.join(5)
            self._sock.close()
            self._sock = self._reader = None

    def close(self) -> None:
        """Disconnect, and remove the socket and the directory."""
        self.disconnect()
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        shutil.rmtree(self.directory, ignore_errors=True)
