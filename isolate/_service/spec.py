"""The service under test, declared once: its spec, templates and health checks."""

from __future__ import annotations

import http.client
import re
import signal
import socket
import string
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .._errors import ConfigError

__all__ = [
    "TEMPLATE_FIELDS",
    "HealthCheck",
    "HttpCheck",
    "ServiceSpec",
    "TcpCheck",
    "placeholders",
    "render",
    "start_order",
]

#: Placeholders a command or env template may use.
TEMPLATE_FIELDS = (
    "port", "host", "url", "name", "worker", "run_id",
    "dsn", "schema", "role", "redis_url", "services", "containers",
)  # fmt: skip
_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,40}$")
_ENTRY_RE = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")


@dataclass(frozen=True)
class HttpCheck:
    """Ready when ``GET path`` answers with a status in ``statuses``."""

    path: str = "/health"
    statuses: tuple[int, ...] = (200, 204)

    def __call__(self, host: str, port: int) -> bool:
        conn = http.client.HTTPConnection(host, port, timeout=1.0)
        try:
            conn.request("GET", self.path)
            return conn.getresponse().status in self.statuses
        except (OSError, http.client.HTTPException):
            return False
        finally:
            conn.close()


@dataclass(frozen=True)
class TcpCheck:
    """Ready when the port accepts a TCP connection (that stays open ``settle`` seconds).

    Behind a port Docker publishes (port-mapped mode) the engine's proxy accepts every
    connection while the container runs and hangs up at once when nothing listens in
    it; there the service handle probes with ``settle`` (see ``ServiceHandle.proxied``).
    """

    #: Seconds the accepted connection must stay open (0: accepted is enough).
    settle: float = 0.0

    def __call__(self, host: str, port: int) -> bool:
        try:
            with socket.create_connection((host, port), timeout=1.0) as sock:
                if self.settle > 0:
                    sock.settimeout(self.settle)
                    try:
                        return sock.recv(1, socket.MSG_PEEK) != b""  # b"": hung up
                    except TimeoutError:
                        return True  # still open, nothing said: something listens
                return True
        except OSError:
            return False


HealthCheck = HttpCheck | TcpCheck | Callable[[str, int], bool]


@dataclass(frozen=True)
class ServiceSpec:
    """How to run the service under test; each worker gets its own instance.

    ``command`` (native backend), ``container_command`` (docker backend) and ``env``
    are templates (``{services[NAME].url}`` names another service of the worker, see
    ``depends_on``; ``{containers[NAME].url}`` a container started with
    ``WorkerStack.container()``): ``{port}``, ``{host}``, ``{url}``,
    ``{name}`` (the instance name ``<name>-test-<worker>``), ``{worker}``,
    ``{run_id}``, ``{dsn}``, ``{schema}``, ``{role}`` and ``{redis_url}`` are
    filled in per worker. Using ``{dsn}`` or ``{redis_url}`` is what makes the
    worker's PostgreSQL schema or Redis start.
    """

    name: str
    command: Sequence[str] = ()
    env: Mapping[str, str] = field(default_factory=dict)
    health: HealthCheck = field(default_factory=HttpCheck)
    ready_timeout: float | None = None
    stop_timeout: float | None = None
    #: Native backend: the working directory, relative to the pytest rootdir (default:
    #: the rootdir), so ``command`` and relative paths work wherever pytest is started.
    cwd: str | Path | None = None
    inherit_env: bool = True
    #: Docker backend: the image to run (or build from ``build_context``).
    image: str | None = None
    #: Docker backend: the directory the image is built from (relative to the pytest
    #: rootdir, or absolute), as ``isolate-build/<name>:<digest>``.
    build_context: str | Path | None = None
    #: Docker backend: the Dockerfile of that build, relative to ``build_context`` or
    #: absolute, inside the context or not (default: ``Dockerfile`` in the context).
    dockerfile: str | Path | None = None
    #: Docker backend: build arguments (values for the Dockerfile's ``ARG`` lines); part of the digest.
    build_args: Mapping[str, str] = field(default_factory=dict)
    #: Docker port-mapped mode: the port the service listens on inside the container.
    container_port: int | None = None
    #: Docker backend: the command run in the container (templates allowed). ``None``
    #: (the default) runs ``command``; ``()`` runs the image's own ``CMD``.
    container_command: Sequence[str] | None = None
    #: Services of the same worker this one needs started first; their handles are in
    #: the ``{services}`` template field: ``{services[fake-api].url}``, ``.port``.
    depends_on: Sequence[str] = ()
    #: Python services: ``"module:function"`` that ``command`` runs
    #: (``"myapi.__main__:main"``). With it, each start forks a per-worker parent that has
    #: imported ``preload`` instead of starting a new interpreter (see docs/reference/services.md);
    #: on the docker backend, inside the service's container, if its command runs Python.
    #: ``command`` stays what runs where fork is unavailable (and what sets ``sys.argv``).
    entry: str | None = None
    #: Modules the fork server imports once (default: the ``entry``'s module). They must
    #: not start threads or open connections at import time.
    preload: Sequence[str] = ()
    #: The signal of each worker's last stop, at the end of its session (``stop()`` in a
    #: test always sends SIGTERM). A service that drains slowly on SIGTERM (a readiness
    #: delay for a load balancer) but ends cleanly on another signal (SIGINT, SIGQUIT) lets
    #: every worker finish sooner. Still a graceful stop: the stop timeout, then SIGKILL.
    close_signal: int = signal.SIGTERM

    def __post_init__(self) -> None:
        if not _NAME_RE.match(self.name):
            raise ConfigError(
                f"service name {self.name!r} is not valid",
                hint="use 1-41 lower-case letters, digits, '.', '_' or '-', starting with a "
                "letter or digit (it becomes part of process and container names)",
            )
        for label, value in (("command", self.command), ("container_command", self.container_command)):
            if isinstance(value, str):
                raise ConfigError(
                    f"ServiceSpec.{label} for {self.name!r} is a string",
                    hint="pass a list of arguments, e.g. ['python', '-m', 'app', '--port', '{port}']",
                )
        if self.entry is not None and not _ENTRY_RE.match(self.entry):
            raise ConfigError(
                f"ServiceSpec.entry of {self.name!r} is {self.entry!r}",
                hint="name the function the service's command runs as 'module:function', "
                "e.g. entry='myapi.__main__:main'",
            )
        if isinstance(self.preload, str) or (self.preload and self.entry is None):
            raise ConfigError(
                f"ServiceSpec.preload of {self.name!r} needs a list of modules and an entry",
                hint="e.g. entry='myapi.server:main', preload=['myapi.app']",
            )
        if self.close_signal not in set(signal.Signals):
            raise ConfigError(
                f"ServiceSpec.close_signal of {self.name!r} is {self.close_signal!r}, not a signal",
                hint="e.g. close_signal=signal.SIGINT",
            )
        if self.entry is not None and not self.preload:
            object.__setattr__(self, "preload", (self.entry.partition(":")[0],))
        self._check_build()
        if isinstance(self.depends_on, str) or self.name in self.depends_on:
            raise ConfigError(
                f"ServiceSpec.depends_on of {self.name!r} must be a list of other services' names",
                hint="e.g. depends_on=['fake-api']",
            )
        for template in self._templates():
            used = placeholders(template)
            unknown = used - set(TEMPLATE_FIELDS)
            if unknown:
                raise ConfigError(
                    f"service {self.name!r} template {template!r} uses unknown "
                    f"placeholder(s) {', '.join(sorted(unknown))}",
                    hint=f"use only {', '.join('{' + f + '}' for f in TEMPLATE_FIELDS)}; "
                    "write {{ and }} for literal braces",
                )

    def _check_build(self) -> None:
        if (self.dockerfile is not None or self.build_args) and self.build_context is None:
            raise ConfigError(
                f"ServiceSpec.dockerfile and build_args of {self.name!r} need a build_context",
                hint="set build_context to the directory the image is built from, e.g. "
                "ServiceSpec(build_context='.', dockerfile='docker/api.Dockerfile')",
            )
        args = self.build_args
        if not isinstance(args, Mapping) or not all(isinstance(v, str) for v in (*args, *args.values())):
            raise ConfigError(
                f"ServiceSpec.build_args of {self.name!r} must map names to strings",
                hint="e.g. build_args={'PYTHON_VERSION': '3.12'}",
            )

    def uses(self) -> set[str]:
        """The placeholders its templates use."""
        used: set[str] = set()
        for template in self._templates():
            used |= placeholders(template)
        return used

    def _templates(self) -> list[str]:
        return [*self.command, *(self.container_command or ()), *self.env.values()]


def placeholders(template: str) -> set[str]:
    """Field names used in a ``str.format`` template."""
    try:
        return {name.split(".")[0].split("[")[0] for _, name, _, _ in string.Formatter().parse(template) if name}
    except ValueError as exc:
        raise ConfigError(f"bad template {template!r}: {exc}") from None


def render(template: str, values: Mapping[str, object]) -> str:
    """Fill a template; missing values raise :class:`ConfigError`."""
    try:
        return template.format_map(values)
    except KeyError as exc:
        raise ConfigError(f"template {template!r} needs {exc} which is not available") from None


def start_order(specs: Sequence[ServiceSpec], started: Collection[str] = ()) -> list[ServiceSpec]:
    """``specs`` in an order where each comes after what it ``depends_on`` (services in
    ``started`` count as there already); :class:`ConfigError` on a cycle or an unknown name."""
    by_name = {spec.name: spec for spec in specs}
    if len(by_name) != len(specs):
        raise ConfigError("two services share a name", hint="give each ServiceSpec its own name")
    order: list[ServiceSpec] = []
    visiting: set[str] = set()

    def visit(spec: ServiceSpec) -> None:
        if any(spec is done for done in order):
            return
        if spec.name in visiting:
            raise ConfigError(f"services depend on each other in a cycle through {spec.name!r}",
                              hint="remove one depends_on of the cycle")  # fmt: skip
        visiting.add(spec.name)
        for dep in spec.depends_on:
            if dep in by_name:
                visit(by_name[dep])
            elif dep not in started:
                raise ConfigError(f"service {spec.name!r} depends on unknown service {dep!r}",
                                  hint=f"declare it: one of {', '.join(sorted(by_name))}")  # fmt: skip
        order.append(spec)

    for spec in specs:
        visit(spec)
    return order
