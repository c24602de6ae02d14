"""Timings isolate records about itself (start-up, restarts, teardown)."""

from __future__ import annotations

import contextlib
import json
import os
import statistics
import time
from collections.abc import Iterator
from pathlib import Path

__all__ = ["PHASES", "Timings", "summarize", "what_ran"]

#: Phases, in the order they are reported.
PHASES = (
    "postgres_start",
    "postgres_wait",
    "schema_migrations",
    "database_ready",
    "redis_start",
    "redis_wait",
    "prestart_wait",
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


def _count(n: int, one: str, many: str) -> str:
    return f"{n} {one if n == 1 else many}"


def what_ran(events: list[dict[str, object]], *, external_pg: bool, external_redis: bool) -> str:
    """What a run started, in one phrase: ``PostgreSQL, 4 Redis, 12 services on 4 workers``
    (empty if nothing); from the timings every process recorded."""
    counts: dict[str, int] = {}
    workers = set()
    for event in events:
        counts[str(event["phase"])] = counts.get(str(event["phase"]), 0) + 1
        if event["phase"] in ("postgres_wait", "redis_start", "redis_wait", "service_ready"):  # it used something
            workers.add(str(event["worker"]))
    parts = []
    if counts.get("postgres_start"):
        parts.append("an external PostgreSQL" if external_pg else "PostgreSQL")
    if counts.get("redis_start"):
        parts.append(_count(counts["redis_start"], "Redis", "Redis"))
    elif external_redis and workers:
        parts.append("an external Redis")
    if counts.get("service_ready"):
        parts.append(_count(counts["service_ready"], "service", "services"))
    if not parts:
        return ""
    return ", ".join(parts) + (f" on {_count(len(workers), 'worker', 'workers')}" if workers else "")
