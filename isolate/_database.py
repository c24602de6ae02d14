"""Per-worker schema and role on the shared server: the janitor."""

from __future__ import annotations

import hashlib
import logging
import re
import secrets
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from ._errors import ConfigError, FaultInjectionError, MigrationError
from ._fault import Fault
from ._lazy import lazy
from ._postgres import PostgresServer
from ._postgres.server import CHEAP_SCRAM, SESSIONS_END_TIMEOUT, Seed, end_sessions, until_gone
from ._retry import poll_until

if TYPE_CHECKING:
    import psycopg
    from psycopg import sql
else:
    psycopg = lazy("psycopg")
    sql = lazy("psycopg.sql")

__all__ = [
    "MIGRATING",
    "Migrations",
    "TemplatePlan",
    "WorkerDatabase",
    "clone_database",
    "migrations_key",
    "migration_files",
    "run_bootstrap",
    "run_migrations",
    "schema_name",
    "template_key",
]

logger = logging.getLogger(__name__)

#: The ``application_name`` of the session that migrates a worker's schema.
MIGRATING = "isolate-migrations"

#: A directory of ``.sql`` files, a single file, or ``callable(connection)``.
Migrations = str | Path | Callable[["psycopg.Connection[tuple[object, ...]]"], None] | None


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


#: A migrations callable runs in one thread of a process at a time: the fresh-database
#: pool migrates spare schemas in a background thread while the worker may migrate (or
#: rebuild) in its own, and a callable is rarely thread-safe (Alembic's ``context`` is a
#: module-level global; a Django callable repoints the default connection).
_ONE_CALLABLE_AT_A_TIME = threading.RLock()


def run_migrations(conn: psycopg.Connection[tuple[object, ...]], steps: Migrations, where: str,
                   *, what: str = "migration") -> int:  # fmt: skip
    """Run a directory or file of ``.sql`` files, or ``callable(conn)``, on ``conn``;
    how many steps ran. ``where`` names the target, ``what`` the steps, in errors."""
    if steps is None:
        return 0
    if callable(steps):
        try:
            with _ONE_CALLABLE_AT_A_TIME:
                steps(conn)
        except Exception as exc:
            raise MigrationError(f"{what} callable failed: {exc}", target=where) from exc
        return 1
    files = migration_files(steps)
    for path in files:
        try:
            with conn.transaction():
                conn.execute(path.read_text())
        except psycopg.Error as exc:
            raise MigrationError(
                f"{what} {path.name} failed: {exc}", target=where, file=path,
                hint="fix the SQL; migrations must not name a schema "
                "(they run with search_path set to the worker's schema or database)",
            ) from exc  # fmt: skip
    return len(files)


@dataclass
class WorkerDatabase:
    """One worker's schema (or database) and login role, and what a test may do with them.

    Schema mode (the default): a schema of the run's database, ``search_path`` set to it.
    Database mode (``--isolate-db-isolation=database``): a database of its own, cloned
    from the run's migrated template (``database`` and ``template`` are set; ``schema``
    is ``public``).
    """

    server: PostgresServer
    schema: str
    role: str
    password: str
    #: Database mode: the worker's database, and the template it is cloned from.
    database: str | None = None
    template: str | None = None
    #: What :meth:`rebuild` re-applies in schema mode.
    migrations: Migrations = field(default=None, compare=False, repr=False)
    #: Whether :meth:`cut` is in effect.
    is_cut: bool = field(default=False, compare=False, repr=False)

    @classmethod
    def create(cls, server: PostgresServer, worker_slug: str, run_id: str) -> WorkerDatabase:
        """Create the role (``search_path`` = its schema) and the schema it owns."""
        name = schema_name(worker_slug, run_id)
        db = cls(server, schema=name, role=name, password=secrets.token_urlsafe(18))
        ident = sql.Identifier(name)
        with psycopg.connect(server.admin_dsn, autocommit=True) as conn:
            _create_login_role(conn, name, db.password)
            conn.execute(sql.SQL("CREATE SCHEMA {} AUTHORIZATION {}").format(ident, ident))
            conn.execute(sql.SQL("ALTER ROLE {} SET search_path = {}").format(ident, ident))
        return db

    @classmethod
    def clone(cls, server: PostgresServer, worker_slug: str, run_id: str, template: str,
              template_owner: str) -> WorkerDatabase:  # fmt: skip
        """Database mode: a role and ``CREATE DATABASE ... TEMPLATE``, no other role allowed
        to connect. The role is made a member of the template's owner, so it owns what the
        migrations made (no ``REASSIGN OWNED`` per clone: with hundreds of objects that
        was most of a clone's time); the owner itself can connect to no worker's database."""
        name = schema_name(worker_slug, run_id)
        db = cls(server, schema="public", role=name, password=secrets.token_urlsafe(18),
                 database=name, template=template)  # fmt: skip
        with psycopg.connect(server.admin_dsn, autocommit=True) as conn:
            _create_login_role(conn, name, db.password)
            conn.execute(sql.SQL("GRANT {} TO {}").format(sql.Identifier(template_owner), sql.Identifier(name)))
            clone_database(conn, server, name, template, name)
        return db

    @property
    def admin_dsn(self) -> str:
        """The superuser's URL of the worker's database (the run's, in schema mode)."""
        return self.server.dsn(database=self.database)

    @property
    def dsn(self) -> str:
        """Connection URL of the worker's role, ``search_path`` baked in."""
        return self.server.dsn(user=self.role, password=self.password, database=self.database,
                               search_path=self.schema)  # fmt: skip

    def connect(self, **kwargs: object) -> psycopg.Connection[tuple[object, ...]]:
        """A new psycopg connection as the worker's role."""
        return psycopg.connect(self.dsn, **kwargs)  # type: ignore[arg-type]

    def apply_migrations(self, migrations: Migrations) -> int:
        """Apply migrations as the worker's role; returns how many steps ran. (The session
        is named :data:`MIGRATING`: the DDL it runs is not a test's, see ``_recycle.py``.)"""
        if migrations is None:
            return 0
        with self.connect(application_name=MIGRATING) as conn:
            return run_migrations(conn, migrations, self.schema)

    def tables(self) -> list[str]:
        with psycopg.connect(self.admin_dsn) as conn:
            rows = conn.execute(
                "SELECT tablename FROM pg_tables WHERE schemaname = %s ORDER BY 1",
                (self.schema,),
            ).fetchall()
        return [str(r[0]) for r in rows]

    def rebuild(self) -> None:
        """Return to the migrated state, DDL included: re-clone the database from the
        run's template (database mode), or drop the schema and migrate it again (schema
        mode). The worker's sessions are ended (the service's pool reconnects)."""
        if self.database is not None:
            assert self.template is not None
            with psycopg.connect(self.server.admin_dsn, autocommit=True) as conn:
                conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(self.database)))
                clone_database(conn, self.server, self.database, self.template, self.role)
            return
        ident, role = sql.Identifier(self.schema), sql.Identifier(self.role)
        with psycopg.connect(self.server.admin_dsn, autocommit=True) as conn:
            conn.execute(end_sessions("usename", self.role))
            conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(ident))
            conn.execute(sql.SQL("CREATE SCHEMA {} AUTHORIZATION {}").format(ident, role))
        self.apply_migrations(self.migrations)

    def reset(self, exclude: Sequence[str] = ("schema_version",)) -> None:
        """Empty every table of the worker's schema (identities restart); see
        :meth:`rebuild` to undo DDL too."""
        names = [t for t in self.tables() if t not in set(exclude)]
        if not names:
            return
        targets = sql.SQL(", ").join(sql.Identifier(self.schema, t) for t in names)
        with psycopg.connect(self.admin_dsn, autocommit=True) as conn:
            conn.execute(sql.SQL("TRUNCATE {} RESTART IDENTITY CASCADE").format(targets))

    # -- fault injection ----------------------------------------------------

    def cut(self) -> Fault:
        """Make PostgreSQL unavailable to this worker only.

        The role loses LOGIN and its sessions are terminated (it returns once they are
        gone); other workers' roles are untouched. :meth:`restore`, or leaving ``with db.cut():``, undoes
        it; the plugin restores it after the test in any case.
        """
        ident = sql.Identifier(self.role)
        self.is_cut = True
        try:
            with psycopg.connect(self.server.admin_dsn, autocommit=True) as conn:
                conn.execute(sql.SQL("ALTER ROLE {} NOLOGIN").format(ident))
                # A connection that passed the LOGIN check before that commit is still
                # starting (not yet a session of the role): it would survive the end of
                # the sessions below. Let those that were starting then become sessions.
                starting = _starting_backends(conn)
                if starting and not poll_until(lambda: not starting & _starting_backends(conn), CUT_TIMEOUT):
                    raise FaultInjectionError(
                        f"could not cut {self.role}: connections {sorted(starting)} were still starting "
                        f"after {CUT_TIMEOUT:.0f}s"
                    )
                # Ending a session only signals its backend, which a loaded machine may run
                # a while later, and a test may count the role's sessions at once.
                conn.execute(end_sessions("usename", self.role))
                mine = sql.SQL("usename = {}").format(sql.Literal(self.role))
                conn.execute(until_gone(conn, mine))
                if conn.execute(sql.SQL("SELECT FROM pg_stat_activity WHERE {}").format(mine)).fetchone():
                    raise FaultInjectionError(
                        f"could not cut {self.role}: its sessions were still running "
                        f"{SESSIONS_END_TIMEOUT:.0f}s after they were ended"
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
        """Drop the schema (or database) and the role, ending the role's sessions first."""
        ident = sql.Identifier(self.role)
        with psycopg.connect(self.server.admin_dsn, autocommit=True) as conn:
            conn.execute(sql.SQL("ALTER ROLE {} NOLOGIN").format(ident))
            conn.execute(end_sessions("usename", self.role))
            if self.database is not None:
                conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(self.database)))
            else:
                conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(self.schema)))
            conn.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(ident))


#: Seconds :meth:`WorkerDatabase.cut` waits for connections that were starting.
CUT_TIMEOUT = 10.0

#: Backends in their start-up transaction: they hold their own ``virtualxid`` lock but
#: pg_stat_activity does not show them as a user's session yet (it does not show them at
#: all before PostgreSQL 18). A connection's LOGIN check happens in that transaction.
_STARTING = """
SELECT DISTINCT l.pid FROM pg_locks l
WHERE l.locktype = 'virtualxid' AND l.pid IS NOT NULL AND l.pid <> pg_backend_pid()
  AND NOT EXISTS (SELECT FROM pg_stat_activity a WHERE a.pid = l.pid
                  AND (a.usename IS NOT NULL OR a.backend_type <> 'client backend'))
"""


def _starting_backends(conn: psycopg.Connection[tuple[object, ...]]) -> set[int]:
    """The pids of the server's connections that are still starting (see ``_STARTING``)."""
    return {int(pid) for (pid,) in conn.execute(_STARTING)}  # type: ignore[call-overload]


def _create_login_role(conn: psycopg.Connection[tuple[object, ...]], name: str, password: str) -> None:
    """``CREATE ROLE name LOGIN PASSWORD ...``, its verifier of one SCRAM iteration where
    the server has the setting (see :data:`CHEAP_SCRAM`)."""
    conn.execute(CHEAP_SCRAM)
    conn.execute(sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(sql.Identifier(name), sql.Literal(password)))


def clone_database(conn: psycopg.Connection[tuple[object, ...]], server: PostgresServer, name: str,
                   template: str, role: str, **connect: object) -> None:  # fmt: skip
    """``CREATE DATABASE name TEMPLATE template`` on ``conn`` (a superuser's), owned by
    ``role``, which alone may connect, and whose ``public`` schema it owns too (through a
    superuser connection to the clone, made with ``connect`` as extra arguments)."""
    ident, owner = sql.Identifier(name), sql.Identifier(role)
    # FILE_COPY (PostgreSQL 15+) copies files instead of logging every block: a clone
    # of a template with hundreds of tables takes a third less.
    strategy = sql.SQL(" STRATEGY FILE_COPY" if conn.info.server_version >= 150000 else "")
    conn.execute(sql.SQL("CREATE DATABASE {} TEMPLATE {} OWNER {}{}").format(
        ident, sql.Identifier(template), owner, strategy))  # fmt: skip
    conn.execute(sql.SQL("REVOKE CONNECT ON DATABASE {} FROM PUBLIC").format(ident))
    with psycopg.connect(server.dsn(database=name), autocommit=True, **connect) as clone:  # type: ignore[arg-type]
        clone.execute(sql.SQL("ALTER SCHEMA public OWNER TO {}").format(owner))


def run_bootstrap(server: PostgresServer, bootstrap: Migrations) -> dict[str, object]:
    """Schema mode: run the bootstrap as the superuser in the run's database (once)."""
    with psycopg.connect(server.admin_dsn, autocommit=True) as conn:
        steps = run_migrations(conn, bootstrap, server.database, what="bootstrap")
    return {"steps": steps}


@dataclass(frozen=True)
class TemplatePlan:
    """Database mode: the run's template database, bootstrapped (superuser) and migrated
    (as a template role whose objects each clone hands to its worker's role), then closed
    to connections so that workers can clone it at once.

    With a ``key`` (the migrations are files, or a callable with a ``cache_key``), its
    names come from the key, not the run, and :meth:`seed` lets the native backend keep
    a cluster that already holds it: an unchanged migration set costs nothing next run.
    """

    name: str
    owner: str
    key: str | None
    migrations: Migrations = field(compare=False)
    bootstrap: Migrations = field(compare=False)

    @classmethod
    def for_run(cls, run_id: str, migrations: Migrations, bootstrap: Migrations,
                *, cacheable: bool) -> TemplatePlan:  # fmt: skip
        key = template_key(migrations, bootstrap) if cacheable else None
        suffix = f"m{key[:16]}" if key else run_id
        return cls(f"isolate_tpl_{suffix}", f"isolate_tplown_{suffix}", key, migrations, bootstrap)

    def seed(self) -> Seed | None:
        """What a fresh cluster for this run should hold first, if it can be cached."""
        return Seed(self.key, self.build) if self.key else None

    def build(self, connect: Callable[[str], psycopg.Connection[tuple[object, ...]]]) -> None:
        """Create it; ``connect(dbname)`` opens an autocommit superuser connection."""
        name, owner = sql.Identifier(self.name), sql.Identifier(self.owner)
        with connect("postgres") as conn:
            conn.execute(sql.SQL("CREATE ROLE {} NOLOGIN").format(owner))
            conn.execute(sql.SQL("CREATE DATABASE {}").format(name))
        with connect(self.name) as conn:
            conn.execute("REVOKE ALL ON SCHEMA public FROM PUBLIC")
            conn.execute(sql.SQL("GRANT ALL ON SCHEMA public TO {}").format(owner))
            run_migrations(conn, self.bootstrap, self.name, what="bootstrap")
            conn.execute(sql.SQL("SET ROLE {}").format(owner))
            run_migrations(conn, self.migrations, self.name)
        with connect("postgres") as conn:
            conn.execute(sql.SQL("ALTER DATABASE {} ALLOW_CONNECTIONS false").format(name))

    def make(self, server: PostgresServer) -> dict[str, object]:
        """Build it on ``server`` unless the cluster came with it; the state workers share."""
        def connect(database: str) -> psycopg.Connection[tuple[object, ...]]:
            return psycopg.connect(server.dsn(database=database), autocommit=True)

        with connect(server.database) as conn:
            cached = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (self.name,)).fetchone()
        if not cached:
            self.build(connect)
        return {"template": self.name, "owner": self.owner, "cached": bool(cached),
                "migrations": migrations_key(self.migrations)}  # fmt: skip


def template_key(migrations: Migrations, bootstrap: Migrations) -> str | None:
    """A digest of what the template is made of (file names and contents, or a
    callable's ``cache_key``); ``None`` if it cannot be known (a callable without one)."""
    digest = hashlib.sha256(b"isolate-template-1")
    for steps in (bootstrap, migrations):
        if steps is None:
            digest.update(b"\0none")
        elif callable(steps):
            key = getattr(steps, "cache_key", None)
            if not isinstance(key, str):
                return None
            digest.update(b"\0callable:" + key.encode())
        else:
            for path in migration_files(steps):
                digest.update(b"\0" + path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def migrations_key(steps: Migrations) -> str:
    """What names a set of migrations the same way in every worker process."""
    if callable(steps):
        return f"{getattr(steps, '__module__', '?')}.{getattr(steps, '__qualname__', repr(steps))}"
    return repr(None if steps is None else str(steps))
