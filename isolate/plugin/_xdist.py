"""Hooks that exist only when pytest-xdist is active (controller side)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pytest

from .._controller import RunController
from .._run.serial import serial_ids
from ._durations import CPU_CACHE_KEY, DurationRecorder

if TYPE_CHECKING:
    from ._scheduler import DurationScheduling


class XdistHooks:
    """Hands every worker the run's facts, so they all agree on them, and with
    ``duration`` set, gives xdist isolate's scheduler."""

    def __init__(self, controller: RunController, recorder: DurationRecorder, duration: bool) -> None:
        self.controller = controller
        self.recorder = recorder
        self.duration = duration
        self.scheduler: DurationScheduling | None = None  # isolate's, once xdist made it

    @pytest.hookimpl(optionalhook=True)
    def pytest_configure_node(self, node: Any) -> None:
        node.workerinput.update(self.controller.workerinput())

    @pytest.hookimpl(optionalhook=True)
    def pytest_xdist_make_scheduler(self, config: pytest.Config, log: Any) -> Any:
        if not self.duration:
            return None  # xdist's own, as --dist says
        from ._scheduler import DurationScheduling  # only a controller that schedules needs it

        run_dir = self.controller.run.path
        recorder = self.recorder
        self.scheduler = DurationScheduling(
            config, log, recorder.history(), lambda: serial_ids(run_dir), recorder.history(CPU_CACHE_KEY)
        )
        return self.scheduler

    @pytest.hookimpl
    def pytest_runtest_logstart(self, nodeid: str) -> None:
        """xdist calls it on the controller as a worker begins a test."""
        if self.scheduler is not None:
            self.scheduler.mark_test_started(nodeid)
