"""The migrated schema, checked through this worker's own role and schema."""

from __future__ import annotations

from pathlib import Path

import psycopg
import pytest
from _support import new_id

MIGRATIONS = sorted((Path(__file__).resolve().parents[1] / "migrations").glob("*.sql"))


def test_schema_version_endpoint_reports_latest_migration(api, isolate_conn):
    body = api.get("/schema/version").json()
    version, name = isolate_conn.execute(
        "SELECT version, name FROM schema_version ORDER BY version DESC LIMIT 1"
    ).fetchone()
    assert body["version"] == version == len(MIGRATIONS)
    assert body["name"] == name == MIGRATIONS[-1].stem
    assert body["applied_at"].endswith("Z")


def test_every_migration_is_recorded_once(isolate_conn):
    rows = isolate_conn.execute("SELECT version, name FROM schema_version ORDER BY version").fetchall()
    assert rows == [(i + 1, path.stem) for i, path in enumerate(MIGRATIONS)]


def test_connection_uses_this_workers_schema(isolate_conn, isolate_database):
    assert isolate_conn.execute("SELECT current_schema()").fetchone()[0] == isolate_database.schema


def test_tables_live_in_the_workers_schema(isolate_conn, isolate_database):
    rows = isolate_conn.execute(
        "SELECT tablename FROM pg_tables WHERE schemaname = current_schema() ORDER BY 1"
    ).fetchall()
    assert [r[0] for r in rows] == ["audit_events", "schema_version"]
    assert isolate_database.tables() == ["audit_events", "schema_version"]


def test_tables_are_owned_by_the_workers_role(isolate_conn, isolate_database):
    owners = isolate_conn.execute(
        "SELECT DISTINCT tableowner FROM pg_tables WHERE schemaname = current_schema()"
    ).fetchall()
    assert owners == [(isolate_database.role,)]


def test_audit_events_columns(isolate_conn):
    rows = isolate_conn.execute(
        "SELECT column_name, data_type, is_nullable FROM information_schema.columns"
        " WHERE table_schema = current_schema() AND table_name = 'audit_events' ORDER BY ordinal_position"
    ).fetchall()
    assert rows == [
        ("id", "uuid", "NO"),
        ("event_type", "text", "NO"),
        ("actor", "text", "NO"),
        ("correlation_id", "text", "NO"),
        ("occurred_at", "timestamp with time zone", "NO"),
        ("payload", "jsonb", "NO"),
        ("received_at", "timestamp with time zone", "NO"),
    ]


def test_primary_key_is_id(isolate_conn):
    rows = isolate_conn.execute(
        "SELECT a.attname FROM pg_index i JOIN pg_attribute a ON a.attrelid = i.indrelid"
        " AND a.attnum = ANY(i.indkey) WHERE i.indrelid = 'audit_events'::regclass AND i.indisprimary"
    ).fetchall()
    assert rows == [("id",)]


@pytest.mark.parametrize(
    ("index", "columns"),
    [
        ("audit_events_occurred_at_idx", "occurred_at, id"),
        ("audit_events_correlation_id_idx", "correlation_id, occurred_at, id"),
        ("audit_events_event_type_idx", "event_type, occurred_at, id"),
        ("audit_events_actor_idx", "actor, occurred_at, id"),
    ],
)
def test_listing_indexes_serve_filter_and_order(isolate_conn, index, columns):
    row = isolate_conn.execute(
        "SELECT indexdef FROM pg_indexes WHERE schemaname = current_schema() AND indexname = %s", (index,)
    ).fetchone()
    assert row is not None, f"index {index} missing"
    assert row[0].endswith(f"USING btree ({columns})")


def test_correlation_query_can_use_its_index(isolate_conn):
    with isolate_conn.transaction():
        isolate_conn.execute("SET LOCAL enable_seqscan = off")
        isolate_conn.execute("SET LOCAL enable_bitmapscan = off")
        plan = "\n".join(
            r[0] for r in isolate_conn.execute(
                "EXPLAIN SELECT * FROM audit_events WHERE correlation_id = 'x' ORDER BY occurred_at, id LIMIT 10"
            ).fetchall()
        )  # fmt: skip
    assert "audit_events_correlation_id_idx" in plan


def _insert(conn, **overrides):
    values = {"id": new_id(), "event_type": "ok.type", "actor": "a", "correlation_id": "c",
              "occurred_at": "2024-05-01T12:00:00Z", "payload": "{}"} | overrides  # fmt: skip
    conn.execute(
        "INSERT INTO audit_events (id, event_type, actor, correlation_id, occurred_at, payload)"
        " VALUES (%(id)s, %(event_type)s, %(actor)s, %(correlation_id)s, %(occurred_at)s, %(payload)s::jsonb)",
        values,
    )


@pytest.mark.parametrize(
    "overrides",
    [{"event_type": "Bad Type"}, {"event_type": ""}, {"actor": ""}, {"actor": "a" * 201},
     {"correlation_id": ""}, {"correlation_id": "c" * 101}, {"payload": "[1]"}, {"payload": '"s"'}],
    ids=["type-charset", "type-empty", "actor-empty", "actor-long", "cid-empty", "cid-long",
         "payload-array", "payload-string"],
)  # fmt: skip
def test_check_constraints_mirror_api_validation(isolate_conn, overrides):
    with pytest.raises(psycopg.errors.CheckViolation):
        _insert(isolate_conn, **overrides)


def test_duplicate_id_violates_primary_key(isolate_conn):
    event_id = new_id()
    _insert(isolate_conn, id=event_id)
    with pytest.raises(psycopg.errors.UniqueViolation):
        _insert(isolate_conn, id=event_id)


def test_received_at_defaults_to_now(isolate_conn):
    event_id = new_id()
    _insert(isolate_conn, id=event_id)
    assert isolate_conn.execute(
        "SELECT received_at > now() - interval '1 minute' FROM audit_events WHERE id = %s", (event_id,)
    ).fetchone() == (True,)


def test_workers_role_cannot_use_the_public_schema(isolate_conn, isolate_database):
    if isolate_database.database is not None:
        # --isolate-db-isolation=database: public is this worker's own database's.
        assert isolate_conn.execute("SELECT current_database()").fetchone() == (isolate_database.database,)
        return
    with pytest.raises((psycopg.errors.InsufficientPrivilege, psycopg.errors.UndefinedTable)):
        isolate_conn.execute("SELECT 1 FROM public.audit_events")
