"""Schema mode: a used copy whose test changed only rows and sequences is put back to its
migrated state in milliseconds, instead of being dropped and migrated again.

Two records make that safe:

- **the DDL log**: event triggers of the run (``ddl_command_end`` and ``sql_drop``),
  created once per run by the superuser in the run's database, note in
  ``isolate_ddl_<run id>.dirty`` the schema of every DDL command a worker role runs (but
  the worker's own migration, whose session is named ``isolate-migrations``): the schema
  named after the role (the worker's copy at that moment) and the schemas of the objects
  the command touched. A copy in the log is dropped and migrated again.
- **the pristine record**, taken once from a freshly migrated copy: the rows the
  migrations left in each table (COPY text, in scan order, and a digest of them), the
  value of each sequence, and the shape of the schema (its relations, columns,
  constraints, triggers, functions and types). A copy that is not in the log and has the
  same shape gets, in one transaction with triggers and foreign-key checks off
  (``session_replication_role = replica``), the rows of each table whose rows differ from
  the record deleted and the migrations' rows copied back, and its changed sequences set
  back; then it is a spare again.

Without a superuser (an external server's non-superuser DSN) there is no DDL log and
every used copy is dropped and migrated again. Schemas with foreign tables (whose rows
live elsewhere) are never recycled.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, cast

from ._database import MIGRATING
from ._lazy import lazy

if TYPE_CHECKING:
    import psycopg
    from psycopg import sql

    Conn = psycopg.Connection[tuple[object, ...]]
else:
    psycopg = lazy("psycopg")
    sql = lazy("psycopg.sql")

__all__ = ["DdlLog", "Pristine", "Recycler"]

logger = logging.getLogger(__name__)


#: One lock key for installing a run's DDL log (workers race to do it).
_INSTALL_LOCK = 0x15014F

#: The schema's shape, in names and kinds only (OIDs and the schema's own name differ
#: between copies). The DDL log is what catches DDL; this double-checks it.
_SHAPE = """
SELECT md5(concat_ws(E'\\n',
  (SELECT string_agg(concat_ws(':', c.relname, c.relkind, c.relnatts, c.relacl::text, c.relrowsecurity),
                     ',' ORDER BY c.relname) FROM pg_class c WHERE c.relnamespace = n.oid),
  (SELECT string_agg(concat_ws(':', c.relname, x.columns), ',' ORDER BY c.relname)
     FROM pg_class c, LATERAL (  -- per relation, by index: a join would scan all of pg_attribute
       SELECT string_agg(concat_ws(':', a.attname, t.typname, a.atttypmod, a.attnotnull, a.atthasdef, a.attidentity,
                                   a.attgenerated, a.attacl::text), ',' ORDER BY a.attnum) AS columns
         FROM pg_attribute a JOIN pg_type t ON t.oid = a.atttypid
        WHERE a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped) x
    WHERE c.relnamespace = n.oid),
  (SELECT string_agg(concat_ws(':', conname, contype, convalidated), ',' ORDER BY conname)
     FROM pg_constraint WHERE connamespace = n.oid),
  (SELECT string_agg(concat_ws(':', c.relname, g.tgname, g.tgenabled), ',' ORDER BY c.relname, g.tgname)
     FROM pg_trigger g JOIN pg_class c ON c.oid = g.tgrelid WHERE c.relnamespace = n.oid AND NOT g.tgisinternal),
  (SELECT string_agg(concat_ws(':', proname, prokind, pronargs, md5(prosrc), proacl::text), ','
                     ORDER BY proname, pronargs, md5(prosrc)) FROM pg_proc WHERE pronamespace = n.oid),
  (SELECT string_agg(concat_ws(':', typname, typtype), ',' ORDER BY typname) FROM pg_type WHERE typnamespace = n.oid),
  (SELECT count(*) FROM pg_description d JOIN pg_class c ON c.oid = d.objoid
    WHERE d.classoid = 'pg_class'::regclass AND c.relnamespace = n.oid),
  n.nspacl::text))
FROM pg_namespace n WHERE n.nspname = {schema}
"""

_RELATIONS = """
SELECT c.relname, c.relkind FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE n.nspname = %s AND c.relkind IN ('r', 'S', 'f') ORDER BY c.relname
"""

#: What a restore with triggers and rules off would still run: triggers and rules enabled
#: ALWAYS (they fire under ``session_replication_role = replica`` too).
_ALWAYS = """
SELECT EXISTS (SELECT FROM pg_trigger g JOIN pg_class c ON c.oid = g.tgrelid JOIN pg_namespace n ON n.oid = c.relnamespace
               WHERE n.nspname = %s AND g.tgenabled = 'A')
    OR EXISTS (SELECT FROM pg_rewrite w JOIN pg_class c ON c.oid = w.ev_class JOIN pg_namespace n ON n.oid = c.relnamespace
               WHERE n.nspname = %s AND w.ev_enabled = 'A')
"""

#: Migrations that leave more rows than this are not kept in memory: copies are migrated again.
MAX_SEED_BYTES = 64 << 20

_COLUMNS = """
SELECT a.attname FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE n.nspname = %s AND c.relname = %s AND a.attnum > 0 AND NOT a.attisdropped AND a.attgenerated = ''
ORDER BY a.attnum
"""


class DdlLog:
    """The run's DDL log (see the module's doc): ``isolate_ddl_<run id>``."""

    def __init__(self, run_id: str) -> None:
        self.run_id = run_id
        self.schema = f"isolate_ddl_{run_id}"
        self.roles = rf"^isolate_[a-z0-9_]+_{run_id}$"

    def install(self, conn: Conn) -> None:
        """Create it unless a worker of the run did (needs a superuser)."""
        schema = sql.Identifier(self.schema)
        mark = sql.Identifier(self.schema, "mark")
        body = sql.SQL("""
            BEGIN
              IF session_user::text !~ {roles} OR current_setting('application_name') = {migrating} THEN
                RETURN;  -- not a worker's session, or the worker migrating its schema
              END IF;
              INSERT INTO {dirty} (nsp) SELECT oid FROM pg_namespace WHERE nspname = session_user::text
                ON CONFLICT DO NOTHING;
              IF tg_event = 'sql_drop' THEN
                INSERT INTO {dirty} (nsp) SELECT DISTINCT n.oid FROM pg_event_trigger_dropped_objects() d
                  JOIN pg_namespace n ON n.nspname = d.schema_name ON CONFLICT DO NOTHING;
              ELSE
                INSERT INTO {dirty} (nsp) SELECT DISTINCT n.oid FROM pg_event_trigger_ddl_commands() d
                  JOIN pg_namespace n ON n.nspname = d.schema_name ON CONFLICT DO NOTHING;
              END IF;
            EXCEPTION WHEN OTHERS THEN  -- never fail a DDL command (the shape check remains)
              RAISE WARNING 'isolate: DDL log: %', SQLERRM;
            END""").format(roles=sql.Literal(self.roles), migrating=sql.Literal(MIGRATING),
                          dirty=sql.Identifier(self.schema, "dirty"))  # fmt: skip
        with conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (_INSTALL_LOCK,))
            if conn.execute("SELECT 1 FROM pg_namespace WHERE nspname = %s", (self.schema,)).fetchone():
                return
            conn.execute(sql.SQL("CREATE SCHEMA {}").format(schema))
            conn.execute(sql.SQL("CREATE TABLE {} (nsp oid PRIMARY KEY)").format(sql.Identifier(self.schema, "dirty")))
            conn.execute(sql.SQL("CREATE FUNCTION {}() RETURNS event_trigger LANGUAGE plpgsql SECURITY DEFINER "
                                 "SET search_path = pg_catalog, pg_temp AS {}").format(
                mark, sql.Literal(body.as_string(conn))))  # fmt: skip
            for event, short in (("ddl_command_end", "end"), ("sql_drop", "drop")):
                # dropped with the schema (they depend on its function), by name with the run
                conn.execute(sql.SQL("CREATE EVENT TRIGGER {} ON {} EXECUTE FUNCTION {}()").format(
                    sql.Identifier(f"isolate_ddl_{short}_{self.run_id}"), sql.SQL(event), mark))  # fmt: skip

    def dirty(self, schema: str) -> sql.Composed:
        """Whether a worker role ran DDL while ``schema`` was its copy (an expression)."""
        return sql.SQL("EXISTS (SELECT FROM {} d JOIN pg_namespace n ON n.oid = d.nsp WHERE n.nspname = {})").format(
            sql.Identifier(self.schema, "dirty"), sql.Literal(schema))  # fmt: skip


@dataclass
class Pristine:
    """What a freshly migrated copy holds (see the module's doc)."""

    shape: str
    #: Every table: the digest of its rows in scan order ("" when it has none).
    tables: dict[str, str]
    #: The tables with rows: their columns (generated ones left out) and COPY text.
    seeds: dict[str, tuple[list[str], bytes]] = field(repr=False)
    #: Every sequence: ``last_value:is_called``.
    sequences: dict[str, str]

    @classmethod
    def capture(cls, conn: Conn, schema: str) -> Pristine | None:
        """The record of ``schema``, a freshly migrated copy nobody used; ``None`` if its
        copies cannot be recycled (foreign tables, triggers or rules enabled ALWAYS, more
        than :data:`MAX_SEED_BYTES` of rows)."""
        relations = conn.execute(_RELATIONS, (schema,)).fetchall()
        always = conn.execute(_ALWAYS, (schema, schema)).fetchone()
        if any(kind == "f" for _, kind in relations) or (always and always[0]):
            return None
        tables = [str(name) for name, kind in relations if kind == "r"]
        sequences = [str(name) for name, kind in relations if kind == "S"]
        shape, _, state = _inspect(conn, schema, tables, sequences, sql.SQL("false"))
        seeds, size = {}, 0
        for table, digest in zip(tables, state, strict=False):
            if digest:
                columns = [str(c) for (c,) in conn.execute(_COLUMNS, (schema, table))]
                data = bytearray()
                query = sql.SQL("COPY (SELECT {} FROM ONLY {} ORDER BY ctid) TO STDOUT").format(
                    sql.SQL(", ").join(map(sql.Identifier, columns)), sql.Identifier(schema, table))  # fmt: skip
                with conn.cursor().copy(query) as copy:
                    for chunk in copy:
                        data += chunk
                size += len(data)
                if size > MAX_SEED_BYTES:
                    return None
                seeds[table] = (columns, bytes(data))
        return cls(shape, dict(zip(tables, state, strict=False)), seeds,
                   dict(zip(sequences, state[len(tables):], strict=True)))  # fmt: skip

    def restore(self, conn: Conn, schema: str, dirty: sql.Composable) -> bool:
        """Put ``schema`` (a used copy, its sessions gone) back to this record; ``False``
        if it cannot be (``dirty``, an SQL expression, is true, or its shape differs)."""
        try:
            shape, is_dirty, state = _inspect(conn, schema, list(self.tables), list(self.sequences), dirty)
        except psycopg.errors.UndefinedTable:  # a table went: DDL
            return False
        if is_dirty or shape != self.shape:
            return False
        tables = [t for t, now in zip(self.tables, state, strict=False) if now != self.tables[t]]
        sequences = [s for s, now in zip(self.sequences, state[len(self.tables):], strict=True)
                     if now != self.sequences[s]]  # fmt: skip
        if not tables and not sequences:
            return True
        with conn.transaction():
            conn.execute("SET LOCAL session_replication_role = replica")  # no triggers, no FK checks
            for table in tables:
                conn.execute(sql.SQL("DELETE FROM ONLY {}").format(sql.Identifier(schema, table)))
                if table in self.seeds:
                    columns, data = self.seeds[table]
                    query = sql.SQL("COPY {} ({}) FROM STDIN").format(
                        sql.Identifier(schema, table), sql.SQL(", ").join(map(sql.Identifier, columns)))  # fmt: skip
                    with conn.cursor().copy(query) as copy:
                        copy.write(data)
            for sequence in sequences:
                last, called = self.sequences[sequence].split(":")
                name = sql.Identifier(schema, sequence).as_string(conn)
                conn.execute("SELECT setval(%s::regclass, %s, %s)", (name, int(last), called == "true"))
        return True


#: The tables (of those named) whose heap has pages: only they can hold rows.
_WITH_PAGES = """
(SELECT coalesce(array_agg(c.relname::text), '{{}}') FROM pg_class c
  WHERE c.relnamespace = to_regnamespace({schema}) AND c.relname = ANY({tables}) AND c.relkind = 'r'
    AND pg_relation_size(c.oid) > 0)
"""

#: PostgreSQL 18+: every named sequence's ``last_value:is_called`` in one call each, by name.
_SEQUENCE_DATA = """
(SELECT coalesce(jsonb_object_agg(c.relname, d.last_value::text || ':' || d.is_called::text), '{{}}')
   FROM pg_class c, LATERAL pg_get_sequence_data(c.oid) d
  WHERE c.relnamespace = to_regnamespace({schema}) AND c.relname = ANY({sequences}) AND c.relkind = 'S')
"""


def _inspect(conn: Conn, schema: str, tables: list[str], sequences: list[str],
             dirty: sql.Composable) -> tuple[str, bool, list[str]]:  # fmt: skip
    """The schema's shape, the value of ``dirty``, and the state of each table (the
    digest of its own rows in scan order, "" if none) and then of each sequence
    (``last_value:is_called``). One query, and a second for the tables with pages (a
    table whose heap has none holds no rows: it is not read, which costs the most on a
    copy this session has not opened before)."""
    literal = sql.Literal(schema)
    if conn.info.server_version >= 180000:
        seq_state = sql.SQL(_SEQUENCE_DATA).format(schema=literal, sequences=sql.Literal(sequences))
    else:  # a subquery each, in their order
        parts = [sql.SQL("(SELECT last_value::text || ':' || is_called::text FROM {})").format(
            sql.Identifier(schema, s)) for s in sequences]  # fmt: skip
        seq_state = sql.SQL("ARRAY[{}]::text[]").format(sql.SQL(", ").join(parts) if parts else sql.SQL(""))
    row = conn.execute(sql.SQL("SELECT ({}), {}, {}, {}").format(
        sql.SQL(_SHAPE).format(schema=literal), dirty,
        sql.SQL(_WITH_PAGES).format(schema=literal, tables=sql.Literal(tables)), seq_state)).fetchone()  # fmt: skip
    assert row is not None
    pages = set(cast("list[str]", row[2]))
    with_pages = [t for t in tables if t in pages]
    digests: dict[str, str] = {}
    if with_pages:
        parts = [
            sql.SQL("(SELECT coalesce(md5(string_agg(r::text, E'\\n' ORDER BY r.ctid)), '') FROM ONLY {} r)").format(
                sql.Identifier(schema, t))
            for t in with_pages
        ]  # fmt: skip
        found = conn.execute(sql.SQL("SELECT ARRAY[{}]::text[]").format(sql.SQL(", ").join(parts))).fetchone()
        assert found is not None
        digests = dict(zip(with_pages, (str(v) for v in found[0]), strict=True))  # type: ignore[attr-defined]
    seq_state_row = cast("dict[str, str] | list[str]", row[3])
    values = seq_state_row if isinstance(seq_state_row, dict) else dict(zip(sequences, seq_state_row, strict=True))
    state = [digests.get(t, "") for t in tables] + [str(values.get(s, "")) for s in sequences]
    return str(row[0] or ""), bool(row[1]), state


class Recycler:
    """A worker's recycling of used schema copies: the run's DDL log and the record of a
    freshly migrated copy."""

    def __init__(self, run_id: str) -> None:
        self.log = DdlLog(run_id)
        self.pristine: Pristine | None = None
        self.usable = True

    def start(self, conn: Conn) -> None:
        """Make sure the DDL log exists; without it (no superuser) nothing is recycled."""
        try:
            self.log.install(conn)
        except psycopg.Error as exc:
            logger.info("isolate: used schema copies are migrated again, not recycled: %s", exc)
            self.usable = False

    def record(self, conn: Conn, schema: str) -> None:
        """Take the pristine record from ``schema`` (a fresh copy) if there is none yet."""
        if self.usable and self.pristine is None:
            self.pristine = Pristine.capture(conn, schema)
            self.usable = self.pristine is not None

    def recycle(self, conn: Conn, schema: str) -> bool:
        """Put ``schema`` (a used copy, its sessions gone) back to its migrated state;
        ``False`` if it must be dropped instead."""
        if not self.usable or self.pristine is None:
            return False
        return self.pristine.restore(conn, schema, self.log.dirty(schema))
