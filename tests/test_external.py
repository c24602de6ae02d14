"""External servers (``--isolate-pg-dsn``, ``--isolate-redis-url``): runs share a
PostgreSQL and a Redis they did not start, at the same time, and leave nothing there;
what a dead run left is found by its stale lease, not by a local pid."""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys
import threading
from pathlib import Path

import psycopg
import pytest
import redis
from psycopg import sql
from suite_support import clean_env, poll, run_id_of, run_objects

import isolate
from isolate._identity import new_run_id
from isolate._postgres.external import RunLease, drop_run_objects
from isolate._redis.lease import LEASE_KEY, MARK_KEY, ExternalDbLease

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
            # by this run, or by a run of another test on this server that claimed the
            # dead lease first and may still be dropping (its claim keeps this one off)
            poll(lambda: run_objects(conn, dead) == [], 60)
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
        "-n", "2", "-p", "no:randomly", "--isolate-backend=docker", "--no-isolate-reap-stale", *external
    )
    result.assert_outcomes(passed=6)
    with psycopg.connect(isolate_postgres.admin_dsn, autocommit=True) as conn:
        assert run_objects(conn, run_id_of(result)) == []


# -- leases that cannot be stolen ---------------------------------------------------------


def _stale_run(conn: psycopg.Connection[tuple[object, ...]]) -> str:
    """A run whose lease went stale an hour ago, with a role, schema and database."""
    run_id = new_run_id()
    conn.execute("CREATE TABLE IF NOT EXISTS isolate_run_leases (run_id text PRIMARY KEY, host text, "
                 "pid int, started timestamptz DEFAULT now(), heartbeat timestamptz DEFAULT now(), "
                 "kept boolean DEFAULT false)")  # fmt: skip
    conn.execute("INSERT INTO isolate_run_leases (run_id, host, heartbeat) VALUES "
                 "(%s, 'elsewhere', now() - interval '1 hour')", (run_id,))  # fmt: skip
    for worker in ("gw0", "gw1", "gw2"):
        name = sql.Identifier(f"isolate_{worker}_{run_id}")
        conn.execute(sql.SQL("CREATE ROLE {} LOGIN").format(name))
        conn.execute(sql.SQL("CREATE SCHEMA {} AUTHORIZATION {}").format(name, name))
        conn.execute(sql.SQL("CREATE TABLE {}.t (x int)").format(name))
        conn.execute(sql.SQL("CREATE DATABASE {} OWNER {}").format(name, name))
    return run_id


def _together(calls: list[object]) -> list[object]:
    """What each call returned (or raised), all started at the same moment."""
    barrier = threading.Barrier(len(calls))
    results: list[object] = [None] * len(calls)

    def start(i: int) -> None:
        barrier.wait()
        try:
            results[i] = calls[i]()  # type: ignore[operator]
        except Exception as exc:
            results[i] = exc

    threads = [threading.Thread(target=start, args=(i,)) for i in range(len(calls))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    return results


def test_shards_starting_together_against_a_stale_run_all_start(isolate_postgres: isolate.PostgresServer) -> None:
    """Two shards start at the same moment, ten times, each time against a fresh stale run:
    one claims it (under the lock) and drops its objects, the other leaves it alone, and
    both start; nothing of the stale run is left."""
    # A database of the test's own holds the lease table: no other test's nested run (they
    # share this server) claims the stale run first.
    own = dataclasses.replace(isolate_postgres, database=f"isolate_shards_{new_run_id()}")
    with psycopg.connect(isolate_postgres.admin_dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(own.database)))
    try:
        for _ in range(10):
            with psycopg.connect(own.admin_dsn, autocommit=True) as conn:
                stale = _stale_run(conn)
            leases = [RunLease(own, new_run_id()) for _ in range(2)]
            results = _together([lease.open for lease in leases])
            try:
                assert all(isinstance(r, list) for r in results), results
                assert sum(bool(r) for r in results) == 1, results  # one shard dropped it
                with psycopg.connect(own.admin_dsn, autocommit=True) as conn:
                    assert run_objects(conn, stale) == []
            finally:
                for lease in leases:
                    lease.close()
    finally:
        with psycopg.connect(isolate_postgres.admin_dsn, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(own.database)))


def test_a_run_whose_lease_was_taken_for_dead_fails_its_tests(
    pytester: pytest.Pytester, isolate_postgres: isolate.PostgresServer
) -> None:
    """The run's row vanishes (another run found it stale and dropped its objects): the
    next heartbeat notices, and every later test fails with one clear error."""
    pytester.makepyfile(test_lost="""
        import psycopg
        from tenacity import Retrying, stop_after_delay, wait_fixed

        def test_1_the_lease_is_taken(isolate_stack, isolate_postgres):
            with psycopg.connect(isolate_postgres.admin_dsn, autocommit=True) as conn:
                conn.execute("DELETE FROM isolate_run_leases WHERE run_id = %s", (isolate_stack.worker.run_id,))
            for attempt in Retrying(stop=stop_after_delay(60), wait=wait_fixed(0.2), reraise=True):
                with attempt:
                    assert isolate_stack.run.lost()

        def test_2_later_tests_fail(isolate_database):
            pass
    """)  # fmt: skip
    result = pytester.runpytest_subprocess("-p", "no:randomly", f"--isolate-pg-dsn={isolate_postgres.admin_dsn}")
    result.assert_outcomes(passed=1, errors=1)
    out = result.stdout.str()
    assert "LeaseLostError" in out and "took this one for dead" in out, out


def _holder_of(client: object, db: int) -> bytes | None:
    return client.get(LEASE_KEY.format(db=db))  # type: ignore[attr-defined,no-any-return]


def test_a_redis_lease_lost_to_another_shard_is_never_flushed(isolate_redis: isolate.RedisServer) -> None:
    """A worker that stalled past its lease's expiry: another shard took the DB. Neither
    its refresh nor its release touches the new holder's DB, and it records the loss."""
    lease = ExternalDbLease(isolate_redis.url, "stalled")
    db = lease.server.db
    with isolate_redis.admin() as client:
        client.set(LEASE_KEY.format(db=db), "the-other-shard")  # expired and taken
        other = redis.Redis(host=isolate_redis.host, port=isolate_redis.port, db=db)
        other.set("theirs", "1")
        lease._refresh_once()
        assert lease.lost is not None and "lost its lease" in lease.lost
        lease.release()
        assert other.get("theirs") == b"1"
        assert _holder_of(client, db) == b"the-other-shard"
        client.delete(LEASE_KEY.format(db=db))
        other.flushdb()
        other.close()


def test_a_redis_db_holding_someone_elses_keys_is_skipped_not_flushed(isolate_redis: isolate.RedisServer) -> None:
    with isolate_redis.admin() as client:
        databases = int(client.config_get("databases")["databases"])
        others = [redis.Redis(host=isolate_redis.host, port=isolate_redis.port, db=db) for db in range(databases)]
        try:
            first = ExternalDbLease(isolate_redis.url, "probe")  # the first free DB
            taken = first.server.db
            first.release()
            client.delete(MARK_KEY.format(db=taken))  # never isolate's
            others[taken].set("not-isolates", "1")
            lease = ExternalDbLease(isolate_redis.url, "mine")
            assert lease.server.db != taken
            assert others[taken].get("not-isolates") == b"1"
            lease.release()
            for db in range(1, databases):  # every DB someone else's: a clear error
                if not client.exists(LEASE_KEY.format(db=db)):
                    client.delete(MARK_KEY.format(db=db))
                    others[db].set("not-isolates", "1")
            with pytest.raises(isolate.ConfigError, match="hold keys isolate did not write"):
                ExternalDbLease(isolate_redis.url, "mine")
        finally:
            for db, other in enumerate(others):
                if db and not client.exists(LEASE_KEY.format(db=db)):
                    other.delete("not-isolates")
                other.close()


def test_a_kept_stack_on_external_servers_prints_no_password(
    pytester: pytest.Pytester, isolate_postgres: isolate.PostgresServer, isolate_redis: isolate.RedisServer
) -> None:
    """``--isolate-keep`` on external servers: the summary shows where the kept schema and
    DB are, never the servers' passwords (they end up in CI logs)."""
    from isolate._redis.server import ADMIN_USER

    url = f"redis://{ADMIN_USER}:{isolate_redis.admin_password}@{isolate_redis.host}:{isolate_redis.port}"
    pytester.makepyfile(test_x="def test_x(isolate_database, isolate_redis): pass")
    result = pytester.runpytest_subprocess("-p", "no:randomly", "--isolate-keep=always",
                                           f"--isolate-pg-dsn={isolate_postgres.admin_dsn}",
                                           f"--isolate-redis-url={url}")  # fmt: skip
    result.assert_outcomes(passed=1)
    out = result.stdout.str()
    run_id = run_id_of(result)
    try:
        assert "isolate: stacks kept (--isolate-keep)" in out, out
        assert f"redis_url: redis://{ADMIN_USER}:***@" in out and "dsn: postgresql://isolate_main_" in out, out
        assert isolate_redis.admin_password not in out and isolate_postgres.password not in out
        kept = [line for line in out.splitlines() if line.strip().startswith("dsn: ")]
        assert kept and all(":***@" in line for line in kept), kept
    finally:
        subprocess.run([sys.executable, "-m", "isolate", "cleanup", run_id], env=clean_env(), check=True, timeout=120)
    with psycopg.connect(isolate_postgres.admin_dsn, autocommit=True) as conn:
        assert run_objects(conn, run_id) == []
