"""Validation of POST /events: RFC 9457 problem details that name every bad field."""

from __future__ import annotations

import json

import pytest
from _support import assert_problem, list_events, new_event


@pytest.mark.parametrize("field", ["event_type", "actor", "correlation_id"])
def test_missing_required_field(api, cid, field):
    body = new_event(cid)
    del body[field]
    problem = assert_problem(api.post("/events", json=body), 400, "validation-error", fields=[field])
    assert problem["errors"] == [{"field": field, "message": "is required"}]


@pytest.mark.parametrize("field", ["event_type", "actor", "correlation_id"])
def test_null_required_field(api, cid, field):
    assert_problem(api.post("/events", json=new_event(cid, **{field: None})), 400, fields=[field])


def test_all_missing_fields_are_reported_together(api):
    problem = assert_problem(
        api.post("/events", json={}), 400, fields=["event_type", "actor", "correlation_id"]
    )
    assert problem["title"] == "Request validation failed"
    assert problem["detail"].startswith("Invalid: ")


@pytest.mark.parametrize("field", ["event_type", "actor", "correlation_id"])
@pytest.mark.parametrize("value", [123, True, ["a"], {"a": 1}], ids=["int", "bool", "list", "object"])
def test_text_field_must_be_a_string(api, cid, field, value):
    problem = assert_problem(api.post("/events", json=new_event(cid, **{field: value})), 400, fields=[field])
    assert "must be a string" in problem["errors"][0]["message"]


@pytest.mark.parametrize("field", ["event_type", "actor", "correlation_id"])
def test_text_field_must_not_be_empty(api, cid, field):
    assert_problem(api.post("/events", json=new_event(cid, **{field: ""})), 400, fields=[field])


@pytest.mark.parametrize(("field", "max_len"), [("event_type", 100), ("actor", 200), ("correlation_id", 100)])
def test_text_field_at_max_length_is_accepted(api, cid, field, max_len):
    value = ("e" * max_len) if field != "correlation_id" else (cid + "x" * (max_len - len(cid)))
    response = api.post("/events", json=new_event(cid, **{field: value}))
    assert response.status_code == 201, response.text
    assert response.json()[field] == value


@pytest.mark.parametrize(("field", "max_len"), [("event_type", 100), ("actor", 200), ("correlation_id", 100)])
def test_text_field_over_max_length_is_rejected(api, cid, field, max_len):
    problem = assert_problem(
        api.post("/events", json=new_event(cid, **{field: "e" * (max_len + 1)})), 400, fields=[field]
    )
    assert str(max_len) in problem["errors"][0]["message"]


@pytest.mark.parametrize("event_type", ["User.Login", "user login", "user/login", "ünicode", "a*b"])
def test_event_type_charset_is_enforced(api, cid, event_type):
    assert_problem(
        api.post("/events", json=new_event(cid, event_type=event_type)), 400, fields=["event_type"]
    )


@pytest.mark.parametrize("event_type", ["a", "user.login", "svc:order-created_v2", "0.1"])
def test_event_type_charset_accepts_allowed_characters(api, cid, event_type):
    assert api.post("/events", json=new_event(cid, event_type=event_type)).status_code == 201


@pytest.mark.parametrize("field", ["actor", "correlation_id"])
def test_nul_character_is_rejected(api, cid, field):
    assert_problem(api.post("/events", json=new_event(cid, **{field: "a\u0000b"})), 400, fields=[field])


@pytest.mark.parametrize(
    "occurred_at",
    ["2024-05-01T12:00:00", "2024-05-01", "yesterday", "2024-02-30T00:00:00Z", "2024-05-01T12:00:00+24:00",
     "1714564800", "2024-05-01T25:00:00Z"],
)  # fmt: skip
def test_invalid_occurred_at_is_rejected(api, cid, occurred_at):
    assert_problem(
        api.post("/events", json=new_event(cid, occurred_at=occurred_at)), 400, fields=["occurred_at"]
    )


def test_occurred_at_must_be_a_string(api, cid):
    problem = assert_problem(
        api.post("/events", json=new_event(cid, occurred_at=1714564800)), 400, fields=["occurred_at"]
    )
    assert "string" in problem["errors"][0]["message"]


@pytest.mark.parametrize("payload", [[1, 2], "text", 5, True], ids=["list", "string", "int", "bool"])
def test_payload_must_be_an_object(api, cid, payload):
    assert_problem(api.post("/events", json=new_event(cid, payload=payload)), 400, fields=["payload"])


def test_payload_over_64_kib_is_rejected(api, cid):
    payload = {"blob": "x" * (64 * 1024)}
    assert_problem(api.post("/events", json=new_event(cid, payload=payload)), 400, fields=["payload"])


def test_payload_just_under_64_kib_is_accepted(api, cid):
    overhead = len(json.dumps({"blob": ""}, separators=(",", ":")))
    payload = {"blob": "x" * (64 * 1024 - overhead)}
    assert api.post("/events", json=new_event(cid, payload=payload)).status_code == 201


@pytest.mark.parametrize("payload", [{"k": "a\u0000b"}, {"a\u0000": 1}, {"n": ["ok", {"deep": "\u0000"}]}])
def test_payload_with_nul_is_rejected(api, cid, payload):
    assert_problem(api.post("/events", json=new_event(cid, payload=payload)), 400, fields=["payload"])


@pytest.mark.parametrize(
    "event_id", ["nope", "1234", "3fa85f6457174562b3fc2c963f66afa6", "{3fa85f64-5717-4562-b3fc-2c963f66afa6}"]
)
def test_malformed_id_is_rejected(api, cid, event_id):
    assert_problem(api.post("/events", json=new_event(cid, id=event_id)), 400, fields=["id"])


def test_id_must_be_a_string(api, cid):
    assert_problem(api.post("/events", json=new_event(cid, id=42)), 400, fields=["id"])


def test_unknown_field_is_rejected(api, cid):
    assert_problem(api.post("/events", json=new_event(cid, severity="high")), 400, fields=["severity"])


def test_received_at_cannot_be_set_by_the_client(api, cid):
    assert_problem(api.post("/events", json=new_event(cid, received_at="2024-01-01T00:00:00Z")), 400,
                   fields=["received_at"])  # fmt: skip


def test_every_problem_is_reported_at_once(api):
    body = {"event_type": "BAD TYPE", "actor": "", "occurred_at": "x", "payload": [], "id": "y", "z": 1}
    assert_problem(api.post("/events", json=body), 400,
                   fields=["event_type", "actor", "correlation_id", "occurred_at", "payload", "id", "z"])  # fmt: skip


def test_rejected_event_is_not_stored(api, cid):
    api.post("/events", json=new_event(cid, actor=""))
    assert list_events(api, correlation_id=cid)["total"] == 0


@pytest.mark.parametrize(
    "raw",
    [b"", b"   ", b"{", b"{'a': 1}", b'{"actor": NaN}', b'{"actor": Infinity}', b"\xff\xfe", b'{"a": 1e999}'],
    ids=["empty", "blank", "truncated", "single-quotes", "nan", "infinity", "not-utf8", "float-overflow"],
)
def test_malformed_json_is_a_400_naming_body(api, raw):
    response = api.post("/events", content=raw, headers={"content-type": "application/json"})
    assert_problem(response, 400, "malformed-json", fields=["body"])


@pytest.mark.parametrize("body", [[], "string", 1, None], ids=["array", "string", "number", "null"])
def test_non_object_body_is_rejected(api, body):
    assert_problem(
        api.post("/events", content=json.dumps(body).encode()), 400, "validation-error", fields=["body"]
    )


def test_problem_response_has_problem_json_content_type(api):
    response = api.post("/events", json={})
    assert response.headers["content-type"] == "application/problem+json"
