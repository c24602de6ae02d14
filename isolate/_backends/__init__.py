"""The backend seam: where the run's PostgreSQL, a worker's Redis and the service
instances run. :func:`make_backend`, the one place that picks, gives every process a
:class:`Backend`:

* :class:`~isolate._backends.native.NativeBackend`: native processes;
* :class:`~isolate._backends.docker.DockerBackend`: containers (imported only when chosen,
  so a native run never loads Docker);
* either behind :class:`~isolate._backends.external.ExternalPostgres` when the run's
  PostgreSQL is a server isolate does not start (``--isolate-pg-dsn``).

The stack asks the backend for pieces and never which one it is.
"""

from __future__ import annotations

import importlib.metadata
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Protocol, TypeVar

from .._config import Settings
from .._errors import ConfigError
from .._identity import WorkerIdentity
from .._postgres import PostgresConfig, PostgresServer
from .._postgres.external import drop_run_objects
from .._redis import RedisConfig, RedisServer
from .._run.registry import ProcessRecord
from .._run.rundir import RunDir
from .._service import Launcher, ServiceSpec

__all__ = [
    "Backend",
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


def reap_leftovers(run: RunDir, backend: Backend, timeout: float) -> list[str]:
    """Stop every process the run registered and remove what the backend made for it
    (containers, networks); the names reaped. The run dir itself stays. From here on the
    run's workers start nothing more."""
    run.mark_stopping()
    reaped = run.registry.reap(timeout)
    try:
        reaped += backend.reap_run()
        if backend.name != "docker" and run.has_containers() and docker_installed():
            from .._docker.containers import reap_run  # testcontainers of a native run

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
    from .._docker.engine import engine_available

    ok, why = engine_available()
    return ("docker" if ok else "native"), f"auto: {why}"


def make_backend(
    backend: str, settings: Settings, worker: WorkerIdentity, run: RunDir, rootdir: Path
) -> Backend:
    """The one place that picks the implementation (and puts an external PostgreSQL,
    ``--isolate-pg-dsn``, in front of it)."""
    made: Backend
    if backend == "docker":
        if not docker_installed():
            raise ConfigError(
                "the docker backend needs the Docker SDK and testcontainers, which are not installed",
                hint="pip install 'pytest-isolate-stacks[docker]', or use --isolate-backend=native",
            )
        from .docker import DockerBackend

        made = DockerBackend(settings, worker, run, rootdir)
    else:
        from .native import NativeBackend

        made = NativeBackend(settings, rootdir)
    if settings.pg_dsn:
        from .external import ExternalPostgres

        made = ExternalPostgres(made, settings.pg_dsn, needs_createdb=settings.db_isolation == "database")
    return made
