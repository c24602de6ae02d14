import json
import urllib.error
import urllib.request

import pytest
from orders.models import Order


def call(url, payload=None):
    data = json.dumps(payload).encode() if payload is not None else None
    request = urllib.request.Request(url, data=data, method="POST" if data else "GET")
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


@pytest.mark.django_db
@pytest.mark.parametrize("quantity", [1, 5, 99])
def test_the_orm_sees_the_workers_own_database(quantity):
    order = Order.objects.create(sku="bolt", quantity=quantity)
    assert Order.objects.get(id=order.id).quantity == quantity  # rolled back after the test


@pytest.mark.django_db(transaction=True)
def test_an_order_made_through_the_service_is_in_the_database(isolate_service):
    created = call(isolate_service.url + "/orders", {"sku": "nut", "quantity": 3})
    assert Order.objects.get(id=created["id"]).sku == "nut"
    assert call(f"{isolate_service.url}/orders/{created['id']}")["quantity"] == 3


def test_the_service_stops_gracefully_and_comes_back(isolate_service):
    assert isolate_service.stop() == 0
    with pytest.raises(urllib.error.URLError):
        call(isolate_service.url + "/health")
    isolate_service.start()
    assert call(isolate_service.url + "/health") == {"status": "ok"}


def test_a_killed_service_reports_137_and_restarts(isolate_service):
    assert isolate_service.kill() == 137
    isolate_service.restart()
    assert call(isolate_service.url + "/health") == {"status": "ok"}


@pytest.mark.parametrize("n", range(8))
def test_parallel_orders(isolate_service, n):
    created = call(isolate_service.url + "/orders", {"sku": f"sku-{n}", "quantity": n + 1})
    assert call(f"{isolate_service.url}/orders/{created['id']}")["sku"] == f"sku-{n}"
