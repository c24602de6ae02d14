import json
import urllib.error
import urllib.request

import pytest


def call(url, payload=None):
    data = json.dumps(payload).encode() if payload is not None else None
    request = urllib.request.Request(url, data=data, method="POST" if data else "GET")
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


@pytest.mark.parametrize("text", ["hello", "héllo", "a" * 1000, ""])
def test_a_note_is_stored_and_read_back(isolate_service, text):
    created = call(isolate_service.url + "/notes", {"text": text})
    assert call(f"{isolate_service.url}/notes/{created['id']}") == {"id": created["id"], "text": text}


def test_the_database_is_this_workers_own(isolate_service, isolate_conn):
    call(isolate_service.url + "/notes", {"text": "mine"})
    assert isolate_conn.execute("SELECT count(*) FROM notes WHERE text = 'mine'").fetchone()[0] >= 1


def test_the_counter_lives_in_this_workers_redis(isolate_service, isolate_redis_client):
    isolate_redis_client.set("notes:created", 41)
    assert call(isolate_service.url + "/notes", {"text": "x"})["count"] == 42


def test_a_stopped_service_refuses_connections(isolate_service):
    assert isolate_service.stop() == 0  # graceful: SIGTERM, exit 0
    with pytest.raises(urllib.error.URLError):
        call(isolate_service.url + "/health")
    isolate_service.start()
    assert call(isolate_service.url + "/health") == {"status": "ok"}


def test_notes_survive_a_kill_and_restart(isolate_service):
    created = call(isolate_service.url + "/notes", {"text": "durable"})
    assert isolate_service.kill() == 137  # SIGKILL: 128 + 9
    isolate_service.start()
    assert call(f"{isolate_service.url}/notes/{created['id']}")["text"] == "durable"


@pytest.mark.parametrize("n", range(8))
def test_many_workers_many_notes(isolate_service, n):
    assert call(isolate_service.url + "/notes", {"text": f"note {n}"})["id"] > 0
