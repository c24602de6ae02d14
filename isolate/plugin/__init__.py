"""isolate's pytest plugin (the ``pytest11`` entry point ``isolate``).

Only this package imports pytest. ``_hooks`` declares the options and drives the run
(controller and worker), ``_xdist`` holds the hooks that exist only with pytest-xdist,
``_fixtures`` the default fixtures.
"""

from ._fixtures import (
    _isolate_restore_faults,
    isolate_backend,
    isolate_bootstrap,
    isolate_conn,
    isolate_database,
    isolate_dsn,
    isolate_fresh_database,
    isolate_migrations,
    isolate_postgres,
    isolate_redis,
    isolate_redis_client,
    isolate_redis_url,
    isolate_service,
    isolate_service_session,
    isolate_service_spec,
    isolate_stack,
    isolate_worker,
)
from ._hooks import (
    pytest_addoption,
    pytest_collection_modifyitems,
    pytest_configure,
    pytest_report_header,
    pytest_runtest_makereport,
    pytest_runtest_protocol,
    pytest_sessionfinish,
    pytest_terminal_summary,
    pytest_unconfigure,
)

__all__ = [
    "_isolate_restore_faults",
    "isolate_backend",
    "isolate_bootstrap",
    "isolate_conn",
    "isolate_database",
    "isolate_dsn",
    "isolate_fresh_database",
    "isolate_migrations",
    "isolate_postgres",
    "isolate_redis",
    "isolate_redis_client",
    "isolate_redis_url",
    "isolate_service",
    "isolate_service_session",
    "isolate_service_spec",
    "isolate_stack",
    "isolate_worker",
    "pytest_addoption",
    "pytest_collection_modifyitems",
    "pytest_configure",
    "pytest_report_header",
    "pytest_runtest_makereport",
    "pytest_runtest_protocol",
    "pytest_sessionfinish",
    "pytest_terminal_summary",
    "pytest_unconfigure",
]
