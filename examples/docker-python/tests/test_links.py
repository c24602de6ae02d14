import httpx
import pytest


@pytest.fixture
def api(isolate_service):
    with httpx.Client(base_url=isolate_service.url, timeout=10) as client:
        yield client


@pytest.mark.parametrize("n", range(8))
def test_a_link_is_stored_and_followed(api, n):
    url = f"https://example.com/{n}"
    created = api.post("/links", json={"url": url})
    assert created.status_code == 201
    assert api.get(f"/links/{created.json()['code']}").json() == {"url": url, "hits": 1}


def test_a_bad_request_is_400(api):
    assert api.post("/links", json={"href": "x"}).status_code == 400
    assert api.get("/links/nope").status_code == 404


def test_the_link_is_in_this_workers_database(api, isolate_conn):
    code = api.post("/links", json={"url": "https://example.com/mine"}).json()["code"]
    assert isolate_conn.execute("SELECT url FROM links WHERE code = %s", (code,)).fetchone() == (
        "https://example.com/mine",
    )


def test_the_counter_lives_in_this_workers_redis(api, isolate_redis_client):
    code = api.post("/links", json={"url": "https://example.com/counted"}).json()["code"]
    isolate_redis_client.set(f"hits:{code}", 41)
    assert api.get(f"/links/{code}").json()["hits"] == 42


def test_a_graceful_stop_exits_0_and_the_links_stay(api, isolate_service):
    code = api.post("/links", json={"url": "https://example.com/kept"}).json()["code"]
    assert isolate_service.stop() == 0  # SIGTERM: uvicorn shuts down, exit 0
    assert not isolate_service.is_running
    isolate_service.start()  # same port, same URL
    assert api.get(f"/links/{code}").json()["url"] == "https://example.com/kept"


def test_a_killed_service_comes_back(api, isolate_service):
    assert isolate_service.kill() == 137  # SIGKILL: 128 + 9, on both backends
    isolate_service.restart()
    assert api.get("/health").json() == {"status": "ok"}
