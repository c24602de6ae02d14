"""isolate's default fixtures. Override ``isolate_service_spec`` (and, if you have
some, ``isolate_migrations``) in your conftest.py; use the rest."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from .._database import Migrations, WorkerDatabase
from .._identity import WorkerIdentity
from .._lazy import lazy
from .._postgres import PostgresServer
from .._redis import RedisServer
from .._runscope import RunScope
from .._service import ServiceHandle, ServiceSpec
from .._stack import WorkerStack
from ._hooks import FAILED_KEY, STACK_KEY, wants_fresh

if TYPE_CHECKING:
    import psycopg
    import redis
else:
    psycopg = lazy("psycopg")
    redis = lazy("redis")


@pytest.fixture(scope="session")
def isolate_stack(pytestconfig: pytest.Config) -> WorkerStack:
    """This worker's :class:`~isolate.WorkerStack`: every piece, the run dir, start-once."""
    return pytestconfig.stash[STACK_KEY]


@pytest.fixture(scope="session")
def isolate_run(isolate_stack: WorkerStack) -> RunScope:
    """The run (``isolate.RunScope``): its id, dir, backend and worker count, its
    shared PostgreSQL, and calls that register what you start with the run
    (``adopt_process``, ``container_labels``, ``container``). A run fixture
    (``@isolate.run_fixture``) gets the same, in the controller."""
    return RunScope(isolate_stack)


@pytest.fixture(autouse=True)
def _isolate_restore_faults(pytestconfig: pytest.Config) -> Iterator[None]:
    """Before every test, fail it if the run lost a lease on an external server; after
    it, undo a ``cut()`` it left in effect (whatever happened)."""
    stack = pytestconfig.stash.get(STACK_KEY, None)
    if stack is not None:
        stack.check()
    yield
    if stack is not None:
        stack.heal()


@pytest.fixture(scope="session")
def isolate_backend(isolate_stack: WorkerStack) -> str:
    """The backend this run chose (``native`` or ``docker``; ``auto`` resolved once by
    the controller): read this rather than ``ISOLATE_BACKEND``."""
    return isolate_stack.backend.name


@pytest.fixture(scope="session")
def isolate_worker(isolate_stack: WorkerStack) -> WorkerIdentity:
    """Worker id (``gw0``... or ``main``), worker count and run id."""
    return isolate_stack.worker


@pytest.fixture(scope="session")
def isolate_postgres(isolate_stack: WorkerStack) -> PostgresServer:
    """The run's shared, tuned PostgreSQL server (superuser connection facts)."""
    return isolate_stack.postgres()


@pytest.fixture(scope="session")
def isolate_migrations(pytestconfig: pytest.Config, isolate_stack: WorkerStack) -> Migrations:
    """Migrations for each worker's schema: override to return a path or a callable.

    Default: ``--isolate-migrations`` (relative to the rootdir), or none.
    """
    path = isolate_stack.settings.migrations
    if not path:
        return None
    resolved = Path(path)
    return resolved if resolved.is_absolute() else pytestconfig.rootpath / resolved


@pytest.fixture(scope="session")
def isolate_bootstrap(isolate_stack: WorkerStack) -> Migrations:
    """Run as the superuser once per run before the migrations (``CREATE EXTENSION``,
    roles the app expects): override to return a path or ``callable(conn)``.

    Default: ``--isolate-bootstrap`` (relative to the rootdir), or none.
    """
    return isolate_stack.settings.bootstrap


@pytest.fixture(scope="session")
def isolate_database(
    isolate_stack: WorkerStack, isolate_migrations: Migrations, isolate_bootstrap: Migrations
) -> Iterator[WorkerDatabase]:
    """This worker's schema (or database) and role, with migrations applied."""
    yield isolate_stack.database(isolate_migrations, isolate_bootstrap)
    isolate_stack.drop_database()


@pytest.fixture
def isolate_fresh_database(
    request: pytest.FixtureRequest, isolate_stack: WorkerStack, isolate_database: WorkerDatabase
) -> Iterator[WorkerDatabase]:
    """This worker's database (or schema) in its migrated state, DDL included, for this
    test: a spare that the worker's pool migrated ahead of time is renamed to the worker's
    name (``--isolate-fresh-pool``; without a pool, it is rebuilt). Its DSN does not
    change: the service's next connection lands in the fresh one, and the sessions on the
    old one are ended. With ``--isolate-keep``, a failing test's database is kept under a
    name that says which test. Set up before the test's other fixtures; a marker
    (``fresh_database``) or ``--isolate-fresh-paths`` give it to tests that do not name it.
    For a module, write a module-scoped fixture that calls ``isolate_database.rebuild()``."""
    yield isolate_stack.fresh_database()
    if isolate_stack.settings.keep != "never" and request.node.stash.get(FAILED_KEY, False):
        isolate_stack.set_aside(request.node.nodeid)


@pytest.fixture(autouse=True)
def _isolate_fresh_first(request: pytest.FixtureRequest) -> None:
    """A test that takes ``isolate_fresh_database`` (by name, marker or path) gets it
    before its other fixtures (a connection opened before the swap would be ended)."""
    if wants_fresh(request.node):
        request.getfixturevalue("isolate_fresh_database")


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
def isolate_redis(isolate_stack: WorkerStack) -> Iterator[RedisServer]:
    """This worker's Redis: its own server, or its own DB on a shared one."""
    yield isolate_stack.redis()
    isolate_stack.stop_redis()


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


def _resolver(request: pytest.FixtureRequest) -> Callable[[str], object]:
    """Template values from the fixtures, so overriding a fixture changes what is used."""

    def resolve(field: str) -> object:
        if field in ("dsn", "schema", "role"):
            db: WorkerDatabase = request.getfixturevalue("isolate_database")
            return {"dsn": db.dsn, "schema": db.schema, "role": db.role}[field]
        if field == "redis_url":
            return request.getfixturevalue("isolate_redis_url")
        raise pytest.UsageError(f"isolate: unknown template field {field!r}")

    return resolve


@pytest.fixture(scope="session")
def isolate_service_session(
    request: pytest.FixtureRequest, isolate_stack: WorkerStack, isolate_service_spec: ServiceSpec
) -> Iterator[ServiceHandle]:
    """This worker's instance of the service, started once per worker.

    Its ``{dsn}``/``{schema}``/``{role}`` come from the ``isolate_database`` fixture and
    ``{redis_url}`` from ``isolate_redis_url``, so overriding those changes what it uses.
    """
    handle = isolate_stack.service(isolate_service_spec, _resolver(request))
    yield handle
    isolate_stack.close_service(isolate_service_spec.name)


@pytest.fixture(scope="session")
def isolate_service_specs() -> list[ServiceSpec]:
    """Several services under test (an API, a background worker, a fake of a third-party
    API): override to return their ``ServiceSpec``s. Each worker gets its own instance of
    each, on its own port, started in ``depends_on`` order."""
    return []


@pytest.fixture(scope="session")
def isolate_services_session(
    request: pytest.FixtureRequest, isolate_stack: WorkerStack, isolate_service_specs: list[ServiceSpec]
) -> Iterator[dict[str, ServiceHandle]]:
    """This worker's instances of ``isolate_service_specs``, by name, started once."""
    handles = isolate_stack.services(isolate_service_specs, _resolver(request))
    yield handles
    for name in reversed(list(handles)):  # dependants first
        isolate_stack.close_service(name)


@pytest.fixture
def isolate_services(isolate_services_session: dict[str, ServiceHandle]) -> dict[str, ServiceHandle]:
    """This worker's services by name, each running and healthy when the test starts."""
    for handle in isolate_services_session.values():
        handle.ensure_ready()
    return isolate_services_session


@pytest.fixture
def isolate_service(isolate_service_session: ServiceHandle) -> ServiceHandle:
    """This worker's service, running and healthy when the test starts (started, or
    restarted, if an earlier test left it stopped or not ready)."""
    isolate_service_session.ensure_ready()
    return isolate_service_session
