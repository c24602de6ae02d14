"""The run's PostgreSQL and the worker's database as part of its stack, a fresh
database per test included."""

from __future__ import annotations

import logging
import time
from pathlib import Path

from .._database import Migrations, TemplatePlan, WorkerDatabase, migrations_key, run_bootstrap
from .._errors import ConfigError
from .._pool import FreshPool, pool_size, set_aside_and_rebuild, spare_space
from .._postgres import PostgresConfig, PostgresServer, tuned_settings
from .._postgres.server import Seed
from .base import StackBase

__all__ = ["DatabasePart"]

logger = logging.getLogger(__name__)


class DatabasePart(StackBase):
    """The run's PostgreSQL (started once per run) and this worker's schema or database."""

    def postgres(self, seed: Seed | None = None) -> PostgresServer:
        """The run's shared PostgreSQL (started now if nobody has yet; from a cached
        cluster that holds ``seed``, if the backend can)."""
        if self._postgres is None:
            waited = time.perf_counter()
            state = self.shared("postgres", lambda: self._start_postgres(seed))
            self.timings.add("postgres_wait", time.perf_counter() - waited)
            self._postgres = PostgresServer.from_json(state)
        return self._postgres

    def prestart_postgres(self, worker_count: int) -> None:
        """Start the run's PostgreSQL now, sized for ``worker_count`` workers, unless
        someone has: what the run's controller does while its workers start. Recorded as
        started, not as used (``postgres_wait`` is recorded only by :meth:`postgres`)."""
        self.shared("postgres", lambda: self._start_postgres(None, worker_count))

    def _start_postgres(self, seed: Seed | None, worker_count: int | None = None) -> dict[str, object]:
        with self.timings.measure("postgres_start"):
            config = PostgresConfig(
                settings=tuned_settings(
                    worker_count or self.worker.worker_count, self.settings.pg_conn_per_worker,
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
