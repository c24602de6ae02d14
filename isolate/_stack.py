"""A worker's side of a run: its stack, started on demand, torn down at its end.

Pure Python (no pytest): the plugin creates one :class:`WorkerStack` per pytest process
and its fixtures ask it for pieces. Shared servers are started once per run by the
first worker that needs one (:meth:`WorkerStack.shared`); per-worker pieces belong to
this process and are stopped by :meth:`WorkerStack.close` (or, if the worker dies, by
the controller's reaper).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from ._backends import Backend, Runner, docker_installed, make_backend
from ._config import Settings
from ._containers import ContainerHandle
from ._database import Migrations, TemplatePlan, WorkerDatabase, migrations_key, run_bootstrap
from ._errors import ConfigError, LeaseLostError, RunStoppingError
from ._identity import WorkerIdentity
from ._pool import FreshPool, pool_size, set_aside_and_rebuild, spare_space
from ._postgres import PostgresConfig, PostgresServer, tuned_settings
from ._postgres.server import Seed
from ._redis import RedisConfig, RedisServer
from ._redis.lease import DbLease, ExternalDbLease, RunDbLease
from ._run.liveness import Owner, process_start_ticks
from ._run.registry import ProcessRecord
from ._run.rundir import RunDir
from ._service import ServiceHandle, ServiceSpec
from ._service.spec import placeholders, render, start_order
from ._timings import Timings

if TYPE_CHECKING:
    from ._docker.context import DockerRun

__all__ = ["WorkerStack"]

logger = logging.getLogger(__name__)

S = TypeVar("S")


class WorkerStack:
    """Everything one worker process gets: PostgreSQL schema, Redis, service instances.

    Get it from the ``isolate_stack`` fixture. Pieces start on first use.
    """

    def __init__(
        self, settings: Settings, worker: WorkerIdentity, run: RunDir, backend: str, rootdir: Path
    ) -> None:
        self.settings = settings
        self.worker = worker
        self.run = run
        self.rootdir = rootdir
        self.backend: Backend = make_backend(backend, settings, worker, run, rootdir)
        self.timings = Timings(run.timings_path, worker.worker_id)
        self._postgres: PostgresServer | None = None
        self._database: WorkerDatabase | None = None
        self._redis: RedisServer | None = None
        self._redis_runner: Runner[RedisServer] | None = None
        self._redis_lease: DbLease | None = None
        self._redis_lock = threading.Lock()  # the early start (see service()) and a fixture
        self._services: dict[str, ServiceHandle] = {}
        self._containers: dict[str, ContainerHandle] = {}
        self._pool: FreshPool | None = None
        #: What :meth:`set_aside` kept: ``test``, ``name``, ``dsn`` each.
        self.fresh_kept: list[dict[str, str]] = []
        #: Set by the plugin when a test of this worker failed (``--isolate-keep=failed``).
        self.failed = False
        #: Set by the plugin when this worker's tests take fresh databases: the pool then
        #: starts making spares as soon as the worker's database exists.
        self.fresh_wanted = False

    # -- the run, for users who add pieces of their own ------------------------

    @property
    def run_dir(self) -> Path:
        """A directory of this run, shared by its workers, removed when the run ends."""
        self.run.require()
        return self.run.path

    def shared(self, name: str, start: Callable[[], Mapping[str, object]]) -> dict[str, object]:
        """Call ``start`` once per run, whichever worker asks first; everyone gets its
        JSON-serialisable result. Concurrent callers wait while the first one starts."""
        return self.run.shared(name, start)

    def adopt_process(
        self, pid: int, name: str, stop_signal: int = signal.SIGTERM, *, group: bool = True
    ) -> None:
        """Have the run stop process ``pid`` when it ends, even if this worker dies.

        With ``group`` (the default) the process should lead its own process group
        (``start_new_session=True``) and the whole group is signalled. It gets
        ``stop_signal``, then SIGKILL after the stop timeout. ``name`` must be unique
        in the run; :meth:`release_process` forgets it.
        """
        ticks = process_start_ticks(pid)
        if ticks is None:
            raise ConfigError(f"cannot adopt pid {pid}: no such process", hint="adopt it while it runs")
        self.run.registry.register(
            ProcessRecord(name=name, pid=pid, start_ticks=ticks, stop_signal=int(stop_signal),
                          group=group, scope="run")
        )  # fmt: skip

    def register_worker(self, name: str) -> None:
        """Record this worker process for the run's reaper, which freezes a worker still
        alive when it reaps (so it cannot start anything afterwards), then kills it."""
        self.run.registry.register(ProcessRecord(name=name, pid=os.getpid(), start_ticks=process_start_ticks(os.getpid()),
                                                 group=False, scope="run", freeze=True))  # fmt: skip

    def _refuse_if_stopping(self) -> None:
        """No process is started once the run is being reaped: it would outlive the pass."""
        if self.run.stopping():
            raise RunStoppingError(f"run {self.worker.run_id} is stopping: {self.worker.worker_id} starts nothing more")

    def release_process(self, name: str) -> None:
        """Forget a process adopted under ``name`` (it has ended, or is stopped elsewhere)."""
        self.run.registry.unregister(name)

    # -- containers of the user's (testcontainers) -------------------------------

    def _docker_run(self) -> DockerRun:
        """The run on the Docker engine (on a native run too: its reapers are told)."""
        ctx = getattr(self.backend, "ctx", None)
        if ctx is not None:
            return ctx  # type: ignore[no-any-return]
        if not docker_installed():
            raise ConfigError("containers need the Docker SDK and testcontainers, which are not installed",
                              hint="pip install 'pytest-isolate-stacks[docker]'")  # fmt: skip
        from ._docker.context import DockerRun

        self.run.require()
        self.run.mark_containers()
        return DockerRun(self.settings, self.worker, self.run, lambda: self.run.owner() or Owner.current())

    def container_labels(self, role: str = "container") -> dict[str, str]:
        """Docker labels that make a container part of this run, on either backend: the
        run's reapers (the controller at the end, the watchdog if the controller is killed,
        ``python -m isolate cleanup``) remove every container that carries them."""
        return self._docker_run().labels(role)

    @contextlib.contextmanager
    def container(
        self, name: str, make: Callable[[int], Any], port: int, *,
        url: str = "http://{host}:{port}", keep: bool = True,
    ) -> Iterator[ContainerHandle]:  # fmt: skip
        """Start a testcontainers container as this worker's, for the length of a ``with``
        block.

        ``make(listen_port)`` returns the container, not started, whose server listens on
        ``listen_port`` (``port``, the server's port in the image, in Docker's mapped
        mode; a port leased for it in host mode)::

            with isolate_stack.container(
                "cache", lambda p: RedisContainer("redis:7").with_command(f"--port {p}"), 6379,
                url="redis://{host}:{port}/0",
            ) as cache:
                cache.container.get_client().ping()

        It carries the run's labels and is reaped with the run's own containers; with
        ``--isolate-keep`` (and ``keep``) it stays up with the worker's stack. A
        ``ServiceSpec`` template names it ``{containers[cache].url}`` (``.host``,
        ``.port``).
        """
        if name in self._containers:
            raise ConfigError(f"container {name!r} is already started on this worker",
                              hint="give each container its own name")  # fmt: skip
        from ._docker.testcontainers import started

        def keeping() -> bool:
            return keep and self.keeping

        with started(self._docker_run(), name, make, port, url=url, keep=keeping) as handle:
            self._containers[name] = handle
            try:
                yield handle
            finally:
                if not keeping():
                    self._containers.pop(name, None)

    def _start(self, runner: Runner[S], *, shared: bool = False) -> S:
        """Start ``runner``; its processes are registered as they are spawned (a shared
        server with run scope: it outlives the worker that started it), and a failed
        start leaves nothing behind."""
        self._refuse_if_stopping()
        scope = "run" if shared else "worker"
        runner.on_spawn = lambda record: self.run.registry.register(replace(record, scope=scope))
        try:
            runner.start()
        except BaseException:
            runner.stop()
            self.run.registry.unregister(runner.name)
            raise
        assert runner.server is not None
        return runner.server

    # -- PostgreSQL ------------------------------------------------------------

    def postgres(self, seed: Seed | None = None) -> PostgresServer:
        """The run's shared PostgreSQL (started now if nobody has yet; from a cached
        cluster that holds ``seed``, if the backend can)."""
        if self._postgres is None:
            waited = time.perf_counter()
            state = self.shared("postgres", lambda: self._start_postgres(seed))
            self.timings.add("postgres_wait", time.perf_counter() - waited)
            self._postgres = PostgresServer.from_json(state)
        return self._postgres

    def _start_postgres(self, seed: Seed | None) -> dict[str, object]:
        with self.timings.measure("postgres_start"):
            config = PostgresConfig(
                settings=tuned_settings(
                    self.worker.worker_count, self.settings.pg_conn_per_worker,
                    self.settings.pg_settings,
                ),
                start_timeout=self.settings.pg_start_timeout, seed=seed,
                cache_size=self.settings.cache_size,
            )  # fmt: skip
            return self._start(self.backend.postgres(config, self.run.path / "postgres"), shared=True).to_json()

    @property
    def _database_phase(self) -> str:
        """What making the worker's database is called in the timings."""
        return "schema_migrations" if self.settings.db_isolation == "schema" else "database_ready"

    def _rooted(self, steps: Migrations) -> Migrations:
        """A relative migrations (or bootstrap) path is relative to the pytest rootdir."""
        if isinstance(steps, str | Path) and not Path(steps).is_absolute():
            return self.rootdir / steps
        return steps

    def database(self, migrations: Migrations = None, bootstrap: Migrations = None) -> WorkerDatabase:
        """The worker's schema (or database) and role, migrations applied (created on
        first call). ``bootstrap`` (default ``--isolate-bootstrap``) runs as the superuser
        once per run before the migrations.

        Schema mode: a schema of the run's database, migrated by each worker. Database
        mode (``--isolate-db-isolation=database``): the first worker migrates a template
        database once per run; every worker clones it. A database first created without
        migrations gets them on the first call that names some; naming different
        migrations later is an error, never a silent skip.
        """
        migrations = self._rooted(migrations)
        bootstrap = self._rooted(bootstrap if bootstrap is not None else self.settings.bootstrap)
        if self._database is None:
            plan = None
            if self.settings.db_isolation == "database":  # cached across runs where it can be
                cacheable = self.settings.template_cache and not self.settings.pg_dsn
                plan = TemplatePlan.for_run(self.worker.run_id, migrations, bootstrap, cacheable=cacheable)
            server = self.postgres(plan.seed() if plan else None)
            with self.timings.measure(self._database_phase):
                self._database = self._create_database(server, migrations, bootstrap, plan)
            if self.fresh_wanted:
                self.fresh_pool()
        elif migrations is not None and migrations != self._database.migrations:
            if self._database.migrations is not None:
                raise ConfigError(
                    f"worker schema {self._database.schema} already has migrations "
                    f"{self._database.migrations!r}; asked again with {migrations!r}",
                    hint="use one isolate_migrations fixture/option per run",
                )
            with self.timings.measure(self._database_phase):
                self._database.apply_migrations(migrations)
            self._database.migrations = migrations
            if self._pool is not None:
                self._pool.invalidate()  # spares made without them
        return self._database

    def _create_database(
        self, server: PostgresServer, migrations: Migrations, bootstrap: Migrations, plan: TemplatePlan | None
    ) -> WorkerDatabase:
        slug, run_id = self.worker.slug, self.worker.run_id
        if plan is not None:
            state = self.shared("pg-template", lambda: plan.make(server))
            if state["migrations"] != migrations_key(migrations):
                raise ConfigError(
                    f"the run's template database was migrated with {state['migrations']}; "
                    f"this worker asks for {migrations_key(migrations)}",
                    hint="use one isolate_migrations fixture/option per run",
                )
            db = WorkerDatabase.clone(server, slug, run_id, str(state["template"]), str(state["owner"]))
        else:
            if bootstrap is not None:
                self.shared("pg-bootstrap", lambda: run_bootstrap(server, bootstrap))
            db = WorkerDatabase.create(server, slug, run_id)
            db.apply_migrations(migrations)
        db.migrations = migrations
        return db

    @property
    def keeping(self) -> bool:
        """Whether this worker's stack stays up after the run (``--isolate-keep``)."""
        return self.settings.keep == "always" or (self.settings.keep == "failed" and self.failed)

    # -- a fresh database per test --------------------------------------------------

    def fresh_pool(self) -> FreshPool | None:
        """The worker's pool of spare databases (schemas), making them from now on;
        ``None`` with ``--isolate-fresh-pool=0``."""
        if self._pool is None and self.settings.fresh_pool > 0:
            db = self.database()
            size = pool_size(self.settings.fresh_pool, self.worker.worker_count, *spare_space(db, self.run.path))
            self._pool = FreshPool(db, self.worker.slug, self.worker.run_id, size, self.timings)
            self._pool.start()
        return self._pool

    def fresh_database(self) -> WorkerDatabase:
        """The worker's database (or schema), returned to its migrated state, DDL
        included: a spare of the pool swapped in under its name (milliseconds, once
        the pool has one), or, without a pool, rebuilt."""
        db = self.database()
        started = time.perf_counter()
        pool = self.fresh_pool()
        if pool is None:
            db.rebuild()
        else:
            self.timings.add("fresh_wait", pool.take())
        self.timings.add("fresh_database", time.perf_counter() - started)
        return db

    def set_aside(self, test: str) -> dict[str, str]:
        """Keep the worker's database as ``test`` left it, under a name that says so
        (``isolate_<worker>_k<n>_<test>_<run id>``), and give the worker a fresh one;
        what was kept (``test``, ``name``, ``dsn``), in the summary of a kept run."""
        pool = self.fresh_pool()
        if pool is not None:
            kept = pool.set_aside(test)
        else:
            kept = set_aside_and_rebuild(self.database(), self.worker.slug, self.worker.run_id,
                                         len(self.fresh_kept) + 1, test)  # fmt: skip
        self.fresh_kept.append(kept)
        return kept

    def close_pool(self) -> None:
        """Stop making spares and drop them (idempotent)."""
        if self._pool is not None:
            self._pool.close()
            self._pool = None

    def drop_database(self) -> None:
        """Drop the worker's schema and role (idempotent; kept with ``--isolate-keep``)."""
        self.close_pool()
        if self._database is not None and not self.keeping:
            try:
                self._database.drop()
            except Exception as exc:  # server already gone: nothing left to drop
                logger.debug("dropping %s failed: %s", self._database.schema, exc)
            self._database = None

    # -- Redis -----------------------------------------------------------------

    def redis(self) -> RedisServer:
        """The worker's Redis (own server, or own DB on the shared one)."""
        with self._redis_lock:
            return self._redis_locked()

    def _redis_locked(self) -> RedisServer:
        if self._redis is None:
            if self.settings.redis_url:
                holder = f"{self.worker.run_id}/{self.worker.worker_id}/{os.getpid()}"
                self._redis_lease = lease = ExternalDbLease(self.settings.redis_url, holder)
                self._redis = lease.server
            elif self.settings.redis_mode == "shared":
                state = self.shared("redis", lambda: self._start_redis("redis-shared", shared=True).to_json())
                self._redis_lease = run_lease = RunDbLease(self.run.path, RedisServer.from_json(state),
                                                           self._redis_databases())  # fmt: skip
                self._redis = run_lease.server
            else:
                self._redis = self._start_redis(f"redis-{self.worker.slug}-{os.getpid()}", shared=False)
        return self._redis

    def _redis_databases(self) -> int:
        return max(16, self.worker.worker_count + 2)

    def _start_redis(self, name: str, *, shared: bool) -> RedisServer:
        with self.timings.measure("redis_start"):
            config = RedisConfig(databases=self._redis_databases())
            runner = self.backend.redis(config, self.run.path / name, name, shared=shared)
            server = self._start(runner, shared=shared)
            if not shared:
                self._redis_runner = runner
            return server

    def stop_redis(self) -> None:
        """Stop the worker's own Redis server (idempotent; kept with ``--isolate-keep``)."""
        if self.keeping:
            return
        if self._redis_runner is not None:
            self._redis_runner.stop()
            self.run.registry.unregister(self._redis_runner.name)
            self._redis_runner = None
        if self._redis_lease is not None:
            self._redis_lease.release()
            self._redis_lease = None
        self._redis = None

    # -- the service under test --------------------------------------------------

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
        values: dict[str, object] = {
            "host": "127.0.0.1", "name": instance, "worker": self.worker.worker_id,
            "run_id": self.worker.run_id,
        }  # fmt: skip
        missing = [dep for dep in spec.depends_on if dep not in self._services]
        if missing:
            raise ConfigError(
                f"service {spec.name!r} depends on {', '.join(missing)}, not started on this worker",
                hint="declare every service in the isolate_service_specs fixture (started in "
                "depends_on order), or start those first",
            )
        values["services"] = dict(self._services)  # the handles: {services[NAME].url}
        values["containers"] = dict(self._containers)  # {containers[NAME].url}
        self._refuse_if_stopping()
        launcher = self.backend.service(spec, instance, self.run.worker_dir(self.worker.slug) / f"{instance}.log")
        launcher.warm(self.run.registry.register)  # a fork server preloads meanwhile
        early = self._start_redis_early(spec)  # Redis starts while the database is made
        try:
            for field_name in sorted(spec.uses() - set(values) - {"port", "url"}):
                values[field_name] = (resolve or self._resolve_field)(field_name)
        except BaseException:
            launcher.close()
            raise
        finally:
            if early is not None:
                early.join()
        handle = ServiceHandle(
            spec, instance, values, launcher, ready_timeout=self.settings.ready_timeout,
            stop_timeout=self.settings.stop_timeout, on_start=self._register_service,
            timings=self.timings, before_start=self._refuse_if_stopping,
        )  # fmt: skip
        self._services[spec.name] = handle
        try:
            with self.timings.measure("service_ready"):
                handle.start()
        except BaseException:
            self.close_service(spec.name)
            raise
        self.timings.add("worker_stack_ready", time.perf_counter() - started)
        return handle

    def services(
        self, specs: Sequence[ServiceSpec], resolve: Callable[[str], object] | None = None
    ) -> dict[str, ServiceHandle]:
        """The worker's running instances of ``specs``, started in ``depends_on`` order."""
        order = start_order(specs, set(self._services))
        return {spec.name: self.service(spec, resolve) for spec in order}

    def _register_service(self, handle: ServiceHandle) -> None:
        record = handle.record()
        if record is not None:
            self.run.registry.register(record)

    def _start_redis_early(self, spec: ServiceSpec) -> threading.Thread | None:
        """Start the worker's Redis in a thread when ``spec`` needs it and the database
        too: the two starts overlap. A failure here is left to the caller's own
        ``redis()``, which tries again and raises it."""
        uses = spec.uses()
        if "redis_url" not in uses or not uses & {"dsn", "schema", "role"} or self._redis is not None:
            return None

        def start() -> None:
            try:
                self.redis()
            except Exception as exc:
                logger.debug("early Redis start failed (retried when asked for): %s", exc)

        thread = threading.Thread(target=start, name="isolate-redis-early", daemon=True)
        thread.start()
        return thread

    def environment(self, pairs: Sequence[tuple[str, str]]) -> dict[str, str]:
        """``--isolate-env``: each NAME with its template rendered for this worker; what
        a template names (the database with ``--isolate-migrations``, Redis) starts now."""
        values: dict[str, object] = {"host": "127.0.0.1", "worker": self.worker.worker_id,
                                     "run_id": self.worker.run_id}  # fmt: skip
        for _, template in pairs:
            for field_name in sorted(placeholders(template) - set(values)):
                if field_name in ("dsn", "schema", "role"):
                    self.database(self.settings.migrations)
                values[field_name] = self._resolve_field(field_name)
        return {name: render(template, values) for name, template in pairs}

    def _resolve_field(self, name: str) -> object:
        if name in ("dsn", "schema", "role"):
            db = self.database()
            return {"dsn": db.dsn, "schema": db.schema, "role": db.role}[name]
        if name == "redis_url":
            return self.redis().url
        raise ConfigError(f"unknown template field {name!r}")

    def running_services(self) -> list[ServiceHandle]:
        """This worker's service handles."""
        return list(self._services.values())

    def close_service(self, name: str) -> None:
        """Stop a service for good and remove what runs it."""
        if self.keeping:
            return
        handle = self._services.pop(name, None)
        if handle is not None:
            handle.close()
            for kind in ("service", "forkserver"):
                self.run.registry.unregister(f"{kind}-{handle.name}")

    def check(self) -> None:
        """Raise :class:`~isolate.LeaseLostError` if the run or this worker lost its hold
        on an external server (its objects, or its Redis DB, are another run's now): a
        test must not go on writing there."""
        why = self.run.lost() if self.settings.pg_dsn else None
        lease = self._redis_lease
        why = why or (lease.lost if isinstance(lease, ExternalDbLease) else None)
        if why:
            raise LeaseLostError(why)

    def heal(self) -> list[str]:
        """Restore this worker's PostgreSQL and Redis if a test left them cut; what was."""
        healed = []
        if self._database is not None and self._database.is_cut:
            self._database.restore()
            healed.append("postgres")
        if self._redis is not None and self._redis.is_cut:
            self._redis.restore()
            healed.append("redis")
        return healed

    def keep(self) -> dict[str, object]:
        """Leave this worker's stack up after the run, recorded in the run dir for the
        controller's summary and ``python -m isolate cleanup RUN``; what was kept."""
        info: dict[str, object] = {"worker": self.worker.worker_id, "pid": os.getpid()}
        if self._database is not None:
            info.update(dsn=self._database.dsn, schema=self._database.schema)
        if self.fresh_kept:
            info["fresh_kept"] = list(self.fresh_kept)
        if self._redis is not None:
            info["redis_url"] = self._redis.url
        #: What lives on a server isolate did not start: printed without its password.
        info["external"] = [key for key, on in (("dsn", bool(self.settings.pg_dsn)),
                                                ("redis_url", bool(self.settings.redis_url))) if on]  # fmt: skip
        info["services"] = [
            {"name": h.name, "url": h.url, "running": h.is_running,
             "log": str(getattr(h.launcher, "log_path", "") or "") or None}
            for h in self._services.values() if h.lease is not None
        ]  # fmt: skip
        info["containers"] = [
            {"name": c.name, "url": c.url, "container": c.container_name} for c in self._containers.values()
        ]  # fmt: skip
        for record in self.run.registry.records():  # outlive this worker now
            if record.owner_pid == os.getpid():
                self.run.registry.register(replace(record, scope="run"))
        self.run.mark_kept(self.worker.slug, info)
        return info

    def close(self) -> None:
        """Stop this worker's services and Redis, drop its schema (idempotent), or keep
        them all (``--isolate-keep``)."""
        self.close_pool()
        if self.keeping:
            if self._database or self._redis or self._services or self._containers:
                self.keep()
            return
        with self.timings.measure("worker_teardown"):
            for name in list(self._services):
                self.close_service(name)
            self.stop_redis()
            self.drop_database()
