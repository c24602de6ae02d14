"""isolate's own test suite uses isolate: the fixture app is the service under test."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

import isolate

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
