"""The run dir's socket: xdist workers ask the controller for run fixtures.

``<run dir>/fixtures/socket`` is a Unix socket in a directory only this user can enter.
A worker connects, sends one JSON line (the request) and reads one JSON line (the
answer); the controller serves each connection on a thread of its own, since its main
thread is busy in xdist's loop and a set-up may take minutes. A worker waits as long as
the set-up takes; if the controller dies meanwhile, the connection ends and the worker
raises at once.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from .._errors import ConfigError, RunFixtureError

__all__ = ["ChannelServer", "ask", "socket_path"]

logger = logging.getLogger(__name__)

#: sun_path holds 104 bytes on macOS, 108 on Linux (the terminating NUL included).
MAX_PATH = 100


def socket_path(run_path: Path) -> Path:
    return run_path / "fixtures" / "socket"


def _read_line(conn: socket.socket) -> bytes:
    chunks = []
    while True:
        chunk = conn.recv(65536)
        if not chunk:
            break
        chunks.append(chunk)
        if chunk.endswith(b"\n"):
            break
    return b"".join(chunks)


class ChannelServer:
    """The controller's side: answers each request with ``answer(request)``."""

    def __init__(self, run_path: Path, answer: Callable[[Mapping[str, Any]], Mapping[str, Any]]) -> None:
        self.path = socket_path(run_path)
        if len(os.fsencode(self.path)) > MAX_PATH:
            raise ConfigError(
                f"the run dir's socket path {self.path} is longer than a Unix socket allows",
                hint="use a shorter --isolate-base-dir",
            )
        self.path.parent.mkdir(mode=0o700, exist_ok=True)
        os.chmod(self.path.parent, 0o700)  # only this user reaches the socket
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        self._answer = answer
        self._closing = False
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.bind(str(self.path))
        self._sock.listen(64)
        self._thread = threading.Thread(target=self._serve, name="isolate-run-fixtures-channel", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            if self._closing:
                conn.close()
                return
            threading.Thread(target=self._handle, args=(conn,), daemon=True,
                             name="isolate-run-fixtures-request").start()  # fmt: skip

    def _handle(self, conn: socket.socket) -> None:
        with conn:
            try:
                answer = dict(self._answer(json.loads(_read_line(conn))))
            except Exception as exc:  # a malformed request, or a bug: the asker learns why
                logger.exception("isolate: could not answer a run fixture request")
                answer = {"error": {"name": "?", "message": f"the controller could not answer: {exc!r}"},
                          "first": True}  # fmt: skip
            with contextlib.suppress(OSError):  # the asker died meanwhile (a killed worker)
                conn.sendall(json.dumps(answer).encode() + b"\n")

    def close(self) -> None:
        """Stop accepting (requests in progress still get their answers)."""
        if self._closing:
            return
        self._closing = True
        with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as wake:
            wake.connect(str(self.path))  # accept() returns, sees _closing and ends
        self._thread.join(5)
        self._sock.close()
        with contextlib.suppress(OSError):
            self.path.unlink()


def ask(run_path: Path, request: Mapping[str, Any]) -> dict[str, Any]:
    """A worker's request to the controller; blocks until it answers."""
    path = socket_path(run_path)
    name = request.get("name")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        try:
            sock.connect(str(path))
        except OSError as exc:
            raise RunFixtureError(
                f"run fixture {name!r}: the controller does not answer on {path} ({exc})",
                hint="the isolate plugin must be active in the xdist controller too (it serves run "
                "fixtures on this socket; see its warning if it could not, e.g. a --isolate-base-dir "
                "too long for a socket path); or the run is ending",
            ) from None
        sock.sendall(json.dumps(dict(request)).encode() + b"\n")
        line = _read_line(sock)
    if not line.endswith(b"\n"):
        raise RunFixtureError(f"run fixture {name!r}: the controller ended before it answered",
                              hint="the run was interrupted or its controller died")  # fmt: skip
    return dict(json.loads(line))
