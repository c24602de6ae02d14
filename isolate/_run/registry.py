"""The run's registry: every process isolate starts, so the controller can reap it.

A record is written when a process starts; the controller, which outlives every
worker, stops whatever is still registered when the run ends (crashed workers
included). Containers are not recorded here: the Docker backend finds them by
their run label.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .._retry import poll_until
from .liveness import is_alive

__all__ = ["ProcessRecord", "ProcessRegistry", "stop_process_group"]

logger = logging.getLogger(__name__)


def stop_process_group(pid: int, start_ticks: int | None, sig: int, timeout: float) -> bool:
    """Send ``sig`` to the process group led by ``pid``, SIGKILL it after ``timeout``.

    Returns True if it stopped gracefully.
    """
    if not is_alive(pid, start_ticks):
        return True
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)
    if poll_until(lambda: not is_alive(pid, start_ticks), timeout):
        return True
    logger.warning("process group %d ignored signal %d for %.1fs; killing", pid, sig, timeout)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)
    poll_until(lambda: not is_alive(pid, start_ticks), 5.0)
    return False


@dataclass
class ProcessRecord:
    """What the reaper needs to stop a process (group) nobody else will stop."""

    name: str
    pid: int | None = None
    start_ticks: int | None = None
    stop_signal: int = signal.SIGTERM
    paths: list[str] = field(default_factory=list)
    owner_pid: int = field(default_factory=os.getpid)


class ProcessRegistry:
    """Records of live processes and dirs in a run dir, for the reaper."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def _file(self, name: str) -> Path:
        return self.directory / f"{name}.json"

    def register(self, record: ProcessRecord) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        tmp = self._file(record.name).with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(asdict(record)))
        tmp.replace(self._file(record.name))

    def unregister(self, name: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self._file(name).unlink()

    def records(self) -> Iterator[ProcessRecord]:
        for path in sorted(self.directory.glob("*.json")):
            with contextlib.suppress(OSError, ValueError, TypeError):
                yield ProcessRecord(**json.loads(path.read_text()))

    def reap(self, timeout: float = 10.0) -> list[str]:
        """Stop every recorded process group and remove its paths; the names reaped."""
        reaped = []
        for record in self.records():
            if record.pid is not None and is_alive(record.pid, record.start_ticks):
                stop_process_group(record.pid, record.start_ticks, record.stop_signal, timeout)
                reaped.append(record.name)
            for raw in record.paths:
                shutil.rmtree(raw, ignore_errors=True)
            self.unregister(record.name)
        return reaped
