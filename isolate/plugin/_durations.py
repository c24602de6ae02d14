"""Every test's duration, recorded by the controller (or the only process) from the reports:
kept in pytest's cache for the duration scheduler, and written in pytest-split's format
with ``--isolate-store-durations``. With it, the CPU time the test's process spent on each
phase and the time its thread waited for a CPU, which :class:`CpuMeter` measures where the
test runs and sends along in the report (as ``isolate_cpu`` and ``isolate_cpu_wait``, which
xdist carries like any report attribute); the recorder scales each test's CPU time to what
it is on a machine with a CPU free for it
(:func:`~isolate._dist.durations.scaled_cpu`)."""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections import defaultdict
from collections.abc import Generator
from pathlib import Path

import pytest

from .._dist.durations import merge, scaled_cpu, strip_group, write_split_file

__all__ = ["CACHE_KEY", "CPU_CACHE_KEY", "CpuMeter", "DurationRecorder"]

#: Where in pytest's cache (``.pytest_cache/v/``) the durations live.
CACHE_KEY = "isolate/durations"
#: ... and the CPU seconds each test's process spent on it (scaled, see :class:`CpuMeter`).
CPU_CACHE_KEY = "isolate/cpu"

_PHASE_CPU = pytest.StashKey[tuple[float, float]]()
#: The kernel's scheduler statistics for the calling thread: CPU time, then the time it was
#: ready to run but waited for a CPU (nanoseconds); Linux only.
_SCHEDSTAT = "/proc/thread-self/schedstat"


class _RunQueueClock:
    """Seconds the calling thread has waited for a CPU so far (0 where the kernel does not
    say), from ``/proc/thread-self/schedstat``. The file stays open and is read again with
    ``pread`` (a few µs, against ~25 µs to open, read and close it six times a test); a
    descriptor opened by another thread, or by the process this one was forked from,
    names that thread, so it is opened anew then."""

    def __init__(self) -> None:
        self._owner: tuple[int, int] | None = None
        self._fd = -1

    def __call__(self) -> float:
        owner = (os.getpid(), threading.get_ident())
        try:
            if owner != self._owner:
                self.close()
                self._fd, self._owner = os.open(_SCHEDSTAT, os.O_RDONLY | os.O_CLOEXEC), owner
            return int(os.pread(self._fd, 128, 0).split()[1]) / 1e9
        except (OSError, IndexError, ValueError):
            return 0.0

    def close(self) -> None:
        if self._fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self._fd)
        self._fd, self._owner = -1, None


class CpuMeter:
    """In the process that runs the tests: the CPU time of each phase (setup, call,
    teardown) and the time the test's thread waited for a CPU meanwhile, put on the
    phase's report as ``isolate_cpu`` and ``isolate_cpu_wait`` (seconds).

    On a busy machine a test that computes waits for a CPU, so its duration grows and its
    CPU time does not: it would look idle, and the scheduler would take it for one that
    waits. The wait (``/proc/thread-self/schedstat``) lets the recorder scale it back
    (:func:`~isolate._dist.durations.scaled_cpu`).
    """

    def __init__(self) -> None:
        self._waited = _RunQueueClock()

    def _measure(self, item: pytest.Item) -> Generator[None, object, object]:
        start, waited = time.process_time(), self._waited()
        try:
            return (yield)
        finally:
            item.stash[_PHASE_CPU] = (time.process_time() - start, self._waited() - waited)

    def pytest_unconfigure(self) -> None:
        self._waited.close()

    @pytest.hookimpl(wrapper=True, tryfirst=True)
    def pytest_runtest_setup(self, item: pytest.Item) -> Generator[None, object, object]:
        return (yield from self._measure(item))

    @pytest.hookimpl(wrapper=True, tryfirst=True)
    def pytest_runtest_call(self, item: pytest.Item) -> Generator[None, object, object]:
        return (yield from self._measure(item))

    @pytest.hookimpl(wrapper=True, tryfirst=True)
    def pytest_runtest_teardown(self, item: pytest.Item) -> Generator[None, object, object]:
        return (yield from self._measure(item))

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_makereport(self, item: pytest.Item) -> Generator[None, pytest.TestReport, pytest.TestReport]:
        report = yield
        measured = item.stash.get(_PHASE_CPU, None)
        if measured is not None:
            cpu, waited = measured
            report.isolate_cpu = round(cpu, 6)  # type: ignore[attr-defined]
            report.isolate_cpu_wait = round(waited, 6)  # type: ignore[attr-defined]
            del item.stash[_PHASE_CPU]
        return report


class DurationRecorder:
    """Sums each test's setup, call and teardown durations, as pytest-split does."""

    def __init__(self, config: pytest.Config, split_file: str | None) -> None:
        self.config = config
        self.split_file = split_file
        self.measured: defaultdict[str, float] = defaultdict(float)
        self.cpu: defaultdict[str, float] = defaultdict(float)  # raw, until the session ends
        self.waited: defaultdict[str, float] = defaultdict(float)
        dist = getattr(config.option, "dist", None)
        self._grouped = dist == "loadgroup"
        self._each = dist == "each"  # every worker runs every test: no one duration per test

    def history(self, key: str = CACHE_KEY) -> dict[str, float]:
        """What earlier runs recorded under ``key``, test id -> seconds: the durations, or
        with :data:`CPU_CACHE_KEY` the CPU times (empty without pytest's cache plugin)."""
        cache = getattr(self.config, "cache", None)
        data = cache.get(key, {}) if cache is not None else {}
        return merge(data if isinstance(data, dict) else {}, {})

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        if report.duration >= 0 and not self._each:  # a frozen clock (freezegun): negative
            nodeid = strip_group(report.nodeid) if self._grouped else report.nodeid
            self.measured[nodeid] += report.duration
            cpu = getattr(report, "isolate_cpu", None)
            if isinstance(cpu, int | float) and cpu >= 0:
                self.cpu[nodeid] += cpu
                waited = getattr(report, "isolate_cpu_wait", None)
                if isinstance(waited, int | float) and waited >= 0:
                    self.waited[nodeid] += waited

    def scaled(self) -> dict[str, float]:
        """Each test's CPU time so far, scaled to a machine with a CPU free for it."""
        return {
            nodeid: round(scaled_cpu(cpu, self.measured[nodeid], self.waited.get(nodeid, 0.0)), 6)
            for nodeid, cpu in self.cpu.items()
        }

    @pytest.hookimpl(trylast=True)
    def pytest_sessionfinish(self) -> None:
        if not self.measured:
            return
        cache = getattr(self.config, "cache", None)
        if cache is not None:
            cache.set(CACHE_KEY, merge(self.history(), self.measured))
            cache.set(CPU_CACHE_KEY, merge(self.history(CPU_CACHE_KEY), self.scaled()))
        if self.split_file:
            path = Path(self.split_file)
            write_split_file(path if path.is_absolute() else self.config.rootpath / path, self.measured)
