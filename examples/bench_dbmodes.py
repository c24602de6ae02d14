"""The database-mode part of the benchmark: schema mode vs database mode, light and heavy
migrations, the migrated-template cache cold and warm, at 1, 4 and 8 workers; and a fresh
database per test (``isolate_fresh_database``) with the warm pool and without it.

A generated suite (``TESTS`` tests, each writing and reading its worker's database)
runs on the native backend; *heavy* migrations create ``HEAVY_TABLES`` tables, each with
two indexes and a function, *light* ones three tables. *cold* removes the cached clusters
that hold a migrated template before the run; *warm* runs right after a run with the
same migrations. Used by ``bench.py``; records carry ``db_isolation``, ``migrations`` and
``template_cache``.

The fresh-database part (:func:`run_fresh`, records with ``setup="fresh"``) runs
``FRESH_TESTS`` tests at ``FRESH_WORKERS`` workers on ``FRESH_TABLES`` tables of one index
each, every test taking ``isolate_fresh_database`` and then working for ``body`` seconds
(a stand-in for its requests to the service). The set-up durations are those pytest's
``--durations`` reports (read unrounded from the set-up reports), each worker's first
test left out (it waits for the pool's first copy). ``python examples/bench_dbmodes.py`` runs only that part and prints its table.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

TESTS = 48
HEAVY_TABLES = 300
_FILES = 10
FRESH_TESTS = 48
FRESH_TABLES = 120
FRESH_WORKERS = 4
FRESH_BODIES = (0.15, 0.5)  # the example suite's tests take 0.16 s on average
FRESH_POOLS = ("4", "0")  # the default pool, and none (rebuilt before each test)
#: The targets of a fresh database's set-up, at FRESH_WORKERS workers (seconds).
FRESH_P50, FRESH_P95 = 0.015, 0.040

SUITE = """
import pytest

@pytest.mark.parametrize("n", range({tests}))
def test_write_read(n, isolate_conn):
    isolate_conn.execute("INSERT INTO t1 (a, b) VALUES (%s, 'x')", (n,))
    assert isolate_conn.execute("SELECT count(*) FROM t1 WHERE a = %s", (n,)).fetchone()[0] >= 1
    isolate_conn.commit()
"""


FRESH_SUITE = """
import time
import pytest

@pytest.mark.parametrize("n", range({tests}))
def test_fresh(n, isolate_fresh_database):
    with isolate_fresh_database.connect(autocommit=True) as conn:
        assert conn.execute("SELECT count(*) FROM t1").fetchone() == (0,)
        conn.execute("INSERT INTO t1 (a, b) VALUES (%s, 'x')", (n,))
    time.sleep({body})  # the test's own work against its service
"""

#: In the controller, every test's set-up duration (what ``--durations`` prints, unrounded)
#: and the worker that ran it, in the order each worker ran them.
FRESH_CONFTEST = """
import os

def pytest_runtest_logreport(report):
    if report.when == "setup" and "PYTEST_XDIST_WORKER" not in os.environ:
        node = getattr(report, "node", None)
        worker = node.gateway.id if node is not None else "main"
        with open(os.environ["FRESH_SETUPS"], "a") as fh:
            fh.write(f"{worker} {report.duration!r} {report.nodeid}\\n")
"""


def write_migrations(directory: Path, tables: int, *, heavy: bool = True) -> None:
    """``tables`` tables over ``_FILES`` files: two indexes and a function each (``heavy``),
    or one index each."""
    directory.mkdir(parents=True)
    per_file = max(1, -(-tables // _FILES))
    for start in range(1, tables + 1, per_file):
        lines = []
        for i in range(start, min(start + per_file, tables + 1)):
            lines += [
                f"CREATE TABLE t{i} (id bigserial PRIMARY KEY, a int, b text, c timestamptz DEFAULT now());",
                f"CREATE INDEX t{i}_a ON t{i} (a);",
            ]
            if heavy:
                lines += [f"CREATE INDEX t{i}_b ON t{i} (b);",
                          f"CREATE FUNCTION f{i}(x int) RETURNS int LANGUAGE sql AS 'SELECT x + {i}';"]  # fmt: skip
        (directory / f"{start:04d}.sql").write_text("\n".join(lines) + "\n")


def clear_template_cache() -> None:
    """Remove the cached clusters that hold a migrated template (the initdb cache stays)."""
    base = Path("/dev/shm") if os.access("/dev/shm", os.W_OK) else Path(tempfile.gettempdir())
    for path in base.glob(f"isolate-cache-{os.geteuid()}/pgdata-*-seed-*"):
        shutil.rmtree(path, ignore_errors=True)


def run_dbmodes(workers: list[int], repeat: int) -> list[dict[str, Any]]:
    """One repetition of every cell; the records."""
    records = []
    with tempfile.TemporaryDirectory(prefix="isolate-bench-db-") as tmp:
        root = Path(tmp)
        (root / "test_db.py").write_text(SUITE.format(tests=TESTS))
        (root / "pytest.ini").write_text("[pytest]\n")
        for weight, tables in (("light", 3), ("heavy", HEAVY_TABLES)):
            migrations = root / f"migrations-{weight}-{repeat}"
            write_migrations(migrations, tables)
            for mode in ("schema", "database"):
                for w in workers:
                    for cache in ("cold", "warm"):
                        if cache == "cold":
                            clear_template_cache()
                        record = _run(root, migrations, mode, w)
                        record.update(setup="dbmodes", backend="native", workers=w, repeat=repeat, dist="duration",
                                      db_isolation=mode, migrations=weight, template_cache=cache)  # fmt: skip
                        records.append(record)
                        print(f"dbmodes  {mode:8} {weight:5} {cache:4} workers={w} "
                              f"wall={record['wall_s']:6.2f}s passed={record['passed']}/{TESTS}", flush=True)  # fmt: skip
    return records


def _run(root: Path, migrations: Path, mode: str, workers: int) -> dict[str, Any]:
    timings = root / "timings.json"
    timings.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "pytest", "-q", "-n", str(workers), "-p", "no:randomly",
           f"--isolate-db-isolation={mode}", f"--isolate-migrations={migrations}",
           f"--isolate-timings-json={timings}"]  # fmt: skip
    start = time.perf_counter()
    done = subprocess.run(cmd, cwd=root, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"bench: the db-mode suite failed ({mode}, {workers}):\n{done.stdout[-3000:]}")
    return {"wall_s": round(wall, 3), "passed": TESTS, "total": TESTS, "failed": 0,
            "timings": json.loads(timings.read_text()) if timings.exists() else {}}  # fmt: skip


def dbmode_table(records: list[dict[str, Any]]) -> list[str]:
    """The markdown rows: wall time and isolate's database phases per cell (medians)."""
    import statistics

    rows = [r for r in records if r.get("setup") == "dbmodes"]
    if not rows:
        return []
    out = ["", "## Database modes: schema vs database, migrations light/heavy, template cache",
           "", f"A generated suite of {TESTS} tests, each writing to its worker's database; heavy "
           f"migrations: {HEAVY_TABLES} tables with two indexes and a function each. *cold*: no "
           "cached cluster holds the migrated template; *warm*: the run after one with the same "
           "migrations. Medians over repetitions, seconds.", "",
           "| db_isolation | migrations | template_cache | workers | wall | postgres_start | worker's database (schema_migrations / database_ready) |",
           "|---|---|---|---|---|---|---|"]  # fmt: skip
    keys = sorted({(r["db_isolation"], r["migrations"], r["template_cache"], r["workers"]) for r in rows},
                  key=lambda k: (k[0], k[1] == "heavy", k[3], k[2] == "warm"))  # fmt: skip
    for key in keys:
        same = [r for r in rows if (r["db_isolation"], r["migrations"], r["template_cache"], r["workers"]) == key]

        def phase(name: str, same: list[dict[str, Any]] = same) -> str:
            values = [r["timings"][name]["median"] for r in same if name in r["timings"]]
            return f"{statistics.median(values):.3f}" if values else ""

        wall = statistics.median(r["wall_s"] for r in same)
        out.append(f"| {key[0]} | {key[1]} | {key[2]} | {key[3]} | {wall:.2f} | {phase('postgres_start')} | "
                   f"{phase('schema_migrations') or phase('database_ready')} |")  # fmt: skip
    return out


def run_fresh(repeat: int) -> list[dict[str, Any]]:
    """One repetition of every fresh-database cell (mode x pool x test body); the records."""
    records = []
    with tempfile.TemporaryDirectory(prefix="isolate-bench-fresh-") as tmp:
        root = Path(tmp)
        (root / "pytest.ini").write_text("[pytest]\n")
        (root / "conftest.py").write_text(FRESH_CONFTEST)
        migrations = root / "migrations"
        write_migrations(migrations, FRESH_TABLES, heavy=False)
        for body in FRESH_BODIES:
            (root / "test_fresh.py").write_text(FRESH_SUITE.format(tests=FRESH_TESTS, body=body))
            for mode in ("schema", "database"):
                for pool in FRESH_POOLS:
                    record = _run_fresh(root, migrations, mode, pool)
                    record.update(setup="fresh", backend="native", workers=FRESH_WORKERS, repeat=repeat,
                                  db_isolation=mode, pool=int(pool), body_s=body)  # fmt: skip
                    records.append(record)
                    print(f"fresh    {mode:8} pool={pool} body={body}s set-up p50={1000 * record['setup_p50_s']:.1f}ms "
                          f"p95={1000 * record['setup_p95_s']:.1f}ms wall={record['wall_s']:.1f}s", flush=True)  # fmt: skip
    return records


def _run_fresh(root: Path, migrations: Path, mode: str, pool: str) -> dict[str, Any]:
    import statistics

    setups_file, timings = root / "setups.txt", root / "timings.json"
    setups_file.unlink(missing_ok=True)
    timings.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "pytest", "-q", "-n", str(FRESH_WORKERS), "-p", "no:randomly",
           f"--isolate-db-isolation={mode}", f"--isolate-fresh-pool={pool}", f"--isolate-migrations={migrations}",
           f"--isolate-timings-json={timings}"]  # fmt: skip
    start = time.perf_counter()
    done = subprocess.run(cmd, cwd=root, capture_output=True, text=True, check=False,
                          env={**os.environ, "FRESH_SETUPS": str(setups_file)})  # fmt: skip
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"bench: the fresh-database suite failed ({mode}, pool {pool}):\n{done.stdout[-3000:]}")
    seen: set[str] = set()
    setups = []
    for line in setups_file.read_text().splitlines():
        worker, duration, _ = line.split(" ", 2)
        if worker in seen:
            setups.append(float(duration))
        seen.add(worker)  # its first test waits for the pool's first copy: left out
    return {"wall_s": round(wall, 3), "passed": FRESH_TESTS, "total": FRESH_TESTS, "failed": 0,
            "setup_p50_s": statistics.median(setups), "setup_p95_s": statistics.quantiles(setups, n=20)[18],
            "timings": json.loads(timings.read_text()) if timings.exists() else {}}  # fmt: skip


def _phase(records: list[dict[str, Any]], name: str) -> str:
    """The median over ``records`` of a timings phase's medians ("" if none has it)."""
    import statistics

    values = [r["timings"][name]["median"] for r in records if name in r["timings"]]
    return f"{statistics.median(values):.3f}" if values else ""


def fresh_table(records: list[dict[str, Any]]) -> list[str]:
    """The markdown rows of the fresh-database cells (medians over repetitions) and the
    targets' verdicts."""
    import statistics

    rows = [r for r in records if r.get("setup") == "fresh"]
    if not rows:
        return []
    out = ["", "## A fresh database per test: the warm pool", "",
           f"`isolate_fresh_database` in each of {FRESH_TESTS} tests at {FRESH_WORKERS} workers, "
           f"{FRESH_TABLES} tables of one index each; each test then works for *body* seconds. "
           "*set-up*: the test's set-up (the fixture's) as `pytest --durations` reports it, each "
           "worker's first test left out; *spare*: making one copy in the background; *recycled*: "
           "putting a used copy back in the background (schema mode, a test that changed only rows). "
           "Pool 0: rebuilt before each test (re-cloned, or the schema dropped and migrated again). "
           "Medians over repetitions.", "",
           "| db_isolation | pool | body (s) | set-up p50 (ms) | set-up p95 (ms) | spare median (s) | recycled median (s) | wall (s) |",
           "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    keys = sorted({(r["db_isolation"], r["pool"], r["body_s"]) for r in rows}, key=lambda k: (k[0], k[2], -k[1]))
    verdicts = []
    for key in keys:
        same = [r for r in rows if (r["db_isolation"], r["pool"], r["body_s"]) == key]
        p50 = statistics.median(r["setup_p50_s"] for r in same)
        p95 = statistics.median(r["setup_p95_s"] for r in same)
        spare, recycled = (_phase(same, name) for name in ("fresh_spare", "fresh_recycle"))
        wall = statistics.median(r["wall_s"] for r in same)
        out.append(f"| {key[0]} | {key[1]} | {key[2]} | {1000 * p50:.1f} | {1000 * p95:.1f} | {spare} | "
                   f"{recycled} | {wall:.1f} |")  # fmt: skip
        if key[1]:
            ok = p50 < FRESH_P50 and p95 < FRESH_P95
            verdicts.append(f"- {'met' if ok else 'MISSED'}: {key[0]} mode, pool {key[1]}, body {key[2]} s: "
                            f"set-up p50 {1000 * p50:.1f} ms, p95 {1000 * p95:.1f} ms (targets < "
                            f"{1000 * FRESH_P50:.0f} ms, < {1000 * FRESH_P95:.0f} ms)")  # fmt: skip
    return [*out, "", *verdicts]


if __name__ == "__main__":
    print("\n".join(fresh_table(run_fresh(0))))
