"""The Docker engine client, located the way testcontainers does."""

from __future__ import annotations

import os
import sys
import threading
from typing import Any

from .._config import Settings
from .._errors import DockerUnavailableError

__all__ = ["engine", "engine_available", "is_docker_error", "network_mode", "reason"]

_API_TIMEOUT = 120
_clients: dict[int, Any] = {}
_clients_lock = threading.Lock()


def _new_client(timeout: float) -> Any:
    """A Docker SDK client from testcontainers (DOCKER_HOST, ``tc.host`` in
    ~/.testcontainers.properties, the docker context)."""
    from testcontainers.core.docker_client import DockerClient

    return DockerClient(timeout=timeout).client


def engine() -> Any:
    """This process's client; :class:`DockerUnavailableError` if no engine answers."""
    pid = os.getpid()  # the SDK's connection pool must not cross a fork
    with _clients_lock:
        client = _clients.get(pid)
        if client is None:
            try:
                client = _new_client(10)  # fail fast if nothing answers...
                client.ping()
                client.api.timeout = _API_TIMEOUT  # ...but let slow operations finish
            except Exception as exc:
                raise DockerUnavailableError(
                    f"no Docker engine answers: {reason(exc)}",
                    docker_host=os.environ.get("DOCKER_HOST"),
                ) from None
            _clients.clear()
            _clients[pid] = client
    return client


def engine_available(timeout: float = 3.0) -> tuple[bool, str]:
    """Whether a Docker engine answers a ping within ``timeout`` seconds, and why."""
    try:
        client = _new_client(timeout)
        try:
            client.ping()
            version = client.version().get("Version", "?")
        finally:
            client.close()
    except Exception as exc:
        return False, f"no engine: {reason(exc)}"
    return True, f"docker engine answered (server {version})"


def reason(exc: BaseException) -> str:
    """The first line of an engine error."""
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:300]


def is_docker_error(exc: BaseException, *names: str) -> bool:
    """Whether ``exc`` is one of the SDK's errors named ``names`` (or a subclass)."""
    return any(cls.__name__ in names for cls in type(exc).__mro__)


def network_mode(settings: Settings) -> str:
    """``host`` or ``mapped`` (``auto``: host on Linux, mapped elsewhere)."""
    if settings.docker_network == "auto":
        return "host" if sys.platform.startswith("linux") else "mapped"
    return settings.docker_network
