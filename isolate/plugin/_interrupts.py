"""Interrupts: SIGTERM and SIGHUP end a run as Ctrl-C does, and the deadline of an
interrupted run."""

from __future__ import annotations

import os
import signal
import sys
import threading

import pytest

from .._controller import RunController

__all__ = ["INTERRUPTS", "InterruptDeadline", "catch_interrupts", "restore_interrupts"]

#: Signals that end a run like Ctrl-C does (CI cancel, a closed terminal).
INTERRUPTS = (signal.SIGTERM, signal.SIGHUP)

_SIGNALS_KEY = pytest.StashKey[dict[int, object]]()


def _interrupted(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"isolate: {signal.Signals(signum).name} received")


def catch_interrupts(config: pytest.Config) -> None:
    """SIGTERM and SIGHUP end the run as Ctrl-C does: pytest stops, the session
    finishes and the run is reaped. A handler set by someone else is kept."""
    previous: dict[int, object] = {}
    for sig in INTERRUPTS:
        try:
            if signal.getsignal(sig) is signal.SIG_DFL:
                previous[sig] = signal.signal(sig, _interrupted)
        except ValueError:  # not the main thread
            break
    config.stash[_SIGNALS_KEY] = previous


def restore_interrupts(config: pytest.Config) -> None:
    """Put back the handlers :func:`catch_interrupts` replaced."""
    for sig, handler in config.stash.get(_SIGNALS_KEY, {}).items():
        signal.signal(sig, handler)  # type: ignore[arg-type]


class InterruptDeadline:
    """After Ctrl-C, SIGTERM or SIGHUP, pytest and xdist get ``grace`` seconds to finish
    the session (and isolate to reap the run). Should anything hang in between (an xdist
    teardown under heavy load, a plugin), the run is reaped from here and the process
    exits with the interrupted status, rather than leave a CI job stuck."""

    def __init__(self, controller: RunController, grace: float) -> None:
        self.controller = controller
        self.grace = grace
        self.done = threading.Event()

    def pytest_keyboard_interrupt(self) -> None:
        threading.Thread(target=self._expire, name="isolate-interrupt-deadline", daemon=True).start()

    def _expire(self) -> None:
        if self.done.wait(self.grace):
            return
        sys.stderr.write(f"\nisolate: the run did not end within {self.grace:.0f}s of the interruption; "
                         "reaping it and exiting\n")  # fmt: skip
        try:
            self.controller.close()
        finally:
            os._exit(int(pytest.ExitCode.INTERRUPTED))

    def pytest_unconfigure(self) -> None:
        self.done.set()
