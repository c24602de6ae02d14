"""Edge cases: body limits, odd but valid input, precedence rules, start-up configuration."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from _support import assert_problem, eventually, list_events, new_event

EXAMPLE_DIR = Path(__file__).resolve().parents[1]


def test_body_over_max_body_bytes_is_413(api, cid, service_config):
    limit = int(service_config["MAX_BODY_BYTES"])
    body = json.dumps(new_event(cid, payload={"blob": "x" * limit})).encode()
    response = api.post("/events", content=body)
    assert_problem(response, 413, "payload-too-large", fields=["body"])
    assert list_events(api, correlation_id=cid)["total"] == 0


def test_streamed_body_over_max_body_bytes_is_413(api, service_config):
    limit = int(service_config["MAX_BODY_BYTES"])

    def chunks():  # no Content-Length: the limit must hold for chunked bodies too
        for _ in range(limit // 4096 + 2):
            yield b" " * 4096

    response = api.post("/events/batch", content=chunks())
    assert_problem(response, 413, "payload-too-large", fields=["body"])


def test_lone_surrogate_is_rejected(api, cid):
    raw = json.dumps(new_event(cid, actor="X")).replace('"X"', '"\\ud800"').encode()
    assert_problem(api.post("/events", content=raw), 400, fields=["actor"])


def test_deeply_nested_payload_is_a_clean_400(api, cid):
    head = f'{{"event_type": "a", "actor": "b", "correlation_id": "{cid}", "payload": {{"x": '
    raw = (head + "[" * 100_000 + "]" * 100_000 + "}}").encode()
    response = api.post("/events", content=raw)
    assert response.status_code == 400
    assert api.get("/health/live").status_code == 200


@pytest.mark.parametrize("stamp", ["0001-01-01T00:00:00+01:00", "9999-12-31T23:59:59-01:00"])
def test_timestamp_outside_the_representable_range_is_400(api, cid, stamp):
    assert_problem(api.post("/events", json=new_event(cid, occurred_at=stamp)), 400, fields=["occurred_at"])


@pytest.mark.parametrize("stamp", ["0001-01-01T00:00:00Z", "9999-12-31T23:59:59.999999Z"])
def test_extreme_but_valid_timestamps_round_trip(api, cid, stamp):
    created = api.post("/events", json=new_event(cid, occurred_at=stamp))
    assert created.status_code == 201, created.text
    assert api.get(f"/events/{created.json()['id']}").json()["occurred_at"] == stamp


def test_sql_metacharacters_are_stored_literally(api, cid):
    actor = "o'brien\"; DROP TABLE audit_events; --"
    api.post("/events", json=new_event(cid, actor=actor))
    page = list_events(api, correlation_id=cid, actor=actor)
    assert [item["actor"] for item in page["items"]] == [actor]


def test_nil_uuid_is_a_valid_id(api, cid, isolate_conn):
    nil = "00000000-0000-0000-0000-000000000000"
    isolate_conn.execute("DELETE FROM audit_events WHERE id = %s", (nil,))  # only this worker's schema
    response = api.post("/events", json=new_event(cid, id=nil))
    assert response.status_code == 201
    assert api.get(f"/events/{nil}").json()["correlation_id"] == cid


def test_since_after_until_is_an_empty_page(api, cid):
    api.post("/events", json=new_event(cid))
    page = list_events(api, correlation_id=cid, since="2030-01-01T00:00:00Z", until="2020-01-01T00:00:00Z")
    assert page["items"] == [] and page["total"] == 0


def test_head_on_a_get_route_is_allowed(api):
    response = api.head("/health/live")
    assert response.status_code == 200 and response.content == b""


@pytest.mark.dlq
def test_shutting_down_takes_precedence_over_database_unavailable(api, outage, isolate_service):
    outage.cut_database()

    def db_down():
        response = api.get("/health/ready")
        assert response.json().get("reason") == "database_unavailable"

    eventually(db_down, timeout=10)
    isolate_service.signal(signal.SIGTERM)

    def shutting_down():
        response = api.get("/health/ready")
        assert response.json().get("reason") == "shutting_down"

    eventually(shutting_down, timeout=5, interval=0.02)
    assert isolate_service.wait_exit() == 0


# -- configuration: the service binary itself, run as a plain process on any backend --


@pytest.fixture
def run_service():
    # A budget for one start of the service, not a measure: a loaded machine takes its time.
    def run(env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
        full = {k: v for k, v in os.environ.items() if k not in {"PORT", "DATABASE_URL", "REDIS_URL"}}
        full.update(env)
        return subprocess.run([sys.executable, "-m", "datastorage"], cwd=EXAMPLE_DIR, env=full,
                              capture_output=True, text=True, timeout=timeout)  # fmt: skip

    return run


def test_missing_port_exits_2(run_service):
    result = run_service({})
    assert result.returncode == 2
    assert "PORT is required" in result.stderr


def test_every_configuration_problem_is_reported_at_once(run_service):
    result = run_service({"PORT": "99999", "PAGE_DEFAULT": "600", "BATCH_MAX": "0", "LOG_LEVEL": "LOUD"})
    assert result.returncode == 2
    for name in ("PORT", "BATCH_MAX", "LOG_LEVEL", "PAGE_DEFAULT"):
        assert name in result.stderr, result.stderr


@pytest.mark.parametrize(
    "env", [{"SHUTDOWN_TIMEOUT": "nan"}, {"DLQ_DRAIN_INTERVAL": "0"}, {"DEBUG_ENDPOINTS": "maybe"}]
)
def test_invalid_setting_exits_2(run_service, env):
    result = run_service({"PORT": "0", **env})
    assert result.returncode == 2
    assert next(iter(env)) in result.stderr


def test_second_instance_on_a_taken_port_fails_to_start(
    run_service, isolate_service, isolate_dsn, isolate_redis_url
):
    result = run_service(
        {"PORT": str(isolate_service.port), "DATABASE_URL": isolate_dsn, "REDIS_URL": isolate_redis_url}
    )
    assert result.returncode in (1, 3), result.stderr
    assert isolate_service.is_ready()  # the running instance is unaffected
