"""The deadline of an interrupted run (a plugin: pytest hooks only)."""

from __future__ import annotations

import os
import sys
import threading

import pytest

from .._controller import RunController

__all__ = ["InterruptDeadline"]


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
