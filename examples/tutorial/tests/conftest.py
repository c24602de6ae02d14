import sys

import pytest

import isolate


@pytest.fixture(scope="session")
def isolate_migrations():
    return "migrations"  # relative to the rootdir (where pytest.ini is)


@pytest.fixture(scope="session")
def isolate_service_spec():
    return isolate.ServiceSpec(
        name="notes",
        command=[sys.executable, "-m", "notes"],
        env={"PORT": "{port}", "DATABASE_URL": "{dsn}", "REDIS_URL": "{redis_url}"},
        health=isolate.HttpCheck("/health"),
        entry="notes.app:main",  # restarts fork a preloaded parent: milliseconds, not seconds
    )
