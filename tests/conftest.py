"""isolate's own test suite uses isolate: the fixture app is the service under test."""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

import isolate
from isolate._config import default_base_dir

HERE = Path(__file__).parent
MIGRATIONS = HERE / "fixture_app" / "migrations"
APP = HERE / "fixture_app" / "app.py"


def app_spec(name: str = "fixture-app", **env: str) -> isolate.ServiceSpec:
    """The fixture app declared once, as a user's conftest would."""
    return isolate.ServiceSpec(
        name=name,
        command=[sys.executable, str(APP)],
        env={"PORT": "{port}", "DATABASE_URL": "{dsn}", "REDIS_URL": "{redis_url}", **env},
        health=isolate.HttpCheck("/health"),
        ready_timeout=20,
        stop_timeout=5,
    )


@pytest.fixture(scope="session")
def isolate_migrations() -> Path:
    return MIGRATIONS


@pytest.fixture(scope="session")
def isolate_service_spec() -> isolate.ServiceSpec:
    return app_spec()


@pytest.fixture
def private_base() -> Iterator[str]:
    """A base dir of the test's own: its caches (templates, the fork servers a run
    remembers) are not another test's, and no concurrent ``cleanup --caches`` (the
    two-users test runs one) empties them in between."""
    base = tempfile.mkdtemp(prefix="isolate-test-base-", dir=default_base_dir())
    os.chmod(base, 0o755)  # the run-as user traverses it
    yield f"--isolate-base-dir={base}"
    shutil.rmtree(base, ignore_errors=True)
