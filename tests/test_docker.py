"""The Docker backend, against a real engine (no mocks).

CI runs these with ``-n 4 --isolate-backend=docker --isolate-pg-image=isolate-local/postgres:15
--isolate-redis-image=isolate-local/redis:7``; the images come from ``.ci/docker-setup.sh``
and the fixture app's image is built by isolate from ``tests/fixture_app/Dockerfile``.
Without an engine these tests skip, except with ``CI=true``, where they fail.

Most tests use host networking on 127.0.0.1; mapped mode's port bindings, URL and
container-side template values are checked on the ``none`` network. The tests that need
a user-defined bridge network and published ports (mapped mode end to end) are marked
``docker_bridge``; CI runs them (``.ci/docker-setup.sh``'s engine has both), and an
engine that cannot deselects them with ``-m 'not docker_bridge'``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import textwrap
import time
import traceback
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import suite_support
from suite_support import clean_env, docker_client, hang_report, signals_as_in_a_terminal
from tenacity import Retrying, stop_after_delay, wait_fixed

import isolate
from isolate._config import Settings, resolve_settings
from isolate._docker.containers import container_state, reap_orphans, reap_run
from isolate._docker.context import LABEL, DockerRun
from isolate._identity import WorkerIdentity, new_run_id
from isolate._ports import PortLease, _try_lock
from isolate._postgres import PostgresConfig, tuned_settings
from isolate._postgres.docker import DockerPostgresRunner
from isolate._redis import RedisConfig
from isolate._redis.docker import DockerRedisRunner
from isolate._run.liveness import Owner, process_start_ticks
from isolate._service.docker import ContainerLauncher

pytestmark = pytest.mark.docker

HERE = Path(__file__).parent
ROOT = HERE.parent
APP_CONTEXT = HERE / "fixture_app"
MIGRATIONS = APP_CONTEXT / "migrations"


# -- fixtures -------------------------------------------------------------------


@pytest.fixture(scope="module", autouse=True)
def docker_engine() -> Iterator[Any]:
    yield from docker_client("the docker tests")


@dataclasses.dataclass(frozen=True)
class Images:
    postgres: str
    redis: str
    python: str


@pytest.fixture(scope="session")
def images(isolate_stack: isolate.WorkerStack) -> Images:
    """The run's --isolate-pg-image/--isolate-redis-image, else the local CI images."""
    s = isolate_stack.settings
    return Images(
        postgres=s.pg_image
        if s.source_of("pg_image") != "default"
        else "isolate-local/postgres:15",
        redis=s.redis_image if s.source_of("redis_image") != "default" else "isolate-local/redis:7",
        python=os.environ.get("ISOLATE_TEST_PYTHON_IMAGE", "isolate-local/python:3"),
    )


@pytest.fixture
def settings(isolate_stack: isolate.WorkerStack, images: Images) -> Settings:
    return resolve_settings(
        {
            "backend": "docker",
            "docker_network": "host",
            "pg_image": images.postgres,
            "redis_image": images.redis,
            "base_dir": isolate_stack.settings.base_dir,
        },
        {},
        {},
    )


@pytest.fixture
def worker(isolate_stack: isolate.WorkerStack) -> WorkerIdentity:
    """A run id of the test's own: its containers are labelled with this process as owner."""
    return WorkerIdentity(isolate_stack.worker.worker_id, 1, "t" + new_run_id())


@pytest.fixture
def reaper_lock(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Serialises the tests that make orphans or reap (a reaper reaps everyone's orphans)."""
    with suite_support.reaper_lock(tmp_path_factory):
        yield


@pytest.fixture
def ctx(isolate_stack: isolate.WorkerStack, settings: Settings, worker: WorkerIdentity) -> DockerRun:
    """The test's own run on the engine; its containers name this process as owner."""
    return DockerRun(settings, worker, isolate_stack.run, Owner.current)


@pytest.fixture
def make_service(ctx: DockerRun) -> Iterator[Any]:
    """Build service handles on containers the way the worker stack does; closed after."""
    handles: list[isolate.ServiceHandle] = []

    def make(
        spec: isolate.ServiceSpec, settings: Settings | None = None, **extra: object
    ) -> isolate.ServiceHandle:
        run = ctx if settings is None else dataclasses.replace(ctx, settings=settings)
        instance = f"{spec.name}-test-{run.worker.slug}"
        values: dict[str, object] = {
            "host": "127.0.0.1", "name": instance, "worker": run.worker.worker_id,
            "run_id": run.worker.run_id, **extra,
        }  # fmt: skip
        launcher = ContainerLauncher(run, spec, instance, ROOT)
        handle = isolate.ServiceHandle(
            spec, instance, values, launcher, ready_timeout=30.0, stop_timeout=5.0
        )
        handles.append(handle)
        return handle

    yield make
    for handle in handles:
        with contextlib.suppress(Exception):
            handle.close()
    reap_run(ctx.worker.run_id)


def app_spec(name: str, **env: str) -> isolate.ServiceSpec:
    """The fixture app, built from tests/fixture_app (host networking, no DB needed)."""
    return isolate.ServiceSpec(
        name=name,
        build_context="tests/fixture_app",
        env={"PORT": "{port}", **env},
        health=isolate.HttpCheck("/health"),
        ready_timeout=30,
        stop_timeout=5,
    )


def containers_of(client: Any, run_id: str) -> list[Any]:
    return list(
        client.containers.list(
            all=True, filters={"label": f"{LABEL.RUN_ID}={run_id}"}, ignore_removed=True
        )
    )


def get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=5) as resp:
        return json.loads(resp.read())


def dead_owner() -> Owner:
    """A process of this machine that has exited."""
    proc = subprocess.Popen(["sleep", "30"])
    ticks = process_start_ticks(proc.pid)
    proc.kill()
    proc.wait()
    return dataclasses.replace(Owner.current(), pid=proc.pid, start_ticks=ticks)


# -- the stack and its isolation at -n 4 ------------------------------------------

INNER_CONFTEST = """
import os
import pytest
from pathlib import Path

import isolate

CONTEXT = Path({context!r})


def pytest_configure(config):
    barrier = os.environ.get("ISO_BARRIER")  # the isolation test's
    if barrier and not hasattr(config, "workerinput"):  # the xdist controller: it owns the run
        (Path(barrier) / "controller-pid").write_text(str(os.getpid()))


@pytest.fixture(scope="session")
def isolate_migrations():
    return CONTEXT / "migrations"


@pytest.fixture(scope="session")
def isolate_service_spec():
    # The image is built from tests/fixture_app/Dockerfile; its CMD runs app.py.
    return isolate.ServiceSpec(
        name="fixture-app",
        build_context=str(CONTEXT),
        env={{"PORT": "{{port}}", "DATABASE_URL": "{{dsn}}", "REDIS_URL": "{{redis_url}}"}},
        health=isolate.HttpCheck("/health"),
        ready_timeout=30,
        stop_timeout=5,
    )
"""

INNER_ISOLATION = """
import functools
import json
import os
import time
import urllib.request
from pathlib import Path

import docker
from tenacity import Retrying, retry_if_exception_type, stop_after_delay, wait_fixed

WORKERS = 4
BARRIER = Path(os.environ["ISO_BARRIER"])


def call(url, value=None):
    data = None if value is None else json.dumps({"value": value}).encode()
    with urllib.request.urlopen(urllib.request.Request(url, data=data), timeout=10) as resp:
        return json.loads(resp.read())


def wait_for(path_glob, count, timeout=180):
    retry = retry_if_exception_type(AssertionError)
    for attempt in Retrying(stop=stop_after_delay(timeout), wait=wait_fixed(0.05), retry=retry, reraise=True):
        with attempt:
            failed = sorted(p.name for p in BARRIER.glob("failed-*"))
            if failed:  # no point waiting for a worker that will never come
                raise RuntimeError(f"given up waiting for {path_glob}: {failed}")
            assert len(list(BARRIER.glob(path_glob))) >= count, f"waiting for {count} x {path_glob}"


def telling_the_others(test):
    @functools.wraps(test)
    def run(*args, **kwargs):
        try:
            return test(*args, **kwargs)
        except BaseException:
            (BARRIER / f"failed-{os.environ['PYTEST_XDIST_WORKER']}").write_text("")
            raise
    return run


@telling_the_others
def test_isolation(isolate_service, isolate_worker, isolate_database, isolate_postgres):
    me, slug = isolate_worker.worker_id, isolate_worker.slug
    svc = isolate_service
    url = svc.url
    instance = f"fixture-app-test-{slug}"
    client = docker.from_env()

    # labels: this worker's service, Redis and the shared PostgreSQL
    owner = (BARRIER / "controller-pid").read_text()  # the xdist controller owns the run
    labels = client.containers.get(svc.launcher.container_name).labels
    assert labels["isolate.run_id"] == isolate_worker.run_id
    assert labels["isolate.worker"] == me
    assert labels["isolate.managed"] == "true"
    assert labels["isolate.owner_pid"] == owner
    assert labels["isolate.owner_start_ticks"].isdigit()
    assert int(labels["isolate.created"]) <= time.time()
    for name in (f"isolate-pg-{isolate_worker.run_id}", f"isolate-redis-{slug}-{isolate_worker.run_id}"):
        other = client.containers.get(name).labels
        assert other["isolate.owner_pid"] == owner and other["isolate.managed"] == "true"
    assert isolate_postgres.backend == "docker"

    (BARRIER / f"ready-{me}").write_text(url)
    wait_for("ready-*", WORKERS)

    if me == "gw0":
        before = call(url + "/items", "before")
        assert before["hits"] == 1  # its own Redis
        (BARRIER / "disrupting").write_text("")
        wait_for("writing-*", WORKERS - 1)  # the others are mid-stream
        assert svc.stop() == 0  # graceful: SIGTERM, the app exits 0
        assert not svc.is_running
        time.sleep(0.5)  # a dwell, not a wait: the others keep writing while it is down
        svc.start()
        assert svc.url == url
        assert call(f"{url}/items/{before['id']}")["value"] == "before"
        assert svc.kill() == 137  # SIGKILL
        time.sleep(0.5)
        svc.start()
        svc.restart()  # graceful stop + start + health probe
        assert svc.url == url and svc.starts == 4
        assert call(url + "/items", "after")["hits"] == 2
        assert svc.logs().count("listening on") == 4  # logs of every start
        (BARRIER / "disrupted").write_text("")
        mine = 2
    else:
        written = during = 0
        deadline = time.monotonic() + 180
        while not (BARRIER / "disrupted").exists():
            disrupting = (BARRIER / "disrupting").exists()
            body = call(url + "/items", f"{me}-{written}")
            assert body["instance"] == instance
            assert body["hits"] == written + 1  # nobody else writes to this Redis
            assert call(f"{url}/items/{body['id']}")["value"] == f"{me}-{written}"
            written += 1
            if disrupting:
                during += 1
                if during == 3:
                    (BARRIER / f"writing-{me}").write_text("")
            assert time.monotonic() < deadline
        assert during >= 3, "no overlap with gw0's stop/kill/restart"
        mine = written
        print(f"{me} wrote {written} rows, {during} while gw0 was disrupted")

    with isolate_database.connect() as conn:
        rows = conn.execute("SELECT instance, count(*) FROM items GROUP BY instance").fetchall()
    assert rows == [(instance, mine)]
"""


def test_isolation_on_docker_at_n4(
    pytester: pytest.Pytester, images: Images, docker_engine: Any
) -> None:
    """Four workers, each its own container stack; gw0 stops, kills and restarts its
    service while gw1-gw3 keep writing and reading through theirs."""
    barrier = pytester.mkdir("barrier")
    pytester.makeconftest(INNER_CONFTEST.format(context=str(APP_CONTEXT)))
    pytester.makepyfile(test_inner=INNER_ISOLATION)
    env = clean_env(ISO_BARRIER=str(barrier))
    with pytest.MonkeyPatch.context() as mp:
        for key in list(os.environ):
            if key not in env:
                mp.delenv(key)
        mp.setenv("ISO_BARRIER", str(barrier))
        args = ["-n", "4", "--dist", "each", "-p", "no:cacheprovider", "-s", "-v", "--isolate-backend=auto",
                "--no-isolate-reap-stale", f"--isolate-pg-image={images.postgres}",
                f"--isolate-redis-image={images.redis}", "-o", "faulthandler_timeout=300"]  # fmt: skip
        try:
            done = subprocess.run([sys.executable, "-m", "pytest", *args], cwd=pytester.path, env=os.environ.copy(),
                                  capture_output=True, text=True, timeout=420, check=False)  # fmt: skip
        except subprocess.TimeoutExpired as exc:  # faulthandler's dump of every thread is in it
            out = exc.stdout.decode(errors="replace") if isinstance(exc.stdout, bytes) else exc.stdout or ""
            (pytester.path / "inner.out").write_text(out)
            (pytester.path / "inner.err").write_bytes(exc.stderr or b"")
            pytest.fail(f"the inner run did not end (all it printed: {pytester.path}/inner.*); "
                        f"where its threads were:\n{hang_report(exc.stderr)}\n{out[-3000:]}")  # fmt: skip
    out = done.stdout
    print(out)  # the inner run's timings table (shown with -s / -rP)
    assert done.returncode == 0, out + done.stderr
    assert "4 passed" in out, out
    # backend auto picked docker because the engine answered
    assert re.search(r"isolate: run \S+, backend docker \(auto: docker engine answered", out), out
    assert "isolate timings (seconds)" in out and "worker_stack_ready" in out, out
    run_id = next(
        line.split()[2].rstrip(",") for line in out.splitlines() if line.startswith("isolate: run ")
    )
    assert containers_of(docker_engine, run_id) == []  # the run removed its containers


# -- the service as a local process against the containers (docker_services=native) ---

#: The test apps' handler: GET answers their ``info()`` as JSON.
JSON_HANDLER = """
class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = json.dumps(info()).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass
"""

HYBRID_APP = """
import http.server, json, os, signal, sys, threading

import psycopg
import redis


def info():
    with psycopg.connect(os.environ["DATABASE_URL"]) as conn:
        (user,) = conn.execute("SELECT current_user").fetchone()
    with redis.Redis.from_url(os.environ["REDIS_URL"]) as client:
        hits = client.incr("hits")
    return {"pid": os.getpid(), "ppid": os.getppid(), "pgid": os.getpgid(0),
            "uid": os.getuid(), "user": user, "hits": hits}
""" + JSON_HANDLER + """


def main():
    server = http.server.HTTPServer(("127.0.0.1", int(os.environ["PORT"])), Handler)
    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=server.shutdown).start())
    print("hybrid app listening", flush=True)
    server.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
"""

HYBRID_CONFTEST = """
import sys
import pytest
import isolate

@pytest.fixture(scope="session")
def isolate_service_spec():
    # No image, no build_context: with --isolate-docker-services=native it runs as a
    # local process (forked from the worker's fork server) against the containers.
    return isolate.ServiceSpec(
        name="hybrid", command=[sys.executable, "hybridapp.py"], entry="hybridapp:main",
        env={"PORT": "{port}", "DATABASE_URL": "{dsn}", "REDIS_URL": "{redis_url}",
             "ISOLATE_RUN_ID": "{run_id}"},
        health=isolate.TcpCheck(), stop_timeout=5,
    )
"""

HYBRID_SUITE = """
import json, os, urllib.request
from pathlib import Path

import docker
import pytest


def get(url):
    with urllib.request.urlopen(url, timeout=10) as resp:
        return json.loads(resp.read())


@pytest.mark.parametrize("n", range(4))
def test_a_local_service_on_the_containers(n, isolate_service, isolate_postgres, isolate_redis,
                                            isolate_database, isolate_stack, isolate_worker):
    svc = isolate_service
    assert (isolate_postgres.backend, isolate_redis.backend) == ("docker", "docker")
    me = get(svc.url)
    assert me["user"] == isolate_database.role  # the worker's role on the PostgreSQL container
    assert me["pid"] == svc.pid == me["pgid"]  # a host process leading its own group
    parent = Path(f"/proc/{me['ppid']}/cmdline").read_bytes().decode()
    assert "_preloader.py" in parent  # forked from the fork server of the worker (a fork of the run's)
    run_as = svc.launcher.run_as  # demoted by the native backend's rules
    assert me["uid"] == (run_as.uid if run_as is not None else os.geteuid())
    records = {record.name for record in isolate_stack.run.registry.records()}
    assert f"service-{svc.name}" in records  # the reaper knows it, and the run's fork server
    assert any(name.startswith("forkserver-") for name in records), records
    client = docker.from_env()
    found = client.containers.list(filters={"label": f"isolate.run_id={isolate_worker.run_id}"})
    roles = {container.labels["isolate.role"] for container in found}
    client.close()
    assert "service" not in roles and {"postgres", "redis"} <= roles
    hits = me["hits"]
    assert svc.stop() == 0  # SIGTERM: it shuts down and exits 0
    svc.start()
    assert get(svc.url)["hits"] == hits + 1  # the same Redis container
    assert svc.kill() == 137
    svc.restart()
    assert get(svc.url)["pid"] == svc.pid
"""


def test_services_as_local_processes_against_the_containers(
    pytester: pytest.Pytester, images: Images, docker_engine: Any
) -> None:
    """``--isolate-docker-services=native``: a spec with only a command runs as a native
    process (own group, registry, fork server, demotion rules) on the docker backend's
    PostgreSQL and Redis, at -n 2; the header says so and the run leaves nothing."""
    from suite_support import leftovers, run_id_of

    pytester.makeconftest(HYBRID_CONFTEST)
    pytester.makepyfile(hybridapp=HYBRID_APP, test_hybrid=HYBRID_SUITE)
    mark = new_run_id()
    with pytest.MonkeyPatch.context() as mp:
        for key in list(os.environ):
            if key not in clean_env():
                mp.delenv(key)
        mp.setenv("LEFTOVER_MARK", mark)
        result = pytester.runpytest_subprocess(
            "-n", "2", "-p", "no:randomly", "-p", "no:cacheprovider",
            "--isolate-backend=docker", "--isolate-docker-services=native",
            "--no-isolate-reap-stale", "-v",
            f"--isolate-pg-image={images.postgres}", f"--isolate-redis-image={images.redis}",
            timeout=240,
        )  # fmt: skip
    out = result.stdout.str()
    assert result.ret == 0, out + result.stderr.str()
    result.assert_outcomes(passed=4)
    result.stdout.fnmatch_lines([
        "isolate: run *, backend docker (from command line --isolate-backend); "
        "services as local processes (from command line --isolate-docker-services)",
        "isolate: *network host, services as local processes (--isolate-docker-services=native)",
    ])  # fmt: skip
    assert "start as new processes" not in out  # the fork server applies
    run_id = run_id_of(result)
    assert containers_of(docker_engine, run_id) == []
    assert leftovers(run_id, mark) == []


def test_which_services_the_docker_backend_can_run_is_a_clear_error(
    isolate_stack: isolate.WorkerStack, settings: Settings, worker: WorkerIdentity, tmp_path: Path
) -> None:
    """No image or build context in container mode, no command in native mode: each
    error names the other way to run it."""
    from isolate._backends.docker import DockerBackend
    from isolate._service.native import ProcessLauncher

    command_only = isolate.ServiceSpec("cmd-only", [sys.executable, "-m", "http.server", "{port}"])
    image_only = isolate.ServiceSpec("img-only", image="isolate-local/python:3")
    bare = isolate.ServiceSpec("bare")
    containers = DockerBackend(settings, worker, isolate_stack.run, ROOT)
    for spec in (command_only, bare):
        with pytest.raises(isolate.ConfigError, match="neither an image nor a build context") as err:
            containers.service(spec, f"{spec.name}-test-x", tmp_path / "log")
        assert "--isolate-docker-services=native" in str(err.value.hint)
        assert ("give it a command" in str(err.value.hint)) == (spec is bare)
    native = DockerBackend(dataclasses.replace(settings, docker_services="native"), worker, isolate_stack.run, ROOT)
    for spec in (image_only, bare):
        with pytest.raises(isolate.ConfigError, match="has no command") as err:
            native.service(spec, f"{spec.name}-test-x", tmp_path / "log")
        assert "--isolate-docker-services=container" in str(err.value.hint)
    launcher = native.service(command_only, "cmd-only-test-x", tmp_path / "log")
    assert isinstance(launcher, ProcessLauncher) and launcher.forkserver is None  # no entry


# -- the service handle --------------------------------------------------------------


def test_url_stable_and_graceful_stop_host_mode(
    make_service: Any, docker_engine: Any, worker: WorkerIdentity
) -> None:
    svc = make_service(app_spec("dk-stable"))
    svc.start()
    url, port = svc.url, svc.port
    assert get_json(url + "/health")["instance"] == svc.name
    container_id = svc.launcher.container_id
    container = docker_engine.containers.get(container_id)
    labels = container.labels
    assert labels[LABEL.MANAGED] == "true"
    assert labels[LABEL.RUN_ID] == worker.run_id
    assert labels[LABEL.WORKER] == worker.worker_id
    assert labels[LABEL.OWNER + "pid"] == str(os.getpid())
    assert labels[LABEL.OWNER + "start_ticks"] == str(process_start_ticks(os.getpid()))
    assert container.name == f"dk-stable-test-{worker.slug}-{worker.run_id}"
    assert svc.pid == container.attrs["State"]["Pid"]
    assert svc.record() is None  # containers are reaped by their run label

    assert svc.stop() == 0  # docker stop: SIGTERM, the app finishes and exits 0
    assert not svc.is_running and svc.last_exit_code == 0
    svc.start()  # same container, same port: readiness re-probed through the host port
    assert (svc.url, svc.port, svc.launcher.container_id) == (url, port, container_id)
    assert get_json(url + "/health")["instance"] == svc.name

    assert svc.kill() == 137  # docker kill: SIGKILL
    svc.start()
    svc.signal(signal.SIGTERM)  # no wait...
    assert svc.wait_exit(10) == 0
    svc.restart()
    assert svc.is_running and svc.url == url and svc.starts == 4
    assert svc.logs().count("listening on") == 4  # logs cover every start
    assert "SIGTERM, shutting down" in svc.logs()
    svc.close()
    with pytest.raises(Exception, match=r"No such container|404"):
        docker_engine.containers.get(container_id)


def test_whether_a_container_runs_is_asked_of_the_kernel_while_its_init_runs(
    make_service: Any, docker_engine: Any
) -> None:
    """Asked before every test: no call to the engine while the init it last saw running
    runs; a container killed behind isolate's back is seen stopped as soon as its init is
    gone, and the next test's ``ensure_running`` starts it again."""
    svc = make_service(app_spec("dk-stable"))
    svc.start()
    container = svc.launcher.container
    asked: list[int] = []
    reload = container.reload

    def counted(*args: Any, **kwargs: Any) -> Any:
        asked.append(1)
        return reload(*args, **kwargs)

    container.reload = counted
    assert all(svc.is_running for _ in range(50)) and asked == []
    docker_engine.containers.get(container.id).kill()  # not through isolate
    for attempt in Retrying(stop=stop_after_delay(10), wait=wait_fixed(0.02), reraise=True):
        with attempt:
            assert not svc.is_running
    assert asked, "the engine was not asked once the init had gone"
    svc.ensure_running()
    assert svc.is_running and get_json(svc.url + "/health")["instance"] == svc.name
    assert docker_engine.containers.get(container.id).attrs["State"]["Running"]


def test_an_init_watch_is_only_taken_on_a_process_in_the_containers_cgroup() -> None:
    """A pid the engine reports that is not this machine's container init (another pid
    namespace, a remote engine, a pid reused since) is never watched: the engine is asked."""
    from isolate._docker.containers import InitWatch

    class Stranger:
        id = "f" * 64

    assert InitWatch.of(Stranger(), {"Running": True, "Pid": os.getpid()}) is None  # ours, not its cgroup
    assert InitWatch.of(Stranger(), {"Running": True, "Pid": 2**22 + 1}) is None  # no such process
    assert InitWatch.of(Stranger(), {"Running": False, "Pid": os.getpid()}) is None


@pytest.mark.parametrize(("cgroups", "inside"), [
    ("0::/system.slice/docker-{id}.scope\n", True),
    ("12:memory:/docker/{id}\n0::/\n", True),
    ("0::/docker/{id}/\n", True),
    ("0::/user.slice/docker-{id}.scope.evil\n", False),
    ("0::/user.slice/{id}-planted/child\n", False),
    ("0::/\n", False),
])  # fmt: skip
def test_a_process_is_in_a_containers_cgroup_only_where_a_path_ends_with_it(cgroups: str, inside: bool) -> None:
    from isolate._docker.containers import _in_cgroup_of

    container_id = "ab" * 32
    assert _in_cgroup_of(cgroups.format(id=container_id), container_id) is inside


def test_stop_kills_a_container_ignoring_sigterm_after_the_timeout(
    make_service: Any, images: Images
) -> None:
    code = (
        "import http.server, os, signal, sys\n"
        "signal.signal(signal.SIGTERM, lambda *a: print('ignoring SIGTERM', flush=True))\n"
        "srv = http.server.HTTPServer(('127.0.0.1', int(os.environ['PORT'])), http.server.SimpleHTTPRequestHandler)\n"
        "print('serving', flush=True)\n"
        "srv.serve_forever()\n"
    )
    spec = isolate.ServiceSpec(
        name="dk-stubborn", image=images.python, command=["python3", "-c", code],
        env={"PORT": "{port}"}, health=isolate.TcpCheck(), stop_timeout=1,
    )  # fmt: skip
    svc = make_service(spec)
    svc.start()
    started = time.monotonic()
    assert svc.stop(timeout=2) == 137  # SIGTERM ignored -> SIGKILL after 2s
    elapsed = time.monotonic() - started
    assert 1.9 <= elapsed < 8, elapsed
    assert "ignoring SIGTERM" in svc.logs()
    assert not svc.is_running


def test_port_taken_before_the_first_start_gets_a_new_port(
    make_service: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    import socket

    svc = make_service(app_spec("dk-porttaken"))
    with socket.socket() as squatter:  # someone outside isolate's leases holds a port...
        squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        taken = squatter.getsockname()[1]
        lock = _try_lock(taken)
        assert lock is not None
        # ...and the port picker hands it out first (it was free when it looked).
        leases = iter([PortLease(taken, lock)])
        real = isolate.reserve_port
        monkeypatch.setattr("isolate._retry.reserve_port", lambda: next(leases, None) or real())
        svc.start()
        assert svc.port != taken and svc.url == f"http://127.0.0.1:{svc.port}"
        assert get_json(svc.url + "/health")["instance"] == svc.name
        assert svc.starts == 1


def test_mapped_mode_port_binding_and_url_stable(
    make_service: Any, settings: Settings, images: Images, docker_engine: Any
) -> None:
    """Mapped mode on the ``none`` network (no bridge here): the published port is
    127.0.0.1:<picked> -> container_port, templates see the container port, and the
    binding, container and URL survive stop/start."""
    mapped = dataclasses.replace(settings, docker_network="mapped", docker_network_name="none")
    web = isolate.ServiceSpec(
        name="dk-mapped", image=images.python,
        command=["python3", "-m", "http.server", "{port}", "--bind", "{host}"],
        env={"LISTEN": "{host}:{port}", "PUBLIC": "{url}"}, container_port=8000,
        health=isolate.TcpCheck(), stop_timeout=2,
    )  # fmt: skip
    with pytest.raises(isolate.ConfigError, match="container_port"):
        make_service(dataclasses.replace(web, name="dk-noport", container_port=None), mapped)

    svc = make_service(web, mapped)
    svc.start(wait=False)  # nothing can reach it on the none network
    url, port = svc.url, svc.port

    def config() -> tuple[Any, ...]:
        attrs = docker_engine.containers.get(svc.launcher.container_id).attrs
        return (
            attrs["Id"],
            attrs["HostConfig"]["PortBindings"],
            attrs["Config"]["Cmd"],
            attrs["Config"]["Env"],
        )

    first = config()
    _, bindings, cmd, env = first
    assert bindings == {"8000/tcp": [{"HostIp": "127.0.0.1", "HostPort": str(port)}]}
    assert cmd == ["python3", "-m", "http.server", "8000", "--bind", "0.0.0.0"]
    assert "LISTEN=0.0.0.0:8000" in env and f"PUBLIC=http://127.0.0.1:{port}" in env
    assert svc.is_running
    svc.stop()
    assert not svc.is_running
    svc.start(wait=False)
    assert svc.is_running and svc.url == url and config() == first


@pytest.mark.docker_bridge
def test_mapped_mode_end_to_end(
    make_service: Any, ctx: DockerRun, settings: Settings, worker: WorkerIdentity, images: Images
) -> None:
    from isolate._database import WorkerDatabase

    mapped = dataclasses.replace(settings, docker_network="mapped")
    run = dataclasses.replace(ctx, settings=mapped)
    pg = DockerPostgresRunner(run, PostgresConfig(tuned_settings(1, 10)))
    rd = DockerRedisRunner(run, RedisConfig(), "redis-main", shared=False)
    svc = None
    try:
        pg.start()
        rd.start()
        assert pg.server is not None and rd.server is not None
        db = WorkerDatabase.create(pg.server, worker.slug, worker.run_id)
        db.apply_migrations(MIGRATIONS)
        code = (
            "import http.server, os, psycopg, redis\n"
            "psycopg.connect(os.environ['DATABASE_URL']).close()\n"
            "redis.Redis.from_url(os.environ['REDIS_URL']).ping()\n"
            "http.server.HTTPServer((os.environ['HOST'], int(os.environ['PORT'])),"
            " http.server.SimpleHTTPRequestHandler).serve_forever()\n"
        )
        spec = isolate.ServiceSpec(
            name="dk-mapped-e2e", image=images.python, command=["python3", "-c", code],
            env={"HOST": "{host}", "PORT": "{port}", "DATABASE_URL": "{dsn}", "REDIS_URL": "{redis_url}"},
            container_port=8080, health=isolate.TcpCheck(), stop_timeout=2,
        )  # fmt: skip
        svc = make_service(spec, mapped, dsn=db.dsn, redis_url=rd.server.url)
        values = svc.launcher.container_values(svc.values)
        assert f"@isolate-pg-{worker.run_id}:5432/" in str(values["dsn"])
        assert f"isolate-redis-{worker.slug}-{worker.run_id}:6379" in str(values["redis_url"])
        svc.start()  # healthy only if it reached PostgreSQL and Redis over the run network
        url = svc.url
        svc.stop()
        svc.start()
        assert svc.url == url and svc.is_ready()
    finally:
        if svc is not None:
            svc.close()  # detach everything before the network goes
        rd.stop()
        pg.stop()
        reap_run(worker.run_id)


@pytest.mark.docker_bridge
def test_a_tcp_check_behind_the_proxy_waits_for_the_service_to_listen(
    make_service: Any, settings: Settings, images: Images
) -> None:
    """Mapped mode: Docker's proxy accepts on the published port before anything listens
    in the container (and hangs up); readiness must wait for the service itself."""
    code = (
        "import http.server, signal\n"
        "signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGUSR1])\n"
        "print('waiting for SIGUSR1', flush=True)\n"
        "signal.sigwait([signal.SIGUSR1])  # listens only when told\n"
        "http.server.HTTPServer(('0.0.0.0', 8000), http.server.SimpleHTTPRequestHandler).serve_forever()\n"
    )
    spec = isolate.ServiceSpec(
        name="dk-late", image=images.python, command=["python3", "-c", code],
        container_port=8000, health=isolate.TcpCheck(), stop_timeout=2,
    )  # fmt: skip
    svc = make_service(spec, dataclasses.replace(settings, docker_network="mapped"))
    svc.start(wait=False)
    assert isolate.TcpCheck()(svc.host, svc.port)  # the proxy accepts...
    assert not svc.is_ready()  # ...and hangs up: nothing listens yet
    for attempt in Retrying(stop=stop_after_delay(30), wait=wait_fixed(0.05), reraise=True):
        with attempt:
            assert "waiting for SIGUSR1" in svc.logs()
    svc.signal(signal.SIGUSR1)
    svc.wait_ready()
    with urllib.request.urlopen(svc.url + "/", timeout=10) as resp:
        assert resp.status == 200
    assert svc.proxied and svc.stop() in (0, 137, 143)


# -- backing servers --------------------------------------------------------------


def test_postgres_and_redis_containers(
    ctx: DockerRun, worker: WorkerIdentity, docker_engine: Any
) -> None:
    pg = DockerPostgresRunner(ctx, PostgresConfig(tuned_settings(2, 10, {"work_mem": "12MB"})))
    rd = DockerRedisRunner(ctx, RedisConfig(databases=20), f"redis-{worker.slug}-1", shared=False)
    try:
        pg.start()
        rd.start()
        assert pg.server is not None and rd.server is not None
        assert pg.server.backend == "docker" and pg.server.version
        import psycopg

        with psycopg.connect(pg.server.admin_dsn) as conn:
            assert conn.execute("SHOW work_mem").fetchone() == ("12MB",)
            assert conn.execute("SHOW fsync").fetchone() == ("off",)
            assert conn.execute("SHOW listen_addresses").fetchone() == ("127.0.0.1",)
        container = docker_engine.containers.get(pg.container.id)
        assert container.name == f"isolate-pg-{worker.run_id}"
        assert container.attrs["HostConfig"]["NetworkMode"] == "host"
        assert container.labels[LABEL.ROLE] == "postgres"
        assert container.labels[LABEL.OWNER + "pid"] == str(os.getpid())

        assert rd.server.backend == "docker"
        client = rd.server.client()
        assert client.ping() and client.config_get("databases") == {"databases": "20"}
        assert client.config_get("bind") == {"bind": "127.0.0.1"}
        rd.server.cut()
        with pytest.raises(Exception):  # noqa: B017 - the default user is disabled
            rd.server.client(socket_timeout=2).ping()
        rd.server.restore()
        assert rd.server.client().ping()
        redis_container = docker_engine.containers.get(rd.container.id)
        assert redis_container.name == f"isolate-redis-{worker.slug}-{worker.run_id}"
        assert redis_container.labels[LABEL.ROLE] == "redis"
    finally:
        for runner in (rd, pg):
            runner.stop()
    assert containers_of(docker_engine, worker.run_id) == []


def test_postgres_starts_from_a_seeded_image_with_a_password_of_its_own(
    ctx: DockerRun, worker: WorkerIdentity, docker_engine: Any
) -> None:
    import psycopg

    from isolate._postgres.docker import seeded_image

    config = PostgresConfig(tuned_settings(1, 10))
    tag = seeded_image(ctx, ctx.settings.pg_image, config)
    assert seeded_image(ctx, ctx.settings.pg_image, config) == tag  # made once
    image = docker_engine.images.get(tag)
    assert image.labels.get("isolate.build_context") == "pg-seed"  # cleanup --caches removes it
    # none of the seeding run's labels: a container made from it is not that run's (its
    # reaper, or the next run's, would remove it)
    assert {k: v for k, v in image.labels.items() if k.startswith("isolate.") and v} == {"isolate.build_context": "pg-seed"}
    # the password it was made with is not in the image
    # (run's remove=True can race the daemon's own removal: 409 "already in progress")
    box = docker_engine.containers.run(tag, entrypoint=["cat", "/tmp/isolate-postgres-password"],
                                       network_mode="none", detach=True)  # fmt: skip
    try:
        box.wait(timeout=60)
        assert box.logs() == b""
    finally:
        box.remove(force=True)
    runs = [DockerPostgresRunner(ctx, config) for _ in range(2)]
    try:
        runs[0].start()
        assert runs[0].server is not None
        container = docker_engine.containers.get(runs[0].container.id)
        assert container.image.id == image.id
        assert runs[0].password not in str(container.attrs["Config"])  # not in inspect
        with psycopg.connect(runs[0].server.admin_dsn) as conn:
            assert conn.execute("SELECT current_user").fetchone() == (config.superuser,)
        runs[0].stop()
        runs[1].container_name += "-2"
        runs[1].start()  # another run from the same image: its own password, not the first's
        assert runs[1].server is not None and runs[1].password != runs[0].password
        first = runs[1].server.admin_dsn.replace(runs[1].password, runs[0].password)
        with pytest.raises(psycopg.OperationalError):
            psycopg.connect(first, connect_timeout=5).close()
    finally:
        for run in runs:
            run.stop()
    assert containers_of(docker_engine, worker.run_id) == []


# -- errors -----------------------------------------------------------------------------


#: Missing images named on a registry at a closed loopback port: the pull isolate tries
#: fails at once, and this machine's tests send nothing past loopback.
NO_REGISTRY = "127.0.0.1:9/isolate-local"


def test_missing_image_errors(ctx: DockerRun, settings: Settings, make_service: Any) -> None:
    image = f"{NO_REGISTRY}/no-such-postgres:1"
    bad = dataclasses.replace(ctx, settings=dataclasses.replace(settings, pg_image=image))
    started = time.monotonic()
    with pytest.raises(isolate.ImageNotFoundError) as err:
        DockerPostgresRunner(bad, PostgresConfig(tuned_settings(1, 10))).start()
    assert image in str(err.value)
    assert "127.0.0.1:9" in str(err.value)  # the pull was tried, on loopback
    assert "--isolate-pg-image" in err.value.hint
    assert time.monotonic() - started < 60

    spec = isolate.ServiceSpec(name="dk-noimage", image=f"{NO_REGISTRY}/no-such-service:1")
    with pytest.raises(isolate.ImageNotFoundError) as err:
        make_service(spec)
    assert "ServiceSpec.image" in err.value.hint and "docker build" in err.value.hint


def test_container_exiting_at_start_reports_code_and_log_tail(make_service: Any) -> None:
    svc = make_service(app_spec("dk-exits", EXIT_AT_START="3"))
    with pytest.raises(isolate.ServiceExitedError) as err:
        svc.start()
    assert err.value.context["exit_code"] == 3
    assert "fixture app: failing on purpose" in (err.value.log_tail or "")
    assert "exited with code 3" in str(err.value)


# -- reaping ------------------------------------------------------------------------------


def labels_of(ctx: DockerRun, owner: Owner) -> dict[str, str]:
    """Labels of another run (``gw9`` of a new run id) owned by ``owner``."""
    worker = WorkerIdentity("gw9", 1, "t" + new_run_id())
    return dataclasses.replace(ctx, worker=worker, find_owner=lambda: owner).labels("test")


def _orphan_candidate(client: Any, image: str, ctx: DockerRun, owner: Owner, name: str) -> Any:
    return client.containers.run(
        image, ["sleep", "300"], name=name, detach=True, network_mode="host",
        labels=labels_of(ctx, owner),
    )  # fmt: skip


@pytest.mark.usefixtures("reaper_lock")
def test_reaper_removes_dead_owners_and_keeps_live_ones(
    ctx: DockerRun, images: Images, docker_engine: Any
) -> None:
    suffix = new_run_id()
    dead = _orphan_candidate(docker_engine, images.python, ctx, dead_owner(), f"dk-dead-{suffix}")
    live = _orphan_candidate(docker_engine, images.python, ctx, Owner.current(), f"dk-live-{suffix}")
    volume = docker_engine.volumes.create(labels=labels_of(ctx, dead_owner()))
    try:
        assert f"container dk-dead-{suffix}" in reap_orphans(dry_run=True)
        assert docker_engine.containers.get(dead.id)  # dry run removed nothing
        removed = reap_orphans()
        assert f"container dk-dead-{suffix}" in removed
        assert f"volume {volume.name}" in removed
        assert f"container dk-live-{suffix}" not in removed
        assert docker_engine.containers.get(live.id).status == "running"
        with pytest.raises(Exception, match=r"No such container|404"):
            docker_engine.containers.get(dead.id)
    finally:
        for container in (dead, live):
            with contextlib.suppress(Exception):
                container.remove(force=True)
        with contextlib.suppress(Exception):
            volume.remove(force=True)


@pytest.mark.usefixtures("reaper_lock")
def test_cleanup_command(tmp_path: Path, ctx: DockerRun, images: Images, docker_engine: Any) -> None:
    base = tmp_path / "base"
    stale = base / "isolate-run-stale1"
    alive = base / "isolate-run-alive1"
    gone = dead_owner()
    for run_dir, (pid, ticks) in ((stale, (gone.pid, gone.start_ticks)), (alive, (os.getpid(), None))):
        (run_dir / "registry").mkdir(parents=True)
        (run_dir / "owner.json").write_text(json.dumps({"pid": pid, "start_ticks": ticks}))
    suffix = new_run_id()
    dead = _orphan_candidate(docker_engine, images.python, ctx, dead_owner(), f"dk-dead-{suffix}")
    live = _orphan_candidate(docker_engine, images.python, ctx, Owner.current(), f"dk-live-{suffix}")
    cmd = [sys.executable, "-m", "isolate", "cleanup", "--base-dir", str(base)]
    try:
        dry = subprocess.run(
            [*cmd, "--dry-run"], capture_output=True, text=True, timeout=60, env=clean_env()
        )
        assert dry.returncode == 0, dry.stderr
        assert f"would remove run dir {stale}" in dry.stdout
        # (or a clean-up that another test ran meanwhile removed it: see below)
        listed = f"would remove container dk-dead-{suffix}" in dry.stdout
        assert listed or not docker_engine.containers.list(all=True, filters={"id": dead.id}), dry.stdout
        assert str(alive) not in dry.stdout and f"dk-live-{suffix}" not in dry.stdout
        assert stale.exists()
        if listed:
            docker_engine.containers.get(dead.id)  # a dry run removes nothing

        done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=clean_env())
        assert done.returncode == 0, done.stderr
        assert f"removed run dir {stale}" in done.stdout
        # (or a clean-up that another test ran meanwhile removed it: it is gone either way)
        assert f"removed container dk-dead-{suffix}" in done.stdout or not docker_engine.containers.list(
            all=True, filters={"id": dead.id})  # fmt: skip
        assert not stale.exists() and alive.exists()
        assert docker_engine.containers.get(live.id).status == "running"
        with pytest.raises(Exception, match=r"No such container|404"):
            docker_engine.containers.get(dead.id)
    finally:
        for container in (dead, live):
            with contextlib.suppress(Exception):
                container.remove(force=True)


INNER_HANG = """
import os
import time
from pathlib import Path


def test_hang(isolate_service, isolate_redis):
    Path(os.environ["ISO_MARKER"]).write_text(isolate_service.url)
    time.sleep(300)
"""


@pytest.mark.usefixtures("reaper_lock")
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM, signal.SIGINT])
def test_a_killed_or_cancelled_run_leaves_no_container(
    tmp_path: Path, images: Images, docker_engine: Any, sig: signal.Signals
) -> None:
    """SIGTERM (CI cancel): the controller reaps before it exits. SIGKILL: its watchdog
    does, within seconds, without waiting for a later run."""
    suite = tmp_path / "suite"
    suite.mkdir()
    (suite / "conftest.py").write_text(
        textwrap.dedent(INNER_CONFTEST.format(context=str(APP_CONTEXT)))
    )
    (suite / "test_hang.py").write_text(INNER_HANG)
    base = tmp_path / "base"
    base.mkdir()
    marker = tmp_path / "started"
    run_id = "k" + new_run_id()
    args = [
        sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "--isolate-backend=docker",
        f"--isolate-pg-image={images.postgres}", f"--isolate-redis-image={images.redis}",
        f"--isolate-base-dir={base}",
        "--no-isolate-reap-stale",  # the orphans of the reaper tests running meanwhile are theirs
    ]  # fmt: skip
    env = clean_env(ISO_MARKER=str(marker), ISOLATE_RUN_ID=run_id)
    proc = subprocess.Popen(
        [*args, "test_hang.py"],
        cwd=suite,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        preexec_fn=signals_as_in_a_terminal,
    )
    try:
        for attempt in Retrying(stop=stop_after_delay(120), wait=wait_fixed(0.1), reraise=True):
            with attempt:
                assert proc.poll() is None, proc.communicate()[0].decode()
                assert marker.exists(), "the run never got its stack up"
        assert containers_of(docker_engine, run_id)
    finally:
        proc.send_signal(sig)
        proc.communicate(timeout=60)
    if sig != signal.SIGKILL:
        assert proc.returncode == pytest.ExitCode.INTERRUPTED
    for attempt in Retrying(stop=stop_after_delay(20), wait=wait_fixed(0.2), reraise=True):
        with attempt:
            assert containers_of(docker_engine, run_id) == []
            assert not (base / f"isolate-run-{run_id}").exists()


def test_a_failed_shared_start_is_one_error_and_leaves_no_container(
    pytester: pytest.Pytester, images: Images, docker_engine: Any
) -> None:
    pytester.makepyfile(
        test_db="""
        import pytest

        @pytest.mark.parametrize("n", range(4))
        def test_db(n, isolate_postgres):
            pass
        """
    )
    run_id = "s" + new_run_id()
    result = pytester.runpytest_subprocess(
        "-n", "2", "-p", "no:randomly", "--isolate-backend=docker", "--no-isolate-reap-stale",
        f"--isolate-pg-image={images.postgres}", "--isolate-pg-settings=shared_buffers=lots",
        f"--isolate-run-id={run_id}", timeout=240,
    )  # fmt: skip
    result.assert_outcomes(errors=4)
    out = result.stdout.str()
    assert "exited during start-up" in out and "shared_buffers" in out
    assert "postgres failed to start in worker" in out
    assert containers_of(docker_engine, run_id) == []


# -- service images ------------------------------------------------------------------

STALE_DOCKERFILE = """
FROM {image}
WORKDIR /app
COPY pkg/ /app/pkg/
CMD ["python3", "-m", "pkg"]
"""

STALE_APP = """
import http.server, os
VERSION = {version!r}


class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = VERSION.encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


http.server.HTTPServer(("127.0.0.1", int(os.environ["PORT"])), Handler).serve_forever()
"""


def _write_context(context: Path, image: str, version: str) -> None:
    (context / "pkg").mkdir(parents=True, exist_ok=True)
    (context / "Dockerfile").write_text(STALE_DOCKERFILE.format(image=image))
    # The same shape as examples/datastorage/.dockerignore: ignore all, re-include some.
    (context / ".dockerignore").write_text("*\n!pkg/\n**/__pycache__\n")
    (context / "notes.txt").write_text(f"not sent to the engine {new_run_id()}")
    (context / "pkg" / "__main__.py").write_text(STALE_APP.format(version=version))


def test_context_digest_follows_dockerignore_reincludes(tmp_path: Path, images: Images) -> None:
    from isolate._docker.images import context_digest

    _write_context(tmp_path, images.python, "v1")
    first = context_digest(tmp_path)
    assert first != "e3b0c44298fc"  # not the digest of nothing
    (tmp_path / "notes.txt").write_text("ignored by .dockerignore")
    assert context_digest(tmp_path) == first
    (tmp_path / "pkg" / "__main__.py").write_text(STALE_APP.format(version="v2"))
    assert context_digest(tmp_path) != first


class Builds:
    """Starts services built by isolate, reads their answer to ``GET /`` and closes them;
    the images built are removed after the test."""

    def __init__(self, make_service: Any) -> None:
        self.make_service = make_service
        self.built: set[str] = set()

    def answer(self, spec: isolate.ServiceSpec) -> str:
        svc = self.make_service(spec)
        svc.start()
        self.built.add(svc.launcher.image)
        with urllib.request.urlopen(svc.url, timeout=10) as resp:
            body = resp.read().decode()
        svc.close()
        return str(body)


@pytest.fixture
def builds(make_service: Any, docker_engine: Any) -> Iterator[Builds]:
    made = Builds(make_service)
    yield made
    for tag in made.built:
        with contextlib.suppress(Exception):
            docker_engine.images.remove(tag, force=True)


def test_context_digest_follows_the_dockerfile_and_build_args(tmp_path: Path, images: Images) -> None:
    from isolate._docker.images import context_digest

    context = tmp_path / "ctx"
    _write_context(context, images.python, "v1")
    outside = tmp_path / "docker" / "svc.Dockerfile"
    outside.parent.mkdir()
    outside.write_text(STALE_DOCKERFILE.format(image=images.python))
    default = context_digest(context)
    assert context_digest(context, context / "Dockerfile") == default  # named or not: the same
    elsewhere = context_digest(context, outside)
    assert elsewhere != default
    outside.write_text(STALE_DOCKERFILE.format(image=images.python) + "ENV EDITED=1\n")
    assert context_digest(context, outside) != elsewhere  # its content counts, outside too
    with_args = context_digest(context, outside, {"GREETING": "hello"})
    assert with_args != context_digest(context, outside)
    assert context_digest(context, outside, {"GREETING": "bye"}) != with_args
    assert context_digest(context, outside, {"GREETING": "hello"}) == with_args


ARG_DOCKERFILE = """
FROM {image}
ARG GREETING=unset
COPY pkg/ /app/pkg/
RUN sed -i "s/^VERSION = .*/VERSION = '$GREETING'/" /app/pkg/__main__.py
CMD ["python3", "/app/pkg/__main__.py"]
"""


def test_a_dockerfile_outside_the_context_with_build_args(
    tmp_path: Path, images: Images, builds: Builds, docker_engine: Any
) -> None:
    """``ServiceSpec.dockerfile`` outside the build context (which ignores everything but
    ``pkg/``) builds, and ``build_args`` reach the build: each value its own image."""
    context = tmp_path / "svc"
    _write_context(context, images.python, "from the context")
    (context / "Dockerfile").write_text("FROM scratch-that-does-not-exist\n")  # not the one used
    dockerfile = tmp_path / "docker" / "svc.Dockerfile"
    dockerfile.parent.mkdir()
    dockerfile.write_text(ARG_DOCKERFILE.format(image=images.python))

    def spec(greeting: str, where: Path | str) -> isolate.ServiceSpec:
        return isolate.ServiceSpec(
            name="dk-args", build_context=context, dockerfile=where, build_args={"GREETING": greeting},
            env={"PORT": "{port}"}, health=isolate.HttpCheck("/"), stop_timeout=2,
        )  # fmt: skip

    assert builds.answer(spec("hello", dockerfile)) == "hello"
    assert builds.answer(spec("bye", "../docker/svc.Dockerfile")) == "bye"  # relative to the context
    assert len(builds.built) == 2
    image = docker_engine.images.get(sorted(builds.built)[0])
    assert image.labels.get("isolate.build_context") == str(context)  # cleanup --caches finds it


@pytest.mark.parametrize("error", [
    "failed to export image: failed to set parent sha256:{h}: unknown parent image ID sha256:{h}",
    "failed to get digest sha256:{h}: open /var/lib/docker/image/overlay2/imagedb/content/sha256/{h}: "
    "no such file or directory",
])  # fmt: skip
def test_a_build_whose_cached_layer_was_removed_meanwhile_goes_again(
    tmp_path: Path, images: Images, docker_engine: Any, monkeypatch: pytest.MonkeyPatch, error: str
) -> None:
    """``isolate cleanup --caches`` in another shell (or ``docker image prune``) may remove
    an image whose layers a build is taking from the cache; the engine then fails the
    build with one of these errors (seen: 3 of 40 builds beside a loop of clean-ups). The
    build goes again, from what is left; a Dockerfile's own error is not tried twice."""
    import docker.errors
    import docker.models.images

    from isolate._docker.images import build_image

    # A context of its own: the other case, maybe on another worker, must not have built
    # (or be removing) the same image meanwhile.
    _write_context(tmp_path, images.python, f"cache gone {new_run_id()}")
    builds: list[str] = []
    injected: list[str] = []
    real = docker.models.images.ImageCollection.build

    def build(self: Any, **kwargs: Any) -> Any:
        builds.append(kwargs["tag"])
        if not injected:  # the engine's answer when the race happens, once
            injected.append(error)
            raise docker.errors.BuildError(error.format(h="ab" * 32), build_log=[])
        return real(self, **kwargs)

    monkeypatch.setattr(docker.models.images.ImageCollection, "build", build)
    tag = build_image(docker_engine, "dk-cachegone", tmp_path)
    try:
        # The injected failure, then the build again. Another test's clean-up on another
        # worker may remove a layer this build takes from the cache meanwhile (the race
        # itself, for real): the engine's error then costs it one more attempt.
        assert builds[:2] == [tag, tag] and len(builds) <= 3, builds
        docker_engine.images.get(tag)
        (tmp_path / "Dockerfile").write_text(f"FROM {images.python}\nRUN exit 3\n")
        builds.clear()
        with pytest.raises(isolate.ImageNotFoundError, match="building image"):
            build_image(docker_engine, "dk-cachegone", tmp_path)
        assert len(builds) == 1
    finally:
        with contextlib.suppress(Exception):
            docker_engine.images.remove(tag, force=True)


def test_edited_build_context_runs_the_new_code(tmp_path: Path, images: Images, builds: Builds) -> None:
    """Two runs of the same service: a file of its build context edited in between
    (re-included by a ``!`` line of .dockerignore) must reach the second run."""
    context = tmp_path / "svc"
    spec = isolate.ServiceSpec(name="dk-stale", build_context=context, env={"PORT": "{port}"},
                               health=isolate.HttpCheck("/"), stop_timeout=2)  # fmt: skip
    _write_context(context, images.python, "v1")
    assert builds.answer(spec) == "v1"
    _write_context(context, images.python, "v2")
    assert builds.answer(spec) == "v2"
    assert len(builds.built) == 2


CLEANUP_CACHES = [sys.executable, "-m", "isolate", "cleanup", "--caches"]


def cleanup_caches(env: dict[str, str] | None = None) -> str:
    """``isolate cleanup --caches``'s output; a failure shows what it said."""
    done = subprocess.run(CLEANUP_CACHES, env=env or clean_env(), capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, f"exit {done.returncode}\n{done.stdout}\n{done.stderr}"
    return done.stdout


def _started_build(context: Path, images: Images, make_service: Any, name: str) -> tuple[isolate.ServiceSpec, Any]:
    """A service built from ``context`` (its image tagged for it), started."""
    _write_context(context, images.python, name)
    spec = isolate.ServiceSpec(name=name, build_context=context, env={"PORT": "{port}"},
                               health=isolate.HttpCheck("/"), stop_timeout=2)  # fmt: skip
    svc = make_service(spec)
    svc.start()
    return spec, svc


@pytest.mark.usefixtures("reaper_lock")  # cleanup reaps the machine's orphan containers too
def test_cleanup_caches_keeps_an_image_a_container_was_made_from_whatever_its_locks_say(
    tmp_path: Path, images: Images, make_service: Any, docker_engine: Any
) -> None:
    """A clean-up that cannot see the run's holds (an older isolate's run; one whose
    machine-wide hold another user kept out) keeps an image a container was made from,
    running or stopped: the run restarts its service from it. Once the container is gone,
    the image goes. (The holds are let go here, as such a clean-up sees them.)"""
    from isolate._docker.images import release_image

    _, svc = _started_build(tmp_path / "svc", images, make_service, "dk-nolock")
    tag = svc.launcher.image
    try:
        svc.stop()  # the container stays, stopped: `docker rmi -f` would untag its image
        release_image(tag)  # no hold this clean-up can see
        out = cleanup_caches()
        assert re.search(rf"kept image {re.escape(tag)} \(container \S+ was made from it\)", out), out
        docker_engine.images.get(tag)  # still there
        svc.start()  # and the run goes on with it
        svc.close()  # its container is removed
        out = cleanup_caches()
        assert f"kept image {tag}" not in out, out
        with pytest.raises(Exception, match=r"No such image|not found"):
            docker_engine.images.get(tag)
    finally:
        with contextlib.suppress(Exception):
            docker_engine.images.remove(tag, force=True)


@pytest.mark.usefixtures("reaper_lock")  # cleanup reaps the machine's orphan containers too
def test_cleanup_caches_keeps_the_image_a_live_run_uses(
    tmp_path: Path, images: Images, make_service: Any, docker_engine: Any
) -> None:
    """The image a worker's container runs, and its build lock, survive ``cleanup
    --caches`` while the worker lives (even with its lock file removed by hand, a later
    build goes on); once the worker is done with it, the clean-up removes the image.
    (Only its own lock file: the lock dir is every running test's.)"""
    from isolate._docker.images import _lock_name, build_locks, release_image

    context = tmp_path / "svc"
    spec, svc = _started_build(context, images, make_service, "dk-inuse")
    tag = svc.launcher.image
    try:
        out = cleanup_caches()
        assert f"kept image {tag} (a live run uses it)" in out, out
        docker_engine.images.get(tag)  # still there
        svc.restart()  # and the run goes on with it
        svc.close()
        (build_locks() / _lock_name(tag)).unlink()  # removed by hand: no lock any more
        _write_context(context, images.python, "rebuilt")
        again = make_service(dataclasses.replace(spec, name="dk-inuse-2"))
        again.start()
        again.close()
        with contextlib.suppress(Exception):
            docker_engine.images.remove(again.launcher.image, force=True)
        release_image(tag)  # this worker is done with it
        out = cleanup_caches()
        assert f"kept image {tag}" not in out, out  # removed (by it, or a clean-up running meanwhile)
        with pytest.raises(Exception, match=r"No such image|not found"):
            docker_engine.images.get(tag)
    finally:
        with contextlib.suppress(Exception):
            docker_engine.images.remove(tag, force=True)


@pytest.mark.usefixtures("reaper_lock")  # cleanup reaps the machine's orphan containers too
def test_cleanup_caches_with_another_tmpdir_keeps_an_image_a_live_run_holds(
    tmp_path: Path, images: Images, make_service: Any, docker_engine: Any
) -> None:
    """An image a live run built and holds, with no container made from it any more (its
    service closed; as between a build and the first container), survives ``cleanup
    --caches`` from a shell with another ``TMPDIR`` (a CI shard; another user's shell is
    the same case: its build locks are elsewhere): the run's hold in the machine's dir says
    the run may still use it. Once the run lets it go, the same clean-up removes it."""
    from isolate._docker.images import release_image

    _, svc = _started_build(tmp_path / "svc", images, make_service, "dk-othertmp")
    tag = svc.launcher.image
    svc.close()  # its container is removed: only the holds keep the image
    other = tmp_path / "other-tmp"
    other.mkdir()
    env = clean_env(TMPDIR=str(other))
    try:
        out = cleanup_caches(env)
        assert f"kept image {tag} (a live run uses it)" in out, out
        docker_engine.images.get(tag)  # still there
        release_image(tag)
        out = cleanup_caches(env)
        assert f"removed image {tag}" in out, out
        with pytest.raises(Exception, match=r"No such image|not found"):
            docker_engine.images.get(tag)
    finally:
        with contextlib.suppress(Exception):
            docker_engine.images.remove(tag, force=True)


# -- the fork server inside a service's container ------------------------------------

FORKAPP = '''
import http.server, json, os, signal, sys, threading

print(f"forkapp: imported in {os.getpid()}", file=sys.stderr, flush=True)


def info():
    return {"pid": os.getpid(), "argv": sys.argv, "cwd": os.getcwd(), "greeting": os.environ.get("GREETING")}
''' + JSON_HANDLER + '''

def main():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", int(os.environ["PORT"])), Handler)
    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=server.shutdown).start())
    server.serve_forever(poll_interval=0.05)
    server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
'''


def forkapp_spec(tmp_path: Path, images: Images, **env: str) -> isolate.ServiceSpec:
    """A service that names an ``entry`` and whose image's CMD runs ``python3 -m``."""
    context = tmp_path / "forkapp"
    context.mkdir(exist_ok=True)
    (context / "forkapp.py").write_text(FORKAPP)
    (context / "Dockerfile").write_text(
        f"FROM {images.python}\nCOPY forkapp.py /app/forkapp.py\nWORKDIR /app\nUSER nobody\n"
        'CMD ["python3", "-m", "forkapp"]\n'
    )
    return isolate.ServiceSpec(
        name="forkapp", build_context=str(context), entry="forkapp:main", container_command=(),
        env={"PORT": "{port}", "GREETING": "hello", **env}, health=isolate.HttpCheck("/"),
        ready_timeout=30, stop_timeout=5,
    )  # fmt: skip


def _started_at(container: Any) -> str:
    container.reload()
    return str(container.attrs["State"]["StartedAt"])


def _warm(service: Any, docker_engine: Any) -> str:
    """Start the service's container ahead, as a worker's stack does while it makes the
    rest (``ServiceLauncher.warm``); when its preload has run, its start time."""
    service.launcher.warm(lambda record: None)

    def preloaded() -> bool:
        warming = service.launcher._warming
        running = warming is not None and warming.is_alive()  # before the outcome: it may end now
        warmed = service.launcher._warmed
        if isinstance(warmed, BaseException):  # the warm removes its container when it fails
            pytest.fail("the warm failed:\n" + "".join(traceback.format_exception(warmed)))
        if warmed is None and not running:
            pytest.fail("the warm made no container (it found that the container cannot fork)")
        container = docker_engine.containers.get(service.launcher.container_name)
        return "forkapp: imported" in container.logs().decode()

    suite_support.poll(preloaded, 60)
    return _started_at(docker_engine.containers.get(service.launcher.container_name))


@pytest.mark.parametrize(("fork_server", "warm"), [("auto", False), ("auto", True), ("off", False)])
def test_a_service_with_an_entry_forks_in_its_container_which_starts_once(
    tmp_path: Path, images: Images, settings: Settings, make_service: Any, docker_engine: Any,
    fork_server: str, warm: bool,
) -> None:  # fmt: skip
    forks = fork_server != "off"
    service = make_service(forkapp_spec(tmp_path, images), dataclasses.replace(settings, fork_server=fork_server))
    ahead = _warm(service, docker_engine) if warm else None
    service.start()
    container = service.launcher.container
    started, first = _started_at(container), get_json(service.url)
    assert (first["greeting"], first["cwd"]) == ("hello", "/app")  # the container's env and WORKDIR
    if warm:  # the container started ahead is the one the start forked in, with its env sent along
        assert started == ahead
        assert service.logs().count("forkapp: imported") == 1
        config_env = container.attrs["Config"]["Env"]
        assert not any(item.startswith(("GREETING=", "PORT=")) for item in config_env), config_env
    if forks:  # handle.pid: the service process, as the host sees it (else the container's init)
        nspid = Path(f"/proc/{service.pid}/status").read_text().partition("NSpid:")[2].split("\n")[0]
        assert nspid.split()[-1] == str(first["pid"]), nspid
    service.restart()
    second = get_json(service.url)
    assert service.launcher.container.id == container.id
    # Forked: a new service process in a container started once, whose app was imported once.
    assert (_started_at(container) == started) is forks
    assert service.logs().count("forkapp: imported") == (1 if forks else 2)
    assert not forks or second["pid"] != first["pid"]  # a new child (a new container may reuse its pid)

    assert service.stop() == 0  # SIGTERM: the app shuts down cleanly
    assert not service.is_running
    assert container_state(container).get("Running") is forks  # the fork server stays up
    service.start()
    assert service.kill() == 137  # as docker kill: 128 + SIGKILL
    service.start()
    service.signal(signal.SIGTERM)
    assert service.wait_exit(10) == 0
    directory = service.launcher.forks.directory if forks else None
    service.close()
    assert service.launcher.forks is None
    assert directory is None or not directory.exists()


def test_a_container_that_cannot_fork_says_why_and_runs_its_command(
    tmp_path: Path, images: Images, make_service: Any, caplog: pytest.LogCaptureFixture
) -> None:
    spec = dataclasses.replace(forkapp_spec(tmp_path, images), container_command=["sh", "-c", "exec python3 -m forkapp"])
    service = make_service(spec)
    with caplog.at_level("WARNING", logger="isolate"):
        service.start()
    notices = [r.getMessage() for r in caplog.records if getattr(r, "isolate_notice", False)]
    assert any("'forkapp' names an entry" in m and "does not run python" in m for m in notices), notices
    assert service.launcher.forks is None
    started = _started_at(service.launcher.container)
    service.restart()
    assert _started_at(service.launcher.container) != started  # the container, started again
    assert service.logs().count("forkapp: imported") == 2


@pytest.mark.parametrize("warm", [False, True])
def test_a_preload_that_fails_in_the_container_is_a_clear_error_and_leaves_nothing(
    tmp_path: Path, images: Images, ctx: DockerRun, make_service: Any, docker_engine: Any, warm: bool
) -> None:
    spec = forkapp_spec(tmp_path, images)
    (tmp_path / "forkapp" / "forkapp.py").write_text('raise RuntimeError("forkapp: failing at import on purpose")\n')
    service = make_service(spec)
    directory = ctx.run.worker_dir(ctx.worker.slug) / "fork-forkapp"
    if warm:
        service.launcher.warm(lambda record: None)
    with pytest.raises(isolate.ConfigError) as failed:
        service.start()
    text = str(failed.value)
    assert "the fork server in its container cannot serve" in text, text
    assert "failing at import on purpose" in text, text  # the container's log says why
    assert "--isolate-fork-server=off" in text, text  # and the fix
    service.close()
    assert containers_of(docker_engine, ctx.worker.run_id) == []
    assert not directory.exists()


def test_a_container_killed_from_outside_is_started_again_and_a_lost_channel_leaves_it_up(
    tmp_path: Path, images: Images, make_service: Any
) -> None:
    service = make_service(forkapp_spec(tmp_path, images))
    service.start()
    container = service.launcher.container
    started = _started_at(container)
    container.kill()  # its fork server (and the service) go with it
    suite_support.poll(lambda: not service.is_running)
    assert service.launcher.exit_code() == 137
    service.start()  # the container again, a new fork server in it
    assert _started_at(container) != started
    pid = get_json(service.url)["pid"]
    # The worker's end of the channel goes (as when the worker dies): the service stays up
    # as long as it runs (--isolate-keep keeps it), and the container with it.
    service.launcher.forks.disconnect()
    assert get_json(service.url)["pid"] == pid
    assert container_state(container).get("Running")
    started = _started_at(container)
    service.start()  # with no channel to it, the container goes and comes back
    assert _started_at(container) != started
    assert get_json(service.url)["greeting"] == "hello"


@suite_support.needs_root
def test_the_container_fork_servers_socket_is_out_of_other_users_reach(
    tmp_path: Path, images: Images, make_service: Any
) -> None:
    service = make_service(forkapp_spec(tmp_path, images))
    service.start()
    sock = service.launcher.forks.directory / "s"
    probe = (f"import socket; s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET); "
             f"s.connect({str(sock)!r}); print('connected')")  # fmt: skip
    other = subprocess.run(["su", "nobody", "-s", "/bin/sh", "-c", f"/usr/bin/python3 -c {shlex.quote(probe)}"],
                           capture_output=True, text=True, timeout=60, check=False)  # fmt: skip
    assert "connected" not in other.stdout
    assert "PermissionError" in other.stderr, other.stderr
    assert get_json(service.url)["greeting"] == "hello"  # and it serves on
