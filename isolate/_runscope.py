"""The run as a run fixture sees it: the ``isolate_run`` fixture.

A run fixture lives in the controller, where no worker's stack exists; what it can use
is the run's: its facts, its shared PostgreSQL, and calls that register what it starts
with the run, so that the run stops it even if the controller is SIGKILLed (the
watchdog reaps the registry and the run's labelled containers).
"""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ._config import Settings
from ._containers import ContainerHandle
from ._postgres import PostgresServer
from ._stack import WorkerStack

__all__ = ["RunScope"]


class RunScope:
    """The run: its facts, its shared PostgreSQL, and registration of what a run fixture
    starts (the ``isolate_run`` fixture; in a worker it is the same run, seen from there).
    """

    def __init__(self, stack: WorkerStack) -> None:
        self._stack = stack

    def __repr__(self) -> str:
        return f"RunScope(run_id={self.run_id!r}, backend={self.backend!r})"

    @property
    def run_id(self) -> str:
        """The run's id (in every name isolate gives what the run makes)."""
        return self._stack.worker.run_id

    @property
    def run_dir(self) -> Path:
        """A directory of this run, shared by the controller and the workers, removed at its end."""
        return self._stack.run_dir

    @property
    def backend(self) -> str:
        """``native`` or ``docker``: the backend the run chose."""
        return self._stack.backend.name

    @property
    def worker_count(self) -> int:
        """How many workers the run has (1 without xdist)."""
        return self._stack.worker.worker_count

    @property
    def settings(self) -> Settings:
        """The run's resolved options."""
        return self._stack.settings

    def postgres(self) -> PostgresServer:
        """The run's shared PostgreSQL (started now if nobody has yet)."""
        return self._stack.postgres()

    def adopt_process(
        self, pid: int, name: str, stop_signal: int = signal.SIGTERM, *, group: bool = True
    ) -> None:
        """Have the run stop process ``pid`` when it ends, even if the controller is
        killed: it gets ``stop_signal``, then SIGKILL after the stop timeout. With ``group``
        (the default) it should lead its own process group (``start_new_session=True``)
        and the whole group is signalled. ``name`` is unique in the run."""
        self._stack.adopt_process(pid, name, stop_signal, group=group)

    def release_process(self, name: str) -> None:
        """Forget a process adopted under ``name`` (your teardown stopped it)."""
        self._stack.release_process(name)

    def container_labels(self, role: str = "run-fixture") -> dict[str, str]:
        """Docker labels that make a container part of this run (on either backend): put
        them on a container you create (``labels=...``) and the run's reapers remove it,
        the watchdog included."""
        return self._stack.container_labels(role)

    def container(
        self, name: str, make: Callable[[int], Any], port: int, *, url: str = "http://{host}:{port}"
    ) -> contextlib.AbstractContextManager[ContainerHandle]:
        """Start a testcontainers container as the run's, for a ``with`` block::

            @isolate.run_fixture
            def shared_redis(isolate_run):
                with isolate_run.container(
                    "shared-redis",
                    lambda port: RedisContainer("redis:7").with_command(f"--port {port}"),
                    6379, url="redis://{host}:{port}/0",
                ) as redis:
                    yield {"url": redis.url}

        ``make(listen_port)`` returns the container, not started; its server listens on
        ``listen_port`` (see ``WorkerStack.container``). It carries the run's labels, so
        it is reaped even if the controller is SIGKILLed; it is stopped when the block
        ends, ``--isolate-keep`` or not.
        """
        return self._stack.container(name, make, port, url=url, keep=False)
