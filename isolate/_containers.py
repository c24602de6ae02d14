"""A container of the user's (testcontainers) started as part of the run: its handle.

Pure data, so the core can name it without importing the Docker side
(``isolate._docker.testcontainers`` starts them).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

__all__ = ["ContainerHandle"]


@dataclass(frozen=True)
class ContainerHandle:
    """A testcontainers container isolate started: its address, and the container.

    In a ``ServiceSpec`` template it is ``{containers[NAME]}``: ``.url``, ``.host``,
    ``.port``, ``.name`` (seen from a service container in mapped mode, they name the
    container on the run's network).
    """

    name: str
    host: str
    port: int
    url: str
    #: The container's name in Docker.
    container_name: str
    #: The port its server listens on inside the container.
    container_port: int
    #: The testcontainers object (``get_client()``, ``get_connection_url()``, ``exec()``...).
    container: Any = field(repr=False, compare=False)
    url_template: str = field(default="", repr=False)
    mode: str = field(default="host", repr=False)

    def inside(self) -> ContainerHandle:
        """The same container as a service container on the run's network sees it."""
        if self.mode != "mapped":
            return self
        host, port = self.container_name, self.container_port
        return replace(self, host=host, port=port, url=self.url_template.format(host=host, port=port))
