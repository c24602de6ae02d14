"""Integration-test wiring for the datastorage example.

Default mode (isolate): every xdist worker gets its own schema + role (migrations
applied), its own Redis and its own ``datastorage`` process on a picked port; tests
may stop, kill, restart or cut the database of *their* instance.

``--shared-stack`` (or ``DATASTORAGE_SHARED_STACK=1``) is the classic baseline for
comparison: ONE service process, ONE schema and ONE Redis for all workers. The schema
and the service's port are a run fixture (``@isolate.run_fixture``: made once by the
xdist controller, which holds the port until the run ends); the first worker to get
there starts the service (under a file lock in the run dir), the others reuse it, and
the run stops it at the end (it is registered with isolate's reaper). The same fixture
names are provided, so the tests do not change. It is expected to fail wherever a test stops "the" service, cuts
"the" database or reads global state (DLQ depth, metrics counters).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import ssl
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from filelock import FileLock
from tenacity import Retrying, retry_if_result, stop_after_delay, wait_fixed

import isolate

EXAMPLE_DIR = Path(__file__).resolve().parent
MIGRATIONS_DIR = EXAMPLE_DIR / "migrations"

#: The service speaks plain HTTP, yet httpx builds a TLS context for every client made
#: without one, loading the CA bundle (~18 ms of CPU each time). The ``api`` clients share
#: this one, which loads nothing: it trusts no certificate, so a stray ``https://`` fails.
NO_TLS = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)

#: The service's configuration for the tests (short delays keep the suite fast;
#: tests read these back through the ``service_config`` fixture).
SERVICE_CONFIG: dict[str, str] = {
    "HOST": "127.0.0.1",
    "SHUTDOWN_PROPAGATION_DELAY": "0.5",
    "SHUTDOWN_TIMEOUT": "5",
    "BATCH_MAX": "25",
    "PAGE_DEFAULT": "10",
    "PAGE_MAX": "50",
    "DLQ_KEY": "datastorage:dlq",
    "DLQ_DRAIN_INTERVAL": "0.05",
    "DLQ_ERROR_DELAY": "0.5",
    "DB_TIMEOUT": "1",
    "DB_POOL_TIMEOUT": "0.5",
    "MAX_BODY_BYTES": "262144",
    "LOG_LEVEL": "INFO",
}


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--shared-stack",
        action="store_true",
        default=False,
        help="baseline: run the suite on ONE shared service/schema/Redis for all workers "
        "(env DATASTORAGE_SHARED_STACK=1); expected to fail where tests stop the service",
    )


def shared_stack_enabled(config: pytest.Config) -> bool:
    return bool(config.getoption("--shared-stack")) or os.environ.get(
        "DATASTORAGE_SHARED_STACK", ""
    ).strip().lower() in {"1", "true", "yes", "on"}


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config: pytest.Config) -> None:
    """The baseline's one Redis is isolate's shared Redis server (same as
    ``--isolate-redis-mode=shared``); every worker then uses its DB 0."""
    if shared_stack_enabled(config):
        config.option.isolate_redis_mode = "shared"


def pytest_report_header(config: pytest.Config) -> str:
    mode = "SHARED stack (baseline)" if shared_stack_enabled(config) else "isolated per-worker stacks"
    return f"datastorage: {mode}"


# --------------------------------------------------------------------------- isolate wiring


@pytest.fixture(scope="session")
def service_config() -> dict[str, str]:
    """The environment the service runs with (besides PORT/DATABASE_URL/REDIS_URL)."""
    return dict(SERVICE_CONFIG)


@pytest.fixture(scope="session")
def isolate_migrations() -> Path:
    return MIGRATIONS_DIR


def _service_env() -> dict[str, str]:
    return {
        **SERVICE_CONFIG,
        "HOST": "{host}",  # 127.0.0.1; in a port-mapped container, 0.0.0.0
        "PORT": "{port}",
        "DATABASE_URL": "{dsn}",
        "REDIS_URL": "{redis_url}",
        "PYTHONUNBUFFERED": "1",
    }


# --8<-- [start:spec]
@pytest.fixture(scope="session")
def isolate_service_spec() -> isolate.ServiceSpec:
    return isolate.ServiceSpec(
        name="datastorage",
        command=[sys.executable, "-m", "datastorage"],  # native backend
        # each start forks a parent that has imported the app (docker: inside the container)
        entry="datastorage.server:main",
        # what a start would import: the app, and what uvicorn loads lazily when it starts
        preload=["datastorage.runner", "uvicorn.protocols.http.auto", "uvicorn.lifespan.on",
                 "encodings.idna"],
        cwd=EXAMPLE_DIR,
        env=_service_env(),
        health=isolate.HttpCheck("/health/ready"),
        ready_timeout=30,
        stop_timeout=15,
        # the last stop of a worker's session: SIGINT skips the propagation delay that
        # SIGTERM waits (tests still stop it with SIGTERM, see tests/test_shutdown.py)
        close_signal=signal.SIGINT,
        # docker backend: the image built from the Dockerfile here runs its own CMD
        # (with --isolate-docker-services=native, the command above runs instead)...
        build_context=EXAMPLE_DIR,
        container_command=(),
        # ...listening on this port inside its container in port-mapped mode.
        container_port=8000,
    )
# --8<-- [end:spec]


@pytest.fixture(scope="session")
def isolate_database(
    request: pytest.FixtureRequest,
    isolate_stack: isolate.WorkerStack,
    isolate_migrations: Path,
) -> Iterator[isolate.WorkerDatabase]:
    """This worker's schema and role (or, with --shared-stack, the one shared schema)."""
    if shared_stack_enabled(request.config):
        yield request.getfixturevalue("_shared_stack").database
        return
    yield isolate_stack.database(isolate_migrations)
    isolate_stack.drop_database()


@pytest.fixture(scope="session")
def isolate_redis(
    request: pytest.FixtureRequest, isolate_stack: isolate.WorkerStack
) -> Iterator[isolate.RedisServer]:
    """This worker's Redis (or, with --shared-stack, the one shared Redis)."""
    if shared_stack_enabled(request.config):
        yield request.getfixturevalue("_shared_stack").redis
        return
    yield isolate_stack.redis()
    isolate_stack.stop_redis()


@pytest.fixture
def isolate_service(request: pytest.FixtureRequest) -> Any:
    """This worker's service, running when the test starts (shared one with --shared-stack)."""
    if shared_stack_enabled(request.config):
        handle = request.getfixturevalue("_shared_stack").service
    else:
        handle = request.getfixturevalue("isolate_service_session")
    handle.ensure_running()
    if not handle.is_ready():
        # An earlier test failed half-way through a shutdown or an outage: let the
        # old process finish, then start afresh rather than inherit its state.
        _poll(lambda: handle.is_ready() or not handle.is_running, 20)
        handle.ensure_running()
    return handle


# --------------------------------------------------------------------------- test helpers


@pytest.fixture
def api(isolate_service: Any) -> Iterator[httpx.Client]:
    """An httpx client on this worker's service."""
    with httpx.Client(base_url=isolate_service.url, timeout=10.0, verify=NO_TLS) as client:
        yield client


@pytest.fixture
def cid() -> str:
    """A correlation id unique to this test: data isolation within the worker's schema."""
    return f"t-{os.urandom(6).hex()}"


# --------------------------------------------------------------------------- shared-stack baseline

_WRAPPER = r"""
import os, signal, subprocess, sys
# Survive the group SIGTERM so the exit code of the service gets recorded.
signal.signal(signal.SIGTERM, lambda *_: None)
signal.signal(signal.SIGINT, lambda *_: None)
rc_path, pid_path, log_path = sys.argv[1:4]
with open(log_path, "ab") as log:
    proc = subprocess.Popen(sys.argv[4:], stdout=log, stderr=subprocess.STDOUT)
    with open(pid_path + ".tmp", "w") as f:
        f.write(str(proc.pid))
    os.replace(pid_path + ".tmp", pid_path)
    rc = proc.wait()
with open(rc_path + ".tmp", "w") as f:
    f.write(str(rc))
os.replace(rc_path + ".tmp", rc_path)
"""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _poll(predicate: Any, timeout: float) -> bool:
    return bool(
        Retrying(
            retry=retry_if_result(lambda ok: not ok),
            stop=stop_after_delay(timeout),
            wait=wait_fixed(0.05),
            retry_error_callback=lambda _: False,
        )(predicate)
    )


class SharedService:
    """The one service process every worker talks to (classic shared infrastructure).

    Any worker may signal, stop, kill or start it: it is *the* service. A small
    wrapper process is its parent, so every worker can learn its exit code.
    """

    name = "datastorage-shared"
    host = "127.0.0.1"
    proxied = False  # a local process: a closed listener refuses connections

    def __init__(self, directory: Path, port: int, env: dict[str, str], stack: isolate.WorkerStack) -> None:
        self.directory = directory
        self.port = port
        self.env = env
        self.stack = stack
        self.ready_timeout = 30.0
        self.stop_timeout = 15.0
        self.log_path = directory / "service.log"
        self.last_exit_code: int | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def _read(self, name: str) -> str | None:
        try:
            return (self.directory / name).read_text().strip() or None
        except OSError:
            return None

    def _generation(self) -> str | None:
        # Every start is a new generation with its own pid/rc files, so a late exit
        # status of the previous process can never be mistaken for the current one's.
        return self._read("current")

    @property
    def pid(self) -> int | None:
        gen = self._generation()
        raw = self._read(f"service-{gen}.pid") if gen else None
        return int(raw) if raw else None

    def _exit_code(self) -> int | None:
        gen = self._generation()
        raw = self._read(f"service-{gen}.rc") if gen else None
        return int(raw) if raw is not None else None

    @property
    def is_running(self) -> bool:
        pid = self.pid
        return pid is not None and _alive(pid) and self._exit_code() is None

    def start(self, wait: bool = True) -> None:
        with FileLock(str(self.directory / "service.lock")):
            if not self.is_running:
                gen = os.urandom(4).hex()
                env = {**os.environ, **self.env}
                wrapper = subprocess.Popen(
                    [sys.executable, "-c", _WRAPPER, str(self.directory / f"service-{gen}.rc"),
                     str(self.directory / f"service-{gen}.pid"), str(self.log_path),
                     sys.executable, "-m", "datastorage"],
                    cwd=EXAMPLE_DIR, env=env, start_new_session=True,
                    stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                )  # fmt: skip
                # The run stops every one left when it ends (SIGTERM to the group: the
                # service shuts down gracefully, the wrapper records its exit code).
                self.stack.adopt_process(wrapper.pid, f"datastorage-shared-service-{wrapper.pid}")
                _poll(lambda: (self.directory / f"service-{gen}.pid").exists(), 10)
                tmp = self.directory / "current.tmp"
                tmp.write_text(gen)
                tmp.replace(self.directory / "current")
        if wait:
            self.wait_ready()

    def is_ready(self) -> bool:
        return isolate.HttpCheck("/health/ready")(self.host, self.port)

    def wait_ready(self, timeout: float | None = None) -> None:
        if not _poll(lambda: self.is_ready() or self._exit_code() is not None, timeout or self.ready_timeout):
            raise isolate.ServiceNotReadyError(f"shared service on {self.url} not ready")
        if self._exit_code() is not None:
            raise isolate.ServiceExitedError(f"shared service exited with {self._exit_code()}")

    def ensure_running(self) -> None:
        if not self.is_running:
            self.start()
        elif not self.is_ready():
            # Another worker's test may be shutting it down: wait for that to finish.
            with contextlib.suppress(isolate.ServiceError):
                self.wait_ready(timeout=self.stop_timeout)
            if not self.is_running:
                self.start()

    def signal(self, sig: int) -> None:
        pid = self.pid
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)

    def wait_exit(self, timeout: float | None = None) -> int | None:
        if _poll(lambda: not self.is_running, self.stop_timeout if timeout is None else timeout):
            _poll(lambda: self._exit_code() is not None, 2)
            self.last_exit_code = self._exit_code()
            return self.last_exit_code
        return None

    def stop(self, graceful: bool = True, timeout: float | None = None) -> int | None:
        if not graceful:
            return self.kill()
        self.signal(signal.SIGTERM)
        code = self.wait_exit(timeout)
        if code is None:
            return self.kill()
        return code

    def kill(self) -> int | None:
        self.signal(signal.SIGKILL)
        return self.wait_exit(5)

    def restart(self, graceful: bool = True, timeout: float | None = None) -> None:
        self.stop(graceful=graceful, timeout=timeout)
        self.start()

    def logs(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""


class SharedStack:
    def __init__(self, database: isolate.WorkerDatabase, redis: isolate.RedisServer,
                 service: SharedService) -> None:  # fmt: skip
        self.database = database
        self.redis = redis
        self.service = service


@isolate.run_fixture
def shared_stack_facts(
    isolate_run: isolate.RunScope, isolate_postgres: isolate.PostgresServer
) -> Iterator[dict[str, object]]:
    """The baseline's one schema, and the port of its one service: made once per run by
    the controller, which holds the port's lease until the run ends (only --shared-stack
    runs ask for it)."""
    db = isolate.WorkerDatabase.create(isolate_postgres, "shared", isolate_run.run_id)
    db.apply_migrations(MIGRATIONS_DIR)
    lease = isolate.reserve_port()
    yield {"schema": db.schema, "role": db.role, "password": db.password, "port": lease.port}
    lease.release()


@pytest.fixture(scope="session")
def _shared_stack(
    isolate_stack: isolate.WorkerStack,
    isolate_postgres: isolate.PostgresServer,
    shared_stack_facts: dict[str, object],
) -> SharedStack:
    """Start (first worker) or join (the others) the one shared stack of this run."""
    directory = isolate_stack.run_dir / "datastorage-shared-stack"
    directory.mkdir(exist_ok=True)
    state = shared_stack_facts
    database = isolate.WorkerDatabase(
        isolate_postgres, str(state["schema"]), str(state["role"]), str(state["password"])
    )
    # isolate's shared Redis server (--isolate-redis-mode=shared), DB 0 for every worker.
    redis_server = dataclasses.replace(isolate_stack.redis(), db=0)
    env = {
        **SERVICE_CONFIG, "PORT": str(state["port"]), "DATABASE_URL": database.dsn,
        "REDIS_URL": redis_server.url, "PYTHONUNBUFFERED": "1",
    }  # fmt: skip
    service = SharedService(directory, int(str(state["port"])), env, isolate_stack)
    service.ensure_running()
    return SharedStack(database, redis_server, service)


# --------------------------------------------------------------------------- fault injection


class Outage:
    """Cut/restore this worker's PostgreSQL or Redis; always undone after the test."""

    def __init__(self, database: Any, redis: Any, service: Any) -> None:
        self.database = database
        self.redis = redis
        self.service = service
        self.db_cut = False
        self.redis_cut = False

    def cut_database(self) -> None:
        self.db_cut = True
        self.database.cut()

    def restore_database(self) -> None:
        self.database.restore()
        self.db_cut = False

    def cut_redis(self) -> None:
        self.redis_cut = True
        self.redis.cut()

    def restore_redis(self) -> None:
        self.redis.restore()
        self.redis_cut = False

    def heal(self) -> None:
        if self.db_cut:
            self.restore_database()
        if self.redis_cut:
            self.restore_redis()
        # Leave the service as the next test expects it: ready, DLQ drained.
        if self.service.is_running:
            self.service.wait_ready(timeout=20)
            key = SERVICE_CONFIG["DLQ_KEY"]
            with self.redis.client() as client:
                _poll(lambda: client.llen(key) + client.llen(f"{key}:processing") == 0, 20)


@pytest.fixture
def outage(isolate_database: Any, isolate_redis: Any, isolate_service: Any) -> Iterator[Outage]:
    controller = Outage(isolate_database, isolate_redis, isolate_service)
    try:
        yield controller
    finally:
        controller.heal()
