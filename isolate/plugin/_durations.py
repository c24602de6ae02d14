"""Every test's duration, recorded by the controller (or the only process) from the reports:
kept in pytest's cache for the duration scheduler, and written in pytest-split's format
with ``--isolate-store-durations``."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import pytest

from .._dist.durations import merge, strip_group, write_split_file

__all__ = ["CACHE_KEY", "DurationRecorder"]

#: Where in pytest's cache (``.pytest_cache/v/``) the durations live.
CACHE_KEY = "isolate/durations"


class DurationRecorder:
    """Sums each test's setup, call and teardown durations, as pytest-split does."""

    def __init__(self, config: pytest.Config, split_file: str | None) -> None:
        self.config = config
        self.split_file = split_file
        self.measured: defaultdict[str, float] = defaultdict(float)
        dist = getattr(config.option, "dist", None)
        self._grouped = dist == "loadgroup"
        self._each = dist == "each"  # every worker runs every test: no one duration per test

    def history(self) -> dict[str, float]:
        """The durations earlier runs recorded (empty without pytest's cache plugin)."""
        cache = getattr(self.config, "cache", None)
        data = cache.get(CACHE_KEY, {}) if cache is not None else {}
        return merge(data if isinstance(data, dict) else {}, {})

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        if report.duration >= 0 and not self._each:  # a frozen clock (freezegun): negative
            nodeid = strip_group(report.nodeid) if self._grouped else report.nodeid
            self.measured[nodeid] += report.duration

    @pytest.hookimpl(trylast=True)
    def pytest_sessionfinish(self) -> None:
        if not self.measured:
            return
        cache = getattr(self.config, "cache", None)
        if cache is not None:
            cache.set(CACHE_KEY, merge(self.history(), self.measured))
        if self.split_file:
            path = Path(self.split_file)
            write_split_file(path if path.is_absolute() else self.config.rootpath / path, self.measured)
