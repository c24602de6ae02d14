"""The fork server: a service that names an ``entry`` is forked from a parent that
preloaded it (once per run, forked for each worker; or one per worker), and behaves exactly
like a spawned one (native backend)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import pytest
from suite_support import leftovers, needs_root, run_id_of

from isolate import ConfigError, ServiceSpec
from isolate._run.groups import children
from isolate._service.forkserver import fork_unavailable, python_argv
from isolate._service.hubs import PROGRAM as _PROGRAM
from isolate._service.hubs import HubRecipe, recall

APP = '''
import http.server, json, os, signal, sys, threading

BOOT_ENV = os.environ.get("WHO")  # read at import: the fork server's, not a start's

class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        if self.path.startswith("/exit"):
            threading.Timer(0.05, os._exit, [int(self.path.partition("=")[2])]).start()
        body = json.dumps({"pid": os.getpid(), "ppid": os.getppid(), "argv": sys.argv,
                           "who": os.environ.get("WHO"), "boot_who": BOOT_ENV,
                           "cwd": os.getcwd(), "pgid": os.getpgid(0)}).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass

def main():
    # The handler is in place, and the greeting written, before the port listens: the
    # health check (TcpCheck) passes once it listens, and a test may signal at once.
    stopping = threading.Event()
    def bye(signum, frame):
        print("graceful bye", flush=True)
        stopping.set()
    signal.signal(signal.SIGTERM, bye)
    print("hello from", os.getpid(), flush=True)
    server = http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), Handler)
    threading.Thread(target=lambda: (stopping.wait(), server.shutdown()), daemon=True).start()
    server.serve_forever()
    return 0

if __name__ == "__main__":  # the command, run where isolate does not fork
    sys.exit(main())
'''

CONFTEST = """
import sys
import pytest
import isolate

@pytest.fixture(scope="session")
def isolate_service_spec():
    return isolate.ServiceSpec(
        name="forked", command=[sys.executable, "forkapp.py", "{port}"], entry="forkapp:main",
        env={"WHO": "worker {worker}"}, health=isolate.TcpCheck(), stop_timeout=5,
    )
"""

SUITE = """
import json, os, signal, urllib.request
from pathlib import Path

def whoami(service):
    with urllib.request.urlopen(service.url + "/", timeout=10) as resp:
        return json.loads(resp.read())

def parent_cmdline(pid):
    return Path(f"/proc/{pid}/cmdline").read_bytes().decode().replace("\\0", " ")

def test_forked(isolate_service, isolate_worker):
    me = whoami(isolate_service)
    assert me["pid"] == isolate_service.pid == me["pgid"]  # its own session and group
    assert ("_preloader.py" in parent_cmdline(me["ppid"])) == FORKED
    assert me["argv"] == ["forkapp.py", str(isolate_service.port)]
    assert me["who"] == f"worker {isolate_worker.worker_id}"
    assert me["cwd"] == os.getcwd()

def test_lifecycle(isolate_service):
    first = whoami(isolate_service)["pid"]
    assert isolate_service.stop() == 0
    assert "graceful bye" in isolate_service.logs()
    isolate_service.start()
    second = whoami(isolate_service)["pid"]
    assert second != first
    assert isolate_service.kill() == 137
    isolate_service.restart()
    port = isolate_service.port
    urllib.request.urlopen(isolate_service.url + "/exit=3", timeout=10).read()
    assert isolate_service.wait_exit(10) == 3
    isolate_service.start()
    assert isolate_service.port == port
    isolate_service.signal(signal.SIGTERM)
    assert isolate_service.wait_exit(10) == 0
    assert isolate_service.logs().count("hello from") == 4
"""


def _suite(pytester: pytest.Pytester, forked: bool) -> None:
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(forkapp=APP, test_forked=f"FORKED = {forked}\n" + SUITE)


@pytest.mark.parametrize("workers", ["1", "2"])
def test_a_forked_service_behaves_like_a_spawned_one(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, workers: str
) -> None:
    mark = uuid.uuid4().hex
    monkeypatch.setenv("LEFTOVER_MARK", mark)
    _suite(pytester, forked=True)
    result = pytester.runpytest_subprocess("-n", workers, "-p", "no:randomly")
    result.assert_outcomes(passed=2)
    assert leftovers(run_id_of(result), mark) == []


MANY_FDS = """
import os, resource
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 4096), hard))
HELD = [os.open(os.devnull, os.O_RDONLY) for _ in range(1100)]  # held until the worker exits
assert HELD[-1] >= 1024, "RLIMIT_NOFILE too low for this test: raise its hard limit"
"""


def test_a_worker_holding_more_descriptors_than_select_takes_ends_its_fork_server(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker whose tests keep over 1,024 descriptors open: the descriptor isolate opens
    to wait for its fork server at the end is above select's limit, so the wait polls;
    the run ends cleanly and leaves nothing."""
    mark = uuid.uuid4().hex
    monkeypatch.setenv("LEFTOVER_MARK", mark)
    _suite(pytester, forked=True)
    pytester.makeconftest(CONFTEST + MANY_FDS)
    result = pytester.runpytest_subprocess("-n", "1", "-p", "no:randomly")
    result.assert_outcomes(passed=2)
    assert "Error" not in result.stdout.str() + result.stderr.str()
    assert leftovers(run_id_of(result), mark) == []


def test_with_the_fork_server_off_it_is_spawned_and_the_header_says_so(pytester: pytest.Pytester) -> None:
    _suite(pytester, forked=False)
    result = pytester.runpytest_subprocess("-p", "no:randomly", "--isolate-fork-server=off")
    result.assert_outcomes(passed=2)
    assert "services with an entry start as new processes (--isolate-fork-server=off)" in result.stdout.str()


UNSAFE = {
    "thread": "import threading, time\nthreading.Thread(target=time.sleep, args=(60,), daemon=True).start()\n",
    "socket": "import socket\nLISTENER = socket.socket()\n",
    "broken": "raise RuntimeError('cannot import me')\n",
}


@pytest.mark.parametrize("kind", sorted(UNSAFE))
def test_a_preload_that_is_unsafe_to_fork_is_refused(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, kind: str
) -> None:
    mark = uuid.uuid4().hex
    monkeypatch.setenv("LEFTOVER_MARK", mark)
    pytester.makeconftest(CONFTEST.replace('entry="forkapp:main"', 'entry="forkapp:main", preload=["bad"]'))
    pytester.makepyfile(forkapp=APP, bad=UNSAFE[kind], test_x="def test_x(isolate_service): pass")
    result = pytester.runpytest_subprocess("-p", "no:randomly")
    result.assert_outcomes(errors=1)
    out = result.stdout.str()
    assert "the fork server cannot serve" in out
    expected = {"thread": "1 thread(s) running", "socket": "1 socket(s) open",
                "broken": "RuntimeError: cannot import me"}[kind]  # fmt: skip
    assert expected in out
    assert "drop ServiceSpec.entry" in out
    assert leftovers(run_id_of(result), mark) == []


def test_a_killed_worker_leaves_no_fork_server_or_child(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    mark = uuid.uuid4().hex
    monkeypatch.setenv("LEFTOVER_MARK", mark)
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(forkapp=APP, test_die="""
        import os, signal
        def test_die(isolate_service):
            os.kill(os.getpid(), signal.SIGKILL)
    """)  # fmt: skip
    result = pytester.runpytest_subprocess("-n", "1", "--max-worker-restart=0", "-p", "no:randomly")
    assert "crashed" in result.stdout.str() or "worker 'gw0' crashed" in result.stdout.str()
    assert leftovers(run_id_of(result), mark) == []


def test_entry_and_preload_are_checked() -> None:
    spec = ServiceSpec("a", ["python", "-m", "a"], entry="a.server:main")
    assert tuple(spec.preload) == ("a.server",)
    for bad in ({"entry": "a.server.main"}, {"entry": "a:"}, {"preload": ["a"]},
                {"entry": "a:main", "preload": "a"}):  # fmt: skip
        with pytest.raises(ConfigError, match=r"entry|preload"):
            ServiceSpec("a", ["python", "-m", "a"], **bad)  # type: ignore[arg-type]


def test_argv_is_what_the_command_gives_the_program() -> None:
    cwd = Path("/srv/app")
    assert python_argv(["py", "-m", "api", "--port", "1"], cwd) == (["api", "--port", "1"], "/srv/app")
    assert python_argv(["py", "bin/run.py", "1"], cwd) == (["bin/run.py", "1"], "/srv/app/bin")
    assert fork_unavailable("native", "auto") is None
    assert "docker backend" in str(fork_unavailable("docker", "auto"))
    assert fork_unavailable("native", "off") == "--isolate-fork-server=off"



def test_a_preload_that_prints_is_served_and_its_output_logged(pytester: pytest.Pytester) -> None:
    """The fork server's own stdout is the service log: a module that prints at import
    (to stdout and stderr) neither breaks the protocol nor loses its output."""
    pytester.makeconftest(CONFTEST.replace('entry="forkapp:main"', 'entry="forkapp:main", preload=["noisy", "forkapp"]'))
    pytester.makepyfile(
        forkapp=APP,
        noisy='import sys\nprint("noisy at import")\nprint("noisy on stderr", file=sys.stderr)\n',
        test_x="def test_x(isolate_service):\n    assert 'noisy at import' in isolate_service.logs()\n"
        "    assert 'noisy on stderr' in isolate_service.logs()\n",
    )
    result = pytester.runpytest_subprocess("-p", "no:randomly")
    result.assert_outcomes(passed=1)


@pytest.mark.parametrize("mode", ["auto", "worker"])
def test_a_preload_that_keeps_more_descriptors_than_select_takes_is_served(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, mode: str
) -> None:
    """A preload that keeps over 1,024 descriptors open: what the fork server opens after
    it (its wakeup pipe; the run's fork server: each worker's channel) is above select's
    limit; services are still forked, stopped, killed and restarted, and nothing is left."""
    mark = uuid.uuid4().hex
    monkeypatch.setenv("LEFTOVER_MARK", mark)
    _suite(pytester, forked=True)
    pytester.makeconftest(CONFTEST.replace('entry="forkapp:main"', 'entry="forkapp:main", preload=["manyfds", "forkapp"]'))
    pytester.makepyfile(manyfds=MANY_FDS.replace("the worker exits", "the fork server exits"))
    result = pytester.runpytest_subprocess("-n", "1", "-p", "no:randomly", f"--isolate-fork-server={mode}")
    result.assert_outcomes(passed=2)
    assert leftovers(run_id_of(result), mark) == []


def test_a_fork_server_that_dies_leaves_its_child_stoppable_and_says_so(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SIGKILL to the fork server while its child runs: the child is watched by pid, so
    kill() returns (it never waits forever for an exit nobody will report), and the
    next start is one clear error."""
    mark = uuid.uuid4().hex
    monkeypatch.setenv("LEFTOVER_MARK", mark)
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(forkapp=APP, test_die="""
        import json, os, signal, urllib.request
        import pytest
        import isolate

        def test_die(isolate_service):
            with urllib.request.urlopen(isolate_service.url + "/", timeout=10) as resp:
                parent = json.loads(resp.read())["ppid"]
            os.kill(parent, signal.SIGKILL)
            assert isolate_service.kill() == 137
            with pytest.raises(isolate.ServerStartError, match="could not fork: the fork server exited"):
                isolate_service.start()
    """)  # fmt: skip
    result = pytester.runpytest_subprocess("-p", "no:randomly", "--timeout=60")
    result.assert_outcomes(passed=1)
    assert leftovers(run_id_of(result), mark) == []


WHERE = """
import json, os, urllib.request
from pathlib import Path

def test_where(isolate_service, isolate_worker):
    with urllib.request.urlopen(isolate_service.url + "/", timeout=10) as resp:
        me = json.loads(resp.read())
    server = me["ppid"]
    ppid = lambda pid: int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    parent = ppid(server)
    Path(os.environ["RECORDS"], isolate_worker.worker_id).write_text(json.dumps({
        "server": server, "parent": parent, "worker": os.getpid(), "boot_who": me["boot_who"],
        "launcher": ppid(parent), "controller": os.environ.get("CONTROLLER_PID"),
        "parent_cmdline": Path(f"/proc/{parent}/cmdline").read_bytes().decode(errors="replace"),
    }))
"""


@pytest.mark.parametrize("mode", ["auto", "worker"])
def test_the_run_preloads_once_and_forks_a_server_for_each_worker(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, mode: str
) -> None:
    """By default one process per run imports the preload, and forks for each worker the
    process that forks that worker's services; ``worker`` gives each worker its own."""
    mark = uuid.uuid4().hex
    monkeypatch.setenv("LEFTOVER_MARK", mark)
    monkeypatch.setenv("RECORDS", str(tmp_path))
    monkeypatch.setenv("WHO", "the run")
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(forkapp=APP, test_where=WHERE)
    result = pytester.runpytest_subprocess("-n", "2", "--dist", "each", "-p", "no:randomly",
                                           f"--isolate-fork-server={mode}")  # fmt: skip
    result.assert_outcomes(passed=2)
    seen = {p.name: json.loads(p.read_text()) for p in tmp_path.iterdir()}
    assert sorted(seen) == ["gw0", "gw1"]
    assert seen["gw0"]["server"] != seen["gw1"]["server"]
    assert all(r["boot_who"] == "the run" for r in seen.values())  # imported with the run's environment
    if mode == "auto":
        assert seen["gw0"]["parent"] == seen["gw1"]["parent"], seen
        assert "hub_fd" in seen["gw0"]["parent_cmdline"]
        assert seen["gw0"]["parent"] not in (seen["gw0"]["worker"], seen["gw1"]["worker"])
    else:
        assert all(r["parent"] == r["worker"] for r in seen.values()), seen
    assert leftovers(run_id_of(result), mark) == []


def test_the_next_run_starts_the_fork_server_before_a_worker_asks(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, private_base: str
) -> None:
    """A run remembers what the fork server its workers used was started from; the next
    run's controller starts it while the workers start, and their services fork from it.
    One started ahead that no worker used is forgotten; a run whose services could not
    fork from one forgets nothing."""
    mark = uuid.uuid4().hex
    monkeypatch.setenv("LEFTOVER_MARK", mark)
    monkeypatch.setenv("RECORDS", str(tmp_path))
    pytester.makeconftest(CONFTEST + CONTROLLER_PID)
    pytester.makepyfile(forkapp=APP, test_where=WHERE, test_plain="def test_plain():\n    pass\n")

    def launched_by(*args: str) -> str | None:
        """Who started the run's fork server: the run's controller or a worker."""
        for record in tmp_path.iterdir():
            record.unlink()
        result = pytester.runpytest_subprocess("-n", "2", "--dist", "each", "-p", "no:randomly", private_base, *args)
        assert leftovers(run_id_of(result), mark) == []
        result.assert_outcomes(passed=2)
        if "test_plain.py" in args:
            return None
        seen = [json.loads(p.read_text()) for p in tmp_path.iterdir()]
        assert len({r["parent"] for r in seen}) == 1, seen  # one fork server for the run
        launcher = seen[0]["launcher"]
        if str(launcher) == seen[0]["controller"]:
            return "controller"
        return "worker" if launcher in {r["worker"] for r in seen} else str(seen)

    assert launched_by("test_where.py") == "worker"  # nothing remembered yet
    assert launched_by("test_where.py") == "controller"
    assert launched_by("test_where.py", "--isolate-prestart=never") == "worker"
    assert launched_by("test_where.py") == "controller"
    # A run whose services cannot fork from the run's fork servers (as on docker) forgets nothing.
    assert launched_by("test_plain.py", "--isolate-fork-server=off") is None
    assert launched_by("test_where.py") == "controller"
    assert launched_by("test_plain.py") is None  # started ahead, used by no worker: forgotten
    assert launched_by("test_where.py") == "worker"


CONTROLLER_PID = """
import os

def pytest_configure(config):
    if not hasattr(config, "workerinput"):  # the controller: its workers inherit this
        os.environ["CONTROLLER_PID"] = str(os.getpid())
"""


def _recipe(**changes: object) -> dict[str, object]:
    recipe: dict[str, object] = {"python": sys.executable, "preload": ["json"], "path0": "/", "cwd": "/",
                                 "user": None, "inherit_env": True}  # fmt: skip
    recipe.update(changes)
    return recipe


@needs_root
def test_only_a_memory_this_user_wrote_is_read(tmp_path: Path) -> None:
    """The remembered recipes name a program to run: a file of another user's, one others
    may write, a link, junk or a malformed recipe is not read."""
    project = tmp_path / "project"
    memory = tmp_path / "forkservers.json"
    memory.write_text(json.dumps({str(project): [_recipe(), _recipe(python=7), _recipe(user=[1, "x"]), "junk"]}))
    memory.chmod(0o600)
    assert recall(memory, project) == [HubRecipe(sys.executable, ("json",), "/", "/", None)]
    assert recall(memory, tmp_path / "other") == []
    memory.chmod(0o666)
    assert recall(memory, project) == []
    memory.chmod(0o600)
    os.chown(memory, 65534, 65534)
    assert recall(memory, project) == []
    os.chown(memory, 0, 0)
    link = tmp_path / "link.json"
    link.symlink_to(memory)
    assert recall(link, project) == []
    memory.write_text("{not json")
    assert recall(memory, project) == []


CLIENT = """
import json, socket, sys
conn = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
conn.connect(sys.argv[1])
a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
socket.send_fds(conn, [json.dumps({"env": {}}).encode()], [b.fileno(), 1])
conn.settimeout(30)
print(repr(conn.recv(4096)))
"""


@needs_root
def test_the_runs_fork_server_answers_only_the_uid_that_started_it() -> None:
    """Reached by another uid (here its socket is made reachable on purpose; in a run it
    lives in the run dir), the run's fork server forks nothing for it and says nothing."""
    tmp_path = Path(tempfile.mkdtemp(prefix="isolate-hub-test-"))  # below /tmp: nobody reaches it
    tmp_path.chmod(0o755)
    path = tmp_path / "hub.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    listener.bind(str(path))
    listener.listen(8)
    path.chmod(0o777)
    config = {"preload": [], "path0": str(tmp_path), "hub_fd": listener.fileno(), "clients": [os.getuid()]}
    hub = subprocess.Popen([sys.executable, str(_PROGRAM), json.dumps(config)], pass_fds=(listener.fileno(),),
                           stdout=subprocess.DEVNULL, start_new_session=True)  # fmt: skip
    listener.close()
    client = tmp_path / "client.py"
    client.write_text(CLIENT)
    client.chmod(0o644)
    try:
        other = subprocess.run(["su", "nobody", "-s", "/bin/sh", "-c", f"/usr/bin/python3 {client} {path}"],
                               capture_output=True, text=True, timeout=60)  # fmt: skip
        assert other.stdout.strip() == "b''", other  # closed unanswered
        assert children(hub.pid, None) == []  # and nothing forked for it
        mine = subprocess.run([sys.executable, str(client), str(path)], capture_output=True, text=True, timeout=60)
        assert '"pid"' in mine.stdout, mine  # the starting uid is served
    finally:
        hub.kill()
        hub.wait()
        shutil.rmtree(tmp_path)
