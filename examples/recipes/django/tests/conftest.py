"""The recipe's wiring: Django's migrations through isolate's migrations hook, pytest-django
pointed at each worker's schema (or database), and the Django service per worker."""

import hashlib
import sys
from pathlib import Path

import pytest
from django.core.management import call_command
from django.db import connections
from shop.dburl import database_from_url

import isolate

PROJECT = Path(__file__).resolve().parent.parent


def use_database(settings: dict) -> None:
    """Point Django's default connection at ``settings`` (it reconnects on next use)."""
    connection = connections["default"]
    connection.close()
    connection.settings_dict.update(settings)


@pytest.fixture(scope="session")
def isolate_migrations(django_db_blocker):
    def django_migrate(conn):
        """``manage.py migrate`` as the role and with the ``search_path`` of the connection
        isolate hands over (the worker's role in its schema; in database mode, the
        template's owner in the template database), so the tables belong to the right role."""
        role, search_path = conn.execute("SELECT current_user, current_setting('search_path')").fetchone()
        info = conn.info
        search_path = search_path.replace(" ", "\\ ")  # libpq options are space-separated
        use_database({
            "NAME": info.dbname, "USER": info.user, "PASSWORD": info.password or "",
            "HOST": info.host, "PORT": str(info.port),
            "OPTIONS": {"options": f"-c role={role} -c search_path={search_path}"},
        })
        with django_db_blocker.unblock():
            call_command("migrate", verbosity=0)
            connections["default"].close()

    # database mode caches the migrated template by this: the migration files' text
    django_migrate.cache_key = hashlib.sha256(
        b"".join(p.read_bytes() for p in sorted((PROJECT / "orders" / "migrations").glob("*.py")))
    ).hexdigest()
    return django_migrate


@pytest.fixture(scope="session")
def django_db_setup(isolate_database):
    """pytest-django's test database is the worker's own, already migrated: no test_* copy."""
    use_database(database_from_url(isolate_database.dsn))


@pytest.fixture(scope="session")
def isolate_service_spec():
    return isolate.ServiceSpec(
        name="shop",
        command=[sys.executable, "-m", "shop.serve"],
        env={"PORT": "{port}", "DATABASE_URL": "{dsn}", "DJANGO_SETTINGS_MODULE": "shop.settings"},
        health=isolate.HttpCheck("/health"),
        entry="shop.serve:main",
        preload=["shop.serve", "django.core.handlers.wsgi", "django.db.backends.postgresql.base"],
    )
