"""isolate: per-worker integration-test stacks for pytest-xdist.

One shared, tuned PostgreSQL per run; a private schema and role per worker; a
private Redis per worker; and each worker's own instance of the service under
test, on its own port, so a test can stop, kill or restart *its* service and
no other worker notices.
"""

from __future__ import annotations

from ._config import OPTIONS, Settings, resolve_settings
from ._database import Migrations, WorkerDatabase
from ._errors import (
    BinaryNotFoundError,
    ConfigError,
    DockerUnavailableError,
    FaultInjectionError,
    ImageNotFoundError,
    IsolateError,
    MigrationError,
    PortUnavailableError,
    ServerStartError,
    ServiceError,
    ServiceExitedError,
    ServiceNotReadyError,
)
from ._ports import PortLease, reserve_port
from ._postgres import PostgresServer
from ._redis import RedisServer
from ._runner import Runner
from ._runtime import IsolateRuntime
from ._service import HttpCheck, ServiceHandle, ServiceSpec, TcpCheck
from ._worker import WorkerIdentity

__all__ = [
    "OPTIONS",
    "BinaryNotFoundError",
    "ConfigError",
    "DockerUnavailableError",
    "FaultInjectionError",
    "HttpCheck",
    "ImageNotFoundError",
    "IsolateError",
    "IsolateRuntime",
    "MigrationError",
    "Migrations",
    "PortLease",
    "PortUnavailableError",
    "PostgresServer",
    "RedisServer",
    "Runner",
    "ServerStartError",
    "ServiceError",
    "ServiceExitedError",
    "ServiceHandle",
    "ServiceNotReadyError",
    "ServiceSpec",
    "Settings",
    "TcpCheck",
    "WorkerDatabase",
    "WorkerIdentity",
    "reserve_port",
    "resolve_settings",
]

__version__ = "0.1.0"
