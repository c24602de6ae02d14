import json
import urllib.error
import urllib.request
import uuid

import pytest


def call(url, payload=None):
    data = json.dumps(payload).encode() if payload is not None else None
    request = urllib.request.Request(url, data=data, method="POST" if data else "GET")
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


def warehouse(service):
    return call(service.url + "/warehouses", {"name": f"wh-{uuid.uuid4().hex[:8]}"})["id"]


@pytest.mark.parametrize("quantity", [0, 1, 250])
def test_items_are_stored_per_warehouse(isolate_service, quantity):
    wh = warehouse(isolate_service)
    call(isolate_service.url + "/items", {"sku": "bolt", "quantity": quantity, "warehouse": wh})
    assert call(f"{isolate_service.url}/warehouses/{wh}") == {"items": {"bolt": quantity}}


def test_alembic_migrated_this_workers_schema(isolate_conn, isolate_database):
    assert isolate_conn.execute("SELECT version_num FROM alembic_version").fetchone() == ("0002",)
    tables = {r[0] for r in isolate_conn.execute(
        "SELECT table_name FROM information_schema.tables WHERE table_schema = current_schema()")}
    assert {"warehouses", "items", "alembic_version"} <= tables


def test_a_test_may_change_the_schema_and_rebuild_undoes_it(isolate_fresh_database, isolate_service):
    with isolate_fresh_database.connect(autocommit=True) as conn:
        conn.execute("ALTER TABLE items ADD COLUMN colour text")
    isolate_fresh_database.rebuild()  # ends the role's sessions: the service's pool pre-pings
    with isolate_fresh_database.connect() as conn:
        columns = {r[0] for r in conn.execute(
            "SELECT column_name FROM information_schema.columns WHERE table_name = 'items'")}
    assert "colour" not in columns
    assert call(f"{isolate_service.url}/warehouses/{warehouse(isolate_service)}") == {"items": {}}


def test_the_service_stops_gracefully_and_comes_back(isolate_service):
    wh = warehouse(isolate_service)
    assert isolate_service.stop() == 0
    with pytest.raises(urllib.error.URLError):
        call(isolate_service.url + "/health")
    isolate_service.start()
    assert call(f"{isolate_service.url}/warehouses/{wh}") == {"items": {}}


def test_a_killed_service_reports_137_and_restarts(isolate_service):
    assert isolate_service.kill() == 137
    isolate_service.restart()
    assert call(isolate_service.url + "/health") == {"status": "ok"}


@pytest.mark.parametrize("n", range(8))
def test_parallel_writes(isolate_service, n):
    wh = warehouse(isolate_service)
    call(isolate_service.url + "/items", {"sku": f"sku-{n}", "quantity": n, "warehouse": wh})
    assert call(f"{isolate_service.url}/warehouses/{wh}")["items"] == {f"sku-{n}": n}
