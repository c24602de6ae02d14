"""testcontainers' own container classes under isolate, on the local images (no registry,
no Ryuk): once per run through ``@isolate.run_fixture`` and ``isolate_run.container``,
once per worker through ``isolate_stack.container`` (labelled like isolate's own: kept
with ``--isolate-keep``, reaped by ``cleanup``, by the controller and by the watchdog).

Without an engine these tests skip, except with ``CI=true``, where they fail.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from suite_support import CONFTEST, HERE, Run, docker_client, leftovers, poll, reaper_lock

from isolate._docker.context import LABEL
from isolate._docker.testcontainers import published

pytestmark = pytest.mark.docker

DOCKER_ARGS = ("--isolate-backend=docker", "--isolate-pg-image=isolate-local/postgres:15",
               "--isolate-redis-image=isolate-local/redis:7")  # fmt: skip
#: No reaping at start: the orphan-reaper tests of test_docker.py own the orphans they make.
NO_REAP = "--no-isolate-reap-stale"


@pytest.fixture(scope="module")
def client() -> Iterator[Any]:
    yield from docker_client("the testcontainers tests")


def containers_of(client: Any, run_id: str) -> list[Any]:
    found = client.containers.list(all=True, filters={"label": f"{LABEL.RUN_ID}={run_id}"}, ignore_removed=True)
    return list(found)


EVENTS = '''
import json, os
from pathlib import Path

def event(kind, **facts):
    with Path(os.environ["FAULT_DIR"], "events").open("a") as fh:
        fh.write(json.dumps({"kind": kind, "pid": os.getpid(), **facts}) + "\\n")
'''

IMPORTS = """
try:  # testcontainers 4.15 moved the modules under community
    from testcontainers.community.postgres import PostgresContainer
    from testcontainers.community.redis import RedisContainer
except ImportError:
    from testcontainers.postgres import PostgresContainer
    from testcontainers.redis import RedisContainer
from testcontainers.core.container import DockerContainer
"""

PER_RUN = CONFTEST + IMPORTS + '''
import urllib.request
from events import event

@isolate.run_fixture
def shared_redis(isolate_run):
    """RedisContainer, once per run, as a context manager; its server listens on the port given."""
    with isolate_run.container(
        "shared-redis", lambda port: RedisContainer("isolate-local/redis:7").with_command(f"--port {port}"),
        6379, url="redis://{host}:{port}/0",
    ) as redis:
        redis.container.get_client().set("greeting", "hello")  # testcontainers' own client
        event("setup", container=redis.container_name)
        yield {"url": redis.url, "container": redis.container_name}
    event("teardown")

@isolate.run_fixture
def shared_postgres(isolate_run):
    with isolate_run.container(
        "shared-pg",
        lambda port: PostgresContainer("isolate-local/postgres:15", driver=None).with_env("PGPORT", str(port)),
        5432,
    ) as pg:
        yield {"url": pg.container.get_connection_url()}

@isolate.run_fixture
def pg_facts(isolate_postgres):
    """isolate's own shared PostgreSQL, on either backend, from the controller."""
    return {"port": isolate_postgres.port}

def answers(url):
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            return resp.status == 200
    except OSError:
        return False

@isolate.run_fixture
def shared_http(isolate_run):
    """A plain DockerContainer, with a readiness check of our own."""
    def make(port):
        return DockerContainer("isolate-local/python:3").with_command(
            ["python3", "-m", "http.server", str(port), "--bind", "127.0.0.1"])
    with isolate_run.container("shared-http", make, 8000) as http:
        assert isolate.poll_until(lambda: answers(http.url), 60), http.container.get_logs()
        yield {"url": http.url}
'''

PER_RUN_TESTS = """
import os
import psycopg, pytest, redis, urllib.request
import docker
from testcontainers.core.config import testcontainers_config

@pytest.mark.parametrize("n", range(4))
def test_shared(n, shared_redis, shared_postgres, shared_http):
    assert redis.Redis.from_url(shared_redis["url"]).get("greeting") == b"hello"
    with psycopg.connect(shared_postgres["url"]) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
    with urllib.request.urlopen(shared_http["url"], timeout=10) as resp:
        assert resp.status == 200

def test_the_runs_own_postgres(pg_facts, isolate_postgres):
    assert pg_facts["port"] == isolate_postgres.port

def test_labelled_with_the_run(shared_redis):
    labels = docker.from_env().containers.get(shared_redis["container"]).labels
    assert labels["isolate.run_id"] == os.environ["ISOLATE_RUN_ID"]
    assert labels["isolate.managed"] == "true"
    assert testcontainers_config.ryuk_disabled or "PYTEST_XDIST_WORKER" in os.environ
"""


@pytest.mark.parametrize("backend", [(), DOCKER_ARGS], ids=["native", "docker"])
def test_testcontainers_once_per_run(pytester: pytest.Pytester, client: Any, backend: tuple[str, ...]) -> None:
    pytester.makeconftest(PER_RUN)
    pytester.makepyfile(events=EVENTS, test_shared=PER_RUN_TESTS)
    run = Run(pytester.path, "-n", "2", NO_REAP, *backend, "test_shared.py")
    out = run.finish(300)
    assert "6 passed" in out, out
    found = [json.loads(line) for line in (run.fault_dir / "events").read_text().splitlines()]
    assert [e["kind"] for e in found] == ["setup", "teardown"], found
    assert found[0]["pid"] == found[1]["pid"] == run.proc.pid
    assert containers_of(client, run.run_id) == []
    poll(run.leftovers, 15)


PER_WORKER = IMPORTS + f"""
import sys
import pytest
import isolate

@pytest.fixture(scope="session")
def isolate_migrations():
    return {str(HERE / "fixture_app" / "migrations")!r}

@pytest.fixture(scope="session")
def cache(isolate_stack):
    with isolate_stack.container(
        "cache", lambda port: RedisContainer("isolate-local/redis:7").with_command(f"--port {{port}}"),
        6379, url="redis://{{host}}:{{port}}/0",
    ) as cache:
        yield cache

@pytest.fixture(scope="session")
def isolate_service_spec(cache):  # the container first: its URL goes into the template
    return isolate.ServiceSpec(
        name="app", command=[sys.executable, {str(HERE / "fixture_app" / "app.py")!r}],
        env={{"PORT": "{{port}}", "DATABASE_URL": "{{dsn}}", "REDIS_URL": "{{containers[cache].url}}"}},
        ready_timeout=30, stop_timeout=5,
    )
"""

PER_WORKER_TESTS = """
import json, urllib.request
import pytest

@pytest.mark.parametrize("n", range(4))
def test_the_service_uses_this_workers_container(n, isolate_service, cache):
    before = int(cache.container.get_client().get("items:written") or 0)
    req = urllib.request.Request(isolate_service.url + "/items", data=json.dumps({"value": n}).encode(),
                                 method="POST")
    with urllib.request.urlopen(req, timeout=10) as resp:
        assert json.loads(resp.read())["hits"] == before + 1
    assert int(cache.container.get_client().get("items:written")) == before + 1
    assert cache.url == f"redis://127.0.0.1:{cache.port}/0"
"""


def test_a_container_per_worker_in_the_service_template_kept_and_cleaned_up(
    pytester: pytest.Pytester, client: Any
) -> None:
    pytester.makeconftest(PER_WORKER)
    pytester.makepyfile(test_cache=PER_WORKER_TESTS)
    run = Run(pytester.path, "-n", "2", NO_REAP, "--isolate-keep=always", "test_cache.py")
    out = run.finish(300)
    assert "4 passed" in out, out
    kept = containers_of(client, run.run_id)
    caches = sorted(c.labels[LABEL.WORKER] for c in kept if c.labels.get("isolate.container") == "cache")
    assert caches == ["gw0", "gw1"], [c.name for c in kept]  # one per worker, left up with its stack
    assert out.count("  container cache: redis://127.0.0.1:") == 2, out
    status = subprocess.run([sys.executable, "-m", "isolate", "status"], capture_output=True, text=True,
                            timeout=60, check=True).stdout  # fmt: skip
    assert any(line.split()[:2] == [run.run_id, "kept"] for line in status.splitlines()), status
    done = subprocess.run([sys.executable, "-m", "isolate", "cleanup", run.run_id],
                          capture_output=True, text=True, timeout=120, check=False)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert containers_of(client, run.run_id) == []
    poll(run.leftovers, 15)


HANG = """
import os, time
from pathlib import Path

def test_hang(shared_redis):
    Path(os.environ["FAULT_DIR"], "up-" + os.environ.get("PYTEST_XDIST_WORKER", "main")).touch()
    time.sleep(300)
"""


def test_a_sigkilled_controllers_container_is_reaped_by_the_watchdog(pytester: pytest.Pytester, client: Any) -> None:
    """On the native backend too: the run dir says it labelled containers."""
    pytester.makeconftest(PER_RUN)
    pytester.makepyfile(events=EVENTS, test_hang=HANG)
    run = Run(pytester.path, "-n", "1", NO_REAP, "test_hang.py")
    run.wait_up(1)
    assert [c.labels[LABEL.WORKER] for c in containers_of(client, run.run_id)] == ["run"]
    run.proc.send_signal(signal.SIGKILL)
    run.finish(30)
    poll(lambda: containers_of(client, run.run_id), 30)
    poll(run.leftovers, 15)


def test_mapped_mode_publishes_on_loopback_only() -> None:
    assert published({"6379": None, 9000: None, "7000/tcp": None}, 6379, 20001) == {
        "9000": ("127.0.0.1",), "7000/tcp": ("127.0.0.1",), "6379/tcp": ("127.0.0.1", 20001),
    }


def _watchdog_of(run: Run) -> int:
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            with contextlib.suppress(OSError):
                cmdline = (proc / "cmdline").read_bytes()
                if b"isolate/_watchdog.py" in cmdline and f"isolate-run-{run.run_id}".encode() in cmdline:
                    return int(proc.name)
    raise AssertionError(f"no watchdog for run {run.run_id}")


def test_a_stale_native_runs_containers_go_with_it(
    pytester: pytest.Pytester, client: Any, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """Controller and watchdog both SIGKILLed (a power cut, as far as the run can tell):
    the next run's stale-run reaper removes the run's labelled containers with the rest.
    (Under the orphan reapers' lock: one of them would remove the container first.)"""
    with reaper_lock(tmp_path_factory):
        _stale_run_scenario(pytester, client)


def _stale_run_scenario(pytester: pytest.Pytester, client: Any) -> None:
    pytester.makeconftest(PER_RUN)
    pytester.makepyfile(events=EVENTS, test_hang=HANG, test_x="def test_x():\n    pass\n")
    # A base dir of its own: no other run on the machine reaps this one first (short: it
    # holds the run's socket).
    base = tempfile.mkdtemp(prefix="iso-", dir="/tmp")
    try:
        run = Run(pytester.path, "-n", "1", NO_REAP, f"--isolate-base-dir={base}", "test_hang.py")
        run.wait_up(1)
        assert containers_of(client, run.run_id)
        os.kill(_watchdog_of(run), signal.SIGKILL)
        run.proc.send_signal(signal.SIGKILL)
        run.finish(30)
        later = Run(pytester.path, "-p", "no:xdist", f"--isolate-base-dir={base}", "test_x.py")
        assert "1 passed" in later.finish()  # its controller reaped the stale run at start
        assert containers_of(client, run.run_id) == []
        poll(lambda: leftovers(run.run_id, run.mark, base=base), 15)
    finally:
        shutil.rmtree(base, ignore_errors=True)
