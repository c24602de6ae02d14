"""Timings isolate records about itself (start-up, restarts, teardown)."""

from __future__ import annotations

import contextlib
import json
import os
import statistics
import time
from collections.abc import Iterator
from pathlib import Path

__all__ = ["PHASES", "Timings", "summarize"]

#: Phases, in the order they are reported.
PHASES = (
    "postgres_start",
    "postgres_wait",
    "schema_migrations",
    "redis_start",
    "service_ready",
    "service_restart",
    "worker_stack_ready",
    "worker_teardown",
    "run_teardown",
)


class Timings:
    """Appends ``{"phase", "worker", "seconds"}`` lines to a shared JSONL file."""

    def __init__(self, path: Path, worker: str) -> None:
        self.path = path
        self.worker = worker

    def add(self, phase: str, seconds: float) -> None:
        line = json.dumps({"phase": phase, "worker": self.worker, "seconds": round(seconds, 6)})
        with contextlib.suppress(OSError):
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                os.write(fd, (line + "\n").encode())
            finally:
                os.close(fd)

    @contextlib.contextmanager
    def measure(self, phase: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.add(phase, time.perf_counter() - start)


def read(path: Path) -> list[dict[str, object]]:
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return []
    events = []
    for line in lines:
        with contextlib.suppress(ValueError):
            events.append(json.loads(line))
    return events


def summarize(events: list[dict[str, object]]) -> dict[str, dict[str, float]]:
    """Count, min, median and max seconds per phase."""
    by_phase: dict[str, list[float]] = {}
    for event in events:
        by_phase.setdefault(str(event["phase"]), []).append(float(str(event["seconds"])))
    order = {p: i for i, p in enumerate(PHASES)}
    return {
        phase: {
            "count": len(values),
            "min": min(values),
            "median": statistics.median(values),
            "max": max(values),
        }
        for phase, values in sorted(by_phase.items(), key=lambda kv: order.get(kv[0], 99))
    }
