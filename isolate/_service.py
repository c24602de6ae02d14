"""The service under test: declared once, one instance per worker."""

from __future__ import annotations

import abc
import http.client
import logging
import os
import re
import signal
import socket
import string
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ._errors import ConfigError, ServiceExitedError, ServiceNotReadyError
from ._ports import PortLease, reserve_port
from ._proc import ManagedProcess, ProcessRecord, poll_until
from ._timings import Timings

__all__ = [
    "HttpCheck",
    "NativeService",
    "ServiceHandle",
    "ServiceSpec",
    "TcpCheck",
    "TEMPLATE_FIELDS",
    "render",
]

logger = logging.getLogger(__name__)

#: Placeholders a command or env template may use.
TEMPLATE_FIELDS = (
    "port", "host", "url", "name", "worker", "run_id",
    "dsn", "schema", "role", "redis_url",
)  # fmt: skip
_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,40}$")


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
    """Ready when the port accepts a TCP connection."""

    def __call__(self, host: str, port: int) -> bool:
        try:
            with socket.create_connection((host, port), timeout=1.0):
                return True
        except OSError:
            return False


HealthCheck = HttpCheck | TcpCheck | Callable[[str, int], bool]


@dataclass(frozen=True)
class ServiceSpec:
    """How to run the service under test; each worker gets its own instance.

    ``command`` and ``env`` are templates: ``{port}``, ``{host}``, ``{url}``,
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
    cwd: str | Path | None = None
    inherit_env: bool = True
    #: Docker backend: the image to run (or build from ``build_context``).
    image: str | None = None
    build_context: str | Path | None = None
    #: Docker port-mapped mode: the port the service listens on inside the container.
    container_port: int | None = None

    def __post_init__(self) -> None:
        if not _NAME_RE.match(self.name):
            raise ConfigError(
                f"service name {self.name!r} is not valid",
                hint="use 1-41 lower-case letters, digits, '.', '_' or '-', starting with a "
                "letter or digit (it becomes part of process and container names)",
            )
        if isinstance(self.command, str):
            raise ConfigError(
                f"ServiceSpec.command for {self.name!r} is a string",
                hint="pass a list of arguments, e.g. ['python', '-m', 'app', '--port', '{port}']",
            )
        for template in [*self.command, *self.env.values()]:
            used = placeholders(template)
            unknown = used - set(TEMPLATE_FIELDS)
            if unknown:
                raise ConfigError(
                    f"service {self.name!r} template {template!r} uses unknown "
                    f"placeholder(s) {', '.join(sorted(unknown))}",
                    hint=f"use only {', '.join('{' + f + '}' for f in TEMPLATE_FIELDS)}; "
                    "write {{ and }} for literal braces",
                )

    def uses(self) -> set[str]:
        """The placeholders its templates use."""
        used: set[str] = set()
        for template in [*self.command, *self.env.values()]:
            used |= placeholders(template)
        return used


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


class ServiceHandle(abc.ABC):
    """One worker's instance of the service under test.

    The port (and so ``url``) is fixed for the handle's life: stop, start and
    restart keep it, so a test can hold the handle across them.
    """

    def __init__(self, spec: ServiceSpec, lease: PortLease, instance_name: str,
                 values: Mapping[str, object], ready_timeout: float, stop_timeout: float) -> None:  # fmt: skip
        self.spec = spec
        self.lease = lease
        self.name = instance_name
        self.host = "127.0.0.1"
        self.values = dict(values)
        self.ready_timeout = spec.ready_timeout or ready_timeout
        self.stop_timeout = spec.stop_timeout or stop_timeout
        self.last_exit_code: int | None = None
        self.starts = 0
        #: Called after every launch (the runtime registers the new pid for the reaper).
        self.on_start: Callable[[ServiceHandle], None] | None = None
        #: Where restart durations are recorded (set by the runtime).
        self.timings: Timings | None = None

    @property
    def port(self) -> int:
        return self.lease.port

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    # backend-specific ------------------------------------------------------
    @abc.abstractmethod
    def _launch(self) -> None: ...

    @abc.abstractmethod
    def _exit_code(self) -> int | None:
        """Exit code if it has exited, else None."""

    @abc.abstractmethod
    def _stop(self, sig: int, timeout: float) -> int | None: ...

    @abc.abstractmethod
    def kill(self) -> int | None:
        """SIGKILL at once; returns the exit code."""

    @abc.abstractmethod
    def signal(self, sig: int) -> None:
        """Send a signal without waiting (e.g. SIGTERM to watch a graceful shutdown)."""

    @property
    @abc.abstractmethod
    def is_running(self) -> bool: ...

    @abc.abstractmethod
    def logs(self) -> str:
        """Everything the service logged so far (all starts)."""

    @abc.abstractmethod
    def record(self) -> ProcessRecord: ...

    @abc.abstractmethod
    def _wait_exit(self, timeout: float) -> int | None: ...

    # common ----------------------------------------------------------------
    def start(self, wait: bool = True) -> None:
        """Start it on its port; by default block until healthy."""
        if self.is_running:
            raise RuntimeError(f"{self.name} is already running")
        self._launch()
        self.starts += 1
        if self.on_start is not None:
            self.on_start(self)
        if wait:
            self.wait_ready()

    def stop(self, graceful: bool = True, timeout: float | None = None) -> int | None:
        """SIGTERM, wait up to ``timeout`` (default: the stop timeout), then SIGKILL.

        ``graceful=False`` is :meth:`kill`. Returns the exit code.
        """
        if not graceful:
            self.last_exit_code = self.kill()
        else:
            limit = self.stop_timeout if timeout is None else timeout
            self.last_exit_code = self._stop(signal.SIGTERM, limit)
        return self.last_exit_code

    def restart(self, graceful: bool = True, timeout: float | None = None) -> None:
        """Stop (gracefully by default) and start again on the same port."""
        started = time.perf_counter()
        self.stop(graceful=graceful, timeout=timeout)
        self.start()
        if self.timings is not None:
            self.timings.add("service_restart", time.perf_counter() - started)

    def wait_exit(self, timeout: float | None = None) -> int | None:
        """Wait for the service to exit by itself; its exit code, or None on timeout."""
        code = self._wait_exit(self.stop_timeout if timeout is None else timeout)
        if code is not None:
            self.last_exit_code = code
        return code

    def is_ready(self) -> bool:
        """One health-check probe."""
        return self.spec.health(self.host, self.port)

    def wait_ready(self, timeout: float | None = None) -> None:
        """Poll the health check until it passes; raise if it exits or times out."""
        limit = self.ready_timeout if timeout is None else timeout
        started = time.monotonic()

        def probe() -> bool:
            if self._exit_code() is not None:
                return True
            return self.is_ready()

        # Short back-off cap: each probe is a cheap loopback request, and readiness
        # latency adds straight to every worker's stack start-up and every restart.
        done = poll_until(probe, limit, maximum=0.03)
        code = self._exit_code()
        if code is not None:
            self.last_exit_code = code
            raise ServiceExitedError(
                f"service {self.name} exited with code {code} before it was ready",
                log_tail=tail_text(self.logs()), exit_code=code, port=self.port,
            )  # fmt: skip
        if not done:
            raise ServiceNotReadyError(
                f"service {self.name} was not ready within {limit:.1f}s",
                log_tail=tail_text(self.logs()), port=self.port, url=self.url,
                waited=f"{time.monotonic() - started:.1f}s",
            )  # fmt: skip

    def ensure_running(self) -> None:
        """Start it if a previous test stopped or killed it."""
        if not self.is_running:
            logger.info("restarting %s, stopped by an earlier test", self.name)
            started = time.perf_counter()
            self.start()
            if self.timings is not None:
                self.timings.add("service_restart", time.perf_counter() - started)

    def close(self) -> None:
        """Stop for good and give the port back."""
        self.stop(graceful=True)
        self.lease.release()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name} {self.url} running={self.is_running}>"


def tail_text(text: str, lines: int = 30) -> str:
    return "\n".join(text.splitlines()[-lines:])


_BIND_ATTEMPTS = 3
_BIND_FAILURES = ("address already in use", "eaddrinuse", "errno 98")


class NativeService(ServiceHandle):
    """The service as a native process group (``<name>-test-<worker>``)."""

    def __init__(self, *args: object, log_path: Path, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.log_path = log_path
        if not self.spec.command:
            raise ConfigError(
                f"service {self.spec.name!r} has no command",
                hint="set ServiceSpec(command=[...]) to run it natively",
            )
        self._proc = self._process()

    def _process(self) -> ManagedProcess:
        env = dict(os.environ) if self.spec.inherit_env else {}
        env.update({k: render(v, self.values) for k, v in self.spec.env.items()})
        env["ISOLATE_INSTANCE_NAME"] = self.name
        return ManagedProcess(
            [render(arg, self.values) for arg in self.spec.command],
            log_path=self.log_path,
            env=env,
            cwd=self.spec.cwd,
        )

    def start(self, wait: bool = True) -> None:
        """Start it; if the very first start loses its port to another process
        (the service logs "address already in use"), move to a new port and retry.
        Later starts keep the port, so the URL a test holds stays valid.
        """
        for attempt in range(_BIND_ATTEMPTS):
            offset = self.log_path.stat().st_size if self.log_path.exists() else 0
            try:
                super().start(wait)
                return
            except ServiceExitedError:
                if self.starts > 1 or attempt == _BIND_ATTEMPTS - 1 or not self._bind_failed(offset):
                    raise
            logger.info("%s could not bind port %d; retrying on a new port", self.name, self.port)
            self.lease.release()
            self.lease = reserve_port()
            self.values.update(port=self.port, url=self.url)
            self._proc = self._process()
            self.starts = 0

    def _bind_failed(self, offset: int) -> bool:
        with open(self.log_path, "rb") as log:
            log.seek(offset)
            text = log.read().decode("utf-8", "replace").lower()
        return any(marker in text for marker in _BIND_FAILURES)

    @property
    def pid(self) -> int | None:
        return self._proc.pid

    def _launch(self) -> None:
        with open(self.log_path, "a") as log:
            log.write(f"--- isolate: starting {self.name} on port {self.port} ---\n")
        self._proc.start()

    def _exit_code(self) -> int | None:
        return self._proc.returncode

    def _stop(self, sig: int, timeout: float) -> int | None:
        return self._proc.stop(sig, timeout)

    def _wait_exit(self, timeout: float) -> int | None:
        return self._proc.wait(timeout)

    def kill(self) -> int | None:
        self.last_exit_code = self._proc.kill()
        return self.last_exit_code

    def signal(self, sig: int) -> None:
        self._proc.send_signal(sig)

    @property
    def is_running(self) -> bool:
        return self._proc.running

    def logs(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def record(self) -> ProcessRecord:
        return ProcessRecord(
            name=f"service-{self.name}", pid=self._proc.pid, start_ticks=self._proc.start_ticks
        )
