"""An existing PostgreSQL (``--isolate-pg-dsn``): nothing is started, every object a run
creates there carries its run id, and a lease table in the server itself says which runs
are alive, so runs on other machines (CI shards) find and drop what a dead run left.

The lease table (``isolate_run_leases`` in the DSN's database) holds one row per live run,
its heartbeat refreshed every :data:`HEARTBEAT_S` seconds by the run's controller. A row
older than :data:`STALE_AFTER_S` belongs to a run that died; whichever run starts next
drops that run's databases, schemas and roles (names ``isolate_*_<run id>``) and the row.
"""

from __future__ import annotations

import logging
import re
import socket
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from .._errors import ConfigError, ExternalServerError
from .._lazy import lazy
from .._retry import poll_until
from .._run.notices import NOTICE
from .._run.registry import ProcessRecord
from .server import POOL_APP_PREFIX, PostgresServer, end_sessions

if TYPE_CHECKING:
    import psycopg
    from psycopg import conninfo, sql
else:
    psycopg = lazy("psycopg")
    sql = lazy("psycopg.sql")
    conninfo = lazy("psycopg.conninfo")

__all__ = [
    "HEARTBEAT_S", "STALE_AFTER_S", "ExternalPostgresRunner", "RunLease", "check_server",
    "drop_run_objects", "parse_dsn",
]  # fmt: skip

logger = logging.getLogger(__name__)

HEARTBEAT_S = 5.0
STALE_AFTER_S = 120.0
_TABLE = "isolate_run_leases"
_LOCK = 0x15014E  # advisory lock: one run at a time creates the table or reaps stale runs


def parse_dsn(dsn: str) -> PostgresServer:
    """The connection facts of ``dsn`` (a URL or ``key=value`` string)."""
    try:
        parts = conninfo.conninfo_to_dict(dsn)
    except psycopg.ProgrammingError as exc:
        raise ConfigError(f"--isolate-pg-dsn is not a PostgreSQL DSN: {exc}",
                          hint="e.g. postgresql://postgres:secret@127.0.0.1:5432/postgres") from None  # fmt: skip
    return PostgresServer(
        host=str(parts.get("host") or "127.0.0.1"), port=int(parts.get("port") or 5432),
        user=str(parts.get("user") or "postgres"), password=str(parts.get("password") or ""),
        database=str(parts.get("dbname") or "postgres"), version="?", backend="external",
    )  # fmt: skip


def check_server(dsn: str, *, needs_createdb: bool = False) -> PostgresServer:
    """The server's facts, once it answered and its role proved able to create roles
    (and databases, if ``needs_createdb``); :class:`ConfigError` naming the fix if not."""
    facts = parse_dsn(dsn)
    try:
        with psycopg.connect(facts.admin_dsn, connect_timeout=10) as conn:
            row = conn.execute(
                "SELECT current_setting('server_version'), rolsuper, rolcreaterole, rolcreatedb "
                "FROM pg_roles WHERE rolname = current_user"
            ).fetchone()
    except psycopg.Error as exc:
        raise ConfigError(f"cannot connect to the --isolate-pg-dsn server: {exc}".strip(),
                          hint="check host, port, user, password and database of the DSN") from None  # fmt: skip
    assert row is not None
    version, superuser, createrole, createdb = row
    missing = [what for what, ok in (("CREATEROLE", createrole), ("CREATEDB", createdb or not needs_createdb))
               if not (superuser or ok)]  # fmt: skip
    if missing:
        raise ConfigError(
            f"the --isolate-pg-dsn role {facts.user!r} lacks {' and '.join(missing)}",
            hint=f"ALTER ROLE {facts.user} {' '.join(missing)}, or use a superuser's DSN",
        )
    return PostgresServer(**{**facts.to_json(), "version": f"PostgreSQL {version}"})  # type: ignore[arg-type]


class ExternalPostgresRunner:
    """The :class:`~isolate._backends.Runner` of a server isolate does not start."""

    def __init__(self, dsn: str, *, needs_createdb: bool) -> None:
        self.name = "postgres-external"
        self.on_spawn: Callable[[ProcessRecord], None] | None = None
        self.dsn = dsn
        self.needs_createdb = needs_createdb
        self._server: PostgresServer | None = None

    @property
    def server(self) -> PostgresServer | None:
        return self._server

    def start(self) -> None:
        """Check it answers and that its role may create what isolate needs."""
        self._server = check_server(self.dsn, needs_createdb=self.needs_createdb)

    def stop(self, timeout: float | None = None) -> int | None:
        return None  # not ours to stop

    @property
    def is_running(self) -> bool:
        return self._server is not None

    def logs(self) -> str:
        return ""

    def record(self) -> ProcessRecord | None:
        return None


def _run_names(run_id: str) -> re.Pattern[str]:
    return re.compile(rf"^isolate_[a-z0-9_]*_{re.escape(run_id)}$")


def _tolerant(conn: psycopg.Connection[tuple[object, ...]], query: sql.Composed | str,
              params: tuple[object, ...] = ()) -> None:  # fmt: skip
    """Run one drop step; an object already gone is fine, and a catalog row another
    session updates at the same moment (``tuple concurrently updated``) is tried again."""
    for attempt in range(5):
        try:
            conn.execute(query, params)
            return
        except (psycopg.errors.UndefinedObject, psycopg.errors.InvalidCatalogName,
                psycopg.errors.InvalidSchemaName):  # dropped first by another process  # fmt: skip
            return
        except psycopg.errors.InternalError_ as exc:
            if "concurrently" not in str(exc) or attempt == 4:
                raise
            time.sleep(0.05 * (attempt + 1))  # the other session's transaction ends


def _end_pool_sessions(conn: psycopg.Connection[tuple[object, ...]], run_id: str) -> None:
    """End the sessions of the run's pools of fresh databases (a dead worker's clone in
    flight would otherwise commit after the listing below), and wait until they are gone."""
    where = "application_name LIKE %s AND pid <> pg_backend_pid()"
    pattern = POOL_APP_PREFIX + run_id + "%"
    conn.execute(f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE {where}", (pattern,))

    def gone() -> bool:
        return conn.execute(f"SELECT count(*) FROM pg_stat_activity WHERE {where}", (pattern,)).fetchone() == (0,)

    if not poll_until(gone, 10.0):
        logger.warning("isolate: sessions of run %s's pools did not end within 10s", run_id)


def drop_run_objects(server: PostgresServer, run_id: str) -> list[str]:
    """Drop the databases, schemas and roles of run ``run_id``; what was dropped. Safe
    to run while another process drops the same run: what is gone is skipped, and a
    failure is one :class:`~isolate.ExternalServerError` naming the server and the run."""
    pattern, like = _run_names(run_id), f"isolate\\_%\\_{run_id}"
    dropped: list[str] = []
    try:
        with psycopg.connect(server.admin_dsn, autocommit=True) as conn:
            _end_pool_sessions(conn, run_id)
            roles = [r for (r,) in conn.execute("SELECT rolname FROM pg_roles WHERE rolname LIKE %s", (like,))]
            for role in filter(pattern.match, roles):  # its sessions end before its objects go
                _tolerant(conn, sql.SQL("ALTER ROLE {} NOLOGIN").format(sql.Identifier(role)))
                _tolerant(conn, end_sessions("usename", role))
            for (name,) in conn.execute("SELECT datname FROM pg_database WHERE datname LIKE %s", (like,)).fetchall():
                if pattern.match(name):
                    _tolerant(conn, sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
                    dropped.append(f"database {name}")
            for (name,) in conn.execute("SELECT nspname FROM pg_namespace WHERE nspname LIKE %s", (like,)).fetchall():
                if pattern.match(name):
                    _tolerant(conn, sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(name)))
                    dropped.append(f"schema {name}")
            for role in filter(pattern.match, roles):
                _tolerant(conn, sql.SQL("DROP OWNED BY {}").format(sql.Identifier(role)))
                _tolerant(conn, sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(role)))
                dropped.append(f"role {role}")
            if conn.execute("SELECT to_regclass(%s)", (_TABLE,)).fetchone() != (None,):
                conn.execute(sql.SQL("DELETE FROM {} WHERE run_id = %s").format(sql.Identifier(_TABLE)), (run_id,))
    except psycopg.Error as exc:
        raise ExternalServerError(
            f"could not drop run {run_id}'s objects on the external PostgreSQL "
            f"{server.host}:{server.port}: {exc}".strip(),
            hint=f"python -m isolate cleanup {run_id} tries again; a later run drops them once "
            "the run's lease is stale",
        ) from None
    return dropped


class RunLease:
    """This run's row in the server's lease table, kept fresh by a heartbeat thread."""

    def __init__(self, server: PostgresServer, run_id: str,
                 on_lost: Callable[[str], None] | None = None) -> None:  # fmt: skip
        self.server = server
        self.run_id = run_id
        #: Called (from the heartbeat thread) if the row is gone: another run took this
        #: run for dead and dropped its objects.
        self.on_lost = on_lost
        #: Why the lease was lost, or ``None``.
        self.lost: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def open(self, *, reap_stale: bool = True) -> list[str]:
        """Take the lease (and drop what runs with stale leases left); what was dropped."""
        try:
            stale = self._take(reap_stale)
        except psycopg.errors.InsufficientPrivilege as exc:
            raise ConfigError(
                f"cannot keep the run's lease on the --isolate-pg-dsn server: {exc}".strip(),
                hint=f"the DSN's role needs CREATE on the public schema of {self.server.database!r} "
                f"(or create the table {_TABLE} there for it)",
            ) from None
        except psycopg.Error as exc:
            raise ExternalServerError(
                f"cannot take run {self.run_id}'s lease on the external PostgreSQL "
                f"{self.server.host}:{self.server.port}: {exc}".strip(),
                hint="check the server's log; starting the run again takes a new lease",
            ) from None
        dropped: list[str] = []
        for run_id in stale:  # claimed by this run alone
            logger.info("isolate: run %s on the external PostgreSQL is stale; dropping its objects", run_id)
            try:
                dropped += drop_run_objects(self.server, run_id)
            except ExternalServerError as exc:  # not this run's problem: its claim goes stale
                logger.warning("isolate: %s", exc)  # again, and a later run tries once more
        self._thread = threading.Thread(target=self._beat, name=f"isolate-lease-{self.run_id}", daemon=True)
        self._thread.start()
        return dropped

    def _take(self, reap_stale: bool) -> list[str]:
        table = sql.Identifier(_TABLE)
        with psycopg.connect(self.server.admin_dsn, autocommit=True) as conn, conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (_LOCK,))
            conn.execute(sql.SQL(
                "CREATE TABLE IF NOT EXISTS {} (run_id text PRIMARY KEY, host text, pid int, "
                "started timestamptz DEFAULT now(), heartbeat timestamptz DEFAULT now(), "
                "kept boolean DEFAULT false)").format(table))  # fmt: skip
            conn.execute(sql.SQL("INSERT INTO {} (run_id, host, pid) VALUES (%s, %s, pg_backend_pid())").format(table),
                         (self.run_id, socket.gethostname()))  # fmt: skip
            # Claimed under the lock: a claimed run's heartbeat is new again, so a shard
            # starting at the same moment does not drop it too (and if this run dies while
            # dropping, the claim goes stale and a later run finishes the job).
            stale = [r for (r,) in conn.execute(sql.SQL(
                "UPDATE {} SET heartbeat = now() WHERE NOT kept AND run_id <> %s "
                "AND heartbeat < now() - make_interval(secs => %s) RETURNING run_id"
                ).format(table),
                (self.run_id, STALE_AFTER_S))] if reap_stale else []  # fmt: skip
        return stale

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S) and self.beat():
            pass

    def beat(self) -> bool:
        """Refresh the heartbeat once; ``False`` once the lease is lost (its row is gone)."""
        update = sql.SQL("UPDATE {} SET heartbeat = now() WHERE run_id = %s").format(sql.Identifier(_TABLE))
        try:
            with psycopg.connect(self.server.admin_dsn, autocommit=True, connect_timeout=5) as conn:
                found = conn.execute(update, (self.run_id,)).rowcount
        except psycopg.Error as exc:  # the next beat may get through
            logger.warning("isolate: lease heartbeat on the external PostgreSQL failed: %s", exc)
            return True
        if found == 0 and not self._stop.is_set():
            self.lost = (
                f"run {self.run_id}'s lease on the external PostgreSQL {self.server.host}:"
                f"{self.server.port} is gone: another run took this one for dead (no heartbeat "
                f"for {STALE_AFTER_S:.0f}s) and dropped its schemas, databases and roles"
            )
            logger.error("isolate: %s", self.lost, extra=NOTICE)
            if self.on_lost is not None:
                self.on_lost(self.lost)
            return False
        return True

    def close(self, *, kept: bool = False) -> None:
        """Stop the heartbeat and remove the row (call it after :func:`drop_run_objects`);
        a ``kept`` run's row is marked instead, so that no run takes it for stale:
        ``python -m isolate cleanup RUN`` drops its objects and the row."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=HEARTBEAT_S + 5)
        query = "UPDATE {} SET kept = true WHERE run_id = %s" if kept else "DELETE FROM {} WHERE run_id = %s"
        with psycopg.connect(self.server.admin_dsn, autocommit=True) as conn:
            conn.execute(sql.SQL(query).format(sql.Identifier(_TABLE)), (self.run_id,))
