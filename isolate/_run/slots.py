"""Collect slots (``--isolate-collect-slots``): xdist workers take turns at their start.

xdist starts every worker at once, and each imports its conftests and collects the whole
suite before its first test. With more workers than cores they share the CPU for all of
that, so even the first worker's first test waits until nearly every worker has collected
(8 workers on 2 cores: the run's longest test started 1.1-1.5 s into the run). The total
work is the same either way, but the order is not: with a few *slots*, as many workers as
there are cores collect at full speed and start testing, the next ones collect meanwhile.

A slot is an ``flock`` on ``collect.slot-K`` in the run dir; worker ``gwN`` takes slot
``N % slots`` before its initial conftests are imported and gives it back once it has
collected. The kernel drops a dead worker's lock, so a crash never blocks the others. A
worker never waits on a slot for ever: if the slot has not changed hands for
:data:`PATIENCE_S` (a conftest that waits at import for another worker, or one very slow
collection), it collects anyway, as it would without slots.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import re
import time
from collections.abc import Callable
from pathlib import Path

__all__ = ["PATIENCE_S", "CollectSlot", "slot_count", "usable_cores", "worker_index"]

logger = logging.getLogger(__name__)

#: A waiting worker collects anyway once its slot has not changed hands for this long.
PATIENCE_S = 10.0
#: How often a waiting worker looks at its slot (a handful of cheap system calls).
POLL_S = 0.005
_HOLDER = 16  # bytes: the holder's pid, left-aligned, written over the previous one


def usable_cores() -> int:
    """The CPUs this process may run on (its affinity, where the platform has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def slot_count(setting: int | str, workers: int, cores: int) -> int:
    """How many workers collect at once: ``0`` when every worker may (``all``, or no more
    workers than slots), else the setting (``auto``: the cores)."""
    slots = cores if setting == "auto" else 0 if setting == "all" else int(setting)
    return slots if 0 < slots < workers else 0


def worker_index(worker_id: str) -> int:
    """``gw12`` -> 12 (xdist's ids; a replacement worker gets the next free number)."""
    match = re.search(r"(\d+)$", worker_id)
    return int(match.group(1)) if match else 0


class CollectSlot:
    """One worker's turn; :meth:`release` (or the process's end) hands it on."""

    def __init__(self, fd: int, waited: float) -> None:
        self._fd = fd
        self.waited = waited  #: seconds this worker waited for its turn

    @classmethod
    def take(
        cls,
        run_dir: Path,
        worker_id: str,
        slots: int,
        *,
        patience: float = PATIENCE_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> CollectSlot | None:
        """Wait for ``worker_id``'s slot and hold it; ``None`` if the slot cannot be
        opened, or did not change hands for ``patience`` seconds (go ahead without it)."""
        path = run_dir / f"collect.slot-{worker_index(worker_id) % slots}"
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            logger.debug("isolate: no collect slot at %s: %s", path, exc)
            return None
        started = since = clock()
        holder = b""
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                now = clock()
                current = os.pread(fd, _HOLDER, 0)
                if current != holder:  # handed on: the turns are moving
                    holder, since = current, now
                elif now - since >= patience:
                    logger.debug("isolate: %s held by %r for %.1fs: collecting anyway", path, holder, now - since)
                    os.close(fd)
                    return None
                time.sleep(POLL_S)
                continue
            except OSError as exc:
                logger.debug("isolate: cannot lock %s: %s", path, exc)
                os.close(fd)
                return None
            os.pwrite(fd, str(os.getpid()).ljust(_HOLDER).encode(), 0)
            return cls(fd, clock() - started)

    def release(self) -> None:
        """Hand the slot on (idempotent)."""
        if self._fd >= 0:
            with contextlib.suppress(OSError):
                fcntl.flock(self._fd, fcntl.LOCK_UN)  # also if a child forked meanwhile holds a copy
            os.close(self._fd)
            self._fd = -1
