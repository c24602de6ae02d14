"""The database-mode part of the benchmark: schema mode vs database mode, light and heavy
migrations, the migrated-template cache cold and warm, at 1, 4 and 8 workers.

A generated suite (``TESTS`` tests, each writing and reading its worker's database)
runs on the native backend; *heavy* migrations create ``HEAVY_TABLES`` tables, each with
two indexes and a function, *light* ones three tables. *cold* removes the cached clusters
that hold a migrated template before the run; *warm* runs right after a run with the
same migrations. Used by ``bench.py``; records carry ``db_isolation``, ``migrations`` and
``template_cache``.
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

SUITE = """
import pytest

@pytest.mark.parametrize("n", range({tests}))
def test_write_read(n, isolate_conn):
    isolate_conn.execute("INSERT INTO t1 (a, b) VALUES (%s, 'x')", (n,))
    assert isolate_conn.execute("SELECT count(*) FROM t1 WHERE a = %s", (n,)).fetchone()[0] >= 1
    isolate_conn.commit()
"""


def write_migrations(directory: Path, tables: int) -> None:
    """``tables`` tables (two indexes and a function each) over ``_FILES`` files."""
    directory.mkdir(parents=True)
    per_file = max(1, -(-tables // _FILES))
    for start in range(1, tables + 1, per_file):
        lines = []
        for i in range(start, min(start + per_file, tables + 1)):
            lines += [
                f"CREATE TABLE t{i} (id bigserial PRIMARY KEY, a int, b text, c timestamptz DEFAULT now());",
                f"CREATE INDEX t{i}_a ON t{i} (a);",
                f"CREATE INDEX t{i}_b ON t{i} (b);",
                f"CREATE FUNCTION f{i}(x int) RETURNS int LANGUAGE sql AS 'SELECT x + {i}';",
            ]
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
