"""The Docker backend: the same stack as the native one, in containers.

* one shared PostgreSQL container per run (``isolate-pg-<run id>``);
* one Redis container per worker (``isolate-redis-<worker>-<run id>``);
* each worker's own container of the service under test
  (``<service>-test-<worker>-<run id>``), created once, then stopped and started in
  place so its URL never changes; or, with ``--isolate-docker-services=native``, the
  service as a local process launched exactly as the native backend launches it
  (process group, registry, fork server, demotion), against the containers.

Containers are created with the Docker SDK client testcontainers locates; isolate does
not use testcontainers' container classes or its Ryuk reaper: Ryuk removes a session's
containers when the *process* that started them exits, but the shared PostgreSQL must
outlive the worker that started it. isolate reaps its own containers by label.
"""

from __future__ import annotations

from pathlib import Path

from .._config import Settings
from .._docker.containers import reap_orphans, reap_run
from .._docker.context import DockerRun
from .._errors import ConfigError
from .._identity import WorkerIdentity
from .._postgres import PostgresConfig
from .._postgres.docker import DockerPostgresRunner
from .._redis import RedisConfig
from .._redis.docker import DockerRedisRunner
from .._run.liveness import Owner
from .._run.rundir import RunDir
from .._service import Launcher, ServiceSpec
from .._service.docker import ContainerLauncher
from .native import NativeBackend

__all__ = ["DockerBackend"]


class DockerBackend:
    """Containers on the local (or ``DOCKER_HOST``) engine."""

    name = "docker"

    def __init__(self, settings: Settings, worker: WorkerIdentity, run: RunDir, rootdir: Path) -> None:
        self.ctx = DockerRun(settings, worker, run, lambda: run.owner() or Owner.current())
        self.rootdir = rootdir
        #: Launches the services when they run as local processes (``docker_services=native``).
        self.native = NativeBackend(settings, rootdir) if settings.docker_services == "native" else None

    def postgres(self, config: PostgresConfig, directory: Path) -> DockerPostgresRunner:
        return DockerPostgresRunner(self.ctx, config)

    def redis(self, config: RedisConfig, directory: Path, name: str, *, shared: bool,
              ) -> DockerRedisRunner:  # fmt: skip
        return DockerRedisRunner(self.ctx, config, name, shared=shared)

    def service(self, spec: ServiceSpec, instance: str, log_path: Path) -> Launcher:
        if self.native is None:
            return ContainerLauncher(self.ctx, spec, instance, self.rootdir)
        if not spec.command:
            raise ConfigError(
                f"service {spec.name!r} has no command, and --isolate-docker-services=native "
                "runs every service as a local process",
                hint="set ServiceSpec(command=[...]) (templates such as {dsn} and {redis_url} "
                "name the containers' published ports), or run it from its image or "
                "build_context with --isolate-docker-services=container",
            )
        return self.native.service(spec, instance, log_path)

    def reap_run(self) -> list[str]:
        return reap_run(self.ctx.worker.run_id)

    def reap_orphans(self) -> list[str]:
        return reap_orphans()

    def describe(self) -> list[str]:
        s = self.ctx.settings
        forks = ", forked in them where they name an entry" if s.fork_server != "off" else ""
        services = ("services as local processes (--isolate-docker-services=native)" if self.native
                    else f"services in containers from their image or build_context{forks}")  # fmt: skip
        return [f"postgres image {s.pg_image}, redis image {s.redis_image}, network {self.ctx.mode}, {services}"]
