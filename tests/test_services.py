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


WRAPPED = f"""
import os, signal, sys
from pathlib import Path
import pytest
import isolate

@pytest.fixture(scope="session")
def isolate_service_spec():
    # a wrapper leader: the server is the shell's child, in the shell's group and session
    return isolate.ServiceSpec("wrapped", ["/bin/sh", "-c", '"$0" -c "$1" "$2" & wait', sys.executable,
                               {FAKE!r}, "{{port}}"], env={{"WHO": "w"}}, health=isolate.TcpCheck(),
                               stop_timeout=5)
"""

WRAPPED_TESTS = """
import signal
from pathlib import Path

def group(pgid):
    found = []
    for proc in Path("/proc").iterdir():
        try:
            fields = (proc / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if proc.name.isdigit() and fields[0] != "Z" and pgid in (int(fields[2]), int(fields[3])):
            found.append(int(proc.name))
    return found

def test_a_killed_leader_leaves_no_child_holding_the_port(isolate_service):
    leader = isolate_service.pid
    assert len(group(leader)) == 2  # the shell and the server
    isolate_service.signal(signal.SIGKILL)  # the shell only: its child keeps the port
    isolate_service.wait_exit(10)
    isolate_service.start()  # what the dead leader left is gone: same port, no bind error
    assert isolate_service.is_ready()
    assert group(leader) == []

def test_stop_and_kill_end_the_whole_group(isolate_service):
    for end in (isolate_service.stop, isolate_service.kill):
        leader = isolate_service.pid
        end()
        assert group(leader) == []
        isolate_service.start()
"""


def test_a_wrapper_leaders_children_are_stopped_with_it(pytester: pytest.Pytester) -> None:
    """A service whose command is a wrapper (``sh -c "server & wait"``): stop, kill and a
    leader killed by a test end its children too, so the next start gets its port."""
    pytester.makeconftest(WRAPPED)
    pytester.makepyfile(test_wrapped=WRAPPED_TESTS)
    pytester.runpytest_subprocess("-p", "no:randomly").assert_outcomes(passed=2)


SIGNALLED = (
    "import http.server, os, signal, sys, threading\n"
    "server = http.server.HTTPServer(('127.0.0.1', int(sys.argv[1])), http.server.BaseHTTPRequestHandler)\n"
    "def record(sig, frame):\n"
    "    with open(os.environ['SIGNALS'], 'a') as fh:\n"
    "        fh.write(signal.Signals(sig).name + '\\n')\n"
    "    threading.Thread(target=server.shutdown).start()\n"
    "signal.signal(signal.SIGTERM, record)\n"
    "signal.signal(signal.SIGINT, record)\n"
    "server.serve_forever()\n"
)


@pytest.mark.parametrize(("close_signal", "last"), [(None, "SIGTERM"), ("signal.SIGINT", "SIGINT")])
def test_the_last_stop_of_a_session_sends_close_signal(
    pytester: pytest.Pytester, close_signal: str | None, last: str
) -> None:
    signals = pytester.path / "signals.txt"
    extra = f", close_signal={close_signal}" if close_signal else ""
    pytester.makeconftest(
        f"""
        import os, signal, sys
        import pytest
        import isolate

        @pytest.fixture(scope="session")
        def isolate_service_spec():
            return isolate.ServiceSpec("sig", [sys.executable, "-c", {SIGNALLED!r}, "{{port}}"],
                                       env={{"SIGNALS": {str(signals)!r}}}, health=isolate.TcpCheck(){extra})
        """
    )
    pytester.makepyfile(
        test_sig="""
        def test_stop_sends_sigterm(isolate_service):
            assert isolate_service.stop() == 0
            isolate_service.start()
        """
    )
    pytester.runpytest_subprocess("-p", "no:randomly").assert_outcomes(passed=1)
    assert signals.read_text().split() == ["SIGTERM", last]


def test_close_signal_must_be_a_signal() -> None:
    with pytest.raises(isolate.ConfigError, match="close_signal of 'svc' is 99, not a signal") as info:
        isolate.ServiceSpec("svc", [sys.executable, "-c", "pass"], close_signal=99)
    assert "signal.SIGINT" in str(info.value)
