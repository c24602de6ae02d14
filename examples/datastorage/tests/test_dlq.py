"""Dead-letter queue: writes fall back to Redis while this worker's PostgreSQL is cut,
and are drained back once it is restored. Only this worker's role is cut."""

from __future__ import annotations

import json

import pytest
from _support import assert_problem, eventually, list_events, metric, new_event, new_id, wait_until

pytestmark = pytest.mark.dlq

DLQ = "datastorage:dlq"


def dlq_entries(redis_client, key=DLQ):
    return [json.loads(raw) for raw in redis_client.lrange(key, 0, -1)]


def test_write_while_database_is_cut_goes_to_dlq(api, cid, outage, isolate_redis_client):
    outage.cut_database()
    response = api.post("/events", json=new_event(cid))
    assert response.status_code == 202, response.text
    body = response.json()
    assert body["stored"] == "dlq"
    assert "location" not in response.headers
    assert [entry["id"] for entry in dlq_entries(isolate_redis_client)] == [body["id"]]


def test_dlq_entry_is_a_versioned_exact_copy(api, cid, outage, isolate_redis_client):
    outage.cut_database()
    sent = new_event(cid, id=new_id(), payload={"k": ["v", 1]}, occurred_at="2024-05-01T14:00:00+02:00")
    api.post("/events", json=sent)
    (entry,) = dlq_entries(isolate_redis_client)
    assert entry["v"] == 1
    assert entry["id"] == sent["id"]
    assert entry["payload"] == sent["payload"]
    assert entry["correlation_id"] == cid
    assert entry["occurred_at"].startswith("2024-05-01T12:00:00")


def test_dlq_is_drained_after_restore(api, cid, outage, isolate_redis_client):
    outage.cut_database()
    ids = [api.post("/events", json=new_event(cid)).json()["id"] for _ in range(3)]
    assert isolate_redis_client.llen(DLQ) == 3
    outage.restore_database()
    eventually(lambda: _assert_listed(api, cid, ids), timeout=20)
    wait_until(lambda: isolate_redis_client.llen(DLQ) + isolate_redis_client.llen(DLQ + ":processing") == 0)


def _assert_listed(api, cid, ids):
    page = list_events(api, correlation_id=cid)
    assert sorted(item["id"] for item in page["items"]) == sorted(ids)


def test_drained_event_keeps_its_content(api, cid, outage):
    outage.cut_database()
    sent = new_event(
        cid, payload={"nested": {"a": [1, 2]}}, actor="Zoë", occurred_at="2024-05-01T12:00:00.25Z"
    )
    accepted = api.post("/events", json=sent).json()
    outage.restore_database()
    stored = eventually(lambda: _get_ok(api, accepted["id"]), timeout=20)
    assert stored["payload"] == sent["payload"]
    assert stored["actor"] == "Zoë"
    assert stored["occurred_at"] == "2024-05-01T12:00:00.25Z"
    assert stored["received_at"] == accepted["received_at"]


def _get_ok(api, event_id):
    response = api.get(f"/events/{event_id}")
    assert response.status_code == 200, response.text
    return response.json()


def test_batch_while_database_is_cut_is_dead_lettered_and_drained(api, cid, outage, isolate_redis_client):
    outage.cut_database()
    response = api.post("/events/batch", json={"events": [new_event(cid) for _ in range(4)]})
    assert response.status_code == 202
    body = response.json()
    assert body["stored"] == "dlq" and body["count"] == 4
    assert isolate_redis_client.llen(DLQ) == 4
    outage.restore_database()
    eventually(lambda: _assert_listed(api, cid, body["ids"]), timeout=20)


def test_invalid_event_is_rejected_even_when_database_is_cut(api, cid, outage, isolate_redis_client):
    outage.cut_database()
    assert_problem(api.post("/events", json=new_event(cid, actor="")), 400, fields=["actor"])
    assert isolate_redis_client.llen(DLQ) == 0


def test_same_id_dead_lettered_twice_is_stored_once(api, cid, outage):
    outage.cut_database()
    event_id = new_id()
    assert api.post("/events", json=new_event(cid, id=event_id)).status_code == 202
    assert api.post("/events", json=new_event(cid, id=event_id)).status_code == 202
    outage.restore_database()
    eventually(lambda: _get_ok(api, event_id), timeout=20)
    wait_until(lambda: metric(api, "dlq_depth") == 0, timeout=20)
    assert list_events(api, correlation_id=cid)["total"] == 1


def test_reads_fail_with_503_problem_while_database_is_cut(api, cid, outage):
    outage.cut_database()
    api.post("/events", json=new_event(cid))  # makes the service notice the outage
    response = api.get("/events", params={"correlation_id": cid})
    assert_problem(response, 503, "database-unavailable")
    assert response.headers["retry-after"] == "1"
    assert_problem(api.get(f"/events/{new_id()}"), 503, "database-unavailable")
    assert_problem(api.get("/schema/version"), 503, "database-unavailable")


def test_readiness_reports_database_unavailable_while_liveness_stays_up(api, outage):
    outage.cut_database()
    response = eventually(lambda: _ready_status(api, 503), timeout=10)
    assert response.json() == {"status": "not_ready", "reason": "database_unavailable"}
    assert response.headers["retry-after"] == "1"
    assert api.get("/health/live").status_code == 200
    outage.restore_database()
    eventually(lambda: _ready_status(api, 200), timeout=20)


def _ready_status(api, status):
    response = api.get("/health/ready")
    assert response.status_code == status, response.text
    return response


def test_metrics_track_the_dlq_round_trip(api, cid, outage):
    written_dlq = metric(api, "events_written_total", stored="dlq")
    drained = metric(api, "dlq_drained_total")
    outage.cut_database()
    api.post("/events/batch", json={"events": [new_event(cid) for _ in range(2)]})
    api.post("/events", json=new_event(cid))
    samples_during = (metric(api, "dlq_depth"), metric(api, "database_up"))
    assert samples_during == (3, 0)
    assert metric(api, "events_written_total", stored="dlq") - written_dlq == 3
    outage.restore_database()
    wait_until(lambda: metric(api, "dlq_drained_total") - drained == 3, timeout=20)
    assert metric(api, "dlq_depth") == 0
    assert metric(api, "database_up") == 1


def test_writes_go_back_to_the_database_after_restore(api, cid, outage):
    outage.cut_database()
    assert api.post("/events", json=new_event(cid)).status_code == 202
    outage.restore_database()
    eventually(lambda: _ready_status(api, 200), timeout=20)
    response = api.post("/events", json=new_event(cid))
    assert response.status_code == 201 and response.json()["stored"] == "db"


def test_database_and_redis_both_cut_is_503_storage_unavailable(api, cid, outage):
    outage.cut_database()
    outage.cut_redis()
    response = api.post("/events", json=new_event(cid))
    assert_problem(response, 503, "storage-unavailable")
    assert response.headers["retry-after"] == "1"
    outage.restore_redis()
    outage.restore_database()
    eventually(lambda: _ready_status(api, 200), timeout=20)
    assert list_events(api, correlation_id=cid)["total"] == 0  # nothing was silently kept


def test_redis_cut_alone_keeps_writes_in_the_database(api, cid, outage):
    outage.cut_redis()
    response = api.post("/events", json=new_event(cid))
    assert response.status_code == 201 and response.json()["stored"] == "db"
    ready = eventually(lambda: _ready_status(api, 503), timeout=10)
    assert ready.json()["reason"] == "redis_unavailable"


def test_undecodable_dlq_entry_is_buried_not_retried(api, cid, isolate_redis_client, outage):
    marker = f"garbage-{new_id()}".encode()
    event_id = new_id()
    good = json.dumps({"v": 1, "id": event_id, "event_type": "ok.type", "actor": "a", "correlation_id": cid,
                       "occurred_at": "2024-05-01T12:00:00+00:00", "payload": {},
                       "received_at": "2024-05-01T12:00:01+00:00"})  # fmt: skip
    isolate_redis_client.lpush(DLQ, marker, good)
    wait_until(lambda: marker in isolate_redis_client.lrange(DLQ + ":dead", 0, -1), timeout=10)
    eventually(lambda: _get_ok(api, event_id), timeout=10)
    wait_until(lambda: isolate_redis_client.llen(DLQ) + isolate_redis_client.llen(DLQ + ":processing") == 0)


def test_dlq_entry_rejected_by_postgres_is_buried_and_siblings_are_drained(
    api, cid, isolate_redis_client, outage
):
    def entry(event_id, event_type):
        return json.dumps({"v": 1, "id": event_id, "event_type": event_type, "actor": "a", "correlation_id": cid,
                           "occurred_at": "2024-05-01T12:00:00+00:00", "payload": {},
                           "received_at": "2024-05-01T12:00:01+00:00"})  # fmt: skip

    good, bad = new_id(), new_id()
    isolate_redis_client.lpush(DLQ, entry(good, "ok.type"), entry(bad, "Not Allowed"))
    wait_until(lambda: any(bad.encode() in raw for raw in isolate_redis_client.lrange(DLQ + ":dead", 0, -1)),
               timeout=10)  # fmt: skip
    eventually(lambda: _get_ok(api, good), timeout=10)
    assert api.get(f"/events/{bad}").status_code == 404


def test_dlq_survives_a_restart_while_the_database_is_down(
    api, cid, outage, isolate_service, isolate_redis_client
):
    outage.cut_database()
    event_id = api.post("/events", json=new_event(cid)).json()["id"]
    assert isolate_service.stop() == 0  # cannot flush: the entry must stay in Redis
    assert [e["id"] for e in dlq_entries(isolate_redis_client)] == [
        event_id
    ] or event_id.encode() in b"".join(isolate_redis_client.lrange(DLQ + ":processing", 0, -1))
    outage.restore_database()
    isolate_service.start()
    eventually(lambda: _get_ok(api, event_id), timeout=20)


def test_cut_terminates_only_this_workers_sessions(isolate_database, isolate_postgres, outage):
    import psycopg

    outage.cut_database()
    with psycopg.connect(isolate_postgres.admin_dsn) as conn:
        can_login = conn.execute(
            "SELECT rolcanlogin FROM pg_roles WHERE rolname = %s", (isolate_database.role,)
        ).fetchone()[0]
        sessions = conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE usename = %s", (isolate_database.role,)
        ).fetchone()[0]
    assert can_login is False
    assert sessions == 0
    with pytest.raises(psycopg.OperationalError):
        isolate_database.connect(connect_timeout=2).close()


def test_missing_table_keeps_entries_queued_until_it_is_back(
    api, cid, isolate_redis_client, isolate_conn, outage
):
    # A non-data error (the table is gone) must not bury or drop entries: they wait in Redis.
    event_id = new_id()
    entry = json.dumps({"v": 1, "id": event_id, "event_type": "ok.type", "actor": "a", "correlation_id": cid,
                        "occurred_at": "2024-05-01T12:00:00+00:00", "payload": {},
                        "received_at": "2024-05-01T12:00:01+00:00"})  # fmt: skip
    errors = metric(api, "dlq_drain_errors_total")
    isolate_conn.execute("ALTER TABLE audit_events RENAME TO audit_events_away")
    try:
        isolate_redis_client.lpush(DLQ, entry)
        # Not only claimed: a drain round has failed on the missing table (the conftest's
        # DLQ_ERROR_DELAY makes the next round come 0.5 s later, not 5 s).
        wait_until(lambda: metric(api, "dlq_drain_errors_total") > errors, timeout=10)
        assert isolate_redis_client.lrange(DLQ + ":processing", 0, -1) == [entry.encode()]
        assert not any(event_id.encode() in raw for raw in isolate_redis_client.lrange(DLQ + ":dead", 0, -1))
    finally:
        isolate_conn.execute("ALTER TABLE audit_events_away RENAME TO audit_events")
    eventually(lambda: _get_ok(api, event_id), timeout=20)
