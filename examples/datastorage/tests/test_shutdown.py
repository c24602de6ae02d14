"""Graceful shutdown, kill and restart of THIS worker's service instance.

Every test here stops or signals the service; the function-scoped ``isolate_service``
fixture starts it again for the next test, and no other worker notices.
"""

from __future__ import annotations

import signal
import socket
import time

import httpx
import pytest
from _support import NO_TLS, eventually, list_events, new_event, wait_until

pytestmark = pytest.mark.shutdown


def _ready(api):
    return api.get("/health/ready")


@pytest.fixture
def held_delay(isolate_redis_client):
    """The service's propagation delay stays open (a debug hook: the Redis key) until the
    test is done with it, so that what a test must see inside it does not race a 0.5 s timer
    on a loaded machine. ``held_delay()`` lets the delay end."""
    key = "debug:hold-propagation-delay"  # datastorage.runner.HOLD_DELAY_KEY
    isolate_redis_client.set(key, 1)
    yield lambda: isolate_redis_client.delete(key)
    isolate_redis_client.delete(key)


def wait_shutting_down(api):
    """Poll readiness until it reports shutting_down (the signal is handled asynchronously)."""

    def check():
        response = _ready(api)
        assert response.status_code == 503, response.text
        return response

    return eventually(check, timeout=5, interval=0.02)


def connection_refused(service) -> bool:
    """Whether nothing listens on the service's port any more. Behind a port Docker
    publishes (``service.proxied``: port-mapped mode) the engine's proxy accepts the
    connection and hangs up on it without a response instead of refusing it."""
    try:
        httpx.get(service.url + "/health/live", timeout=1.0, verify=NO_TLS)
    except httpx.ConnectError:
        return True
    except (httpx.RemoteProtocolError, httpx.ReadError):
        return service.proxied
    except httpx.TransportError:
        return False
    return False


def send_raw(port: int, request: bytes) -> socket.socket:
    """Send a complete HTTP/1.1 request on a fresh connection; the response is read later."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=15)
    sock.sendall(request)
    return sock


def read_response(sock: socket.socket) -> bytes:
    chunks = []
    while True:
        data = sock.recv(65536)
        if not data:
            break
        chunks.append(data)
    sock.close()
    return b"".join(chunks)


def slow_request(seconds: float, release: str | None = None) -> bytes:
    query = f"seconds={seconds}" + (f"&release={release}" if release else "")
    return (f"POST /debug/slow?{query} HTTP/1.1\r\nHost: test\r\n"
            "Content-Length: 0\r\nConnection: close\r\n\r\n").encode()  # fmt: skip


def test_sigterm_makes_readiness_503_shutting_down_at_once(api, isolate_service, held_delay):
    isolate_service.signal(signal.SIGTERM)
    response = wait_shutting_down(api)
    assert response.json() == {"status": "not_ready", "reason": "shutting_down"}
    assert response.headers["retry-after"] == "1"
    held_delay()
    assert isolate_service.wait_exit() == 0


def test_liveness_stays_200_while_shutting_down(api, isolate_service, held_delay):
    isolate_service.signal(signal.SIGTERM)
    wait_shutting_down(api)
    response = api.get("/health/live")
    assert response.status_code == 200 and response.json() == {"status": "alive"}
    held_delay()
    assert isolate_service.wait_exit() == 0


def test_requests_are_still_served_during_the_propagation_delay(api, cid, isolate_service, held_delay):
    isolate_service.signal(signal.SIGTERM)
    wait_shutting_down(api)
    response = api.post("/events", json=new_event(cid))
    assert response.status_code == 201
    held_delay()
    assert isolate_service.wait_exit() == 0
    isolate_service.start()
    assert list_events(api, correlation_id=cid)["total"] == 1


def test_in_flight_request_completes_during_shutdown(isolate_service):
    sock = send_raw(isolate_service.port, slow_request(1.0))
    isolate_service.signal(signal.SIGTERM)
    raw = read_response(sock)
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), raw
    assert body.endswith(b'{"slept":1.0}')
    assert isolate_service.wait_exit() == 0


def test_in_flight_keep_alive_connection_is_closed_after_its_response(isolate_service):
    # No "Connection: close" in the request: the server must still close it after responding.
    request = b"POST /debug/slow?seconds=1.0 HTTP/1.1\r\nHost: test\r\nContent-Length: 0\r\n\r\n"
    sock = send_raw(isolate_service.port, request)
    isolate_service.signal(signal.SIGTERM)
    raw = read_response(sock)  # returns at EOF; a socket timeout here means it was kept open
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.lower().startswith(b"http/1.1 200")
    assert body == b'{"slept":1.0}'
    assert isolate_service.wait_exit() == 0


def test_new_connections_are_refused_after_the_delay(api, cid, isolate_service, isolate_redis_client):
    # In flight until this test releases it (not a timer: under load a timer could end
    # it before the refusal is seen), so the process stays up meanwhile.
    sock = send_raw(isolate_service.port, slow_request(30.0, release=cid))
    isolate_service.signal(signal.SIGTERM)
    wait_until(lambda: connection_refused(isolate_service), timeout=10, interval=0.02)
    assert isolate_service.is_running  # listener closed, in-flight request still running
    isolate_redis_client.set(f"debug:release:{cid}", 1)
    response = read_response(sock)
    assert response.startswith(b"HTTP/1.1 200") and cid.encode() in response
    assert isolate_service.wait_exit() == 0


def test_sigterm_exits_with_status_0(isolate_service):
    isolate_service.signal(signal.SIGTERM)
    assert isolate_service.wait_exit() == 0
    assert not isolate_service.is_running


def test_stop_returns_0(isolate_service):
    assert isolate_service.stop() == 0
    assert not isolate_service.is_running
    assert connection_refused(isolate_service)


def test_stop_honours_the_propagation_delay(isolate_service, service_config):
    delay = float(service_config["SHUTDOWN_PROPAGATION_DELAY"])
    started = time.monotonic()
    assert isolate_service.stop() == 0
    assert time.monotonic() - started >= delay


def test_sigint_skips_the_propagation_delay(isolate_service):
    isolate_service.signal(signal.SIGINT)
    assert isolate_service.wait_exit() == 0
    assert "received SIGINT: shutting down in 0.00s" in isolate_service.logs()


def test_second_sigterm_skips_the_rest_of_the_delay(api, isolate_service, held_delay):
    isolate_service.signal(signal.SIGTERM)  # held: only the second signal ends the delay
    wait_shutting_down(api)
    isolate_service.signal(signal.SIGTERM)
    assert isolate_service.wait_exit() == 0
    assert "skipping the propagation delay" in isolate_service.logs()


def test_third_signal_cancels_in_flight_requests(api, isolate_service, held_delay):
    sock = send_raw(isolate_service.port, slow_request(30))
    isolate_service.signal(signal.SIGTERM)
    wait_shutting_down(api)
    isolate_service.signal(signal.SIGTERM)  # ends the held delay
    wait_until(lambda: connection_refused(isolate_service), timeout=5, interval=0.02)
    isolate_service.signal(signal.SIGTERM)
    started = time.monotonic()
    assert isolate_service.wait_exit(timeout=10) == 0
    assert time.monotonic() - started < 10
    assert b'"slept"' not in read_response(sock)


def test_kill_then_start_recovers(api, cid, isolate_service):
    code = isolate_service.kill()
    assert code not in (0, None)
    assert not isolate_service.is_running
    assert connection_refused(isolate_service)
    isolate_service.start()
    assert _ready(api).status_code == 200
    assert api.post("/events", json=new_event(cid)).status_code == 201


def test_restart_keeps_url_and_port(isolate_service):
    url, port = isolate_service.url, isolate_service.port
    isolate_service.restart()
    assert (isolate_service.url, isolate_service.port) == (url, port)
    assert httpx.get(url + "/health/ready", verify=NO_TLS).status_code == 200


def test_data_persists_across_graceful_restart(api, cid, isolate_service):
    created = api.post("/events", json=new_event(cid)).json()
    isolate_service.restart()
    assert api.get(f"/events/{created['id']}").json()["id"] == created["id"]


def test_data_persists_across_kill_and_start(api, cid, isolate_service):
    ids = api.post("/events/batch", json={"events": [new_event(cid) for _ in range(3)]}).json()["ids"]
    isolate_service.kill()
    isolate_service.start()
    assert sorted(i["id"] for i in list_events(api, correlation_id=cid)["items"]) == sorted(ids)


def test_restart_without_grace_recovers(api, isolate_service):
    isolate_service.restart(graceful=False)
    assert isolate_service.is_running
    assert api.get("/schema/version").json()["version"] == 2


def test_metrics_start_from_zero_after_restart(api, isolate_service):
    for _ in range(3):
        api.get("/schema/version")
    isolate_service.restart()
    text = api.get("/metrics").text
    assert 'route="/schema/version"' not in text


def test_stopped_service_is_restarted_by_ensure_running(isolate_service):
    isolate_service.stop()
    assert not isolate_service.is_running
    isolate_service.ensure_running()
    assert isolate_service.is_running and isolate_service.is_ready()


def test_shutdown_logs_its_steps(isolate_service):
    before = len(isolate_service.logs())
    assert isolate_service.stop() == 0
    log = isolate_service.logs()[before:]
    for line in ("received SIGTERM", "closing the listener", "DLQ is empty", "service stopped", "exiting"):
        assert line in log, log


def test_dlq_is_flushed_on_shutdown(
    api, cid, outage, isolate_service, isolate_redis_client, isolate_database
):
    outage.cut_database()
    ids = [api.post("/events", json=new_event(cid)).json()["id"] for _ in range(3)]
    assert isolate_redis_client.llen("datastorage:dlq") == 3
    outage.restore_database()
    assert isolate_service.stop() == 0
    # The service is gone: what it accepted is in PostgreSQL, nothing is left in Redis.
    with isolate_database.connect() as conn:  # a connection opened before the cut would be dead
        rows = conn.execute("SELECT id::text FROM audit_events WHERE correlation_id = %s", (cid,)).fetchall()
    assert sorted(r[0] for r in rows) == sorted(ids)
    assert isolate_redis_client.llen("datastorage:dlq") == 0
    assert isolate_redis_client.llen("datastorage:dlq:processing") == 0


def test_shutdown_with_database_down_exits_0_and_keeps_the_dlq(
    api, cid, outage, isolate_service, isolate_redis_client
):
    outage.cut_database()
    api.post("/events", json=new_event(cid))
    assert isolate_service.stop() == 0
    assert (
        isolate_redis_client.llen("datastorage:dlq") + isolate_redis_client.llen("datastorage:dlq:processing")
        == 1
    )
    assert "event(s) left in the DLQ" in isolate_service.logs()


def test_leftover_dlq_is_drained_by_the_next_start(api, cid, outage, isolate_service, isolate_redis_client):
    outage.cut_database()
    event_id = api.post("/events", json=new_event(cid)).json()["id"]
    isolate_service.kill()
    outage.restore_database()
    isolate_service.start()
    eventually(lambda: _assert_status(api.get(f"/events/{event_id}"), 200), timeout=20)


def _assert_status(response, status):
    assert response.status_code == status, response.text


def test_service_is_ready_again_after_a_restart_sequence(api, isolate_service):
    for graceful in (True, False, True):
        isolate_service.restart(graceful=graceful)
        assert _ready(api).json() == {"status": "ready"}


def test_shutdown_with_redis_down_still_exits_0(api, outage, isolate_service):
    before = len(isolate_service.logs())
    outage.cut_redis()
    assert isolate_service.stop() == 0
    assert "could not flush the DLQ" in isolate_service.logs()[before:]
