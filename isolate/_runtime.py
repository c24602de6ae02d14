"""The per-process orchestrator: run dir, shared servers, worker stacks, reaping.

Pure Python (no pytest): the plugin creates one :class:`IsolateRuntime` per
process and asks it for stack pieces. The *controller* (the xdist controller,
or the only process without xdist) owns the run: it creates the run dir and,
after every worker is done (crashed ones included), reaps whatever is still
registered and removes the run dir. Shared servers are started lazily by the
first worker that needs one, under a file lock, never twice.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TypeVar

from filelock import FileLock

from ._binaries import Binary, find_postgres, find_redis
from ._config import Settings
from ._database import Migrations, WorkerDatabase
from ._errors import ConfigError
from ._ports import reserve_port
from ._postgres import NativePostgresRunner, PostgresConfig, PostgresServer, tuned_settings
from ._proc import (
    ProcessRegistry,
    RunAs,
    is_alive,
    process_start_ticks,
    resolve_run_as,
)
from ._redis import NativeRedisRunner, RedisConfig, RedisServer
from ._runner import Runner
from ._service import NativeService, ServiceHandle, ServiceSpec
from ._timings import Timings, read, summarize
from ._worker import WorkerIdentity

__all__ = ["IsolateRuntime", "reap_stale_runs"]

logger = logging.getLogger(__name__)

T = TypeVar("T")
RUN_PREFIX = "isolate-run-"


def _write_json(path: Path, data: Mapping[str, object]) -> None:
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(data))
    tmp.replace(path)


def reap_stale_runs(base: Path, timeout: float = 10.0) -> list[Path]:
    """Remove run dirs (and their processes/containers) whose owner process is gone."""
    reaped = []
    for run_dir in base.glob(RUN_PREFIX + "*"):
        owner_file = run_dir / "owner.json"
        try:
            owner = json.loads(owner_file.read_text())
        except (OSError, ValueError):
            continue
        if is_alive(int(owner["pid"]), owner.get("start_ticks")):
            continue
        logger.warning("reaping stale isolate run %s (owner pid %s gone)", run_dir, owner["pid"])
        ProcessRegistry(run_dir / "registry").reap(timeout)
        shutil.rmtree(run_dir, ignore_errors=True)
        reaped.append(run_dir)
    return reaped


class IsolateRuntime:
    """Everything isolate does in one pytest process."""

    def __init__(
        self, settings: Settings, worker: WorkerIdentity, rootdir: Path, *, controller: bool
    ) -> None:
        self.settings = settings
        self.worker = worker
        self.rootdir = rootdir
        self.controller = controller
        self.run_dir = Path(settings.base_path) / f"{RUN_PREFIX}{worker.run_id}"
        self.registry = ProcessRegistry(self.run_dir / "registry")
        self.timings = Timings(self.run_dir / "timings.jsonl", worker.worker_id)
        self._run_as: RunAs | bool | None = False  # False: not resolved yet
        self._postgres: PostgresServer | None = None
        self._database: WorkerDatabase | None = None
        self._migrations: Migrations = None
        self._redis: RedisServer | None = None
        self._redis_runner: Runner | None = None
        self._services: dict[str, ServiceHandle] = {}
        self._backend: str | None = None
        self.backend_reason = ""

    # -- run lifecycle (controller) -------------------------------------------

    def open_run(self) -> None:
        """Create the run dir (controller only) and reap stale runs if asked."""
        base = Path(self.settings.base_path)
        if self.settings.reap_stale:
            reap_stale_runs(base)
            if self.settings.backend in ("docker", "auto"):
                with contextlib.suppress(Exception):
                    from ._docker import reap_orphan_containers

                    reap_orphan_containers()
        self.run_dir.mkdir(mode=0o711, parents=True, exist_ok=True)
        os.chmod(self.run_dir, 0o711)
        pid = os.getpid()
        _write_json(
            self.run_dir / "owner.json",
            {"pid": pid, "start_ticks": process_start_ticks(pid), "created": time.time()},
        )

    def close_run(self) -> dict[str, dict[str, float]]:
        """Reap every registered process/container and remove the run dir.

        Returns the timing summary of the run.
        """
        start = time.perf_counter()
        reaped = self.registry.reap(self.settings.stop_timeout)
        if self.backend == "docker":
            from ._docker import network_mode, remove_run_network

            if network_mode(self.settings) == "mapped":
                reaped += remove_run_network(self.worker.run_id)
        if reaped:
            logger.info("isolate reaped %s", ", ".join(reaped))
        self.timings.add("run_teardown", time.perf_counter() - start)
        summary = summarize(read(self.timings.path))
        shutil.rmtree(self.run_dir, ignore_errors=True)
        return summary

    def _ensure_run_dir(self) -> None:
        if not self.run_dir.is_dir():
            raise ConfigError(
                f"run dir {self.run_dir} does not exist",
                hint="the isolate plugin must be active in the controller process too; "
                "do not disable it with -p no:isolate only on workers",
            )

    @property
    def worker_dir(self) -> Path:
        path = self.run_dir / "workers" / f"{self.worker.slug}-{os.getpid()}"
        path.mkdir(parents=True, exist_ok=True)
        return path

    @property
    def run_as(self) -> RunAs | None:
        if self._run_as is False:
            self._run_as = resolve_run_as(self.settings.run_as)
        assert self._run_as is not True
        return self._run_as

    # -- backend ------------------------------------------------------------

    @property
    def backend(self) -> str:
        if self._backend is None:
            choice = self.settings.backend
            if choice == "auto":
                from ._docker import engine_available

                ok, why = engine_available()
                self._backend = "docker" if ok else "native"
                self.backend_reason = f"auto: {why}"
            else:
                self._backend = choice
                self.backend_reason = f"from {self.settings.source_of('backend')}"
        return self._backend

    def postgres_binary(self) -> Binary:
        return find_postgres(self.settings.pg_bin_dir, self.settings.source_of("pg_bin_dir"))

    def redis_binary(self) -> Binary:
        return find_redis(self.settings.redis_bin, self.settings.source_of("redis_bin"))

    # -- shared resources -----------------------------------------------------

    def _shared(self, name: str, start: Callable[[], dict[str, object]]) -> dict[str, object]:
        """Start a shared resource once per run, whoever asks first; its state."""
        self._ensure_run_dir()
        state_file = self.run_dir / f"{name}.json"
        with FileLock(str(self.run_dir / f"{name}.lock")):
            if state_file.exists():
                return dict(json.loads(state_file.read_text()))
            state = start()
            _write_json(state_file, state)
            return state

    def postgres(self) -> PostgresServer:
        """The run's shared PostgreSQL (started now if nobody has yet)."""
        if self._postgres is None:
            waited = time.perf_counter()
            state = self._shared("postgres", self._start_postgres)
            self.timings.add("postgres_wait", time.perf_counter() - waited)
            self._postgres = PostgresServer.from_json(state)
        return self._postgres

    def _postgres_config(self) -> PostgresConfig:
        return PostgresConfig(
            settings=tuned_settings(
                self.worker.worker_count, self.settings.pg_conn_per_worker, self.settings.pg_settings
            ),
            start_timeout=self.settings.pg_start_timeout,
        )

    def _start_postgres(self) -> dict[str, object]:
        with self.timings.measure("postgres_start"):
            runner: Runner
            if self.backend == "docker":
                from ._docker import DockerPostgresRunner

                runner = DockerPostgresRunner(self._postgres_config(), self.settings, self.worker)
            else:
                runner = NativePostgresRunner(
                    self.postgres_binary(), self._postgres_config(), self.run_dir / "postgres", self.run_as
                )
            try:
                runner.start()
            finally:
                # Registered even if start failed half-way: the reaper cleans up.
                self.registry.register(runner.record())
            server = runner.server
            assert isinstance(server, PostgresServer)
            return server.to_json()

    # -- per-worker resources -------------------------------------------------

    def database(self, migrations: Migrations = None) -> WorkerDatabase:
        """The worker's schema and role, migrations applied (created on first call).

        A schema first created without migrations gets them on the first call that
        names some; naming different migrations later is an error, never a silent skip.
        """
        if self._database is None:
            server = self.postgres()
            with self.timings.measure("schema_migrations"):
                self._database = WorkerDatabase.create(server, self.worker.slug, self.worker.run_id)
                self._database.apply_migrations(migrations)
            self._migrations = migrations
        elif migrations is not None and migrations != self._migrations:
            if self._migrations is not None:
                raise ConfigError(
                    f"worker schema {self._database.schema} already has migrations "
                    f"{self._migrations!r}; asked again with {migrations!r}",
                    hint="use one isolate_migrations fixture/option per run",
                )
            with self.timings.measure("schema_migrations"):
                self._database.apply_migrations(migrations)
            self._migrations = migrations
        return self._database

    def drop_database(self) -> None:
        if self._database is not None:
            try:
                self._database.drop()
            except Exception as exc:  # server already gone: nothing left to drop
                logger.debug("dropping %s failed: %s", self._database.schema, exc)
            self._database = None
            self._migrations = None

    def redis(self) -> RedisServer:
        """The worker's Redis (own server, or own DB on the shared one)."""
        if self._redis is None:
            if self.settings.redis_mode == "shared":
                state = self._shared("redis", lambda: self._start_redis("redis-shared").to_json())
                shared = RedisServer.from_json(state)
                self._redis = RedisServer(
                    shared.host, shared.port, self.worker.index + 1, shared.admin_password,
                    shared=True, backend=shared.backend,
                )  # fmt: skip
            else:
                self._redis = self._start_redis(f"redis-{self.worker.slug}-{os.getpid()}", own=True)
        return self._redis

    def _start_redis(self, name: str, own: bool = False) -> RedisServer:
        with self.timings.measure("redis_start"):
            databases = max(16, self.worker.worker_count + 2)
            runner: Runner
            if self.backend == "docker":
                from ._docker import DockerRedisRunner

                runner = DockerRedisRunner(RedisConfig(databases), self.settings, self.worker, name)
            else:
                runner = NativeRedisRunner(
                    self.redis_binary(), RedisConfig(databases), self.run_dir / name, name
                )
            try:
                runner.start()
            finally:
                self.registry.register(runner.record())
            if own:
                self._redis_runner = runner
            server = runner.server
            assert isinstance(server, RedisServer)
            return server

    def stop_redis(self) -> None:
        if self._redis_runner is not None:
            self._redis_runner.stop()
            self.registry.unregister(self._redis_runner.name)
            self._redis_runner = None
        self._redis = None

    def service(
        self, spec: ServiceSpec, resolve: Callable[[str], object] | None = None
    ) -> ServiceHandle:
        """The worker's running instance of ``spec`` (created and started on first call).

        ``resolve(field)`` supplies ``dsn``/``schema``/``role``/``redis_url`` on demand,
        so only what the templates use gets started.
        """
        handle = self._services.get(spec.name)
        if handle is not None:
            return handle
        started = time.perf_counter()
        instance = f"{spec.name}-test-{self.worker.slug}"
        lease = reserve_port()
        values: dict[str, object] = {
            "port": lease.port, "host": "127.0.0.1", "url": f"http://127.0.0.1:{lease.port}",
            "name": instance, "worker": self.worker.worker_id, "run_id": self.worker.run_id,
        }  # fmt: skip
        resolve = resolve or self._resolve_field
        for field_name in sorted(spec.uses() - set(values)):
            values[field_name] = resolve(field_name)
        try:
            if self.backend == "docker":
                from ._docker import DockerService

                handle = DockerService(
                    spec, lease, instance, values, self.settings.ready_timeout,
                    self.settings.stop_timeout, settings=self.settings, worker=self.worker,
                    rootdir=self.rootdir,
                )  # fmt: skip
            else:
                handle = NativeService(
                    spec, lease, instance, values, self.settings.ready_timeout,
                    self.settings.stop_timeout, log_path=self.worker_dir / f"{instance}.log",
                )  # fmt: skip
        except Exception:
            lease.release()
            raise
        handle.on_start = lambda h: self.registry.register(h.record())
        handle.timings = self.timings
        self._services[spec.name] = handle
        with self.timings.measure("service_ready"):
            handle.start()
        self.timings.add("worker_stack_ready", time.perf_counter() - started)
        return handle

    def _resolve_field(self, name: str) -> object:
        if name in ("dsn", "schema", "role"):
            db = self.database()
            return {"dsn": db.dsn, "schema": db.schema, "role": db.role}[name]
        if name == "redis_url":
            return self.redis().url
        raise ConfigError(f"unknown template field {name!r}")

    def running_services(self) -> list[ServiceHandle]:
        return list(self._services.values())

    def close_service(self, name: str) -> None:
        handle = self._services.pop(name, None)
        if handle is not None:
            handle.close()
            self.registry.unregister(handle.record().name)

    def close_worker(self) -> None:
        """Stop this worker's services and Redis, drop its schema (idempotent)."""
        with self.timings.measure("worker_teardown"):
            for name in list(self._services):
                self.close_service(name)
            self.stop_redis()
            self.drop_database()
