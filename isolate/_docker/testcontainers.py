"""testcontainers' own container classes, started as part of a run.

``make(port)`` builds any testcontainers container (``DockerContainer``,
``RedisContainer``, ``PostgresContainer``, ``KafkaContainer``...) for the port its
server must listen on inside the container. isolate gives it the run's labels (so the
run's reapers, the watchdog, ``--isolate-keep`` and ``status``/``cleanup`` treat it like
isolate's own), the run's networking on a leased port, and a name; then testcontainers
starts it and waits with the class's own wait strategy.

Networking follows the run. ``host`` (Linux): the container shares the host's network
and its server listens on the leased port itself, which is why ``make`` gets the port;
testcontainers' ``get_exposed_port(p)`` and ``get_container_host_ip()`` are pointed at
that port and 127.0.0.1, so the class's own helpers (``get_client()``,
``get_connection_url()``) work. ``mapped``: it joins the run's network and its port is
published on 127.0.0.1.

Ryuk, testcontainers' reaper, is turned off: it needs an image from a registry, and
the run's reapers remove these containers by label, even after a SIGKILL.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from .._containers import ContainerHandle
from .._errors import ConfigError, ServerStartError, tail_text
from .._ports import PortLease
from .._retry import start_on_free_port
from .context import DockerRun
from .engine import reason

__all__ = ["no_ryuk", "published", "started"]

logger = logging.getLogger(__name__)


def no_ryuk() -> None:
    """Turn testcontainers' Ryuk off for this process (the run reaps by label)."""
    from testcontainers.core.config import testcontainers_config

    testcontainers_config.ryuk_disabled = True


def published(ports: Mapping[str, Any], container_port: int, host_port: int) -> dict[str, Any]:
    """Port bindings for mapped mode: ``container_port`` on ``127.0.0.1:host_port``,
    any other exposed port on a port of Docker's choice, on 127.0.0.1 too."""
    bindings: dict[str, Any] = {
        str(key): ("127.0.0.1",) for key in ports if str(key).partition("/")[0] != str(container_port)
    }
    bindings[f"{container_port}/tcp"] = ("127.0.0.1", host_port)
    return bindings


def _configure(container: Any, ctx: DockerRun, name: str, role: str, container_port: int, host_port: int) -> None:
    kwargs = dict(getattr(container, "_kwargs", None) or {})
    kwargs["labels"] = {**(kwargs.get("labels") or {}), **ctx.labels(role), "isolate.container": name}
    if ctx.mode == "mapped":
        kwargs["network"] = ctx.network()
        container.ports = published(container.ports, container_port, host_port)
    else:
        kwargs["network_mode"] = "host"
        container.ports = {}  # nothing to publish: it listens on the host's port itself

        def exposed(port: int | str) -> int:
            port = int(str(port).partition("/")[0])
            return host_port if port in (container_port, host_port) else port

        container.get_exposed_port = exposed
        container.get_container_host_ip = lambda: "127.0.0.1"
    container.with_kwargs(**kwargs)


def _logs(container: Any) -> str:
    with contextlib.suppress(Exception):
        out, err = container.get_logs()
        return tail_text((out or b"").decode(errors="replace") + (err or b"").decode(errors="replace"), 25)
    return ""


def _remove(container: Any) -> None:
    with contextlib.suppress(Exception):
        container.stop()


@contextlib.contextmanager
def started(
    ctx: DockerRun, name: str, make: Callable[[int], Any], port: int, *,
    url: str = "http://{host}:{port}", role: str = "container", keep: Callable[[], bool] = lambda: False,
) -> Iterator[ContainerHandle]:  # fmt: skip
    """Start ``make(listen_port)`` as a container of the run; stop and remove it when the
    block ends, unless ``keep()`` says the stack stays up (``--isolate-keep``)."""
    if "{host}" not in url and "{port}" not in url:
        raise ConfigError(f"container {name!r}: url {url!r} names neither {{host}} nor {{port}}",
                          hint="e.g. url='redis://{host}:{port}/0'")  # fmt: skip
    no_ryuk()
    container_name = f"isolate-{name}-{ctx.worker.slug}-{ctx.worker.run_id}"
    made: list[Any] = []

    def launch(lease: PortLease) -> PortLease:
        listen = lease.port if ctx.mode != "mapped" else port
        container = make(listen)
        if not hasattr(container, "with_kwargs"):
            raise ConfigError(f"container {name!r}: make() returned {container!r}",
                              hint="return a testcontainers container (DockerContainer or a subclass), not started")  # fmt: skip
        _configure(container, ctx, name, role, port, lease.port)
        container.with_name(container_name)
        ctx.remove_stale(container_name)
        try:
            container.start()
        except Exception as exc:
            logs = _logs(container)
            _remove(container)
            raise ServerStartError(
                f"container {container_name} ({container.image}) did not start: {reason(exc)}",
                log_tail=logs or None, image=container.image, port=lease.port,
                hint="read the log lines above; in host networking its server must listen on the "
                "port make() is given (e.g. RedisContainer(...).with_command(f'--port {port}'))",
            ) from None  # fmt: skip
        made.append(container)
        return lease

    lease = start_on_free_port(launch, what=f"container {name}")
    container = made[-1]
    host = "127.0.0.1"
    handle = ContainerHandle(
        name=name, host=host, port=lease.port, url=url.format(host=host, port=lease.port),
        container_name=container_name, container_port=port, container=container,
        url_template=url, mode=ctx.mode,
    )  # fmt: skip
    try:
        yield handle
    finally:
        if keep():
            logger.info("isolate: keeping container %s (--isolate-keep)", container_name)
        else:
            _remove(container)
            lease.release()
