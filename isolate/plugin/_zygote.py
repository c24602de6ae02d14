"""``--isolate-fork-workers``: xdist workers forked from a preloaded copy of the controller.

Each xdist worker is a new interpreter that imports pytest and every plugin again and, with
``PYTHONDONTWRITEBYTECODE`` set (or a read-only venv), rewrites the plugins' asserts
again: 0.3-0.5 s of CPU per worker before its first conftest, which on a small machine is
most of a run's start.

So the controller forks a copy of itself, the *zygote*, once its plugins are loaded and
before anything else happens (the outermost ``pytest_load_initial_conftests`` wrapper: no
conftest imported, no output captured, no warning filter applied yet). The zygote holds
what every worker imports first, rewritten by the same pytest. xdist's local ``popen``
specs then start ``_zygote_client.py`` instead of the interpreter: it hands its stdin,
stdout, stderr, working directory and environment to the zygote, which forks a worker that
runs execnet's bootstrap with them as ``python -u -c`` would, and reports its exit.

A worker must not be told apart from a new interpreter, so each imports its conftests and
test modules itself (they may read ``PYTEST_XDIST_WORKER`` at import), and workers start as
new interpreters whenever a fork could differ: the controller was started with interpreter
options (``-O``, ``-X``, ``-W``) or had threads, a worker's environment differs in what an
interpreter reads at start (``PYTHON*``, locale), or a spec is not a plain local popen.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shlex
import shutil
import signal
import socket
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any

import pytest

from .._retry import poll_until
from .._run.rundir import ZYGOTE_PREFIX
from ._env import started_as_command
from ._precompile import RewrittenModules
from ._zygote_server import DRAIN_S, Server

__all__ = ["ZYGOTE_KEY", "Zygote", "fork_workers", "start_zygote", "summary_line"]

logger = logging.getLogger(__name__)

_CLIENT = Path(__file__).with_name("_zygote_client.py")
ZYGOTE_KEY = pytest.StashKey["Zygote | str"]()


def fork_workers(early_config: pytest.Config) -> None:
    """In an xdist controller, before its conftests: start the zygote its workers will be
    forked from (``ZYGOTE_KEY`` holds it, or why there is none)."""
    if not started_as_command(early_config):  # a fork would carry the program's state into the workers
        zygote: Zygote | str = "pytest was called by a program (pytest.main), not started as a command"
    else:
        zygote = start_zygote(RewrittenModules(early_config))
    early_config.stash[ZYGOTE_KEY] = zygote
    if isinstance(zygote, Zygote):
        early_config.pluginmanager.register(zygote, "isolate-fork-workers")
        early_config.add_cleanup(zygote.close)
    else:
        logger.info("xdist workers start as new interpreters: %s", zygote)


def summary_line(config: pytest.Config) -> str | None:
    """How this run's workers started, for the terminal summary; ``None`` without a try."""
    zygote = config.stash.get(ZYGOTE_KEY, None)
    if zygote is None:
        return None
    if isinstance(zygote, str):
        return f"isolate: xdist workers started as new interpreters: {zygote}"
    forked, reasons = zygote.outcome()
    line = f"isolate: {forked} xdist worker{'s' if forked != 1 else ''} forked from the preloaded controller"
    return line + (f"; the others started as new interpreters: {'; '.join(reasons)}" if reasons else "")


def unavailable(spec_python: str) -> str | None:
    """Why this controller cannot fork its workers, or ``None``."""
    if sys.platform != "linux":
        return f"fork is unsafe on {sys.platform}"
    if threading.active_count() > 1:  # a C library's own pool (OpenBLAS's) handles fork
        return "the controller runs threads before its conftests are loaded"
    orig = getattr(sys, "orig_argv", [sys.executable])
    if len(orig) > 1 and orig[1].startswith("-") and not orig[1].startswith("-m"):  # -m, -mpytest
        # (-W, -X, -O: new interpreters do not get them; PYTHON* variables they do get)
        return f"the controller's interpreter was started with options ({' '.join(orig[1:2])})"
    if "//" in spec_python:
        return "the interpreter's path holds '//', which xdist's specs cannot carry"
    return None


class Zygote:
    """The controller's side: the zygote's pid, its socket, and the pipe whose closing
    tells it the controller is gone. A pytest plugin (``pytest_xdist_setupnodes``)."""

    def __init__(self, pid: int, directory: Path, lifeline: int) -> None:
        self.pid = pid
        self.directory = directory
        self._lifeline = lifeline

    @property
    def log(self) -> Path:
        """One line per worker: ``forked PID`` or ``refused REASON``."""
        return self.directory / "workers.log"

    def launcher(self) -> str:
        return shlex.join([sys.executable, "-I", "-S", str(_CLIENT), str(self.directory / "sock")])

    @pytest.hookimpl(optionalhook=True, trylast=True)
    def pytest_xdist_setupnodes(self, config: pytest.Config, specs: list[Any]) -> None:
        """A plain local ``popen`` spec starts the launcher instead of the interpreter (the
        same spec objects: xdist has given them their ids and keys its status by them)."""
        for spec in specs:
            if spec.popen and not (spec.python or spec.via or spec.ssh or spec.socket or spec.vagrant_ssh):
                spec.python = self.launcher()

    def outcome(self) -> tuple[int, list[str]]:
        """Workers forked, and why the others were not."""
        try:
            lines = self.log.read_text().splitlines()
        except OSError:
            return 0, []
        forked = sum(1 for line in lines if line.startswith("forked "))
        return forked, sorted({line[8:] for line in lines if line.startswith("refused ")})

    def close(self) -> None:
        """Tell the zygote the controller is done, wait for it, remove its directory."""
        if self._lifeline < 0:
            return
        os.close(self._lifeline)
        self._lifeline = -1
        if not poll_until(self._ended, DRAIN_S + 5):  # it drains its workers for up to DRAIN_S
            with contextlib.suppress(OSError):
                os.kill(self.pid, signal.SIGKILL)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(self.pid, 0)
        shutil.rmtree(self.directory, ignore_errors=True)  # if the zygote could not

    def _ended(self) -> bool:
        try:
            return os.waitpid(self.pid, os.WNOHANG)[0] != 0
        except ChildProcessError:  # reaped elsewhere
            return True


def start_zygote(rewritten: RewrittenModules | None = None) -> Zygote | str:
    """Fork the zygote from this process; or why not. While it waits for requests, it
    rewrites the test modules and conftests of ``rewritten`` for its workers."""
    reason = unavailable(shlex.join([sys.executable, str(_CLIENT)]))
    if reason:
        return reason
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        directory = Path(tempfile.mkdtemp(prefix=ZYGOTE_PREFIX))  # mode 0700: ours alone
        try:
            listener.bind(str(directory / "sock"))
        except OSError:
            directory.rmdir()
            raise
        listener.listen(64)
    except OSError as exc:  # no temp dir, or a path too long for a socket
        listener.close()
        return f"no socket for the zygote in {tempfile.gettempdir()} ({exc})"
    read_end, write_end = os.pipe()
    os.set_inheritable(write_end, False)
    pid = os.fork()
    if pid == 0:  # the zygote
        os.close(write_end)
        code = 0
        try:
            idle, in_worker = (rewritten.step, rewritten.install) if rewritten is not None else (None, None)
            Server(listener, read_end, directory / "workers.log", idle, in_worker).serve()
        except BaseException:  # nothing may unwind into the controller's frames
            code = 70
        finally:
            shutil.rmtree(directory, ignore_errors=True)  # also when the controller ran no cleanup (SIGKILL)
            os._exit(code)
    listener.close()
    os.close(read_end)
    return Zygote(pid, directory, write_end)
