"""Helpers shared by the datastorage integration tests (not a test module)."""

from __future__ import annotations

import ssl
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

import httpx
from prometheus_client.parser import text_string_to_metric_families
from tenacity import (
    Retrying,
    retry_if_exception_type,
    retry_if_result,
    stop_after_delay,
    wait_fixed,
)

T = TypeVar("T")

#: The service speaks plain HTTP, yet httpx builds a TLS context for every client made
#: without one (``httpx.get`` included), loading the CA bundle (~18 ms of CPU each time).
#: Tests that make their own clients pass this one, which loads nothing: it trusts no
#: certificate, so a stray ``https://`` fails (conftest's ``api`` fixture has its own).
NO_TLS = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)

PROBLEM_JSON = "application/problem+json"
PROBLEM_BASE = "https://datastorage.example/problems/"

BASE_TIME = datetime(2024, 5, 1, 12, 0, 0, tzinfo=UTC)


def wait_until(predicate: Callable[[], T], timeout: float = 10.0, interval: float = 0.05) -> T:
    """Poll ``predicate`` until it returns something truthy; return it (AssertionError on timeout)."""
    result = Retrying(
        retry=retry_if_result(lambda value: not value),
        stop=stop_after_delay(timeout),
        wait=wait_fixed(interval),
        retry_error_callback=lambda state: state.outcome.result() if state.outcome else None,
    )(predicate)
    assert result, f"condition not met within {timeout}s: {getattr(predicate, '__name__', predicate)}"
    return result


def eventually(check: Callable[[], T], timeout: float = 10.0, interval: float = 0.05) -> T:
    """Retry ``check`` (which asserts) until it passes; re-raise its last failure."""
    return Retrying(
        retry=retry_if_exception_type((AssertionError, httpx.TransportError)),
        stop=stop_after_delay(timeout),
        wait=wait_fixed(interval),
        reraise=True,
    )(check)


def ts(minutes: float = 0, seconds: float = 0) -> str:
    """An RFC 3339 timestamp ``minutes`` after :data:`BASE_TIME` (UTC, Z suffix)."""
    value = BASE_TIME + timedelta(minutes=minutes, seconds=seconds)
    return value.strftime("%Y-%m-%dT%H:%M:%S.%f").rstrip("0").rstrip(".") + "Z"


def new_event(cid: str, **overrides: Any) -> dict[str, Any]:
    """A valid event body in correlation ``cid``; ``overrides`` replace or add fields."""
    body: dict[str, Any] = {
        "event_type": "user.login",
        "actor": "alice",
        "correlation_id": cid,
        "occurred_at": ts(),
        "payload": {"ip": "10.0.0.1"},
    }
    body.update(overrides)
    return body


def new_id() -> str:
    return str(uuid.uuid4())


def problem_fields(response: httpx.Response) -> list[str]:
    """Field names of an RFC 9457 validation problem."""
    body = response.json()
    return [error["field"] for error in body.get("errors", [])]


def assert_problem(response: httpx.Response, status: int, kind: str | None = None,
                   fields: list[str] | None = None) -> dict[str, Any]:  # fmt: skip
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith(PROBLEM_JSON)
    body = response.json()
    assert body["status"] == status
    assert body["title"]
    assert "detail" in body
    if kind is not None:
        assert body["type"] == PROBLEM_BASE + kind, body
    if fields is not None:
        names = problem_fields(response)
        for name in fields:
            assert name in names, (name, body)
            assert name in body["detail"], body["detail"]
    return body


def list_events(client: httpx.Client, **params: Any) -> dict[str, Any]:
    response = client.get("/events", params=params)
    assert response.status_code == 200, response.text
    return response.json()


def metrics(client: httpx.Client) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Samples of /metrics keyed by (sample name, sorted labels)."""
    response = client.get("/metrics")
    assert response.status_code == 200, response.text
    samples: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def metric(client: httpx.Client, name: str, **labels: str) -> float:
    return metrics(client).get((name, tuple(sorted(labels.items()))), 0.0)
