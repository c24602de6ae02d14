"""The run's watchdog: reaps the run when its controller dies, even by SIGKILL.

Like testcontainers' Ryuk, but for both backends and without a registry image. The
controller starts it (this file, run as a script) in its own session, with a
pipe on its stdin that the controller never writes to. However the controller ends,
the kernel closes the pipe; the watchdog reads end-of-file and, if the run dir is
still there (the controller did not close the run itself), stops every registered
process, removes the run's containers and removes the run dir. SIGTERM makes it reap
at once; SIGINT and SIGHUP (a terminal's Ctrl-C or hang-up) do not touch it.

Until it reaps, it has imported nothing but the standard library (run by path, not with
``-m``, so that not even the package is imported): it starts in a few milliseconds beside
the booting workers, and after a run that closed itself it exits at once.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from types import FrameType
from typing import IO, TYPE_CHECKING

if TYPE_CHECKING:
    from isolate._run.rundir import RunDir

# Absolute imports, inside the functions that reap: this file also runs as a script.

__all__ = ["Watchdog", "main", "reap_run_dir"]

logger = logging.getLogger(__name__)


class Watchdog:
    """The controller's handle on its watchdog process."""

    def __init__(self, run_dir: Path, backend: str, stop_timeout: float) -> None:
        # -P: the script's own dir (isolate/) does not go on sys.path
        argv = [sys.executable, "-P", str(Path(__file__).resolve()), str(run_dir), backend, str(stop_timeout)]
        with open(run_dir / "watchdog.log", "ab") as log:
            self._proc = subprocess.Popen(
                argv, stdin=subprocess.PIPE, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True, cwd="/",
            )  # fmt: skip

    def dismiss(self, timeout: float = 10.0) -> None:
        """The run is closed: let the watchdog go (it finds nothing to reap)."""
        stdin: IO[bytes] | None = self._proc.stdin
        if stdin is not None:
            stdin.close()
        try:
            self._proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()


def reap(run_dir: Path, backend: str, stop_timeout: float) -> list[str]:
    """Everything the run left: registered processes, containers, the run dir."""
    if not run_dir.is_dir():
        return []  # closed by the controller
    from isolate._run.rundir import RUN_PREFIX, RunDir

    run = RunDir(run_dir.parent, run_dir.name[len(RUN_PREFIX) :])
    if run.is_kept():
        return []  # --isolate-keep: left up on purpose, removed by `cleanup RUN`
    return reap_run_dir(run, backend, stop_timeout)


def reap_run_dir(run: RunDir, backend: str, stop_timeout: float) -> list[str]:
    """A run's processes, its containers (``backend`` names where they run) and its dir,
    from outside the run (the watchdog, ``python -m isolate cleanup RUN``)."""
    from isolate._backends import make_backend, reap_leftovers
    from isolate._config import resolve_settings
    from isolate._identity import WorkerIdentity

    identity = WorkerIdentity("reaper", 1, run.run_id)
    made = make_backend(backend, resolve_settings(env={}), identity, run, run.path)
    reaped = reap_leftovers(run, made, stop_timeout)
    run.remove()
    return reaped


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="isolate/_watchdog.py")
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("backend")
    parser.add_argument("stop_timeout", type=float)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s watchdog: %(message)s")

    def reap_now(signum: int, frame: FrameType | None) -> None:
        raise SystemExit(_reap(args))

    signal.signal(signal.SIGTERM, reap_now)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        while os.read(0, 4096):  # nothing is ever written: this returns at end-of-file
            pass
    except OSError:
        pass
    return _reap(args)


def _reap(args: argparse.Namespace) -> int:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # reap once, to the end
    reaped = reap(args.run_dir, args.backend, args.stop_timeout)
    if reaped:
        logger.info("controller gone; reaped %s", ", ".join(reaped))
    return 0


if __name__ == "__main__":
    sys.exit(main())
