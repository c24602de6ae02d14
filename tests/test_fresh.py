"""``isolate_fresh_database`` and the warm pool behind it: every test gets a copy of the
migrated database that no earlier test had (rows, DDL, sequences, functions), the service
under test follows the swap through its own DSN, a failing test's copy can be kept and
is removed by ``cleanup RUN``, a burst of tests that empties the pool waits for copies,
and a worker killed while copies are being made leaves nothing, on both backends and on
an external server."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import sql
from suite_support import CONFTEST, HELPERS, clean_env, leftovers, run_id_of, run_objects
from tenacity import Retrying, stop_after_delay, wait_fixed

import isolate
from isolate._config import default_base_dir, resolve_settings
from isolate._pool import pool_size
from isolate._recycle import Pristine
from isolate._spares import kept_name

MODES = ["schema", "database"]
APP = Path(__file__).parent / "fixture_app"

COPIES = '''
import os
from pathlib import Path

STATE = Path(os.environ["FRESH_DIR"])
ME = os.environ.get("PYTEST_XDIST_WORKER", "main")


def first_time(kind, value):
    """Record ``value`` for this worker; whether no earlier test of it recorded it."""
    path = STATE / f"{ME}-{kind}"
    before = path.read_text().split() if path.exists() else []
    path.write_text("\\n".join([*before, str(value)]))
    return str(value) not in before


def copy_id(conn, db):
    """The OID of the database (database mode) or schema the connection is in."""
    query = ("SELECT oid FROM pg_database WHERE datname = current_database()" if db.database
             else "SELECT oid FROM pg_namespace WHERE nspname = current_schema()")
    return conn.execute(query).fetchone()[0]
'''

SUITE = '''
import pytest
from copies import copy_id, first_time
from helpers import get, post


@pytest.mark.parametrize("n", range(8))
def test_fresh(n, isolate_fresh_database, isolate_conn, isolate_service):
    conn, db = isolate_conn, isolate_fresh_database
    assert first_time("copies", copy_id(conn, db))  # never a copy an earlier test had
    assert conn.execute("SELECT count(*) FROM items").fetchone() == (0,)
    assert conn.execute("SELECT count(*) FROM schema_version").fetchone() == (3,)  # migrated rows
    assert conn.execute("SELECT to_regclass('scratch'), to_regprocedure('bump(int)')").fetchone() == (None, None)
    columns = [r[0] for r in conn.execute(
        "SELECT attname FROM pg_attribute WHERE attrelid = 'items'::regclass AND attnum > 0")]
    assert "extra" not in columns
    assert conn.execute("SELECT last_value, is_called FROM items_id_seq").fetchone() == (1, False)
    conn.execute("INSERT INTO items (value, instance) VALUES ('left', 'test')")
    conn.execute("CREATE TABLE scratch (v int)")
    conn.execute("ALTER TABLE items ADD COLUMN extra int")
    conn.execute("CREATE FUNCTION bump(x int) RETURNS int LANGUAGE sql AS 'SELECT x + 1'")
    conn.execute("SELECT setval('items_id_seq', 1000)")
    # The service reads this copy through its own DSN; the session it kept open on the
    # previous test's copy was ended by the swap, so its checked pool made a new one.
    got = get(isolate_service.url + "/pooled")
    assert got["items"] == 1
    assert first_time("connects", got["connects"])
    assert post(isolate_service.url + "/items", {"value": n})["id"] == 1001
'''

BURST = '''
import pytest
from copies import copy_id, first_time


@pytest.mark.parametrize("n", range(15))
def test_burst(n, isolate_fresh_database, isolate_conn):
    if isolate_fresh_database.database:  # a new clone each time (schema mode recycles copies)
        assert first_time("copies", copy_id(isolate_conn, isolate_fresh_database))
    assert isolate_conn.execute("SELECT count(*) FROM items").fetchone() == (0,)
    assert isolate_conn.execute("SELECT last_value, is_called FROM items_id_seq").fetchone() == (1, False)
    isolate_conn.execute("INSERT INTO items (value, instance) VALUES ('left', 'test')")
'''

DOCKER_CONFTEST = """
import pytest
from pathlib import Path
import isolate


@pytest.fixture(scope="session")
def isolate_migrations():
    return Path({app!r}) / "migrations"


@pytest.fixture(scope="session")
def isolate_service_spec():  # the image is built from tests/fixture_app/Dockerfile
    return isolate.ServiceSpec(
        name="app", build_context={app!r}, health=isolate.HttpCheck("/health"), ready_timeout=30,
        env={{"PORT": "{{port}}", "DATABASE_URL": "{{dsn}}", "REDIS_URL": "{{redis_url}}"}},
    )
"""

BACKENDS = [
    pytest.param([], id="native"),
    pytest.param(
        ["--isolate-backend=docker", "--isolate-pg-image=isolate-local/postgres:15",
         "--isolate-redis-image=isolate-local/redis:7", "--no-isolate-reap-stale"],
        id="docker", marks=pytest.mark.docker,
    ),
    pytest.param(None, id="external"),
]


@pytest.fixture
def suite(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> pytest.Pytester:
    state = tmp_path / "fresh-state"
    state.mkdir()
    monkeypatch.setenv("FRESH_DIR", str(state))
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(helpers=HELPERS, copies=COPIES)
    return pytester


def external_args(request: pytest.FixtureRequest) -> list[str]:
    """This worker's PostgreSQL and Redis, as the servers of a nested run."""
    pg: isolate.PostgresServer = request.getfixturevalue("isolate_postgres")
    redis: isolate.RedisServer = request.getfixturevalue("isolate_redis")
    return [f"--isolate-pg-dsn={pg.admin_dsn}", f"--isolate-redis-url={redis.url}"]


def no_objects_left(admin_dsn: str, run_id: str) -> None:
    with psycopg.connect(admin_dsn, autocommit=True) as conn:
        assert run_objects(conn, run_id) == []


def nested_run(request: pytest.FixtureRequest, server: str, mode: str) -> tuple[str, list[str]]:
    """A run id of the test's own, and the arguments that give a nested run that id, ``mode``
    and ``server`` (``native``, or ``external``: this worker's PostgreSQL and Redis)."""
    run_id = "f" + uuid.uuid4().hex[:9]
    args = [f"--isolate-run-id={run_id}", f"--isolate-db-isolation={mode}"]
    return run_id, args + (external_args(request) if server == "external" else [])


def nothing_left(request: pytest.FixtureRequest, server: str, run_id: str) -> None:
    """No process or run dir of the run (its cluster included), nor, on the external
    server, any of its objects."""
    if server == "external":
        no_objects_left(request.getfixturevalue("isolate_postgres").admin_dsn, run_id)
    for attempt in Retrying(stop=stop_after_delay(15), wait=wait_fixed(0.1), reraise=True):
        with attempt:
            assert leftovers(run_id) == []


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", MODES)
def test_each_test_gets_a_copy_no_earlier_test_had_and_the_service_follows(
    suite: pytest.Pytester, request: pytest.FixtureRequest, tmp_path: Path, mode: str, backend: list[str] | None
) -> None:  # fmt: skip
    args = external_args(request) if backend is None else backend
    if "--isolate-backend=docker" in args:
        suite.makeconftest(DOCKER_CONFTEST.format(app=str(APP)))
    suite.makepyfile(test_fresh=SUITE)
    timings = tmp_path / "timings.json"
    result = suite.runpytest_subprocess("-n", "2", "-p", "no:randomly", f"--isolate-db-isolation={mode}",
                                        f"--isolate-timings-json={timings}", *args)  # fmt: skip
    result.assert_outcomes(passed=8)
    phases = json.loads(timings.read_text())
    assert phases["fresh_database"]["count"] == 8
    made = phases["fresh_spare"]["count"] + phases.get("fresh_recycle", {}).get("count", 0)
    assert made >= 8  # swapped in from the pool, not rebuilt
    if backend is None:
        no_objects_left(request.getfixturevalue("isolate_postgres").admin_dsn, run_id_of(result))


@pytest.mark.parametrize("pool", ["1", "0"], ids=["pool-of-1", "no-pool"])
@pytest.mark.parametrize("mode", MODES)
def test_a_burst_of_fast_tests_waits_for_copies_and_never_gets_a_used_one(
    suite: pytest.Pytester, tmp_path: Path, mode: str, pool: str
) -> None:
    suite.makepyfile(test_burst=BURST)
    timings = tmp_path / "timings.json"
    result = suite.runpytest_subprocess("-n", "2", "-p", "no:randomly", f"--isolate-db-isolation={mode}",
                                        f"--isolate-fresh-pool={pool}", f"--isolate-timings-json={timings}")  # fmt: skip
    result.assert_outcomes(passed=15)
    phases = json.loads(timings.read_text())
    if pool == "1":
        assert phases["fresh_wait"]["max"] > 0.01  # the pool ran dry: the fixture waited
        made = phases["fresh_spare"]["count"] + phases.get("fresh_recycle", {}).get("count", 0)
        assert made >= 15  # each test's copy made, or recycled, for it
    else:
        assert "fresh_spare" not in phases  # rebuilt in place


def test_tests_that_do_not_take_it_pay_nothing(suite: pytest.Pytester) -> None:
    suite.makepyfile(
        test_plain="""
        import threading

        def test_1(isolate_conn, isolate_worker):
            isolate_conn.execute("INSERT INTO items (value, instance) VALUES ('kept', 'test_1')")

        def test_2(isolate_conn, isolate_worker):
            assert isolate_conn.execute("SELECT count(*) FROM items").fetchone() == (1,)  # not fresh
            assert not [t.name for t in threading.enumerate() if t.name.startswith("isolate-pool")]
            spares = isolate_conn.execute(
                "SELECT count(*) FROM pg_namespace WHERE nspname ~ %s",
                (rf"^isolate_main_[su]\\d+_{isolate_worker.run_id}$",)).fetchone()
            assert spares == (0,)
        """
    )
    suite.runpytest_subprocess("-p", "no:xdist", "-p", "no:randomly").assert_outcomes(passed=2)


def test_a_marker_or_a_path_makes_it_the_default(suite: pytest.Pytester) -> None:
    fresh = (
        "def test_{name}(isolate_conn):\n"
        "    assert isolate_conn.execute('SELECT count(*) FROM items').fetchone() == (0,)\n"
        "    isolate_conn.execute(\"INSERT INTO items (value, instance) VALUES ('left', '{name}')\")\n"
    )
    suite.makepyfile(
        test_a_plain="""
        def test_plain(isolate_conn):
            isolate_conn.execute("INSERT INTO items (value, instance) VALUES ('left', 'plain')")
        """,
        test_b_marked="import pytest\npytestmark = pytest.mark.fresh_database\n" + fresh.format(name="marked"),
    )
    (suite.path / "db_tests").mkdir()
    (suite.path / "db_tests" / "test_c_in_dir.py").write_text(fresh.format(name="in_dir"))
    result = suite.runpytest_subprocess("-p", "no:xdist", "-p", "no:randomly", "--isolate-fresh-paths=db_tests",
                                        "test_a_plain.py", "test_b_marked.py", "db_tests")  # fmt: skip
    result.assert_outcomes(passed=3)


RECYCLE_MIGRATION = """
CREATE TYPE mood AS ENUM ('sad', 'ok', 'happy');
CREATE TABLE kinds (id int GENERATED ALWAYS AS IDENTITY PRIMARY KEY, name text NOT NULL, mood mood NOT NULL,
                    shout text GENERATED ALWAYS AS (upper(name)) STORED);
INSERT INTO kinds (name, mood) VALUES ('a', 'ok'), ('b', 'happy'), ('c', 'sad');
CREATE TABLE things (id bigserial PRIMARY KEY, kind int NOT NULL REFERENCES kinds (id), note text);
CREATE TABLE audit (what text);
CREATE FUNCTION audit_things() RETURNS trigger LANGUAGE plpgsql AS $$
  BEGIN INSERT INTO audit VALUES ('thing ' || NEW.id); RETURN NEW; END $$;
CREATE TRIGGER things_audit AFTER INSERT ON things FOR EACH ROW EXECUTE FUNCTION audit_things();
CREATE SEQUENCE tickets START 100;
INSERT INTO things (kind, note) VALUES (1, 'seeded');
"""

RECYCLE = """
import psycopg
import pytest
from tenacity import Retrying, stop_after_delay, wait_fixed

HELD, ADMIN = [], []

PRISTINE = {
    "kinds": [(1, "a", "ok", "A"), (2, "b", "happy", "B"), (3, "c", "sad", "C")],
    "things": [(1, 1, "seeded")],
    "audit": [("thing 1",)],
}


def assert_pristine(conn):
    for table, rows in PRISTINE.items():  # in scan order, as the migration left them
        assert conn.execute(f"SELECT * FROM {table}").fetchall() == rows, table
    sequences = "SELECT last_value, is_called FROM tickets UNION ALL SELECT last_value, is_called FROM things_id_seq"
    assert conn.execute(sequences).fetchall() == [(100, False), (1, True)]
    assert conn.execute("SELECT to_regclass('scratch'), to_regprocedure('bump(int)')").fetchone() == (None, None)
    assert conn.execute("SELECT obj_description('things'::regclass)").fetchone() == (None,)
    assert conn.execute("SELECT has_table_privilege('public', 'things', 'SELECT')").fetchone() == (False,)


@pytest.mark.parametrize("n", range(3))
def test_rows_and_sequences(n, isolate_fresh_database, isolate_conn, isolate_postgres):
    conn = isolate_conn
    assert_pristine(conn)
    conn.execute("INSERT INTO things (kind, note) VALUES (2, 'mine')")  # fires the audit trigger
    conn.execute("UPDATE kinds SET name = 'z', mood = 'sad' WHERE id = 1")
    conn.execute("DELETE FROM kinds WHERE id = 3")
    conn.execute("SELECT nextval('tickets'), nextval('tickets')")
    conn.execute("TRUNCATE audit")
    conn.execute("UPDATE things SET note = 'seeded' WHERE id = 1")  # same value, row moved
    # Sessions left open, as a service's pool leaves them: one idle, one in a transaction.
    HELD.append(psycopg.connect(isolate_fresh_database.dsn, autocommit=True))
    HELD[-1].execute("INSERT INTO audit VALUES ('idle session')")
    HELD.append(psycopg.connect(isolate_fresh_database.dsn))
    HELD[-1].execute("INSERT INTO audit VALUES ('open transaction')")
    # and a superuser's, in a transaction that wrote into the copy: it is ended before the
    # copy is looked at, so it cannot commit into it afterwards
    ADMIN.append(psycopg.connect(isolate_postgres.admin_dsn, options=f"-c search_path={isolate_fresh_database.schema}"))
    ADMIN[-1].execute("INSERT INTO audit VALUES ('superuser')")


@pytest.mark.parametrize("n", range(2))
def test_ddl(n, isolate_fresh_database, isolate_conn):
    conn = isolate_conn
    assert_pristine(conn)
    conn.execute("CREATE TABLE scratch (v int)")
    conn.execute("CREATE FUNCTION bump(x int) RETURNS int LANGUAGE sql AS 'SELECT x + 1'")
    conn.execute("COMMENT ON TABLE things IS 'changed'")
    conn.execute("GRANT SELECT ON things TO PUBLIC")


def test_last(isolate_fresh_database, isolate_conn):
    assert_pristine(isolate_conn)
    for attempt in Retrying(stop=stop_after_delay(30), wait=wait_fixed(0.1), reraise=True):
        with attempt:  # every superuser session that wrote into a retired copy was ended
            assert all(conn.closed or conn.broken or not conn.execute("SELECT 1") for conn in ADMIN)
"""

KEEP = """
def test_1_fails(isolate_fresh_database, isolate_conn):
    isolate_conn.execute("INSERT INTO items (value, instance) VALUES ('evidence', 'test_1')")
    assert False, "keep my database"

def test_2_gets_a_fresh_one(isolate_fresh_database, isolate_conn):
    assert isolate_conn.execute("SELECT count(*) FROM items").fetchone() == (0,)
"""


def test_a_copy_whose_test_changed_only_rows_is_recycled_and_one_with_ddl_is_not(
    pytester: pytest.Pytester, tmp_path: Path
) -> None:
    """Schema mode: with a pool of one, every used copy is retired before the next test
    gets it; a copy whose test changed rows (seeded and not, through triggers, generated and
    identity columns, an enum) and sequences is restored and handed out again, one with
    DDL is dropped; every test sees the migrated state."""
    (tmp_path / "migrations").mkdir()
    (tmp_path / "migrations" / "001.sql").write_text(RECYCLE_MIGRATION)
    pytester.makepyfile(test_recycle=RECYCLE)
    timings = tmp_path / "timings.json"
    result = pytester.runpytest_subprocess("-p", "no:xdist", "-p", "no:randomly", "--isolate-fresh-pool=1",
                                           f"--isolate-migrations={tmp_path / 'migrations'}",
                                           f"--isolate-timings-json={timings}")  # fmt: skip
    result.assert_outcomes(passed=6)
    phases = json.loads(timings.read_text())
    assert phases["fresh_recycle"]["count"] >= 3  # after each rows-only test (and the first copy)
    assert phases["fresh_drop"]["count"] >= 2  # after each test with DDL


@pytest.mark.parametrize("server", ["native", "external"])
@pytest.mark.parametrize("mode", MODES)
def test_a_failing_tests_copy_is_kept_named_after_it_until_cleanup(
    suite: pytest.Pytester, request: pytest.FixtureRequest, mode: str, server: str
) -> None:
    suite.makepyfile(test_keep=KEEP)
    run_id, args = nested_run(request, server, mode)
    result = suite.runpytest_subprocess("-p", "no:xdist", "-p", "no:randomly", "--isolate-keep=failed", *args)
    result.assert_outcomes(passed=1, failed=1)
    out = result.stdout.str()
    found = re.search(r"database of test_keep\.py::test_1_fails: (\S+)", out)
    assert found, out
    assert f"python -m isolate cleanup {run_id}" in out
    dsn = found.group(1)
    if server == "external":  # printed without the password; the run's kept record has it
        assert ":***@" in dsn, dsn
        record = json.loads(Path(default_base_dir(), f"isolate-run-{run_id}", "kept", "main.json").read_text())
        dsn = record["fresh_kept"][0]["dsn"]
    with psycopg.connect(dsn) as conn:
        where = conn.execute("SELECT current_database(), current_schema()").fetchone()
        assert where is not None
        name = where[0] if mode == "database" else where[1]
        assert re.fullmatch(rf"isolate_main_k\d+_test_1_fails_{run_id}", name), name
        assert conn.execute("SELECT value FROM items").fetchall() == [("evidence",)]
    done = subprocess.run([sys.executable, "-m", "isolate", "cleanup", run_id], env=clean_env(),
                          capture_output=True, text=True, timeout=120, check=False)  # fmt: skip
    assert done.returncode == 0, done.stderr
    nothing_left(request, server, run_id)


DIE = """
import os
import signal

import isolate._spares as spares


def die_mid_statement(conn, statement):
    # The pool's thread sends its statement and the worker dies while the server runs it.
    conn.pgconn.send_query(statement.encode())
    conn.pgconn.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def clone(conn, server, name, template, role, **connect):
    die_mid_statement(conn, f'CREATE DATABASE "{name}" TEMPLATE "{template}" OWNER "{role}"')


def migrate(conn, steps, where, **kwargs):
    die_mid_statement(conn, "CREATE TABLE dying (v int); SELECT pg_sleep(2)")


spares.clone_database = clone
spares.run_migrations = migrate


def test_dies(isolate_fresh_database):
    raise AssertionError("the worker should have died while the pool made a copy")
"""


@pytest.mark.parametrize("server", ["native", "external"])
@pytest.mark.parametrize("mode", MODES)
def test_a_worker_killed_while_copies_are_made_leaves_nothing(
    suite: pytest.Pytester, request: pytest.FixtureRequest, mode: str, server: str
) -> None:
    suite.makepyfile(test_die=DIE)
    run_id, args = nested_run(request, server, mode)
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-n", "1", "-p", "no:randomly", "-p", "no:cacheprovider",
         "--max-worker-restart=0", *args],
        cwd=suite.path, env=clean_env(FRESH_DIR=str(suite.path)), capture_output=True, text=True, timeout=300,
        check=False,
    )  # fmt: skip
    assert "crashed" in proc.stdout, proc.stdout
    assert "should have died" not in proc.stdout, proc.stdout
    nothing_left(request, server, run_id)


@pytest.fixture
def scratch_schema(isolate_postgres: isolate.PostgresServer) -> Iterator[tuple[psycopg.Connection[Any], str]]:
    """A superuser connection and a schema of its own on this worker's server."""
    name = f"recycle_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(isolate_postgres.admin_dsn, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {name}")
        try:
            yield conn, name
        finally:
            conn.execute(f"DROP SCHEMA {name} CASCADE")


def test_recycling_restores_inherited_tables_each_on_its_own(scratch_schema: tuple[Any, str]) -> None:
    conn, schema = scratch_schema
    conn.execute(f"CREATE TABLE {schema}.parent (v int); CREATE TABLE {schema}.child (w int) INHERITS ({schema}.parent)")
    conn.execute(f"INSERT INTO {schema}.parent VALUES (1); INSERT INTO {schema}.child VALUES (2, 20)")
    pristine = Pristine.capture(conn, schema)
    assert pristine is not None
    conn.execute(f"INSERT INTO {schema}.parent VALUES (3); DELETE FROM {schema}.child")
    assert pristine.restore(conn, schema, sql.SQL("false"))
    assert conn.execute(f"SELECT v FROM ONLY {schema}.parent").fetchall() == [(1,)]
    assert conn.execute(f"SELECT v, w FROM {schema}.child").fetchall() == [(2, 20)]
    assert not pristine.restore(conn, schema, sql.SQL("true"))  # in the DDL log: dropped instead


def test_recycling_restores_every_kind_of_row_change(scratch_schema: tuple[Any, str]) -> None:
    """Rows added, a seeded table emptied by TRUNCATE, an insert rolled back, a sequence
    set back without being called: each is put back, identities too; a table nobody
    touched stays as it was."""
    conn, schema = scratch_schema
    for name in ("untouched", "written", "rolled_back"):
        conn.execute(f"CREATE TABLE {schema}.{name} (id int GENERATED ALWAYS AS IDENTITY, v text)")
    conn.execute(f"CREATE TABLE {schema}.seeded (v text); INSERT INTO {schema}.seeded VALUES ('kept')")
    conn.execute(f"CREATE SEQUENCE {schema}.tickets")
    pristine = Pristine.capture(conn, schema)
    assert pristine is not None
    conn.execute(f"INSERT INTO {schema}.written (v) VALUES ('a'), ('b')")
    conn.execute(f"TRUNCATE {schema}.seeded")
    conn.execute(f"BEGIN; INSERT INTO {schema}.rolled_back (v) VALUES ('x'); ROLLBACK")
    conn.execute(f"SELECT setval('{schema}.tickets', 50, false)")  # not called: its value is hidden from some reads
    assert pristine.restore(conn, schema, sql.SQL("false"))
    assert conn.execute(f"SELECT nextval('{schema}.tickets')").fetchone() == (1,)
    counts = {t: conn.execute(f"SELECT count(*) FROM {schema}.{t}").fetchone()[0]
              for t in ("untouched", "written", "rolled_back")}  # fmt: skip
    assert counts == {"untouched": 0, "written": 0, "rolled_back": 0}
    assert conn.execute(f"SELECT v FROM {schema}.seeded").fetchall() == [("kept",)]
    assert conn.execute(f"INSERT INTO {schema}.written (v) VALUES ('c') RETURNING id").fetchone() == (1,)


def test_a_schema_with_a_trigger_enabled_always_is_never_recycled(scratch_schema: tuple[Any, str]) -> None:
    conn, schema = scratch_schema
    conn.execute(f"CREATE TABLE {schema}.t (v int)")
    assert Pristine.capture(conn, schema) is not None
    conn.execute(f"CREATE FUNCTION {schema}.f() RETURNS trigger LANGUAGE plpgsql AS 'BEGIN RETURN NEW; END'")
    conn.execute(f"CREATE TRIGGER tr BEFORE INSERT ON {schema}.t FOR EACH ROW EXECUTE FUNCTION {schema}.f()")
    conn.execute(f"ALTER TABLE {schema}.t ENABLE ALWAYS TRIGGER tr")  # it would fire while restoring
    assert Pristine.capture(conn, schema) is None


# -- pure logic -------------------------------------------------------------------------


def test_pool_size_is_the_budget_within_half_the_free_space() -> None:
    mb = 1 << 20
    assert pool_size(4, 4, 8 * mb, 10_000 * mb) == 4  # room for all
    assert pool_size(4, 4, 8 * mb, 128 * mb) == 2  # 128/2/4 = 16 MB a worker: two clones
    assert pool_size(4, 8, 8 * mb, 16 * mb) == 1  # never below one
    assert pool_size(4, 4, None, None) == 4  # unknown (schema mode, docker, external)
    assert pool_size(0, 4, 8 * mb, 10_000 * mb) == 0  # off


def test_a_kept_copy_is_named_after_its_test_within_63_characters() -> None:
    name = kept_name("gw3", "0123456789", 2, "tests/test_x.py::test_checkout[card-EUR]")
    assert name == "isolate_gw3_k2_test_checkout_card_eur_0123456789"
    long = kept_name("gw12", "0123456789", 17, "t.py::test_" + "very_long_name_" * 10)
    assert len(long) <= 63 and long.startswith("isolate_gw12_k17_test_very") and long.endswith("_0123456789")


def test_the_pool_options_are_checked() -> None:
    assert resolve_settings(env={}).fresh_pool == 4
    assert resolve_settings({"fresh_pool": "0"}, env={}).fresh_pool == 0
    assert resolve_settings(env={"ISOLATE_FRESH_PATHS": "a, b/c"}).fresh_paths == ("a", "b/c")
    with pytest.raises(isolate.ConfigError, match=r"fresh_pool.*0 or more"):
        resolve_settings({"fresh_pool": "-1"}, env={})
