"""POST /events/batch: limits, all-or-nothing validation, idempotency."""

from __future__ import annotations

import pytest
from _support import assert_problem, list_events, new_event, new_id, ts


def test_batch_returns_201_with_ids_in_order(api, cid):
    ids = [new_id() for _ in range(3)]
    response = api.post("/events/batch", json={"events": [new_event(cid, id=i) for i in ids]})
    assert response.status_code == 201, response.text
    assert response.json() == {"ids": ids, "count": 3, "created": 3, "stored": "db"}


def test_batch_generates_ids_when_missing(api, cid):
    body = api.post("/events/batch", json={"events": [new_event(cid), new_event(cid)]}).json()
    assert len(set(body["ids"])) == 2
    for event_id in body["ids"]:
        assert api.get(f"/events/{event_id}").status_code == 200


def test_batch_events_are_all_listed(api, cid):
    events = [new_event(cid, occurred_at=ts(minutes=m), actor=f"a{m}") for m in range(5)]
    ids = api.post("/events/batch", json={"events": events}).json()["ids"]
    page = list_events(api, correlation_id=cid)
    assert [item["id"] for item in page["items"]] == ids
    assert [item["actor"] for item in page["items"]] == [f"a{m}" for m in range(5)]


def test_batch_of_one_is_accepted(api, cid):
    response = api.post("/events/batch", json={"events": [new_event(cid)]})
    assert response.status_code == 201 and response.json()["count"] == 1


def test_batch_of_exactly_batch_max_is_accepted(api, cid, service_config):
    batch_max = int(service_config["BATCH_MAX"])
    response = api.post("/events/batch", json={"events": [new_event(cid) for _ in range(batch_max)]})
    assert response.status_code == 201
    assert response.json()["created"] == batch_max
    assert list_events(api, correlation_id=cid)["total"] == batch_max


def test_batch_over_batch_max_is_413_and_stores_nothing(api, cid, service_config):
    batch_max = int(service_config["BATCH_MAX"])
    response = api.post("/events/batch", json={"events": [new_event(cid) for _ in range(batch_max + 1)]})
    body = assert_problem(response, 413, "batch-too-large", fields=["events"])
    assert str(batch_max) in body["errors"][0]["message"]
    assert list_events(api, correlation_id=cid)["total"] == 0


def test_one_invalid_event_rejects_the_whole_batch(api, cid):
    events = [new_event(cid), new_event(cid), new_event(cid, actor=""), new_event(cid)]
    assert_problem(api.post("/events/batch", json={"events": events}), 400, "validation-error",
                   fields=["events[2].actor"])  # fmt: skip
    assert list_events(api, correlation_id=cid)["total"] == 0


def test_every_invalid_event_is_named(api, cid):
    events = [new_event(cid, event_type="BAD"), new_event(cid), new_event(cid, occurred_at="x"), 42]
    response = api.post("/events/batch", json={"events": events})
    assert_problem(response, 400, fields=["events[0].event_type", "events[2].occurred_at", "events[3]"])


def test_duplicate_ids_within_a_batch_are_rejected(api, cid):
    event_id = new_id()
    events = [new_event(cid, id=event_id), new_event(cid), new_event(cid, id=event_id.upper())]
    body = assert_problem(api.post("/events/batch", json={"events": events}), 400, fields=["events[2].id"])
    assert "events[0]" in body["errors"][0]["message"]
    assert list_events(api, correlation_id=cid)["total"] == 0


def test_resending_a_batch_is_idempotent(api, cid):
    events = [new_event(cid, id=new_id()) for _ in range(3)]
    first = api.post("/events/batch", json={"events": events})
    second = api.post("/events/batch", json={"events": events})
    assert first.status_code == 201
    assert second.status_code == 200
    assert second.json()["created"] == 0 and second.json()["count"] == 3
    assert list_events(api, correlation_id=cid)["total"] == 3


def test_partially_overlapping_batch_creates_only_new_events(api, cid):
    existing = new_id()
    api.post("/events", json=new_event(cid, id=existing, actor="original"))
    events = [new_event(cid, id=existing, actor="changed"), new_event(cid), new_event(cid)]
    response = api.post("/events/batch", json={"events": events})
    assert response.status_code == 201
    assert response.json()["created"] == 2 and response.json()["count"] == 3
    assert api.get(f"/events/{existing}").json()["actor"] == "original"


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({}, "events"),
        ({"events": None}, "events"),
        ({"events": []}, "events"),
        ({"events": {"a": 1}}, "events"),
        ({"events": "x"}, "events"),
        ({"events": [], "extra": 1}, "extra"),
        ([{"event_type": "a"}], "body"),
        ("events", "body"),
    ],
    ids=[
        "missing",
        "null",
        "empty",
        "object",
        "string",
        "unknown-field",
        "top-level-array",
        "top-level-string",
    ],
)
def test_malformed_batch_envelope_is_400(api, body, field):
    assert_problem(api.post("/events/batch", json=body), 400, "validation-error", fields=[field])


def test_batch_with_malformed_json_is_400(api):
    response = api.post(
        "/events/batch", content=b'{"events": [', headers={"content-type": "application/json"}
    )
    assert_problem(response, 400, "malformed-json", fields=["body"])
