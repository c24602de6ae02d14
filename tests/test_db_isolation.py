"""Schema mode and database mode (``--isolate-db-isolation``): what each isolates, the
migrations paid once per run in database mode, the bootstrap hook, and ``rebuild()``."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

HERE = Path(__file__).parent

CONFTEST = f"""
import os
import uuid
from pathlib import Path
import pytest
import isolate

MIGRATIONS = Path({str(HERE / "fixture_app" / "migrations")!r})
COUNT = Path(os.environ["DBMODE_DIR"])


def migrate(conn):
    with (COUNT / "migrations.log").open("a") as fh:
        fh.write("x\\n")
    for path in sorted(MIGRATIONS.glob("*.sql")):
        conn.execute(path.read_text())


def bootstrap(conn):
    with (COUNT / "bootstrap.log").open("a") as fh:
        fh.write("x\\n")
    conn.execute("DO $$ BEGIN CREATE ROLE app_reader NOLOGIN; "
                 "EXCEPTION WHEN duplicate_object THEN NULL; END $$")


@pytest.fixture(scope="session")
def isolate_migrations():
    return migrate


@pytest.fixture(scope="session")
def isolate_bootstrap():
    return bootstrap
"""

SUITE = """
import os
import uuid
from pathlib import Path
import psycopg, pytest
from tenacity import Retrying, stop_after_delay, wait_fixed

DIR = Path(os.environ["DBMODE_DIR"])
ME = os.environ["PYTEST_XDIST_WORKER"]


def wait_for(path, timeout=60):  # a barrier between the two worker processes
    for attempt in Retrying(stop=stop_after_delay(timeout), wait=wait_fixed(0.02), reraise=True):
        with attempt:
            assert path.exists(), path


def test_migrated_once_per_database_and_bootstrapped(isolate_database):
    with isolate_database.connect() as conn:
        assert conn.execute("SELECT count(*) FROM schema_version").fetchone() == (3,)
        conn.execute("INSERT INTO items (value, instance) VALUES ('v', %s)", (ME,))
        conn.commit()
        assert conn.execute("SELECT 1 FROM pg_roles WHERE rolname = 'app_reader'").fetchone()


def test_advisory_locks(isolate_database):
    # --dist each: gw0 holds lock 4242 while gw1 tries it.
    with isolate_database.connect(autocommit=True) as conn:
        if ME == "gw0":
            assert conn.execute("SELECT pg_try_advisory_lock(4242)").fetchone() == (True,)
            (DIR / "locked").touch()
            wait_for(DIR / "tried")
        else:
            wait_for(DIR / "locked")
            got = conn.execute("SELECT pg_try_advisory_lock(4242)").fetchone()[0]
            (DIR / f"other-got-{got}").touch()
            (DIR / "tried").touch()


def test_rebuild_undoes_ddl_and_data(isolate_database):
    with isolate_database.connect(autocommit=True) as conn:
        conn.execute("ALTER TABLE items ADD COLUMN extra int")
        conn.execute("CREATE TABLE scratch (v int)")
    isolate_database.rebuild()
    with isolate_database.connect(autocommit=True) as conn:
        columns = [r[0] for r in conn.execute(
            "SELECT column_name FROM information_schema.columns WHERE table_name = 'items'")]
        assert "extra" not in columns and columns
        assert conn.execute("SELECT to_regclass('scratch')").fetchone() == (None,)
        assert conn.execute("SELECT count(*) FROM items").fetchone() == (0,)
        assert conn.execute("SELECT count(*) FROM schema_version").fetchone() == (3,)


def test_other_workers_database_is_out_of_reach(isolate_database, isolate_postgres):
    with psycopg.connect(isolate_postgres.admin_dsn) as admin:
        others = [r[0] for r in admin.execute(
            "SELECT datname FROM pg_database WHERE datname LIKE 'isolate_gw%'")]
    for name in others:
        if name != isolate_database.database:
            with pytest.raises(psycopg.OperationalError):
                psycopg.connect(isolate_database.server.dsn(
                    user=isolate_database.role, password=isolate_database.password, database=name))
"""


BACKENDS = [
    pytest.param([], id="native"),
    pytest.param(
        # no reaping at start: the reaper tests of test_docker.py own the orphans they make
        ["--isolate-backend=docker", "--isolate-pg-image=isolate-local/postgres:15",
         "--no-isolate-reap-stale"],
        id="docker", marks=pytest.mark.docker,
    ),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["schema", "database"])
def test_db_isolation_modes(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, mode: str,
    backend: list[str],
) -> None:
    work = tmp_path / "dbmode"
    work.mkdir()
    monkeypatch.setenv("DBMODE_DIR", str(work))
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(test_modes=SUITE)
    result = pytester.runpytest_subprocess(
        "-n", "2", "--dist=each", "-p", "no:randomly", f"--isolate-db-isolation={mode}", *backend
    )
    result.assert_outcomes(passed=8)
    migrations = len((work / "migrations.log").read_text().split())
    assert (work / "bootstrap.log").read_text().split() == ["x"]  # once per run, both modes
    if mode == "database":
        assert migrations == 1  # paid once: the workers clone the migrated template
        assert (work / "other-got-True").exists()  # advisory locks are per database
    else:
        # rebuild() migrates the schema again: 2 workers x (first + rebuild)
        assert migrations == 4
        assert (work / "other-got-False").exists()  # one database: the lock is shared


CACHE_SUITE = """
import os
import uuid
from pathlib import Path

def test_made(isolate_database):
    with isolate_database.connect() as conn:
        made = conn.execute("SELECT at FROM made").fetchone()[0]
    with Path(os.environ["DBMODE_DIR"], "made.log").open("a") as fh:
        fh.write(made.isoformat() + "\\n")
"""

CALLABLE_CONFTEST = """
import os
import uuid
from pathlib import Path
import pytest

def migrate(conn):
    with Path(os.environ["DBMODE_DIR"], "migrations.log").open("a") as fh:
        fh.write("x\\n")
    conn.execute("CREATE TABLE made (at timestamptz DEFAULT clock_timestamp())")
    conn.execute("INSERT INTO made DEFAULT VALUES")

if os.environ.get("CACHE_KEY"):
    migrate.cache_key = os.environ["CACHE_KEY"]

@pytest.fixture(scope="session")
def isolate_migrations():
    return migrate
"""


def test_the_migrated_template_is_cached_across_runs_by_content(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, private_base: str
) -> None:
    """Native backend: a second run with the same migration files starts from a cluster
    that holds the template (the row the migration wrote is the first run's); changed
    content, or the cache turned off, migrates again."""
    work, migrations = tmp_path / "dbmode", tmp_path / "migrations"
    work.mkdir()
    migrations.mkdir()
    monkeypatch.setenv("DBMODE_DIR", str(work))
    (migrations / "0001_made.sql").write_text(
        f"-- {uuid.uuid4()}\nCREATE TABLE made (at timestamptz DEFAULT clock_timestamp());\n"
        "INSERT INTO made DEFAULT VALUES;\n"
    )
    pytester.makepyfile(test_cache=CACHE_SUITE)
    args = ["-n", "2", "-p", "no:randomly", "--isolate-db-isolation=database", f"--isolate-migrations={migrations}",
            private_base]  # fmt: skip

    def made(*extra: str) -> set[str]:
        (work / "made.log").unlink(missing_ok=True)
        pytester.runpytest_subprocess(*args, *extra).assert_outcomes(passed=1)
        return set((work / "made.log").read_text().split())

    first = made()
    assert len(first) == 1  # one template for the run
    assert made() == first  # not migrated again: the cached cluster holds it
    assert made("--no-isolate-template-cache") != first
    (migrations / "0002_more.sql").write_text("CREATE TABLE more (v int);\n")
    assert made() != first  # new content, new template


@pytest.mark.parametrize(("named", "runs_migrated"), [(True, 1), (False, 2)], ids=["cache_key", "no-key"])
def test_a_callable_is_cached_by_its_cache_key(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, named: bool, runs_migrated: int,
    private_base: str,
) -> None:  # fmt: skip
    work = tmp_path / "dbmode"
    work.mkdir()
    monkeypatch.setenv("DBMODE_DIR", str(work))
    monkeypatch.setenv("CACHE_KEY", f"v1-{uuid.uuid4().hex}" if named else "")
    pytester.makeconftest(CALLABLE_CONFTEST)
    pytester.makepyfile(test_cache=CACHE_SUITE)
    for _ in range(2):
        pytester.runpytest_subprocess("-p", "no:randomly", "--isolate-db-isolation=database",
                                      private_base).assert_outcomes(passed=1)  # fmt: skip
    assert len((work / "migrations.log").read_text().split()) == runs_migrated
