"""``--isolate-env``: an existing suite that reads its DSN and Redis URL from the
environment runs in parallel with no code of isolate's in it."""

from __future__ import annotations

import subprocess
import sys

import pytest
from suite_support import clean_env, leftovers, run_id_of

#: A suite shaped like pudo/dataset's and kiwicom/kiwi-cache's: the conftest reads the
#: URLs at import, fixed table names, a flush after each test. On one shared server, its
#: workers would drop each other's tables and flush each other's keys.
LEGACY_CONFTEST = """
import os
import psycopg
import pytest
import redis

DATABASE_URL = os.environ["DATABASE_URL"]  # read at import, as such suites do
REDIS_URL = os.environ["REDIS_URL"]

@pytest.fixture
def db():
    with psycopg.connect(DATABASE_URL, autocommit=True) as conn:
        conn.execute("DROP TABLE IF EXISTS items")
        conn.execute("CREATE TABLE items (id serial PRIMARY KEY, name text)")
        yield conn
        conn.execute("DROP TABLE items")

@pytest.fixture
def cache():
    client = redis.Redis.from_url(REDIS_URL)
    yield client
    client.flushdb()
    client.close()
"""

LEGACY_TESTS = """
import time
import pytest

@pytest.mark.parametrize("n", range(12))
def test_items(n, db, cache):
    for i in range(3):
        db.execute("INSERT INTO items (name) VALUES (%s)", (f"{n}-{i}",))
        cache.incr("count")
        time.sleep(0.02)  # long enough for a shared server's other workers to interfere
    assert db.execute("SELECT count(*) FROM items").fetchone() == (3,)
    assert int(cache.get("count")) == 3
"""


def _run(pytester: pytest.Pytester, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "no:randomly", "-p", "no:cacheprovider", *args],
                          cwd=pytester.path, env=clean_env(), capture_output=True, text=True, timeout=300,
                          check=False)  # fmt: skip


def test_an_existing_suite_runs_at_n4_with_one_option(pytester: pytest.Pytester) -> None:
    pytester.makeconftest(LEGACY_CONFTEST)
    pytester.makepyfile(test_items=LEGACY_TESTS)
    done = _run(pytester, "-n", "4", "--isolate-env", "DATABASE_URL={dsn}", "--isolate-env", "REDIS_URL={redis_url}")
    out = done.stdout + done.stderr
    assert done.returncode == 0, out
    assert "12 passed" in out, out
    assert "PostgreSQL, 4 Redis on 4 workers" in out, out  # each worker its own
    assert leftovers(run_id_of_output(out)) == []


def test_the_ini_form_and_without_xdist(pytester: pytest.Pytester) -> None:
    pytester.makeconftest(LEGACY_CONFTEST)
    pytester.makepyfile(test_items=LEGACY_TESTS)
    pytester.makeini("[pytest]\nisolate_env =\n    DATABASE_URL={dsn}\n    REDIS_URL={redis_url}\n")
    for args in (["-n", "2"], ["-p", "no:xdist"]):
        done = _run(pytester, *args)
        assert done.returncode == 0, done.stdout + done.stderr
        assert "12 passed" in done.stdout, done.stdout


def test_a_bad_env_option_names_the_fix(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_x="def test_x(): pass")
    for bad, expected in (("DATABASE_URL", "expected NAME=TEMPLATE"), ("URL={port}", "may use {dsn}")):
        done = _run(pytester, "--isolate-env", bad)
        assert done.returncode == pytest.ExitCode.USAGE_ERROR, done.stdout + done.stderr
        assert expected in done.stderr, done.stderr


def run_id_of_output(out: str) -> str:
    class _Result:
        class stdout:
            @staticmethod
            def str() -> str:
                return out

    return run_id_of(_Result())  # type: ignore[arg-type]
