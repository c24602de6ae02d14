"""The service under test: a backend-neutral spec (``spec``) and handle (``handle``),
with thin launchers (``native``: a process group; ``docker``: a container)."""

from .handle import Launcher, ServiceHandle
from .spec import TEMPLATE_FIELDS, HealthCheck, HttpCheck, ServiceSpec, TcpCheck, render

__all__ = [
    "TEMPLATE_FIELDS",
    "HealthCheck",
    "HttpCheck",
    "Launcher",
    "ServiceHandle",
    "ServiceSpec",
    "TcpCheck",
    "render",
]
