"""What a fresh copy of a worker's database is in each mode: how one is made, swapped in
under the worker's name, retired (recycled or dropped), and reached.

Database mode: clones of the run's migrated template, swapped by ``ALTER DATABASE ...
RENAME``. Schema mode: schemas migrated as the worker's role, swapped by ``ALTER SCHEMA
... RENAME``, and recycled when their test changed only rows (:mod:`isolate._recycle`).
Used by :class:`~isolate._pool.FreshPool`; every call takes a superuser's autocommit
connection.
"""

from __future__ import annotations

import contextlib
import re
from typing import TYPE_CHECKING, Protocol

from ._database import WorkerDatabase, clone_database, run_migrations, schema_name
from ._lazy import lazy
from ._postgres.server import POOL_APP_PREFIX, end_sessions, until_gone
from ._recycle import Recycler

if TYPE_CHECKING:
    import psycopg
    from psycopg import pq, sql

    Conn = psycopg.Connection[tuple[object, ...]]
else:
    psycopg = lazy("psycopg")
    pq = lazy("psycopg.pq")
    sql = lazy("psycopg.sql")

__all__ = ["DatabaseSpares", "SchemaSpares", "Spares", "kept_name", "pool_app_name", "spares_for"]


def pool_app_name(run_id: str, worker_slug: str = "") -> str:
    """The ``application_name`` of a run's pool sessions (of one worker's, with a slug)."""
    return f"{POOL_APP_PREFIX}{run_id}" + (f"-{worker_slug}" if worker_slug else "")


def kept_name(worker_slug: str, run_id: str, n: int, test: str) -> str:
    """``isolate_<worker>_k<n>_<test>_<run id>``: a failed test's copy, named after the test
    (its function and parameters, shortened to fit PostgreSQL's 63 characters)."""
    label = re.sub(r"[^a-z0-9]+", "_", test.rpartition("::")[2].lower()).strip("_") or "test"
    room = 63 - len(schema_name(f"{worker_slug}_k{n}_", run_id))
    return schema_name(f"{worker_slug}_k{n}_{label[:room].rstrip('_')}", run_id)


class Spares(Protocol):
    """What differs between the modes."""

    #: The worker's database (database mode) or schema (schema mode): the name it keeps.
    current: str
    @property
    def recycles(self) -> bool:
        """Whether :meth:`retire` may give a used copy back as a spare."""

    def prepare(self, conn: Conn) -> None:
        """Once, before the first copy is made."""

    def make(self, conn: Conn, name: str) -> None:
        """Create copy ``name``, migrated and owned by the worker's role."""

    def swap(self, conn: Conn, spare: str | None, retire_as: str) -> list[int]:
        """Rename the worker's copy ``retire_as`` and ``spare`` (if any) to the worker's
        name, and end the sessions on the old one; the pids still ending."""

    def retire(self, conn: Conn, name: str, pids: list[int], spare: str) -> bool:
        """Once sessions ``pids`` are gone, make used copy ``name`` a spare named ``spare``
        (``True``) or drop it (``False``)."""

    def reopen(self, conn: Conn, name: str) -> None:
        """Make a retired copy reachable again (kept for a failed test)."""

    def drop(self, conn: Conn, name: str) -> None:
        """Drop a copy (and end its sessions)."""

    def names(self, conn: Conn, like: str) -> list[str]:
        """The copies whose names are ``LIKE like``."""

    def dsn(self, name: str) -> str:
        """The worker role's DSN of copy ``name``."""


class DatabaseSpares:
    """Database mode: clones of the run's template, dropped after use."""

    def __init__(self, db: WorkerDatabase, app: str) -> None:
        assert db.database is not None and db.template is not None
        self.db, self.app, self.current = db, app, db.database

    @property
    def recycles(self) -> bool:
        return False

    def prepare(self, conn: Conn) -> None:
        pass

    def make(self, conn: Conn, name: str) -> None:
        assert self.db.template is not None
        clone_database(conn, self.db.server, name, self.db.template, self.db.role, application_name=self.app)

    def swap(self, conn: Conn, spare: str | None, retire_as: str) -> list[int]:
        # Two round trips, each one implicit transaction: closed to new sessions (none
        # could land in it between the end of the old ones and the rename: a database
        # with sessions cannot be renamed) and its sessions ended; then, once they are
        # gone, the renames.
        current = sql.Identifier(self.current)
        conn.execute(sql.SQL("ALTER DATABASE {} ALLOW_CONNECTIONS false; {}").format(
            current, end_sessions("datname", self.current)))  # fmt: skip
        steps = [until_gone(conn, sql.SQL("datname = {}").format(sql.Literal(self.current))),
                 sql.SQL("ALTER DATABASE {} RENAME TO {}").format(current, sql.Identifier(retire_as))]  # fmt: skip
        if spare is not None:
            steps.append(sql.SQL("ALTER DATABASE {} RENAME TO {}").format(sql.Identifier(spare), current))
        try:
            conn.execute(sql.SQL("; ").join(steps))
        except BaseException:
            with contextlib.suppress(psycopg.Error):  # still the worker's: open it again
                conn.execute(sql.SQL("ALTER DATABASE {} ALLOW_CONNECTIONS true").format(current))
            raise
        return []

    def retire(self, conn: Conn, name: str, pids: list[int], spare: str) -> bool:
        self.drop(conn, name)  # a new clone costs less than undoing a test's changes
        return False

    def reopen(self, conn: Conn, name: str) -> None:
        conn.execute(sql.SQL("ALTER DATABASE {} ALLOW_CONNECTIONS true").format(sql.Identifier(name)))

    def drop(self, conn: Conn, name: str) -> None:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))

    def names(self, conn: Conn, like: str) -> list[str]:
        return [str(n) for (n,) in conn.execute("SELECT datname FROM pg_database WHERE datname LIKE %s", (like,))]

    def dsn(self, name: str) -> str:
        db = self.db
        return db.server.dsn(user=db.role, password=db.password, database=name, search_path=db.schema)


#: End the sessions (but this one) that hold a lock on a relation of a schema; their pids.
_LOCKING = """
SELECT pid, pg_terminate_backend(pid) FROM (
  SELECT DISTINCT l.pid FROM pg_locks l JOIN pg_class c ON c.oid = l.relation
  JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = %s AND l.pid <> pg_backend_pid()) s
"""


class SchemaSpares:
    """Schema mode: schemas migrated as the worker's role; recycled after use when their
    test changed only rows and sequences, else dropped."""

    def __init__(self, db: WorkerDatabase, app: str, run_id: str) -> None:
        self.db, self.app, self.current = db, app, db.schema
        self.recycler = Recycler(run_id)

    @property
    def recycles(self) -> bool:
        return self.recycler.usable

    def prepare(self, conn: Conn) -> None:
        self.recycler.start(conn)

    def make(self, conn: Conn, name: str) -> None:
        db = self.db
        conn.execute(sql.SQL("CREATE SCHEMA {} AUTHORIZATION {}").format(sql.Identifier(name), sql.Identifier(db.role)))
        # As the worker's role, search_path the spare: what the worker's own migration saw.
        options = f"-c role={db.role} -c search_path={name}"
        with psycopg.connect(db.server.admin_dsn, application_name=self.app, options=options) as migrating:
            run_migrations(migrating, db.migrations, name)
        self.recycler.record(conn, name)

    def swap(self, conn: Conn, spare: str | None, retire_as: str) -> list[int]:
        # One round trip: the renames, committed, then the end of the role's sessions
        # (every one that exists then may have seen the old copy; from the commit on, a
        # new session is in the fresh one).
        current = sql.Identifier(self.current)
        steps = [sql.SQL("ALTER SCHEMA {} RENAME TO {}").format(current, sql.Identifier(retire_as))]
        if spare is not None:
            steps.append(sql.SQL("ALTER SCHEMA {} RENAME TO {}").format(sql.Identifier(spare), current))
        query = sql.SQL("BEGIN; {}; COMMIT; {}").format(sql.SQL("; ").join(steps), end_sessions("usename", self.db.role))
        try:
            cursor = conn.execute(query)
        except BaseException:
            if conn.info.transaction_status == pq.TransactionStatus.INERROR:
                conn.execute("ROLLBACK")
            raise
        while cursor.nextset():  # BEGIN, ALTER..., COMMIT: the pids come last
            pass
        return [int(str(pid)) for pid, ended in cursor.fetchall() if ended]

    def retire(self, conn: Conn, name: str, pids: list[int], spare: str) -> bool:
        # Another role's session (a superuser's) in a transaction that touched the copy
        # could commit into it after the check: it is ended too.
        locking = conn.execute(_LOCKING, (name,)).fetchall()
        pids = [*pids, *(int(str(pid)) for pid, ended in locking if ended)]
        if pids:  # a session that was ending could still commit into it
            conn.execute(until_gone(conn, sql.SQL("pid = ANY({})").format(sql.Literal(pids))))
        if self.recycler.recycle(conn, name):
            conn.execute(sql.SQL("ALTER SCHEMA {} RENAME TO {}").format(sql.Identifier(name), sql.Identifier(spare)))
            return True
        self.drop(conn, name)
        return False

    def reopen(self, conn: Conn, name: str) -> None:
        pass  # a schema needs no opening: the role's DSN with its search_path reaches it

    def drop(self, conn: Conn, name: str) -> None:
        conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(name)))

    def names(self, conn: Conn, like: str) -> list[str]:
        return [str(n) for (n,) in conn.execute("SELECT nspname FROM pg_namespace WHERE nspname LIKE %s", (like,))]

    def dsn(self, name: str) -> str:
        db = self.db
        return db.server.dsn(user=db.role, password=db.password, database=db.database, search_path=name)


def spares_for(db: WorkerDatabase, run_id: str, worker_slug: str) -> Spares:
    """The spares of ``db``'s mode."""
    app = pool_app_name(run_id, worker_slug)
    return DatabaseSpares(db, app) if db.database is not None else SchemaSpares(db, app, run_id)
