"""PostgreSQL access: a small connection pool wrapper with fail-fast health state.

The service must notice a database outage quickly (so writes can fail over to
the dead-letter queue) and notice the recovery quickly (so the queue drains).
``psycopg_pool`` alone is built to *wait* for the database; this module adds:

* a liveness check of every connection taken from the pool (an empty query,
  like ``ConnectionPool.check_connection`` in psycopg_pool >= 3.2, done here so
  it also works with 3.1), discarding connections whose backend is gone;
* a short pool timeout, so a pool that cannot connect fails within
  ``DB_POOL_TIMEOUT`` instead of the usual 30 s;
* a client-side deadline on every operation (statement_timeout covers slow
  queries, the deadline also covers a server that stopped answering);
* a three-state health flag (unknown/up/down). While *down* callers are told
  immediately (no waiting on the pool); the DLQ drainer probes periodically
  and flips it back to *up*.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import math
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from datetime import datetime
from typing import TYPE_CHECKING, Any

import psycopg
from psycopg.conninfo import conninfo_to_dict
from psycopg.types.json import Jsonb
from psycopg_pool import AsyncConnectionPool

from datastorage.events import Event
from datastorage.validation import ListQuery

if TYPE_CHECKING:
    from psycopg import AsyncConnection

log = logging.getLogger(__name__)

_COLUMNS = "id, event_type, actor, correlation_id, occurred_at, payload, received_at"

_INSERT_ONE = f"""
INSERT INTO audit_events ({_COLUMNS})
VALUES (%s, %s, %s, %s, %s, %s, %s)
ON CONFLICT (id) DO NOTHING
RETURNING {_COLUMNS}
"""

_INSERT_MANY = f"""
INSERT INTO audit_events ({_COLUMNS})
SELECT * FROM unnest(
    %s::uuid[], %s::text[], %s::text[], %s::text[], %s::timestamptz[], %s::jsonb[], %s::timestamptz[]
)
ON CONFLICT (id) DO NOTHING
RETURNING id
"""

_SELECT_ONE = f"SELECT {_COLUMNS} FROM audit_events WHERE id = %s"

_SCHEMA_VERSION = (
    "SELECT version, name, applied_at FROM schema_version ORDER BY version DESC LIMIT 1"
)


class DatabaseUnavailable(Exception):
    """PostgreSQL cannot be used right now (connection, timeout or outage)."""


class Health(enum.Enum):
    UNKNOWN = "unknown"
    UP = "up"
    DOWN = "down"


def _row_to_event(row: Sequence[Any]) -> Event:
    return Event(
        id=row[0],
        event_type=row[1],
        actor=row[2],
        correlation_id=row[3],
        occurred_at=row[4],
        payload=row[5],
        received_at=row[6],
    )


class Database:
    def __init__(
        self,
        conninfo: str,
        *,
        timeout: float,
        pool_timeout: float,
        min_size: int,
        max_size: int,
        on_health_change: Callable[[Health], None] | None = None,
    ) -> None:
        # Fail at startup (not at the first request) on an unparsable DATABASE_URL.
        params = conninfo_to_dict(conninfo)
        options = params.get("options") or ""
        options = f"{options} -c statement_timeout={int(timeout * 1000)}".strip()
        self._kwargs: dict[str, Any] = {
            "autocommit": True,
            # libpq only knows whole seconds, and treats values below 2 as 2.
            "connect_timeout": max(2, math.ceil(timeout)),
            "options": options,
        }
        if "application_name" not in params:
            self._kwargs["application_name"] = "datastorage"
        self._conninfo = conninfo
        self._timeout = timeout
        self._pool_timeout = pool_timeout
        self._min_size = min_size
        self._max_size = max_size
        self._on_health_change = on_health_change
        self._pool: AsyncConnectionPool[AsyncConnection[Any]] | None = None
        self.health = Health.UNKNOWN

    # ------------------------------------------------------------------ lifecycle

    async def open(self) -> None:
        """Open the pool without waiting for it to fill (the DB may be down)."""
        self._pool = AsyncConnectionPool(
            self._conninfo,
            kwargs=self._kwargs,
            min_size=self._min_size,
            max_size=self._max_size,
            open=False,
            name="datastorage",
            timeout=self._pool_timeout,
            # Give up background reconnection attempts quickly; new ones are
            # started on demand, so recovery is noticed within ~1 s.
            reconnect_timeout=max(1.0, self._timeout),
            max_idle=60.0,
        )
        await self._pool.open(wait=False)

    async def close(self) -> None:
        if self._pool is not None:
            pool, self._pool = self._pool, None
            await pool.close(timeout=2.0)

    # ------------------------------------------------------------------ health

    def _set_health(self, health: Health, reason: object = None) -> None:
        if health is self.health:
            return
        previous, self.health = self.health, health
        if health is Health.DOWN:
            log.warning("database unavailable (was %s): %s", previous.value, reason)
        elif health is Health.UP:
            log.info("database available (was %s)", previous.value)
        if self._on_health_change is not None:
            self._on_health_change(health)

    @property
    def is_down(self) -> bool:
        return self.health is Health.DOWN

    @asynccontextmanager
    async def connection(self) -> AsyncIterator[AsyncConnection[Any]]:
        """A checked connection; raises DatabaseUnavailable on any outage.

        Does not consult the health flag (see :meth:`session`).
        """
        pool = self._pool
        if pool is None:
            raise DatabaseUnavailable("database pool is closed")
        try:
            async with asyncio.timeout(self._pool_timeout + self._timeout + 0.5):
                conn = await self._checked_connection(pool)
                try:
                    yield conn
                finally:
                    await pool.putconn(conn)
        except (psycopg.OperationalError, TimeoutError) as exc:
            # PoolTimeout/PoolClosed are OperationalErrors too.
            reason = str(exc) or f"no answer within {self._pool_timeout + self._timeout + 0.5:g}s"
            self._set_health(Health.DOWN, reason)
            raise DatabaseUnavailable(reason) from exc
        self._set_health(Health.UP)

    async def _checked_connection(
        self, pool: AsyncConnectionPool[AsyncConnection[Any]]
    ) -> AsyncConnection[Any]:
        deadline = asyncio.get_running_loop().time() + self._pool_timeout
        # Every idle connection may be dead (backends terminated), so allow
        # discarding up to max_size of them before waiting for a new one.
        for _ in range(self._max_size + 1):
            remaining = deadline - asyncio.get_running_loop().time()
            conn = await pool.getconn(timeout=max(remaining, 0.01))
            try:
                await conn.execute("")
            except psycopg.Error as exc:
                log.debug("discarding dead pooled connection: %s", exc)
                await pool.putconn(conn)  # a broken connection is dropped and replaced
                continue
            return conn
        raise psycopg.OperationalError("no working database connection available")

    @asynccontextmanager
    async def session(self) -> AsyncIterator[AsyncConnection[Any]]:
        """Like :meth:`connection`, but fails immediately while marked down."""
        if self.health is Health.DOWN:
            raise DatabaseUnavailable("database is marked unavailable")
        async with self.connection() as conn:
            yield conn

    async def probe(self) -> bool:
        """Check the database, updating the health flag. Never raises."""
        try:
            async with self.connection():
                pass
        except DatabaseUnavailable:
            return False
        return True

    async def reachable(self, timeout: float | None = None) -> bool:
        """Whether a new connection, outside the pool, gets in within ``timeout`` seconds
        (by default the time a pooled operation gets). Never raises.

        After an outage the pool tries again on a backoff of its own (~1 s), so its
        :meth:`probe` may still fail for a while after this is true again.
        """
        if timeout is None:
            timeout = self._pool_timeout + self._timeout + 0.5
        try:
            async with asyncio.timeout(timeout):
                conn = await psycopg.AsyncConnection.connect(self._conninfo, **self._kwargs)
                await conn.close()
        except (psycopg.Error, TimeoutError):
            return False
        return True

    async def wait_up(self, deadline: float) -> bool:
        """Probe until the pool has a working connection; give up at ``deadline``
        (:func:`time.monotonic`), or as soon as a probe fails while no new connection
        gets in either (the database is really down). Never raises."""
        while not await self.probe():
            left = deadline - time.monotonic()
            if left <= 0 or not await self.reachable(left):
                return False
        return True

    # ------------------------------------------------------------------ queries

    async def insert_event(self, event: Event) -> tuple[Event, bool]:
        """Insert ``event``; returns (stored event, created). Idempotent on id."""
        async with self.session() as conn:
            cur = await conn.execute(
                _INSERT_ONE,
                (
                    event.id,
                    event.event_type,
                    event.actor,
                    event.correlation_id,
                    event.occurred_at,
                    Jsonb(event.payload),
                    event.received_at,
                ),
            )
            row = await cur.fetchone()
            if row is not None:
                return _row_to_event(row), True
            cur = await conn.execute(_SELECT_ONE, (event.id,))
            row = await cur.fetchone()
        if row is None:  # pragma: no cover - rows are never deleted
            raise RuntimeError(f"event {event.id} conflicted but cannot be read back")
        return _row_to_event(row), False

    async def insert_events(self, events: Sequence[Event], *, check_health: bool = True) -> int:
        """Insert all ``events`` in one statement (atomic); returns how many were new."""
        columns: tuple[list[Any], ...] = ([], [], [], [], [], [], [])
        for ev in events:
            for column, value in zip(
                columns,
                (
                    ev.id,
                    ev.event_type,
                    ev.actor,
                    ev.correlation_id,
                    ev.occurred_at,
                    Jsonb(ev.payload),
                    ev.received_at,
                ),
                strict=True,
            ):
                column.append(value)
        ctx = self.session() if check_health else self.connection()
        async with ctx as conn:
            cur = await conn.execute(_INSERT_MANY, columns)
            return len(await cur.fetchall())

    async def get_event(self, event_id: uuid.UUID) -> Event | None:
        async with self.session() as conn:
            cur = await conn.execute(_SELECT_ONE, (event_id,))
            row = await cur.fetchone()
        return None if row is None else _row_to_event(row)

    async def list_events(self, query: ListQuery) -> tuple[list[Event], int, bool]:
        """Returns (page of events, total matching the filters, more pages follow)."""
        where: list[str] = []
        params: dict[str, Any] = {}
        for name in ("correlation_id", "event_type", "actor"):
            value = getattr(query, name)
            if value is not None:
                where.append(f"{name} = %({name})s")
                params[name] = value
        if query.since is not None:
            where.append("occurred_at >= %(since)s")
            params["since"] = query.since
        if query.until is not None:
            where.append("occurred_at < %(until)s")
            params["until"] = query.until
        where_sql = " AND ".join(where) or "TRUE"
        page_where = where_sql
        if query.after is not None:
            page_where += " AND (occurred_at, id) > (%(after_ts)s, %(after_id)s)"
            params["after_ts"], params["after_id"] = query.after
        params["limit"] = query.limit + 1
        params["offset"] = query.offset
        # One statement, so page and total come from the same snapshot; the
        # LEFT JOIN keeps the (total) row even when the page is empty.
        sql = (
            f"SELECT c.total, p.* FROM (SELECT count(*) AS total FROM audit_events WHERE {where_sql}) c"
            f" LEFT JOIN LATERAL (SELECT {_COLUMNS} FROM audit_events WHERE {page_where}"
            " ORDER BY occurred_at, id LIMIT %(limit)s OFFSET %(offset)s) p ON TRUE"
            " ORDER BY p.occurred_at, p.id"
        )
        async with self.session() as conn:
            rows = await (await conn.execute(sql, params)).fetchall()
        total = int(rows[0][0]) if rows else 0
        events = [_row_to_event(row[1:]) for row in rows if row[1] is not None]
        more = len(events) > query.limit
        return events[: query.limit], total, more

    async def schema_version(self) -> tuple[int, str | None, datetime | None]:
        async with self.session() as conn:
            try:
                row = await (await conn.execute(_SCHEMA_VERSION)).fetchone()
            except psycopg.errors.UndefinedTable:
                return 0, None, None
        if row is None:
            return 0, None, None
        return int(row[0]), row[1], row[2]
