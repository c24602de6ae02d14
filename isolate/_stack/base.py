"""What every part of a worker's stack shares: the run, the settings, the backend, the
pieces' state, and starting a server so that the run's reaper can stop it."""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import TypeVar

from .._backends import Backend, Runner, make_backend
from .._config import Settings
from .._containers import ContainerHandle
from .._database import WorkerDatabase
from .._errors import ConfigError, RunStoppingError
from .._identity import WorkerIdentity
from .._pool import FreshPool
from .._postgres import PostgresServer
from .._redis import RedisServer
from .._redis.lease import DbLease
from .._run.liveness import process_start_ticks
from .._run.registry import ProcessRecord
from .._run.rundir import RunDir
from .._service import ServiceHandle
from .._timings import Timings

__all__ = ["StackBase"]

S = TypeVar("S")


class StackBase:
    """The state of one worker's stack; its parts (databases, Redis, containers,
    services) build on it."""

    def __init__(
        self, settings: Settings, worker: WorkerIdentity, run: RunDir, backend: str, rootdir: Path
    ) -> None:
        self.settings = settings
        self.worker = worker
        self.run = run
        self.rootdir = rootdir
        self.backend: Backend = make_backend(backend, settings, worker, run, rootdir)
        self.timings = Timings(run.timings_path, worker.worker_id)
        self._postgres: PostgresServer | None = None
        self._database: WorkerDatabase | None = None
        self._redis: RedisServer | None = None
        self._redis_runner: Runner[RedisServer] | None = None
        self._redis_lease: DbLease | None = None
        self._redis_lock = threading.Lock()  # the early starts (see service()) and a fixture
        self._redis_used = False
        self._services: dict[str, ServiceHandle] = {}
        self._containers: dict[str, ContainerHandle] = {}
        self._pool: FreshPool | None = None
        #: What :meth:`set_aside` kept: ``test``, ``name``, ``dsn`` each.
        self.fresh_kept: list[dict[str, str]] = []
        #: Set by the plugin when a test of this worker failed (``--isolate-keep=failed``).
        self.failed = False
        #: Set by the plugin when this worker's tests take fresh databases: the pool then
        #: starts making spares as soon as the worker's database exists.
        self.fresh_wanted = False

    @property
    def run_dir(self) -> Path:
        """A directory of this run, shared by its workers, removed when the run ends."""
        self.run.require()
        return self.run.path

    def shared(self, name: str, start: Callable[[], Mapping[str, object]]) -> dict[str, object]:
        """Call ``start`` once per run, whichever worker asks first; everyone gets its
        JSON-serialisable result. Concurrent callers wait while the first one starts."""
        return self.run.shared(name, start)

    def adopt_process(
        self, pid: int, name: str, stop_signal: int = signal.SIGTERM, *, group: bool = True
    ) -> None:
        """Have the run stop process ``pid`` when it ends, even if this worker dies.

        With ``group`` (the default) the process should lead its own process group
        (``start_new_session=True``) and the whole group is signalled. It gets
        ``stop_signal``, then SIGKILL after the stop timeout. ``name`` must be unique
        in the run; :meth:`release_process` forgets it.
        """
        ticks = process_start_ticks(pid)
        if ticks is None:
            raise ConfigError(f"cannot adopt pid {pid}: no such process", hint="adopt it while it runs")
        self.run.registry.register(
            ProcessRecord(name=name, pid=pid, start_ticks=ticks, stop_signal=int(stop_signal),
                          group=group, scope="run")
        )  # fmt: skip

    def register_worker(self, name: str) -> None:
        """Record this worker process for the run's reaper, which freezes a worker still
        alive when it reaps (so it cannot start anything afterwards), then kills it."""
        self.run.registry.register(ProcessRecord(name=name, pid=os.getpid(), start_ticks=process_start_ticks(os.getpid()),
                                                 group=False, scope="run", freeze=True))  # fmt: skip

    def _refuse_if_stopping(self) -> None:
        """No process is started once the run is being reaped: it would outlive the pass."""
        if self.run.stopping():
            raise RunStoppingError(f"run {self.worker.run_id} is stopping: {self.worker.worker_id} starts nothing more")

    def release_process(self, name: str) -> None:
        """Forget a process adopted under ``name`` (it has ended, or is stopped elsewhere)."""
        self.run.registry.unregister(name)

    def _start(self, runner: Runner[S], *, shared: bool = False) -> S:
        """Start ``runner``; its processes are registered as they are spawned (a shared
        server with run scope: it outlives the worker that started it), and a failed
        start leaves nothing behind."""
        self._refuse_if_stopping()
        scope = "run" if shared else "worker"
        runner.on_spawn = lambda record: self.run.registry.register(replace(record, scope=scope))
        try:
            runner.start()
        except BaseException:
            runner.stop()
            self.run.registry.unregister(runner.name)
            raise
        assert runner.server is not None
        return runner.server

    @property
    def keeping(self) -> bool:
        """Whether this worker's stack stays up after the run (``--isolate-keep``)."""
        return self.settings.keep == "always" or (self.settings.keep == "failed" and self.failed)
