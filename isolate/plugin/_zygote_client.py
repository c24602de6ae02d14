"""The program xdist starts for a worker when ``--isolate-fork-workers`` is on.

Run as ``python -I -S _zygote_client.py SOCKET -u [-B] -c BOOTSTRAP`` (execnet appends
everything after ``SOCKET``). It hands its stdin, stdout and stderr, its working directory
and its environment to the zygote behind ``SOCKET``, which forks the worker; it then waits
for the worker's exit and exits the same way, so xdist sees one process as before. Should
the zygote refuse or be gone, it becomes the worker itself: ``python -u -c BOOTSTRAP``.

xdist starts the workers one after another, and each waits for this program: it imports
only ``os`` and modules built into the interpreter (no ``json``, ``socket`` or ``signal``,
whose imports would more than double its ~7 ms), and no isolate. The request it sends is
:func:`encode`'s.
"""

from __future__ import annotations

import _signal  # type: ignore[import-not-found]  # no stub; signal itself imports enum (~4 ms)
import _socket
import _struct
import os
import sys

__all__ = ["decode", "encode"]

#: The first field of a request: what the zygote checks before it reads the rest.
PROTOCOL = b"isolate-zygote/2"


def encode(cwd: bytes, umask: int, ignored: list[int], blocked: list[int], argv: list[bytes],
           env: dict[bytes, bytes]) -> bytes:  # fmt: skip
    """A request as NUL-separated fields (none holds a NUL: they are a process's own
    strings), preceded by its length."""
    fields = [PROTOCOL, cwd, b"%d" % umask, b",".join(b"%d" % s for s in ignored),
              b",".join(b"%d" % s for s in blocked), b"%d" % len(argv), *argv,
              *(k + b"=" + v for k, v in env.items())]  # fmt: skip
    body = b"\0".join(fields)
    return _struct.pack("!I", len(body)) + body


def decode(body: bytes) -> dict[str, object]:
    """What :func:`encode` packed (without the length), with strings decoded as ``os``
    decodes a process's own; ``ValueError`` on anything else."""
    fields = body.split(b"\0")

    def numbers(field: bytes) -> list[int]:
        return [int(s) for s in field.split(b",")] if field else []

    try:
        if len(fields) < 6 or fields[0] != PROTOCOL:
            raise ValueError
        argc = int(fields[5])
        argv, env = fields[6 : 6 + argc], fields[6 + argc :]
        if len(argv) != argc or not all(b"=" in pair for pair in env):
            raise ValueError
        return {"cwd": os.fsdecode(fields[1]), "umask": int(fields[2]), "ignored": numbers(fields[3]),
                "blocked": numbers(fields[4]), "argv": [os.fsdecode(a) for a in argv],
                "env": dict(os.fsdecode(pair).split("=", 1) for pair in env)}  # fmt: skip
    except ValueError:
        raise ValueError("a malformed request") from None


def _fresh(argv: list[str]) -> None:
    """Become what xdist asked for: a new interpreter."""
    os.execv(sys.executable, [sys.executable, *argv])  # noqa: S606 - what execnet would run


def _ask(path: str, argv: list[str]) -> tuple[_socket.socket, int]:
    """The worker's pid, forked by the zygote; raises ``OSError`` when it refuses."""
    conn = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    conn.settimeout(30)
    conn.connect(path)
    # What the worker inherits besides: the signals this process found ignored (as Python
    # starts: SIGINT ignored stays ignored) and its blocked ones.
    ignored = [int(s) for s in _signal.valid_signals() if _signal.getsignal(s) == _signal.SIG_IGN]
    blocked = [int(s) for s in _signal.pthread_sigmask(_signal.SIG_BLOCK, [])]
    umask = os.umask(0o077)
    os.umask(umask)
    message = encode(os.getcwdb(), umask, ignored, blocked, [os.fsencode(a) for a in argv], dict(os.environb))
    rights = [(_socket.SOL_SOCKET, _socket.SCM_RIGHTS, _struct.pack("3i", 0, 1, 2))]
    sent = conn.sendmsg([message[:4096]], rights)
    conn.sendall(message[sent:])
    answer = _line(conn)
    if not answer.startswith("ok "):
        conn.close()
        raise OSError(answer or "the zygote closed the connection")
    return conn, int(answer[3:])


def _line(conn: _socket.socket) -> str:
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
        _signal.signal(-code, _signal.SIG_DFL)
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
    _signal.signal(_signal.SIGINT, _signal.SIG_IGN)  # Ctrl-C reaches the worker by its group
    for sig in (_signal.SIGTERM, _signal.SIGHUP):
        _signal.signal(sig, lambda signum, frame: os.kill(pid, signum))
    conn.settimeout(None)
    answer = _line(conn)
    if answer.startswith("exit "):
        _exit_like(int(answer[5:]))
    os._exit(1)  # the zygote is gone, and took the worker with it


if __name__ == "__main__":
    main()
