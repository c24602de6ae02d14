"""A worker's warm pool of fresh databases, behind ``isolate_fresh_database``.

Two daemon threads of the worker, each on a superuser connection of its own, keep
``size`` spares ready, owned by the worker's role and named ``isolate_<worker>_s<n>_<run id>``
(:mod:`isolate._spares`: clones of the run's migrated template in database mode, schemas
migrated again in schema mode). Taking one is a swap on the fixture's own connection:
the worker's database (or schema) is renamed ``isolate_<worker>_u<n>_<run id>`` and the
spare renamed to the worker's name, and the sessions on the old one are ended. The
worker's DSN never changes, so the service under test lands in the fresh one on its next
connection. One thread (the retirer) then retires the used copy (schema mode: recycled
into a spare if its test changed only rows, :mod:`isolate._recycle`; else dropped), while
the other (the maker) makes new spares whenever fewer than ``size`` are ready or coming.

Every name carries the run id, so what a killed worker leaves goes with the run's server
or, on an external one, with the run's objects; the pool's sessions carry the
``application_name`` of :func:`~isolate._spares.pool_app_name`, which
:func:`~isolate._postgres.external.drop_run_objects` ends first, so that no clone in
flight commits after the run's objects were dropped.
"""

from __future__ import annotations

import collections
import itertools
import logging
import re
import shutil
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

from ._database import WorkerDatabase, schema_name
from ._errors import FreshDatabaseError
from ._lazy import lazy
from ._postgres.server import end_sessions
from ._spares import kept_name, pool_app_name, spares_for
from ._timings import Timings

if TYPE_CHECKING:
    import psycopg

    Conn = psycopg.Connection[tuple[object, ...]]
else:
    psycopg = lazy("psycopg")

__all__ = ["FreshPool", "pool_size", "set_aside_and_rebuild", "spare_space"]

logger = logging.getLogger(__name__)


#: Consecutive failures to make a spare after which the pool stops and says why.
MAX_FAILURES = 3
#: Seconds a test waits for a copy on its way back (recycled) before one is made anew.
STARVED_S = 2.0


def pool_size(budget: int, workers: int, clone_bytes: int | None, free_bytes: int | None) -> int:
    """Spares per worker: ``budget``, fewer if the spares of all ``workers`` would take
    more than half of ``free_bytes`` (when both sizes are known), never fewer than one."""
    if budget <= 0:
        return 0
    if not clone_bytes or free_bytes is None:
        return budget
    return max(1, min(budget, free_bytes // 2 // max(workers, 1) // clone_bytes))


def spare_space(db: WorkerDatabase, directory: Path) -> tuple[int | None, int | None]:
    """Bytes a spare takes and bytes free in ``directory`` (where the cluster lives), when
    known: clones on the native backend (a spare schema is catalog rows; a container's or
    an external server's disk is not this machine's to measure)."""
    if db.template is None or db.server.backend != "native":
        return None, None
    with psycopg.connect(db.server.admin_dsn) as conn:
        row = conn.execute("SELECT pg_database_size(%s)", (db.template,)).fetchone()
    return (int(str(row[0])) if row else None), shutil.disk_usage(directory).free


def set_aside_and_rebuild(db: WorkerDatabase, worker_slug: str, run_id: str, n: int,
                          test: str) -> dict[str, str]:  # fmt: skip
    """Without a pool: keep the worker's copy as ``test`` left it, renamed after the test,
    and rebuild the worker's; what was kept (``test``, ``name``, ``dsn``)."""
    spares = spares_for(db, run_id, worker_slug)
    name = kept_name(worker_slug, run_id, n, test)
    with psycopg.connect(db.server.admin_dsn, autocommit=True) as conn:
        spares.swap(conn, None, name)
        spares.reopen(conn, name)
    db.rebuild()
    return {"test": test, "name": name, "dsn": spares.dsn(name)}


class FreshPool:
    """One worker's spares and the threads that keep them coming (see the module's doc)."""

    def __init__(self, db: WorkerDatabase, worker_slug: str, run_id: str, size: int, timings: Timings,
                 *, wait_timeout: float = 600.0) -> None:  # fmt: skip
        self.db = db
        self.size = size
        self.slug, self.run_id = worker_slug, run_id
        self.spares = spares_for(db, run_id, worker_slug)
        self.app = pool_app_name(run_id, worker_slug)
        self.timings = timings
        self.wait_timeout = wait_timeout
        self._numbers = itertools.count(1)
        self._ready: collections.deque[str] = collections.deque()
        #: Used copies to retire, with the sessions that were ending when they were.
        self._trash: collections.deque[tuple[str, list[int]]] = collections.deque()
        self._cond = threading.Condition()
        self._waiting = 0
        #: A test has waited :data:`STARVED_S` for a copy: do not count on used ones coming back.
        self._starved = False
        self._failures = 0
        self._error: BaseException | None = None
        self._generation = 0
        self._stopping = False
        self._prepared = False
        #: Jobs under way, by thread.
        self._busy = {"make": 0, "retire": 0}
        self._threads: list[threading.Thread] = []
        self._conn: Conn | None = None  # the fixture's (this worker's main thread)

    def _name(self, kind: str) -> str:
        return schema_name(f"{self.slug}_{kind}{next(self._numbers)}", self.run_id)

    def _connect(self) -> Conn:
        return psycopg.connect(self.db.server.admin_dsn, autocommit=True, application_name=self.app)

    def _connection(self) -> Conn:
        if self._conn is None or self._conn.closed or self._conn.broken:
            self._conn = self._connect()
        return self._conn

    # -- the worker's side -------------------------------------------------------

    def start(self) -> None:
        """Start making spares in the background (idempotent)."""
        with self._cond:
            if not self._threads:
                self._threads = [
                    threading.Thread(target=self._run, args=(kind,), name=f"isolate-pool-{kind}-{self.slug}", daemon=True)
                    for kind in ("make", "retire")
                ]  # fmt: skip
                for thread in self._threads:
                    thread.start()

    def take(self) -> float:
        """Swap a spare in for the worker's database; the seconds spent waiting for one."""
        spare, waited = self._next_spare()
        self._swap(spare, self._name("u"), keep=False)
        return waited

    def set_aside(self, test: str) -> dict[str, str]:
        """Keep the worker's database as it is, renamed after ``test``, and swap a spare
        in; what was kept (``test``, ``name``, ``dsn``)."""
        spare, _ = self._next_spare()
        name = kept_name(self.slug, self.run_id, next(self._numbers), test)
        self._swap(spare, name, keep=True)
        self.spares.reopen(self._connection(), name)
        return {"test": test, "name": name, "dsn": self.spares.dsn(name)}

    def invalidate(self) -> None:
        """The migrations changed: the spares made so far are dropped, not handed out."""
        with self._cond:
            self._generation += 1
            self._trash.extend((name, []) for name in self._ready)
            self._ready.clear()
            self._cond.notify_all()

    def _next_spare(self) -> tuple[str, float]:
        started = time.monotonic()
        self.start()
        with self._cond:
            self._waiting += 1
            self._cond.notify_all()
            try:
                while not self._ready:
                    self._check_alive(started)
                    self._cond.wait(min(STARVED_S, max(0.0, started + self.wait_timeout - time.monotonic())))
                    if not self._ready and time.monotonic() - started >= STARVED_S:
                        self._starved = True  # the maker makes one, whatever is on its way back
                        self._cond.notify_all()
                spare = self._ready.popleft()
            finally:
                self._waiting -= 1
                self._starved = False
            self._cond.notify_all()  # one fewer ready: the maker makes the next
        return spare, time.monotonic() - started

    def _check_alive(self, started: float) -> None:
        if self._failures >= MAX_FAILURES:
            raise FreshDatabaseError(
                f"making a spare copy of {self.spares.current} failed {self._failures} times in a row: "
                f"{self._error}", worker=self.slug,
            ) from self._error  # fmt: skip
        if self._stopping:
            raise FreshDatabaseError("the pool of fresh databases is closed", worker=self.slug)
        if time.monotonic() - started >= self.wait_timeout:
            raise FreshDatabaseError(f"no fresh copy of {self.spares.current} within {self.wait_timeout:.0f}s",
                                     worker=self.slug)  # fmt: skip

    def _swap(self, spare: str, retire_as: str, *, keep: bool) -> None:
        try:
            pids = self.spares.swap(self._connection(), spare, retire_as)
        except psycopg.Error as exc:
            with self._cond:  # whichever of the two still exists goes
                self._trash.extend([(spare, [])] if keep else [(spare, []), (retire_as, [])])
                self._cond.notify_all()
            raise FreshDatabaseError(f"could not swap {spare} in for {self.spares.current}: {exc}",
                                     worker=self.slug) from exc  # fmt: skip
        if not keep:
            with self._cond:
                self._trash.append((retire_as, pids))
                self._cond.notify_all()

    def close(self) -> None:
        """Stop the threads (ending what they are doing) and drop every spare and used copy
        of this worker's; kept ones and the worker's own stay."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if not self._threads and self._conn is None:
            return  # never used: nothing made
        try:
            conn = self._connection()
            if any(thread.is_alive() for thread in self._threads):
                conn.execute(end_sessions("application_name", self.app))
                for thread in self._threads:
                    thread.join(timeout=30)
            slug = self.slug.replace("_", "\\_")
            mine = re.compile(rf"^isolate_{re.escape(self.slug)}_[su]\d+_{re.escape(self.run_id)}$")
            for name in self.spares.names(conn, f"isolate\\_{slug}\\_%\\_{self.run_id}"):
                if mine.match(name):
                    self.spares.drop(conn, name)
        except psycopg.Error as exc:  # the server is gone: so are the copies
            logger.debug("closing the pool of %s: %s", self.spares.current, exc)
        finally:
            if self._conn is not None:
                self._conn.close()

    # -- the threads ---------------------------------------------------------------

    def _next_make(self) -> tuple[str, list[int]] | None:
        """Under the lock, for the maker: a new spare's name, if fewer than ``size`` copies
        are ready or on their way (being made, or, where used ones are recycled, waiting
        to be), or a test waits with nothing ready nor coming (or for :data:`STARVED_S`)."""
        if self._failures >= MAX_FAILURES:
            return None
        coming = self._busy["make"] + (len(self._trash) + self._busy["retire"] if self.spares.recycles else 0)
        if len(self._ready) + coming < self.size or (self._waiting and not self._ready and (not coming or self._starved)):
            return self._name("s"), []
        return None

    def _next_retire(self) -> tuple[str, list[int]] | None:
        """Under the lock, for the retirer: the next used copy and the sessions it waits for."""
        return self._trash.popleft() if self._trash else None

    def _run(self, kind: str) -> None:
        """A thread's loop: ``make`` spares, or ``retire`` used copies (recycled into spares
        or dropped), each on a connection of its own."""
        pick = self._next_make if kind == "make" else self._next_retire
        conn: Conn | None = None
        while True:
            with self._cond:
                job = None if self._stopping else pick()
                while job is None and not self._stopping:
                    self._cond.wait()
                    job = None if self._stopping else pick()
                if job is None:
                    break  # stopping
                self._busy[kind] += 1
                generation = self._generation
            name, pids = job
            started = time.perf_counter()
            spare = None
            try:
                if conn is None or conn.closed or conn.broken:
                    conn = self._connect()
                if kind == "make":
                    self._prepare(conn)
                    self.spares.make(conn, name)
                    spare = name
                else:
                    new = self._name("s")
                    spare = new if self.spares.retire(conn, name, pids, new) else None
            except Exception as exc:
                if conn is not None:  # in whatever state the failure left it: a new one
                    conn.close()
                    conn = None
                with self._cond:
                    self._busy[kind] -= 1
                if self._stopping:
                    break
                self._failed(kind, name, exc)
                continue
            phase = "fresh_spare" if kind == "make" else "fresh_recycle" if spare else "fresh_drop"
            self.timings.add(phase, time.perf_counter() - started)
            with self._cond:
                self._busy[kind] -= 1
                if kind == "make":
                    self._failures = 0
                if spare is not None and generation == self._generation:
                    self._ready.append(spare)
                elif spare is not None:  # made for migrations since replaced
                    self._trash.append((spare, []))
                self._cond.notify_all()
        if conn is not None:
            conn.close()

    def _prepare(self, conn: Conn) -> None:
        with self._cond:
            if self._prepared:
                return
            self._prepared = True
        self.spares.prepare(conn)

    def _failed(self, kind: str, name: str, exc: Exception) -> None:
        logger.warning("isolate: could not %s %s: %s", kind, name, exc)
        with self._cond:
            if kind == "make":  # what half of it exists goes; try again after a pause
                self._failures += 1
                self._error = exc
                self._trash.append((name, []))
                self._cond.notify_all()
                if self._failures < MAX_FAILURES:
                    self._cond.wait(0.2 * self._failures)
