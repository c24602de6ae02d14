"""The program xdist starts for a worker when ``--isolate-fork-workers`` is on.

Run as ``python -I -S _zygote_client.py SOCKET -u [-B] -c BOOTSTRAP`` (execnet appends
everything after ``SOCKET``). It hands its stdin, stdout and stderr, its working directory
and its environment to the zygote behind ``SOCKET``, which forks the worker; it then waits
for the worker's exit and exits the same way, so xdist sees one process as before. Should
the zygote refuse or be gone, it becomes the worker itself: ``python -u -c BOOTSTRAP``.

Standard library only, and no import of isolate: it starts in ~15 ms.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import struct
import sys

__all__: list[str] = []


def _fresh(argv: list[str]) -> None:
    """Become what xdist asked for: a new interpreter."""
    os.execv(sys.executable, [sys.executable, *argv])  # noqa: S606 - what execnet would run


def _ask(path: str, argv: list[str]) -> tuple[socket.socket, int]:
    """The worker's pid, forked by the zygote; raises ``OSError`` when it refuses."""
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    conn.settimeout(30)
    conn.connect(path)
    # What the worker inherits besides: the signals this process found ignored (as Python
    # starts: SIGINT ignored stays ignored) and its blocked ones.
    ignored = [int(s) for s in signal.valid_signals() if signal.getsignal(s) == signal.SIG_IGN]
    blocked = [int(s) for s in signal.pthread_sigmask(signal.SIG_BLOCK, [])]
    umask = os.umask(0o077)
    os.umask(umask)
    body = json.dumps({"cwd": os.getcwd(), "env": dict(os.environ), "argv": argv, "umask": umask,
                       "ignored": ignored, "blocked": blocked}).encode()  # fmt: skip
    message = struct.pack("!I", len(body)) + body
    sent = socket.send_fds(conn, [message[:4096]], [0, 1, 2])
    conn.sendall(message[sent:])
    answer = _line(conn)
    if not answer.startswith("ok "):
        conn.close()
        raise OSError(answer or "the zygote closed the connection")
    return conn, int(answer[3:])


def _line(conn: socket.socket) -> str:
    data = b""
    while not data.endswith(b"\n"):
        chunk = conn.recv(256)
        if not chunk:
            break
        data += chunk
    return data.decode(errors="replace").strip()


def _exit_like(code: int) -> None:
    """Exit as the worker did: with its code, or by its signal."""
    if code < 0:
        signal.signal(-code, signal.SIG_DFL)
        os.kill(os.getpid(), -code)
    os._exit(code if code >= 0 else 128 - code)


def main() -> None:
    path, argv = sys.argv[1], sys.argv[2:]
    try:
        conn, pid = _ask(path, argv)
    except (OSError, ValueError) as exc:
        sys.stderr.write(f"isolate: this worker starts as a new interpreter: {exc}\n")
        _fresh(argv)
        return
    # The worker holds the pipes now: xdist must see their end when the worker ends.
    null = os.open(os.devnull, os.O_RDWR)
    os.dup2(null, 0)
    os.dup2(null, 1)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the worker by its group
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, lambda signum, frame: os.kill(pid, signum))
    conn.settimeout(None)
    answer = _line(conn)
    if answer.startswith("exit "):
        _exit_like(int(answer[5:]))
    os._exit(1)  # the zygote is gone, and took the worker with it


if __name__ == "__main__":
    main()
