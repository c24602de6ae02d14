"""The Redis dead-letter queue and its drainer.

Layout (``KEY`` is ``DLQ_KEY``):

* ``KEY``            pending events; producers LPUSH, the drainer takes from the right (FIFO).
* ``KEY:processing`` events claimed by the drainer (LMOVE), removed (LREM) only
  after PostgreSQL committed them. Whatever is left here after a crash or a
  failed insert is retried first, so an event is never lost; inserts are
  idempotent (ON CONFLICT (id) DO NOTHING), so retrying is harmless.
* ``KEY:dead``       entries that can never be inserted (undecodable, or rejected
  by PostgreSQL with a data error). Kept for inspection, not retried.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, cast

import psycopg

from datastorage.db import Database, DatabaseUnavailable
from datastorage.events import Event

if TYPE_CHECKING:
    from redis.asyncio import Redis

log = logging.getLogger(__name__)

DRAIN_CHUNK = 100
# PostgreSQL rejecting the entry itself: such an entry can never be inserted and
# is moved to KEY:dead. Any other error (missing table, permissions, outage)
# leaves the entries queued for a later attempt.
_POISON = (psycopg.DataError, psycopg.IntegrityError)


class DeadLetterQueue:
    def __init__(self, redis: Redis, key: str) -> None:
        self.redis = redis
        self.key = key
        self.processing_key = f"{key}:processing"
        self.dead_key = f"{key}:dead"

    async def push(self, events: Sequence[Event]) -> None:
        """Append events atomically (one LPUSH)."""
        await self.redis.lpush(self.key, *(event.to_dlq() for event in events))

    async def lengths(self) -> tuple[int, int]:
        """(pending, claimed) entry counts, in one round trip."""
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.llen(self.key)
            pipe.llen(self.processing_key)
            pending, claimed = await pipe.execute()
        return int(pending), int(claimed)

    async def depth(self) -> int:
        """Events not yet in PostgreSQL (pending + claimed)."""
        return sum(await self.lengths())

    async def claim(self, limit: int, *, pending: int, claimed: int) -> list[bytes]:
        """Entries to insert next, oldest first: the leftovers of an earlier
        attempt if there are any (``claimed``), else up to ``limit`` pending ones."""
        if claimed:
            leftovers = cast(list[bytes], await self.redis.lrange(self.processing_key, 0, -1))
            return leftovers[::-1]
        if not pending:
            return []
        async with self.redis.pipeline(transaction=False) as pipe:
            for _ in range(min(pending, limit)):
                pipe.lmove(self.key, self.processing_key, "RIGHT", "LEFT")
            moved: list[bytes | None] = await pipe.execute()
        return [raw for raw in moved if raw is not None]

    async def ack(self, entries: Sequence[bytes]) -> None:
        """Forget entries that are now stored in PostgreSQL."""
        async with self.redis.pipeline(transaction=True) as pipe:
            for raw in entries:
                pipe.lrem(self.processing_key, 1, cast(Any, raw))  # bytes are fine at runtime
            await pipe.execute()

    async def bury(self, entries: Sequence[bytes]) -> None:
        """Move entries that can never be inserted to the dead list."""
        async with self.redis.pipeline(transaction=True) as pipe:
            for raw in entries:
                pipe.rpush(self.dead_key, raw)
                pipe.lrem(self.processing_key, 1, cast(Any, raw))  # bytes are fine at runtime
            await pipe.execute()


class Drainer:
    """Moves dead-lettered events into PostgreSQL whenever it is reachable."""

    def __init__(
        self,
        dlq: DeadLetterQueue,
        db: Database,
        *,
        interval: float,
        error_delay: float,
        redis_errors: tuple[type[BaseException], ...],
        on_drained: Callable[[int], None],
        on_depth: Callable[[int], None],
        on_error: Callable[[], None],
    ) -> None:
        self._dlq = dlq
        self._db = db
        self._interval = interval
        self._error_delay = error_delay
        self._redis_errors = redis_errors
        self._on_drained = on_drained
        self._on_depth = on_depth
        self._on_error = on_error
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._redis_ok = True
        self._wake = asyncio.Event()

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="dlq-drainer")

    def wake(self) -> None:
        """Run a cycle now instead of at the next tick."""
        self._wake.set()

    async def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._task is not None:
            task, self._task = self._task, None
            try:
                await asyncio.wait_for(task, timeout=5.0)
            except TimeoutError:  # wait_for has cancelled it; entries stay in :processing
                log.warning("DLQ drainer did not stop in time; cancelled")

    async def _run(self) -> None:
        while not self._stop.is_set():
            delay = self._interval
            try:
                await self.cycle()
            except Exception:
                # E.g. the table is missing or not writable: entries stay queued.
                log.exception("DLQ drain cycle failed; retrying in %gs", self._error_delay)
                self._on_error()
                delay = max(delay, self._error_delay)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=delay)
            self._wake.clear()

    async def cycle(self, deadline: float | None = None) -> int:
        """One round: probe the DB if it is down, then drain. Returns events drained."""
        if self._db.is_down and not await self._db.probe():
            await self._refresh_depth()
            return 0
        try:
            return await self.drain(deadline)
        except self._redis_errors as exc:
            self._redis_state(ok=False, exc=exc)
            return 0

    async def drain(self, deadline: float | None = None) -> int:
        """Drain until the queue is empty, the DB fails or ``deadline`` (monotonic) passes."""
        total = 0
        while True:
            pending, claimed = await self._dlq.lengths()  # one round trip when idle
            self._redis_state(ok=True)
            self._on_depth(pending + claimed)
            if not (pending or claimed):
                break
            if self._stop.is_set() and deadline is None:
                break
            if deadline is not None and time.monotonic() >= deadline:
                break
            entries = await self._dlq.claim(DRAIN_CHUNK, pending=pending, claimed=claimed)
            if not entries:
                continue  # raced with another drainer
            try:
                total += await self._insert(entries)
            except DatabaseUnavailable:
                break  # entries stay claimed; retried once the DB is back
        if total:
            log.info("drained %d event(s) from the DLQ into PostgreSQL", total)
        return total

    async def _insert(self, entries: list[bytes]) -> int:
        events: list[Event] = []
        good: list[bytes] = []
        bad: list[bytes] = []
        for raw in entries:
            try:
                events.append(Event.from_dlq(raw))
                good.append(raw)
            except ValueError as exc:
                log.error("burying undecodable DLQ entry (%s): %.200r", exc, raw)
                bad.append(raw)
        if bad:
            await self._dlq.bury(bad)
        if not events:
            return 0
        try:
            await self._db.insert_events(events, check_health=False)
        except _POISON as exc:
            # A bad entry must not block the others: find it, one by one.
            log.warning("batch insert from the DLQ failed (%s); retrying entry by entry", exc)
            return await self._insert_one_by_one(events, good)
        await self._dlq.ack(good)
        self._on_drained(len(good))
        return len(good)

    async def _insert_one_by_one(self, events: list[Event], entries: list[bytes]) -> int:
        done = 0
        for event, raw in zip(events, entries, strict=True):
            try:
                await self._db.insert_events([event], check_health=False)
            except _POISON as exc:
                log.error("burying DLQ entry %s rejected by PostgreSQL: %s", event.id, exc)
                await self._dlq.bury([raw])
                continue
            await self._dlq.ack([raw])
            self._on_drained(1)
            done += 1
        return done

    async def _refresh_depth(self) -> None:
        try:
            self._on_depth(await self._dlq.depth())
        except self._redis_errors as exc:
            self._redis_state(ok=False, exc=exc)
        else:
            self._redis_state(ok=True)

    def _redis_state(self, *, ok: bool, exc: Any = None) -> None:
        if ok and not self._redis_ok:
            log.info("redis available again")
        elif not ok and self._redis_ok:
            log.warning("redis unavailable: %s", exc)
        self._redis_ok = ok
