"""GET /metrics (Prometheus) and the health endpoints in steady state."""

from __future__ import annotations

import pytest
from _support import metric, metrics, new_event, new_id


def test_metrics_content_type_is_prometheus_text(api):
    response = api.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    # 0.0.4 with prometheus-client 0.16 (the image), 1.0.0 with 0.26 (PyPI)
    assert "version=" in response.headers["content-type"]


@pytest.mark.parametrize(
    "family", ["http_requests_total", "http_request_duration_seconds_count", "dlq_depth",
               "events_written_total", "dlq_drained_total", "database_up"],
)  # fmt: skip
def test_metric_families_are_exported(api, family):
    assert family in api.get("/metrics").text


def test_request_counter_uses_route_template_not_concrete_path(api, cid):
    created = api.post("/events", json=new_event(cid)).json()
    before = metric(api, "http_requests_total", route="/events/{id}", method="GET", status="200")
    api.get(f"/events/{created['id']}")
    api.get(f"/events/{created['id']}")
    samples = metrics(api)
    after = samples[
        ("http_requests_total", (("method", "GET"), ("route", "/events/{id}"), ("status", "200")))
    ]
    assert after - before == 2
    assert not any(created["id"] in str(labels) for _, labels in samples)


def test_request_counter_counts_status_codes(api, cid):
    before = metric(api, "http_requests_total", route="/events", method="POST", status="400")
    api.post("/events", json={})
    assert metric(api, "http_requests_total", route="/events", method="POST", status="400") - before == 1


def test_unknown_paths_are_labelled_unmatched(api):
    before = metric(api, "http_requests_total", route="unmatched", method="GET", status="404")
    api.get(f"/nowhere/{new_id()}")
    assert metric(api, "http_requests_total", route="unmatched", method="GET", status="404") - before == 1


def test_duration_histogram_counts_requests(api):
    before = metric(api, "http_request_duration_seconds_count", route="/schema/version")
    for _ in range(3):
        api.get("/schema/version")
    assert metric(api, "http_request_duration_seconds_count", route="/schema/version") - before == 3


def test_events_written_db_counts_single_creates_only(api, cid):
    before = metric(api, "events_written_total", stored="db")
    event_id = new_id()
    api.post("/events", json=new_event(cid, id=event_id))
    api.post("/events", json=new_event(cid, id=event_id))  # duplicate: not written again
    assert metric(api, "events_written_total", stored="db") - before == 1


def test_events_written_db_counts_batch_creates(api, cid):
    before = metric(api, "events_written_total", stored="db")
    existing = new_id()
    api.post("/events/batch", json={"events": [new_event(cid, id=existing)]})
    api.post("/events/batch", json={"events": [new_event(cid, id=existing), new_event(cid), new_event(cid)]})
    assert metric(api, "events_written_total", stored="db") - before == 3


def test_rejected_events_are_not_counted_as_written(api, cid):
    before = metric(api, "events_written_total", stored="db")
    api.post("/events", json=new_event(cid, actor=""))
    api.post("/events/batch", json={"events": [new_event(cid), new_event(cid, actor="")]})
    assert metric(api, "events_written_total", stored="db") == before


def test_database_up_and_empty_dlq_at_rest(api):
    samples = metrics(api)
    assert samples[("database_up", ())] == 1
    assert samples[("dlq_depth", ())] == 0


def test_liveness_is_200(api):
    response = api.get("/health/live")
    assert response.status_code == 200
    assert response.json() == {"status": "alive"}


def test_readiness_is_200_when_dependencies_are_up(api):
    response = api.get("/health/ready")
    assert response.status_code == 200
    assert response.json() == {"status": "ready"}


def test_service_runs_on_its_own_port(isolate_service, api):
    assert isolate_service.url == f"http://127.0.0.1:{isolate_service.port}"
    assert isolate_service.is_running
    assert isolate_service.is_ready()


@pytest.mark.parametrize("seconds", ["0", "0.05"])
def test_debug_slow_sleeps_and_reports(api, seconds):
    response = api.post("/debug/slow", params={"seconds": seconds})
    assert response.status_code == 200
    assert response.json() == {"slept": float(seconds)}


@pytest.mark.parametrize(
    "params", [{"seconds": "-1"}, {"seconds": "61"}, {"seconds": "nan"}, {"seconds": "x"}, {"other": "1"}]
)
def test_debug_slow_validates_its_query(api, params):
    response = api.post("/debug/slow", params=params)
    assert response.status_code == 400
    assert [e["field"] for e in response.json()["errors"]] == list(params)


def test_unknown_http_methods_are_labelled_other(api):
    before = metrics(api)
    api.request("BREW", "/events")
    after = metrics(api)
    grown = {
        key for key, value in after.items() if key[0] == "http_requests_total" and value > before.get(key, 0)
    }
    methods = {dict(labels)["method"] for _, labels in grown}
    assert "OTHER" in methods and "BREW" not in methods
