"""Several services per worker: each worker gets its own instance of each, started in
dependency order; a template names another service's URL; each has a full handle."""

from __future__ import annotations

import sys

import pytest

import isolate

FAKE = (
    "import http.server, os, sys\n"
    "class H(http.server.BaseHTTPRequestHandler):\n"
    "    def do_GET(self):\n"
    "        body = os.environ['WHO'].encode()\n"
    "        self.send_response(200); self.send_header('Content-Length', str(len(body)))\n"
    "        self.end_headers(); self.wfile.write(body)\n"
    "    def log_message(self, *a): pass\n"
    "http.server.HTTPServer(('127.0.0.1', int(sys.argv[1])), H).serve_forever()\n"
)

API = (
    "import http.server, os, sys, urllib.request\n"
    "class H(http.server.BaseHTTPRequestHandler):\n"
    "    def do_GET(self):\n"
    "        with urllib.request.urlopen(os.environ['FAKE_URL'], timeout=5) as r:\n"
    "            body = b'api via ' + r.read()\n"
    "        self.send_response(200); self.send_header('Content-Length', str(len(body)))\n"
    "        self.end_headers(); self.wfile.write(body)\n"
    "    def log_message(self, *a): pass\n"
    "http.server.HTTPServer(('127.0.0.1', int(sys.argv[1])), H).serve_forever()\n"
)

CONFTEST = f"""
import sys
import pytest
import isolate

@pytest.fixture(scope="session")
def isolate_service_specs():
    return [
        # declared before what it needs: started after it anyway
        isolate.ServiceSpec("api", [sys.executable, "-c", {API!r}, "{{port}}"],
                            env={{"FAKE_URL": "{{services[fake-payments].url}}"}},
                            depends_on=["fake-payments"], health=isolate.TcpCheck()),
        isolate.ServiceSpec("fake-payments", [sys.executable, "-c", {FAKE!r}, "{{port}}"],
                            env={{"WHO": "fake {{worker}}"}}, health=isolate.TcpCheck()),
    ]
"""

SUITE = """
import os, urllib.request
import pytest

def get(url):
    with urllib.request.urlopen(url, timeout=5) as resp:
        return resp.read().decode()

@pytest.mark.parametrize("n", range(4))
def test_each_worker_has_its_own_pair(n, isolate_services, isolate_worker):
    api, fake = isolate_services["api"], isolate_services["fake-payments"]
    assert api.port != fake.port
    assert get(api.url) == f"api via fake {isolate_worker.worker_id}"

def test_stopping_the_fake_leaves_the_api_running(isolate_services):
    api, fake = isolate_services["api"], isolate_services["fake-payments"]
    assert fake.stop() in (0, 143)
    assert api.is_running and not fake.is_running
    fake.start()
    assert get(api.url).startswith("api via fake")
"""


def test_several_services_per_worker(pytester: pytest.Pytester) -> None:
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(test_multi=SUITE)
    pytester.runpytest_subprocess("-n", "2", "-p", "no:randomly").assert_outcomes(passed=5)


def test_a_dependency_cycle_is_a_clear_error(isolate_stack: isolate.WorkerStack) -> None:
    a = isolate.ServiceSpec("cyc-a", [sys.executable, "-c", "pass"], depends_on=["cyc-b"])
    b = isolate.ServiceSpec("cyc-b", [sys.executable, "-c", "pass"], depends_on=["cyc-a"])
    with pytest.raises(isolate.ConfigError, match="cycle"):
        isolate_stack.services([a, b])
    c = isolate.ServiceSpec("cyc-c", [sys.executable, "-c", "pass"], depends_on=["nope"])
    with pytest.raises(isolate.ConfigError, match="unknown service 'nope'"):
        isolate_stack.services([c])
