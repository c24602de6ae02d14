"""An external PostgreSQL (``--isolate-pg-dsn``) as the run's server, in front of either
backend: the backend runs Redis and the services, the DSN's server is the run's
PostgreSQL (nothing is started; see :mod:`isolate._postgres.external`)."""

from __future__ import annotations

from pathlib import Path

from .._postgres import PostgresConfig
from .._postgres.external import ExternalPostgresRunner
from .._redis import RedisConfig, RedisServer
from .._service import Launcher, ServiceSpec
from . import Backend, Runner

__all__ = ["ExternalPostgres"]


class ExternalPostgres:
    """``backend`` with the PostgreSQL of ``dsn`` instead of its own."""

    def __init__(self, backend: Backend, dsn: str, *, needs_createdb: bool) -> None:
        self.backend = backend
        self.name = backend.name
        self.dsn = dsn
        self.needs_createdb = needs_createdb

    def postgres(self, config: PostgresConfig, directory: Path) -> ExternalPostgresRunner:
        return ExternalPostgresRunner(self.dsn, needs_createdb=self.needs_createdb)

    def redis(self, config: RedisConfig, directory: Path, name: str, *, shared: bool,
              ) -> Runner[RedisServer]:  # fmt: skip
        return self.backend.redis(config, directory, name, shared=shared)

    def service(self, spec: ServiceSpec, instance: str, log_path: Path) -> Launcher:
        return self.backend.service(spec, instance, log_path)

    def reap_run(self) -> list[str]:
        return self.backend.reap_run()

    def reap_orphans(self) -> list[str]:
        return self.backend.reap_orphans()

    def describe(self) -> list[str]:
        return [*self.backend.describe(), "postgres: the external server of --isolate-pg-dsn (none is started)"]
