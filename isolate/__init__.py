"""isolate: per-worker integration-test stacks for pytest-xdist.

One shared, tuned PostgreSQL per run; a private schema and role per worker; a
private Redis per worker; and each worker's own instance of the service under
test, on its own port, so a test can stop, kill or restart *its* service and
no other worker notices.
"""

from __future__ import annotations

from . import _plainimport  # noqa: F401  first: isolate's other modules load without pytest's rewrite
from ._backends import Backend, Runner
from ._config import OPTIONS, Settings, resolve_settings
from ._containers import ContainerHandle
from ._database import Migrations, WorkerDatabase
from ._errors import (
    BinaryNotFoundError,
    ConfigError,
    DockerUnavailableError,
    ExternalServerError,
    FaultInjectionError,
    FreshDatabaseError,
    ImageNotFoundError,
    IsolateError,
    LeaseLostError,
    MigrationError,
    PortUnavailableError,
    RunFixtureError,
    RunStoppingError,
    ServerStartError,
    ServiceError,
    ServiceExitedError,
    ServiceNotReadyError,
    UnexpectedFileError,
)
from ._fault import Fault
from ._identity import WorkerIdentity
from ._ports import PortLease, reserve_port
from ._postgres import PostgresServer
from ._redis import RedisServer
from ._retry import poll_until
from ._run.fixture_defs import run_fixture
from ._runscope import RunScope
from ._service import HttpCheck, ServiceHandle, ServiceSpec, TcpCheck
from ._stack import WorkerStack

__all__ = [
    "OPTIONS",
    "Backend",
    "BinaryNotFoundError",
    "ConfigError",
    "ContainerHandle",
    "DockerUnavailableError",
    "ExternalServerError",
    "Fault",
    "FaultInjectionError",
    "FreshDatabaseError",
    "HttpCheck",
    "ImageNotFoundError",
    "IsolateError",
    "LeaseLostError",
    "MigrationError",
    "Migrations",
    "PortLease",
    "PortUnavailableError",
    "PostgresServer",
    "RedisServer",
    "RunFixtureError",
    "RunScope",
    "RunStoppingError",
    "Runner",
    "ServerStartError",
    "ServiceError",
    "ServiceExitedError",
    "ServiceHandle",
    "ServiceNotReadyError",
    "ServiceSpec",
    "Settings",
    "TcpCheck",
    "UnexpectedFileError",
    "WorkerDatabase",
    "WorkerIdentity",
    "WorkerStack",
    "poll_until",
    "reserve_port",
    "resolve_settings",
    "run_fixture",
]

__version__ = "0.1.0"
