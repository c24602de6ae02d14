"""External servers (``--isolate-pg-dsn``, ``--isolate-redis-url``): runs share a
PostgreSQL and a Redis they did not start, at the same time, and leave nothing there;
what a dead run left is found by its stale lease, not by a local pid."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import psycopg
import pytest
from psycopg import sql
from suite_support import clean_env, run_id_of

import isolate
from isolate._identity import new_run_id
from isolate._postgres.external import drop_run_objects

SUITE = """
import pytest
import isolate

@pytest.mark.parametrize("n", range(6))
def test_stack(n, isolate_database, isolate_conn, isolate_redis, isolate_redis_client, isolate_worker):
    run_id = isolate_worker.run_id
    where = isolate_conn.execute("SELECT current_database(), current_schema(), current_user").fetchone()
    assert where[2].endswith(run_id)  # the worker's own role, named with the run id
    assert (where[0] if isolate_database.database else where[1]).endswith(run_id)
    isolate_conn.execute("CREATE TABLE IF NOT EXISTS seen (n int)")
    isolate_conn.execute("INSERT INTO seen VALUES (%s)", (n,))
    isolate_conn.commit()
    assert isolate_redis.db != 0 and isolate_redis.backend == "external"
    isolate_redis_client.sadd("seen", f"{run_id}:{n}")
    assert all(m.decode().startswith(run_id) for m in isolate_redis_client.smembers("seen"))
    with pytest.raises(isolate.FaultInjectionError, match="--isolate-redis-url"):
        isolate_redis.cut()
"""


def run_objects(conn: psycopg.Connection[tuple[object, ...]], *run_ids: str) -> list[str]:
    found = []
    for run_id in run_ids:
        like = f"isolate\\_%\\_{run_id}"
        for query in ("SELECT rolname FROM pg_roles WHERE rolname LIKE %s",
                      "SELECT datname FROM pg_database WHERE datname LIKE %s",
                      "SELECT nspname FROM pg_namespace WHERE nspname LIKE %s"):  # fmt: skip
            found += [str(name) for (name,) in conn.execute(query, (like,))]
        if conn.execute("SELECT to_regclass('isolate_run_leases')").fetchone() != (None,):
            found += [f"lease {r}" for (r,) in conn.execute("SELECT run_id FROM isolate_run_leases "
                                                           "WHERE run_id = %s", (run_id,))]  # fmt: skip
    return found


def start(path: Path, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "pytest", "-p", "no:randomly", "-p", "no:cacheprovider", *args],
        cwd=path, env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip


@pytest.fixture
def external(isolate_postgres: isolate.PostgresServer, isolate_redis: isolate.RedisServer) -> list[str]:
    """This worker's PostgreSQL and Redis, as the servers of the nested runs."""
    return [f"--isolate-pg-dsn={isolate_postgres.admin_dsn}", f"--isolate-redis-url={isolate_redis.url}"]


def test_two_concurrent_runs_share_external_servers_and_leave_nothing(
    pytester: pytest.Pytester, external: list[str], isolate_postgres: isolate.PostgresServer,
    isolate_redis: isolate.RedisServer,
) -> None:  # fmt: skip
    pytester.makepyfile(test_stack=SUITE)
    runs = [start(pytester.path, "-n", "2", *external),
            start(pytester.path, "-n", "2", "--isolate-db-isolation=database", *external)]  # fmt: skip
    outputs = [run.communicate(timeout=300)[0] for run in runs]
    for run, out in zip(runs, outputs, strict=True):
        assert run.returncode == 0, out
        assert "6 passed" in out, out
    run_ids = [re.findall(r"isolate: run ([0-9a-f]{10})", out)[0] for out in outputs]
    assert run_ids[0] != run_ids[1]
    with psycopg.connect(isolate_postgres.admin_dsn, autocommit=True) as conn:
        assert run_objects(conn, *run_ids) == []
    with isolate_redis.admin() as client:
        for db in range(16):
            client.execute_command("SELECT", db)
            keys = [k for k in client.keys("*") if not k.startswith(b"isolate:db-lease:")]
            assert keys == [] or db == isolate_redis.db, (db, keys)
        client.execute_command("SELECT", 0)
        assert client.keys("isolate:db-lease:*") == []


def test_a_dead_runs_objects_are_dropped_by_its_stale_lease_and_a_live_runs_kept(
    pytester: pytest.Pytester, external: list[str], isolate_postgres: isolate.PostgresServer
) -> None:
    dead, alive = new_run_id(), new_run_id()
    with psycopg.connect(isolate_postgres.admin_dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE IF NOT EXISTS isolate_run_leases (run_id text PRIMARY KEY, host text, "
                     "pid int, started timestamptz DEFAULT now(), heartbeat timestamptz DEFAULT now(), "
                     "kept boolean DEFAULT false)")  # fmt: skip
        conn.execute("INSERT INTO isolate_run_leases (run_id, host, heartbeat) VALUES "
                     "(%s, 'elsewhere', now() - interval '1 hour'), (%s, 'elsewhere', now())",
                     (dead, alive))  # fmt: skip
        for run_id in (dead, alive):
            name = sql.Identifier(f"isolate_gw0_{run_id}")
            conn.execute(sql.SQL("CREATE ROLE {} LOGIN").format(name))
            conn.execute(sql.SQL("CREATE SCHEMA {} AUTHORIZATION {}").format(name, name))
            conn.execute(sql.SQL("CREATE TABLE {}.t (x int)").format(name))
            conn.execute(sql.SQL("CREATE DATABASE {} OWNER {}").format(name, name))
    try:
        pytester.makepyfile(test_x="def test_x(isolate_database): pass")
        result = pytester.runpytest_subprocess("-p", "no:randomly", *external)
        result.assert_outcomes(passed=1)
        with psycopg.connect(isolate_postgres.admin_dsn, autocommit=True) as conn:
            assert run_objects(conn, dead) == []
            assert len(run_objects(conn, alive)) == 4  # role, database, schema, lease: not touched
            assert run_objects(conn, run_id_of(result)) == []
    finally:
        drop_run_objects(isolate_postgres, alive)


def test_a_role_that_cannot_create_roles_is_told_what_it_lacks(
    pytester: pytest.Pytester, isolate_postgres: isolate.PostgresServer
) -> None:
    role = f"isolate_weak_{new_run_id()}"
    with psycopg.connect(isolate_postgres.admin_dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE ROLE {} LOGIN PASSWORD 'weak'").format(sql.Identifier(role)))
    try:
        pytester.makepyfile(test_x="def test_x(isolate_database): pass")
        dsn = isolate_postgres.dsn(user=role, password="weak")
        result = pytester.runpytest_subprocess("-p", "no:randomly", f"--isolate-pg-dsn={dsn}")
        assert result.ret != 0
        out = result.stdout.str() + result.stderr.str()
        assert f"the --isolate-pg-dsn role {role!r} lacks CREATEROLE" in out
        assert f"ALTER ROLE {role} CREATEROLE" in out
        assert "Traceback" not in out
    finally:
        with psycopg.connect(isolate_postgres.admin_dsn, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))


@pytest.mark.docker
def test_the_docker_backend_uses_the_external_servers_too(
    pytester: pytest.Pytester, external: list[str], isolate_postgres: isolate.PostgresServer
) -> None:
    """No PostgreSQL or Redis container: the containers a run would start are replaced by
    the external servers, and nothing is left on them."""
    pytester.makepyfile(test_stack=SUITE)
    result = pytester.runpytest_subprocess(
        "-n", "2", "-p", "no:randomly", "--isolate-backend=docker", "--isolate-reap-stale=false", *external
    )
    result.assert_outcomes(passed=6)
    with psycopg.connect(isolate_postgres.admin_dsn, autocommit=True) as conn:
        assert run_objects(conn, run_id_of(result)) == []
