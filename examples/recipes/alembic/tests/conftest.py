"""The recipe's wiring: Alembic migrations through isolate's migrations hook, and the
service under test on each worker."""

import hashlib
import sys
from pathlib import Path

import pytest
from alembic import command
from alembic.config import Config
from sqlalchemy import create_engine
from sqlalchemy.pool import StaticPool

import isolate

PROJECT = Path(__file__).resolve().parent.parent
VERSIONS = PROJECT / "migrations" / "versions"


def alembic_upgrade(conn):
    """``alembic upgrade head`` on the connection isolate hands over: the worker's role
    with ``search_path`` set to its schema (schema mode), or the template's owner in the
    template database (database mode). SQLAlchemy borrows it; isolate commits and closes it."""
    engine = create_engine("postgresql+psycopg://", creator=lambda: conn, poolclass=StaticPool)
    config = Config(str(PROJECT / "alembic.ini"))
    config.set_main_option("script_location", str(PROJECT / "migrations"))
    with engine.connect() as connection:
        config.attributes["connection"] = connection
        command.upgrade(config, "head")
        connection.commit()


# Database mode caches the migrated template across runs by this key: the revisions' text.
alembic_upgrade.cache_key = hashlib.sha256(
    b"".join(path.read_bytes() for path in sorted(VERSIONS.glob("*.py")))
).hexdigest()


@pytest.fixture(scope="session")
def isolate_migrations():
    return alembic_upgrade


@pytest.fixture(scope="session")
def isolate_service_spec():
    return isolate.ServiceSpec(
        name="inventory",
        command=[sys.executable, "-m", "inventory"],
        env={"PORT": "{port}", "DATABASE_URL": "{dsn}"},
        health=isolate.HttpCheck("/health"),
        entry="inventory.server:main",
        preload=["inventory.server", "sqlalchemy.dialects.postgresql.psycopg"],
    )
