"""Serial tests inside a parallel run: a readers-writer gate shared by the run's workers.

Every test of an xdist run passes the gate *shared*; a test marked ``serial`` passes it
*exclusive*, so it runs while no other test of the run runs, and no other test starts
until it is done. Two ``flock`` files in the run dir make the gate:

* ``serial.turnstile``: a serial test holds it exclusively for its whole run; every
  other test takes it shared for an instant on its way in, so none starts meanwhile
  (and a waiting serial test is not starved by a stream of new parallel tests);
* ``serial.room``: every test holds it shared while it runs; a serial test takes it
  exclusively, which waits until the tests already running have left.

The kernel drops a dead worker's locks, so a crashed worker never blocks the run. (filelock
has no shared mode, hence ``fcntl`` here.)

The duration scheduler (:mod:`isolate._dist.planner`) runs serial tests last on one worker
by itself; it learns which tests are serial from the ids each worker records here
(:func:`record_serial_ids`), since the controller sees test ids only. The gate stays on
underneath, and never waits then.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from collections.abc import Iterator
from pathlib import Path

from .rundir import write_json

__all__ = ["SerialGate", "record_serial_ids", "serial_ids"]


class SerialGate:
    """The run's gate; one per worker process."""

    def __init__(self, run_dir: Path) -> None:
        self._turnstile = self._open(run_dir / "serial.turnstile")
        self._room = self._open(run_dir / "serial.room")

    @staticmethod
    def _open(path: Path) -> int:
        return os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)

    @contextlib.contextmanager
    def shared(self) -> Iterator[None]:
        """Run alongside other parallel tests, never alongside a serial one."""
        fcntl.flock(self._turnstile, fcntl.LOCK_SH)
        fcntl.flock(self._turnstile, fcntl.LOCK_UN)
        fcntl.flock(self._room, fcntl.LOCK_SH)
        try:
            yield
        finally:
            fcntl.flock(self._room, fcntl.LOCK_UN)

    @contextlib.contextmanager
    def exclusive(self) -> Iterator[None]:
        """Run alone: wait for the running tests to finish, hold the others back."""
        fcntl.flock(self._turnstile, fcntl.LOCK_EX)
        try:
            fcntl.flock(self._room, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(self._room, fcntl.LOCK_UN)
        finally:
            fcntl.flock(self._turnstile, fcntl.LOCK_UN)

    def close(self) -> None:
        for fd in (self._turnstile, self._room):
            with contextlib.suppress(OSError):
                os.close(fd)


def record_serial_ids(run_dir: Path, worker_id: str, nodeids: list[str]) -> None:
    """A worker writes the ids of the serial tests it collected, for the controller's
    scheduler (which sees test ids only). Written before the worker reports its collection."""
    folder = run_dir / "serial-ids"
    folder.mkdir(mode=0o700, exist_ok=True)
    write_json(folder / f"{worker_id}.json", {"ids": nodeids})


def serial_ids(run_dir: Path) -> set[str]:
    """The serial test ids the workers recorded (none if no worker wrote any)."""
    found: set[str] = set()
    for path in sorted((run_dir / "serial-ids").glob("*.json")):
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
            found.update(str(nodeid) for nodeid in json.loads(path.read_text())["ids"])
    return found
