"""pytest plugin: isolate's options and default fixtures.

Registered through the ``pytest11`` entry point, so installing isolate is enough.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Generator, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
import redis

from ._config import OPTIONS, Settings, resolve_settings
from ._database import Migrations, WorkerDatabase
from ._errors import ConfigError, IsolateError
from ._postgres import PostgresServer
from ._redis import RedisServer
from ._runtime import IsolateRuntime
from ._service import ServiceHandle, ServiceSpec, tail_text
from ._worker import WorkerIdentity, new_run_id, worker_from_env

logger = logging.getLogger(__name__)

RUNTIME_KEY = pytest.StashKey[IsolateRuntime]()
RUN_ID_KEY = "isolate_run_id"
_SUMMARY_KEY = pytest.StashKey[dict[str, dict[str, float]]]()


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("isolate", "isolate: per-worker stacks for integration tests")
    for opt in OPTIONS:
        help_text = f"{opt.help} (ini {opt.ini}, env {opt.env}, default: {opt.default or 'unset'})"
        group.addoption(opt.cli, dest=f"isolate_{opt.name}", default=None, help=help_text)
        parser.addini(opt.ini, help=help_text, default="")


def _settings(config: pytest.Config) -> Settings:
    cli = {opt.name: config.getoption(f"isolate_{opt.name}") for opt in OPTIONS}
    ini = {opt.name: str(config.getini(opt.ini) or "") for opt in OPTIONS}
    try:
        return resolve_settings(cli, ini, os.environ)
    except ConfigError as exc:
        raise pytest.UsageError(str(exc)) from None


class _XdistHooks:
    """Hooks that exist only when pytest-xdist is active (controller side)."""

    def __init__(self, run_id: str) -> None:
        self.run_id = run_id

    @pytest.hookimpl(optionalhook=True)
    def pytest_configure_node(self, node: Any) -> None:
        node.workerinput[RUN_ID_KEY] = self.run_id


def pytest_configure(config: pytest.Config) -> None:
    settings = _settings(config)
    workerinput = getattr(config, "workerinput", None)
    if workerinput is not None:
        run_id = str(workerinput.get(RUN_ID_KEY) or "")
        if not run_id:
            raise pytest.UsageError("isolate: the xdist controller did not pass a run id")
    else:
        run_id = settings.run_id or new_run_id()
    # Not an xdist worker: "main", whatever PYTEST_XDIST_* an outer run left in the env.
    worker = worker_from_env(run_id, env={} if workerinput is None else None, workerinput=workerinput)
    runtime = IsolateRuntime(settings, worker, config.rootpath, controller=workerinput is None)
    config.stash[RUNTIME_KEY] = runtime
    if runtime.controller:
        try:
            runtime.open_run()
        except IsolateError as exc:
            raise pytest.UsageError(str(exc)) from None
        if config.pluginmanager.hasplugin("xdist"):
            config.pluginmanager.register(_XdistHooks(run_id), "isolate-xdist")


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session: pytest.Session) -> None:
    runtime = session.config.stash.get(RUNTIME_KEY, None)
    if runtime is None:
        return
    runtime.close_worker()
    if runtime.controller:
        summary = runtime.close_run()
        session.config.stash[_SUMMARY_KEY] = summary
        path = runtime.settings.timings_json
        if path:
            target = Path(path)
            if not target.is_absolute():
                target = session.config.rootpath / target
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(json.dumps(summary, indent=2) + "\n")


def pytest_unconfigure(config: pytest.Config) -> None:
    runtime = config.stash.get(RUNTIME_KEY, None)
    if runtime is not None and runtime.controller and runtime.run_dir.exists():
        runtime.close_run()  # sessionfinish did not run (internal error)


def pytest_report_header(config: pytest.Config) -> list[str]:
    runtime = config.stash.get(RUNTIME_KEY, None)
    if runtime is None:
        return []
    lines = [f"isolate: run {runtime.worker.run_id}, backend {runtime.backend} ({runtime.backend_reason})"]
    if runtime.backend == "native":
        for label, finder in (("postgres", runtime.postgres_binary), ("redis", runtime.redis_binary)):
            try:
                lines.append(f"isolate: {label} {finder().describe()}")
            except IsolateError as exc:
                lines.append(f"isolate: {label} not found ({exc.hint})")
    else:
        lines.append(f"isolate: postgres image {runtime.settings.pg_image}, redis image "
                     f"{runtime.settings.redis_image}")
    return lines


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    summary = config.stash.get(_SUMMARY_KEY, None)
    if not summary or not set(summary) - {"worker_teardown", "run_teardown"}:
        return
    terminalreporter.section("isolate timings (seconds)")
    terminalreporter.write_line(f"{'phase':<22}{'count':>6}{'min':>9}{'median':>9}{'max':>9}")
    for phase, row in summary.items():
        terminalreporter.write_line(
            f"{phase:<22}{int(row['count']):>6}{row['min']:>9.3f}{row['median']:>9.3f}{row['max']:>9.3f}"
        )


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    if report.failed and "isolate_service" in getattr(item, "fixturenames", ()):
        runtime = item.config.stash.get(RUNTIME_KEY, None)
        for handle in runtime.running_services() if runtime else ():
            report.sections.append(
                (f"isolate: {handle.name} log (last 40 lines)", tail_text(handle.logs(), 40))
            )
    return report


def _runtime(config: pytest.Config) -> IsolateRuntime:
    return config.stash[RUNTIME_KEY]


# -- fixtures -----------------------------------------------------------------


@pytest.fixture(scope="session")
def isolate_runtime(pytestconfig: pytest.Config) -> IsolateRuntime:
    """The process's :class:`~isolate.IsolateRuntime` (advanced use)."""
    return _runtime(pytestconfig)


@pytest.fixture(scope="session")
def isolate_worker(isolate_runtime: IsolateRuntime) -> WorkerIdentity:
    """Worker id (``gw0``... or ``main``), worker count and run id."""
    return isolate_runtime.worker


@pytest.fixture(scope="session")
def isolate_postgres(isolate_runtime: IsolateRuntime) -> PostgresServer:
    """The run's shared, tuned PostgreSQL server (superuser connection facts)."""
    return isolate_runtime.postgres()


@pytest.fixture(scope="session")
def isolate_migrations(pytestconfig: pytest.Config, isolate_runtime: IsolateRuntime) -> Migrations:
    """Migrations for each worker's schema: override to return a path or a callable.

    Default: ``--isolate-migrations`` (relative to the rootdir), or none.
    """
    path = isolate_runtime.settings.migrations
    if not path:
        return None
    resolved = Path(path)
    return resolved if resolved.is_absolute() else pytestconfig.rootpath / resolved


@pytest.fixture(scope="session")
def isolate_database(
    isolate_runtime: IsolateRuntime, isolate_migrations: Migrations
) -> Iterator[WorkerDatabase]:
    """This worker's schema and role, with migrations applied."""
    yield isolate_runtime.database(isolate_migrations)
    isolate_runtime.drop_database()


@pytest.fixture(scope="session")
def isolate_dsn(isolate_database: WorkerDatabase) -> str:
    """DSN of this worker's role; its ``search_path`` is the worker's schema."""
    return isolate_database.dsn


@pytest.fixture
def isolate_conn(isolate_database: WorkerDatabase) -> Iterator[psycopg.Connection[Any]]:
    """A psycopg connection (autocommit) as this worker's role, closed after the test."""
    with isolate_database.connect(autocommit=True) as conn:
        yield conn


@pytest.fixture(scope="session")
def isolate_redis(isolate_runtime: IsolateRuntime) -> Iterator[RedisServer]:
    """This worker's Redis: its own server, or its own DB on a shared one."""
    yield isolate_runtime.redis()
    isolate_runtime.stop_redis()


@pytest.fixture(scope="session")
def isolate_redis_url(isolate_redis: RedisServer) -> str:
    """``redis://`` URL of this worker's Redis."""
    return isolate_redis.url


@pytest.fixture
def isolate_redis_client(isolate_redis: RedisServer) -> Iterator[redis.Redis]:
    """A redis-py client on this worker's Redis, closed after the test."""
    client = isolate_redis.client()
    yield client
    client.close()


@pytest.fixture(scope="session")
def isolate_service_spec() -> ServiceSpec:
    """The service under test. Override in your conftest.py to return a ServiceSpec."""
    raise pytest.UsageError(
        "the isolate_service fixture needs to know your service: define a session-scoped "
        "fixture `isolate_service_spec` in conftest.py returning isolate.ServiceSpec(...)"
    )


@pytest.fixture(scope="session")
def isolate_service_session(
    request: pytest.FixtureRequest, isolate_runtime: IsolateRuntime, isolate_service_spec: ServiceSpec
) -> Iterator[ServiceHandle]:
    """This worker's instance of the service, started once per worker."""

    def resolve(field: str) -> object:
        if field in ("dsn", "schema", "role"):
            db: WorkerDatabase = request.getfixturevalue("isolate_database")
            return {"dsn": db.dsn, "schema": db.schema, "role": db.role}[field]
        if field == "redis_url":
            return request.getfixturevalue("isolate_redis_url")
        raise pytest.UsageError(f"isolate: unknown template field {field!r}")

    handle = isolate_runtime.service(isolate_service_spec, resolve)
    yield handle
    isolate_runtime.close_service(isolate_service_spec.name)


@pytest.fixture
def isolate_service(isolate_service_session: ServiceHandle) -> ServiceHandle:
    """This worker's service, guaranteed running when the test starts."""
    isolate_service_session.ensure_running()
    return isolate_service_session
