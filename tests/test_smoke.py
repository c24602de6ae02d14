import json
import urllib.request


def test_service_writes_through_own_schema(isolate_service, isolate_database, isolate_worker):
    req = urllib.request.Request(isolate_service.url + "/items", data=json.dumps({"value": "x"}).encode(), method="POST")
    body = json.loads(urllib.request.urlopen(req).read())
    assert body["instance"] == f"fixture-app-test-{isolate_worker.slug}"
    who = json.loads(urllib.request.urlopen(isolate_service.url + "/whoami").read())
    assert who["schema"] == isolate_database.schema
