"""The service core: storage with dead-letter fail-over, health and lifecycle.

Independent of HTTP; :mod:`datastorage.app` maps it onto routes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Sequence
from typing import Any

from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError

from datastorage.config import Settings
from datastorage.db import Database, DatabaseUnavailable, Health
from datastorage.dlq import DeadLetterQueue, Drainer
from datastorage.events import Event
from datastorage.metrics import Metrics

log = logging.getLogger(__name__)

# What "Redis is not usable" looks like across redis-py versions.
REDIS_ERRORS: tuple[type[BaseException], ...] = (RedisError, OSError, TimeoutError)


class StorageUnavailable(Exception):
    """Neither PostgreSQL nor the Redis dead-letter queue could take the events."""


class Service:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.metrics = Metrics()
        self.shutting_down = False
        self.db = Database(
            settings.database_url,
            timeout=settings.db_timeout,
            pool_timeout=settings.db_pool_timeout,
            min_size=settings.db_pool_min,
            max_size=settings.db_pool_max,
            on_health_change=self._on_db_health,
        )
        self.redis: Redis = Redis.from_url(
            settings.redis_url,
            socket_timeout=settings.db_timeout,
            socket_connect_timeout=settings.db_timeout,
            # One immediate retry covers a connection that went stale (Redis
            # restart); newer redis-py would otherwise back off for seconds.
            retry=Retry(NoBackoff(), 1),
            retry_on_error=[RedisConnectionError],
        )
        self.dlq = DeadLetterQueue(self.redis, settings.dlq_key)
        self.drainer = Drainer(
            self.dlq,
            self.db,
            interval=settings.dlq_drain_interval,
            error_delay=settings.dlq_error_delay,
            redis_errors=REDIS_ERRORS,
            on_drained=self.metrics.dlq_drained.inc,
            on_depth=self.metrics.dlq_depth.set,
            on_error=self.metrics.dlq_drain_errors.inc,
        )
        self._started = False
        self._stopping: asyncio.Task[None] | None = None
        self._stop_deadline: float | None = None
        self.metrics.db_up.set(0)

    def _on_db_health(self, health: Health) -> None:
        self.metrics.db_up.set(1 if health is Health.UP else 0)
        if health is Health.UP:
            self.drainer.wake()

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        self._started = True
        await self.db.open()
        self.drainer.start()
        log.info("service started (dlq key %r)", self.settings.dlq_key)

    def begin_shutdown(self, deadline: float | None = None) -> None:
        """Report not-ready from now on; ``deadline`` (monotonic) bounds the final DLQ flush."""
        if not self.shutting_down:
            log.info("shutdown requested: readiness now reports 503")
        self.shutting_down = True
        if deadline is not None:
            self._stop_deadline = deadline

    async def stop(self) -> None:
        """Stop background work, flush the DLQ if possible, close connections. Idempotent."""
        if self._stopping is None:
            self._stopping = asyncio.get_running_loop().create_task(self._stop())
        await asyncio.shield(self._stopping)

    async def _stop(self) -> None:
        self.shutting_down = True
        if not self._started:
            await self._close_redis()
            return
        deadline = self._stop_deadline or time.monotonic() + max(
            self.settings.shutdown_timeout, 1.0
        )
        deadline = max(deadline, time.monotonic() + 1.0)
        await self.drainer.stop()
        try:
            # Back from an outage, the pool may still wait out its reconnect backoff:
            # one failed probe must not leave what the DLQ holds behind.
            if not self.db.is_down or await self.db.wait_up(deadline):
                await self.drainer.drain(deadline=deadline)
            left = await self.dlq.depth()
        except REDIS_ERRORS as exc:
            log.warning("could not flush the DLQ, redis unavailable: %s", exc)
        except Exception:  # e.g. the table is missing: the entries stay in Redis
            log.exception("could not flush the DLQ")
        else:
            if left:
                log.warning(
                    "%d event(s) left in the DLQ (redis key %r); drained on next start",
                    left,
                    self.settings.dlq_key,
                )
            else:
                log.info("DLQ is empty")
        await self.db.close()
        await self._close_redis()
        log.info("service stopped")

    async def _close_redis(self) -> None:
        close = getattr(self.redis, "aclose", None) or self.redis.close  # redis-py >= 5 / 4.x
        with contextlib.suppress(*REDIS_ERRORS):
            await close()
            # redis-py 4.x does not close a from_url() pool on close().
            await self.redis.connection_pool.disconnect()

    # ------------------------------------------------------------------ operations

    async def _to_dlq(self, events: Sequence[Event]) -> None:
        try:
            await self.dlq.push(events)
        except REDIS_ERRORS as exc:
            log.error(
                "cannot store %d event(s): database and redis unavailable (%s)", len(events), exc
            )
            raise StorageUnavailable(str(exc)) from exc
        self.metrics.events_written.labels(stored="dlq").inc(len(events))
        self.metrics.dlq_depth.inc(len(events))

    async def write_event(self, event: Event) -> tuple[int, dict[str, Any]]:
        """Store one event. Returns (HTTP status, body)."""
        if not self.db.is_down:
            try:
                stored, created = await self.db.insert_event(event)
            except DatabaseUnavailable:
                pass
            else:
                if created:
                    self.metrics.events_written.labels(stored="db").inc()
                return (201 if created else 200), {**stored.to_api(), "stored": "db"}
        await self._to_dlq([event])
        return 202, {**event.to_api(), "stored": "dlq"}

    async def write_batch(self, events: Sequence[Event]) -> tuple[int, dict[str, Any]]:
        """Store all events or none. Returns (HTTP status, body)."""
        ids = [str(event.id) for event in events]
        if not self.db.is_down:
            try:
                created = await self.db.insert_events(events)
            except DatabaseUnavailable:
                pass
            else:
                self.metrics.events_written.labels(stored="db").inc(created)
                status = 201 if created else 200
                return status, {"ids": ids, "count": len(ids), "created": created, "stored": "db"}
        await self._to_dlq(events)
        return 202, {"ids": ids, "count": len(ids), "stored": "dlq"}

    async def readiness(self) -> str | None:
        """None when ready, else the reason."""
        if self.shutting_down:
            return "shutting_down"
        if self.db.is_down or not await self.db.probe():
            return "database_unavailable"
        try:
            await self.redis.ping()
        except REDIS_ERRORS:
            return "redis_unavailable"
        return None

    async def refresh_dlq_depth(self) -> None:
        with contextlib.suppress(*REDIS_ERRORS):  # else keep the last known value
            self.metrics.dlq_depth.set(await asyncio.wait_for(self.dlq.depth(), 0.5))
