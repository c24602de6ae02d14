"""POST /events and GET /events/{id}: the single-event write and read API."""

from __future__ import annotations

import uuid
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from _support import NO_TLS, assert_problem, eventually, list_events, new_event, new_id, ts


def test_post_event_returns_201_with_location_and_stored_db(api, cid):
    response = api.post("/events", json=new_event(cid))
    assert response.status_code == 201, response.text
    body = response.json()
    assert body["stored"] == "db"
    assert response.headers["location"] == f"/events/{body['id']}"
    uuid.UUID(body["id"])


def test_post_event_echoes_every_field(api, cid):
    sent = new_event(cid, event_type="order.created", actor="bob", payload={"order": 7})
    body = api.post("/events", json=sent).json()
    for field in ("event_type", "actor", "correlation_id", "payload"):
        assert body[field] == sent[field]
    assert body["occurred_at"] == sent["occurred_at"]
    assert body["received_at"].endswith("Z")


def test_get_event_returns_what_was_stored(api, cid):
    created = api.post("/events", json=new_event(cid)).json()
    response = api.get(f"/events/{created['id']}")
    assert response.status_code == 200
    fetched = response.json()
    assert "stored" not in fetched
    assert fetched == {k: v for k, v in created.items() if k != "stored"}


def test_client_supplied_id_is_kept(api, cid):
    event_id = new_id()
    body = api.post("/events", json=new_event(cid, id=event_id)).json()
    assert body["id"] == event_id
    assert api.get(f"/events/{event_id}").status_code == 200


def test_uppercase_client_id_is_normalised(api, cid):
    event_id = new_id()
    body = api.post("/events", json=new_event(cid, id=event_id.upper())).json()
    assert body["id"] == event_id


def test_repeated_id_is_idempotent_200_and_keeps_the_original(api, cid):
    event_id = new_id()
    first = api.post("/events", json=new_event(cid, id=event_id, actor="alice"))
    second = api.post("/events", json=new_event(cid, id=event_id, actor="mallory"))
    assert first.status_code == 201
    assert second.status_code == 200
    assert second.json()["actor"] == "alice"
    assert second.headers["location"] == f"/events/{event_id}"
    listing = api.get("/events", params={"correlation_id": cid}).json()
    assert listing["total"] == 1


def test_occurred_at_defaults_to_now(api, cid):
    body = new_event(cid)
    del body["occurred_at"]
    created = api.post("/events", json=body).json()
    assert created["occurred_at"] == created["received_at"]


def test_occurred_at_null_defaults_to_now(api, cid):
    created = api.post("/events", json=new_event(cid, occurred_at=None)).json()
    assert created["occurred_at"] == created["received_at"]


@pytest.mark.parametrize(
    ("sent", "stored"),
    [
        ("2024-05-01T14:00:00+02:00", "2024-05-01T12:00:00Z"),
        ("2024-05-01T07:30:00-04:30", "2024-05-01T12:00:00Z"),
        ("2024-05-01t12:00:00z", "2024-05-01T12:00:00Z"),
        ("2024-05-01 12:00:00Z", "2024-05-01T12:00:00Z"),
        ("2024-05-01T12:00:00.500Z", "2024-05-01T12:00:00.5Z"),
        ("2024-05-01T12:00:00.123456789Z", "2024-05-01T12:00:00.123456Z"),
        ("2024-05-01T12:00:00.000Z", "2024-05-01T12:00:00Z"),
    ],
)
def test_occurred_at_is_normalised_to_utc(api, cid, sent, stored):
    created = api.post("/events", json=new_event(cid, occurred_at=sent)).json()
    assert created["occurred_at"] == stored
    assert api.get(f"/events/{created['id']}").json()["occurred_at"] == stored


def test_payload_defaults_to_empty_object(api, cid):
    body = new_event(cid)
    del body["payload"]
    assert api.post("/events", json=body).json()["payload"] == {}


def test_nested_unicode_payload_round_trips(api, cid):
    payload = {"name": "Zoë ✓ 日本", "nested": {"list": [1, 2.5, None, True, {"k": "v"}]}, "n": -3}
    created = api.post("/events", json=new_event(cid, payload=payload)).json()
    assert api.get(f"/events/{created['id']}").json()["payload"] == payload


def test_unicode_actor_round_trips(api, cid):
    created = api.post("/events", json=new_event(cid, actor="Ørjan Ünal")).json()
    assert api.get(f"/events/{created['id']}").json()["actor"] == "Ørjan Ünal"


def test_written_event_is_a_row_in_this_workers_schema(api, cid, isolate_conn):
    created = api.post("/events", json=new_event(cid, payload={"x": 1})).json()
    row = isolate_conn.execute(
        "SELECT event_type, actor, correlation_id, payload FROM audit_events WHERE id = %s",
        (created["id"],),
    ).fetchone()
    assert row == ("user.login", "alice", cid, {"x": 1})


def test_row_inserted_in_the_database_is_served(api, cid, isolate_conn):
    event_id = new_id()
    isolate_conn.execute(
        "INSERT INTO audit_events (id, event_type, actor, correlation_id, occurred_at, payload)"
        " VALUES (%s, 'seeded.row', 'db', %s, '2024-05-01T12:00:00Z', '{\"a\": 1}')",
        (event_id, cid),
    )
    fetched = api.get(f"/events/{event_id}").json()
    assert fetched["event_type"] == "seeded.row"
    assert fetched["payload"] == {"a": 1}
    assert fetched["occurred_at"] == ts()


def test_get_unknown_event_is_404_problem(api):
    event_id = new_id()
    body = assert_problem(api.get(f"/events/{event_id}"), 404, "event-not-found")
    assert event_id in body["detail"]


@pytest.mark.parametrize("bad", ["not-a-uuid", "12345", "0" * 32, "zzzzzzzz-zzzz-zzzz-zzzz-zzzzzzzzzzzz"])
def test_get_with_malformed_id_is_400_naming_id(api, bad):
    assert_problem(api.get(f"/events/{bad}"), 400, "validation-error", fields=["id"])


def test_get_with_uppercase_id_finds_the_event(api, cid):
    created = api.post("/events", json=new_event(cid)).json()
    assert api.get(f"/events/{created['id'].upper()}").json()["id"] == created["id"]


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("DELETE", "/events"),
        ("PUT", "/events"),
        ("PATCH", "/events/batch"),
        ("DELETE", "/events/00000000-0000-0000-0000-000000000000"),
        ("POST", "/health/ready"),
        ("POST", "/metrics"),
    ],
)
def test_unsupported_method_is_405_problem_with_allow(api, method, path):
    response = api.request(method, path)
    body = assert_problem(response, 405)
    assert body["type"] == "about:blank"
    assert "allow" in response.headers


def test_events_405_lists_get_and_post(api):
    response = api.delete("/events")
    allowed = {m.strip() for m in response.headers["allow"].split(",")}
    assert {"GET", "POST"} <= allowed


def test_unknown_path_is_404_problem(api):
    body = assert_problem(api.get("/no/such/path"), 404)
    assert body["type"] == "about:blank"


def test_schema_version_shape(api):
    body = api.get("/schema/version").json()
    assert set(body) == {"version", "name", "applied_at"}
    assert body["version"] == 2 and body["name"] == "0002_audit_events"


def test_concurrent_writes_are_all_stored(api, cid, isolate_service):
    def post(i):
        with httpx.Client(base_url=isolate_service.url, timeout=10, verify=NO_TLS) as client:
            return client.post("/events", json=new_event(cid, actor=f"w{i}")).status_code

    with ThreadPoolExecutor(8) as pool:
        statuses = list(pool.map(post, range(24)))
    assert set(statuses) <= {201, 202}  # 202: pool exhausted -> DLQ (documented); drained soon after

    def all_listed():
        assert list_events(api, correlation_id=cid, limit=50)["total"] == 24

    eventually(all_listed, timeout=20)
