"""Per-worker schema and role on the shared server: the janitor."""

from __future__ import annotations

import logging
import re
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import psycopg
from psycopg import sql

from ._errors import ConfigError, FaultInjectionError, MigrationError
from ._fault import Fault
from ._postgres import PostgresServer

__all__ = ["Migrations", "WorkerDatabase", "migration_files", "schema_name"]

logger = logging.getLogger(__name__)

#: A directory of ``.sql`` files, a single file, or ``callable(connection)``.
Migrations = str | Path | Callable[[psycopg.Connection[tuple[object, ...]]], None] | None


def schema_name(worker_slug: str, run_id: str) -> str:
    """``isolate_<worker>_<run>``: unique per worker and per concurrent run."""
    name = f"isolate_{worker_slug}_{run_id}".lower()
    if not re.fullmatch(r"[a-z_][a-z0-9_]{0,62}", name):
        raise ConfigError(f"cannot build a valid schema name from {worker_slug!r}/{run_id!r}")
    return name


def _natural_key(path: Path) -> list[object]:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", path.name)]


def migration_files(source: str | Path) -> list[Path]:
    """The ``.sql`` files of a migrations directory, in natural order (2 before 10)."""
    path = Path(source)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise ConfigError(
            f"migrations path {str(path)!r} does not exist",
            hint="point --isolate-migrations / ISOLATE_MIGRATIONS (relative to the rootdir) "
            "at a directory of .sql files, or override the isolate_migrations fixture",
        )
    files = sorted((p for p in path.iterdir() if p.suffix == ".sql"), key=_natural_key)
    if not files:
        raise ConfigError(f"no .sql files in migrations directory {str(path)!r}")
    return files


@dataclass
class WorkerDatabase:
    """One worker's schema and login role, and what a test may do with them."""

    server: PostgresServer
    schema: str
    role: str
    password: str
    #: Whether :meth:`cut` is in effect.
    is_cut: bool = field(default=False, compare=False, repr=False)

    @classmethod
    def create(cls, server: PostgresServer, worker_slug: str, run_id: str) -> WorkerDatabase:
        """Create the role (``search_path`` = its schema) and the schema it owns."""
        name = schema_name(worker_slug, run_id)
        db = cls(server, schema=name, role=name, password=secrets.token_urlsafe(18))
        ident = sql.Identifier(name)
        with psycopg.connect(server.admin_dsn, autocommit=True) as conn:
            conn.execute(
                sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(ident, sql.Literal(db.password))
            )
            conn.execute(sql.SQL("CREATE SCHEMA {} AUTHORIZATION {}").format(ident, ident))
            conn.execute(sql.SQL("ALTER ROLE {} SET search_path = {}").format(ident, ident))
        return db

    @property
    def dsn(self) -> str:
        """Connection URL of the worker's role, ``search_path`` baked in."""
        return self.server.dsn(user=self.role, password=self.password, search_path=self.schema)

    def connect(self, **kwargs: object) -> psycopg.Connection[tuple[object, ...]]:
        """A new psycopg connection as the worker's role."""
        return psycopg.connect(self.dsn, **kwargs)  # type: ignore[arg-type]

    def apply_migrations(self, migrations: Migrations) -> int:
        """Apply migrations as the worker's role; returns how many steps ran."""
        if migrations is None:
            return 0
        with self.connect() as conn:
            if callable(migrations):
                try:
                    migrations(conn)
                except Exception as exc:
                    raise MigrationError(
                        f"migration callable failed: {exc}", schema=self.schema
                    ) from exc
                return 1
            files = migration_files(migrations)
            for path in files:
                try:
                    with conn.transaction():
                        conn.execute(path.read_text())
                except psycopg.Error as exc:
                    raise MigrationError(
                        f"migration {path.name} failed: {exc}",
                        schema=self.schema,
                        file=path,
                        hint="fix the SQL; migrations must not name a schema "
                        "(they run with search_path set to the worker's schema)",
                    ) from exc
            return len(files)

    def tables(self) -> list[str]:
        with psycopg.connect(self.server.admin_dsn) as conn:
            rows = conn.execute(
                "SELECT tablename FROM pg_tables WHERE schemaname = %s ORDER BY 1",
                (self.schema,),
            ).fetchall()
        return [str(r[0]) for r in rows]

    def reset(self, exclude: Sequence[str] = ("schema_version",)) -> None:
        """Empty every table of the worker's schema (identities restart)."""
        names = [t for t in self.tables() if t not in set(exclude)]
        if not names:
            return
        targets = sql.SQL(", ").join(sql.Identifier(self.schema, t) for t in names)
        with psycopg.connect(self.server.admin_dsn, autocommit=True) as conn:
            conn.execute(sql.SQL("TRUNCATE {} RESTART IDENTITY CASCADE").format(targets))

    # -- fault injection ----------------------------------------------------

    def cut(self) -> Fault:
        """Make PostgreSQL unavailable to this worker only.

        The role loses LOGIN and its sessions are terminated; other workers'
        roles are untouched. :meth:`restore`, or leaving ``with db.cut():``, undoes
        it; the plugin restores it after the test in any case.
        """
        ident = sql.Identifier(self.role)
        self.is_cut = True
        try:
            with psycopg.connect(self.server.admin_dsn, autocommit=True) as conn:
                conn.execute(sql.SQL("ALTER ROLE {} NOLOGIN").format(ident))
                conn.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = %s",
                    (self.role,),
                )
        except psycopg.Error as exc:
            raise FaultInjectionError(f"could not cut {self.role}: {exc}") from exc
        return Fault(f"PostgreSQL cut for {self.role}", self.restore)

    def restore(self) -> None:
        """Undo :meth:`cut` (idempotent)."""
        with psycopg.connect(self.server.admin_dsn, autocommit=True) as conn:
            conn.execute(sql.SQL("ALTER ROLE {} LOGIN").format(sql.Identifier(self.role)))
        self.is_cut = False

    def drop(self) -> None:
        """Drop the schema and the role (terminating the role's sessions first)."""
        ident = sql.Identifier(self.role)
        with psycopg.connect(self.server.admin_dsn, autocommit=True) as conn:
            conn.execute(sql.SQL("ALTER ROLE {} NOLOGIN").format(ident))
            conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = %s",
                (self.role,),
            )
            conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(self.schema)))
            conn.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(ident))
