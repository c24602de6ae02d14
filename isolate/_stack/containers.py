"""Containers of the user's own (testcontainers) as part of a worker's stack."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from .._backends import docker_installed
from .._containers import ContainerHandle
from .._errors import ConfigError
from .._run.liveness import Owner
from .base import StackBase

if TYPE_CHECKING:
    from .._docker.context import DockerRun

__all__ = ["ContainersPart"]


class ContainersPart(StackBase):
    """A worker's testcontainers, labelled with the run's labels."""

    def _docker_run(self) -> DockerRun:
        """The run on the Docker engine (on a native run too: its reapers are told)."""
        ctx = getattr(self.backend, "ctx", None)
        if ctx is not None:
            return ctx  # type: ignore[no-any-return]
        if not docker_installed():
            raise ConfigError("containers need the Docker SDK and testcontainers, which are not installed",
                              hint="pip install 'pytest-isolate-stacks[docker]'")  # fmt: skip
        from .._docker.context import DockerRun

        self.run.require()
        self.run.mark_containers()
        return DockerRun(self.settings, self.worker, self.run, lambda: self.run.owner() or Owner.current())

    def container_labels(self, role: str = "container") -> dict[str, str]:
        """Docker labels that make a container part of this run, on either backend: the
        run's reapers (the controller at the end, the watchdog if the controller is killed,
        ``python -m isolate cleanup``) remove every container that carries them."""
        return self._docker_run().labels(role)

    @contextlib.contextmanager
    def container(
        self, name: str, make: Callable[[int], Any], port: int, *,
        url: str = "http://{host}:{port}", keep: bool = True,
    ) -> Iterator[ContainerHandle]:  # fmt: skip
        """Start a testcontainers container as this worker's, for the length of a ``with``
        block.

        ``make(listen_port)`` returns the container, not started, whose server listens on
        ``listen_port`` (``port``, the server's port in the image, in Docker's mapped
        mode; a port leased for it in host mode)::

            with isolate_stack.container(
                "cache", lambda p: RedisContainer("redis:7").with_command(f"--port {p}"), 6379,
                url="redis://{host}:{port}/0",
            ) as cache:
                cache.container.get_client().ping()

        It carries the run's labels and is reaped with the run's own containers; with
        ``--isolate-keep`` (and ``keep``) it stays up with the worker's stack. A
        ``ServiceSpec`` template names it ``{containers[cache].url}`` (``.host``,
        ``.port``).
        """
        if name in self._containers:
            raise ConfigError(f"container {name!r} is already started on this worker",
                              hint="give each container its own name")  # fmt: skip
        from .._docker.testcontainers import started

        def keeping() -> bool:
            return keep and self.keeping

        with started(self._docker_run(), name, make, port, url=url, keep=keeping) as handle:
            self._containers[name] = handle
            try:
                yield handle
            finally:
                if not keeping():
                    self._containers.pop(name, None)
