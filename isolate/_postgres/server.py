"""PostgreSQL facts shared by both backends: tuning, config, connection facts."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING
from urllib.parse import quote

from .._lazy import lazy

if TYPE_CHECKING:
    import psycopg
    from psycopg import sql
else:
    psycopg = lazy("psycopg")
    sql = lazy("psycopg.sql")


__all__ = [
    "CHEAP_SCRAM", "POOL_APP_PREFIX", "POOL_CONNECTIONS", "SESSIONS_END_TIMEOUT", "PostgresConfig", "PostgresServer", "Seed",
    "end_sessions", "prepare_database", "tuned_settings", "until_gone",
]  # fmt: skip

#: Connections a worker's pool of fresh databases holds at most (``isolate/_pool.py``: the
#: fixture's, its two background threads', and one to a copy being made), on top of the worker's budget.
POOL_CONNECTIONS = 4
#: The ``application_name`` of those connections starts with this and the run id.
POOL_APP_PREFIX = "isolate-pool-"
#: Run in a session before it sets a password isolate made: the verifier takes one SCRAM
#: iteration instead of 4096 (PostgreSQL 16+; earlier servers skip it). Iterations slow the
#: guessing of a password from its verifier, and these are 144 random bits, beyond guessing;
#: the 4096 cost every connection as that role ~2.5 ms of CPU in its client (here: each
#: connection of a service's pool, a test, isolate's clean-up).
CHEAP_SCRAM = (
    "SELECT set_config('scram_iterations', '1', false) "
    "WHERE current_setting('server_version_num')::int >= 160000"
)


def tuned_settings(
    worker_count: int, conn_per_worker: int, overrides: Mapping[str, str] | None = None
) -> dict[str, str]:
    """Server settings for a throwaway test database, sized for ``worker_count``.

    Durability is traded for speed (nothing here must survive a crash); each worker
    gets ``conn_per_worker`` connections plus :data:`POOL_CONNECTIONS`, and
    ``overrides`` win over every default.
    """
    settings = {
        "fsync": "off",
        "synchronous_commit": "off",
        "full_page_writes": "off",
        "wal_level": "minimal",
        "max_wal_senders": "0",
        "max_wal_size": "1GB",
        "checkpoint_timeout": "30min",
        "max_connections": str(max(worker_count, 1) * (conn_per_worker + POOL_CONNECTIONS) + 10),
        "shared_buffers": "128MB",
        "jit": "off",
        "listen_addresses": "127.0.0.1",
        "log_min_messages": "warning",
        "log_min_error_statement": "panic",
        "log_checkpoints": "off",
        "timezone": "UTC",
    }
    settings.update(overrides or {})
    return settings


@dataclass(frozen=True)
class Seed:
    """What every fresh cluster of runs with the same ``key`` creates first (database
    mode: the migrated template). The native backend caches a cluster that holds it;
    ``create(connect)`` builds it, ``connect(dbname)`` giving a superuser connection."""

    key: str
    create: Callable[[Callable[[str], psycopg.Connection[tuple[object, ...]]]], None]


@dataclass(frozen=True)
class PostgresConfig:
    """How to start the shared server."""

    settings: Mapping[str, str]
    start_timeout: float = 60.0
    superuser: str = "isolate"
    database: str = "isolate"
    #: Native backend: start from a cached cluster that already holds this (built once).
    seed: Seed | None = None
    #: Native backend: bytes the template cache may take (least recently used entries go
    #: first, never one in use); 0: no bound.
    cache_size: int = 1 << 30


@dataclass(frozen=True)
class PostgresServer:
    """Connection facts of a running server (JSON-serialisable, shared by workers)."""

    host: str
    port: int
    user: str
    password: str
    database: str
    version: str
    backend: str = "native"
    settings: Mapping[str, str] = field(default_factory=dict)

    def dsn(
        self,
        user: str | None = None,
        password: str | None = None,
        database: str | None = None,
        search_path: str | None = None,
    ) -> str:
        """A ``postgresql://`` URL, by default the superuser's."""
        user = user or self.user
        password = self.password if password is None else password
        url = (
            f"postgresql://{quote(user, safe='')}:{quote(password, safe='')}"
            f"@{self.host}:{self.port}/{quote(database or self.database, safe='')}"
        )
        if search_path:
            url += "?options=" + quote(f"-csearch_path={search_path}", safe="")
        return url

    @property
    def admin_dsn(self) -> str:
        return self.dsn()

    def to_json(self) -> dict[str, object]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, object]) -> PostgresServer:
        return cls(**data)  # type: ignore[arg-type]


def prepare_database(server: PostgresServer) -> None:
    """Create the run's database and lock its ``public`` schema down."""
    with psycopg.connect(server.dsn(database="postgres"), autocommit=True) as conn:
        exists = conn.execute(
            "SELECT 1 FROM pg_database WHERE datname = %s", (server.database,)
        ).fetchone()
        if not exists:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(server.database)))
    with psycopg.connect(server.admin_dsn, autocommit=True) as conn:
        conn.execute("REVOKE ALL ON SCHEMA public FROM PUBLIC")


def end_sessions(where: str, value: str) -> sql.Composed:
    """End the sessions whose ``pg_stat_activity`` column ``where`` is ``value`` (but the
    one running this); rows of their pids. (The call is in the select list, evaluated only
    for the rows the ``WHERE`` keeps: in the ``WHERE`` it could run before the filter.)"""
    return sql.SQL("SELECT pid, pg_terminate_backend(pid) FROM pg_stat_activity "
                   "WHERE {} = {} AND pid <> pg_backend_pid()").format(sql.Identifier(where), sql.Literal(value))  # fmt: skip


#: Seconds the sessions :func:`end_sessions` ended get to exit (:func:`until_gone`).
SESSIONS_END_TIMEOUT = 10.0


def until_gone(conn: psycopg.Connection[tuple[object, ...]], condition: sql.Composable) -> sql.Composed:
    """Wait, in the server, until no session but this one matches ``condition``, up to
    :data:`SESSIONS_END_TIMEOUT` seconds: :func:`end_sessions` only signals them, and an
    ended session exits a moment later (longer on a loaded machine, where waiting in the
    server also saves a round trip per check)."""
    body = sql.SQL("BEGIN FOR i IN 1..{} LOOP PERFORM pg_stat_clear_snapshot(); "
                   "EXIT WHEN NOT EXISTS (SELECT FROM pg_stat_activity WHERE {} AND pid <> pg_backend_pid()); "
                   "PERFORM pg_sleep(0.001); END LOOP; END").format(
        sql.Literal(int(SESSIONS_END_TIMEOUT * 1000)), condition)  # fmt: skip
    return sql.SQL("DO {}").format(sql.Literal(body.as_string(conn)))
