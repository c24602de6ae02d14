"""Whole pytest runs of small suites (pytester, in subprocesses), as users run them."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from suite_support import CONFTEST, HELPERS, leftovers, needs_root, run_id_of

from isolate._config import default_base_dir
from isolate._run.liveness import process_start_ticks


@pytest.fixture
def suite(pytester: pytest.Pytester) -> pytest.Pytester:
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(helpers=HELPERS)
    return pytester


ISOLATION_TEST = '''
import os, time
from pathlib import Path
from tenacity import Retrying, stop_after_delay, wait_fixed
from helpers import get, post

BARRIER = Path(os.environ["BARRIER_DIR"])
WORKERS = int(os.environ["PYTEST_XDIST_WORKER_COUNT"])

def wait_for(predicate, timeout=60):
    for attempt in Retrying(stop=stop_after_delay(timeout), wait=wait_fixed(0.02), reraise=True):
        with attempt:
            assert predicate()

def test_one_worker_disrupts_while_the_others_work(isolate_service, isolate_worker):
    me = isolate_worker.worker_id
    if me == "gw0":
        # the disruptor: wait until every other worker is mid-traffic
        wait_for(lambda: len(list(BARRIER.glob("writing-*"))) == WORKERS - 1)
        for action in ("stop", "kill", "restart", "stop"):
            if action == "stop":
                assert isolate_service.stop(timeout=5) == 0
                isolate_service.start()
            elif action == "kill":
                isolate_service.kill()
                isolate_service.start()
            else:
                isolate_service.restart()
        (BARRIER / "disrupted").touch()
    else:
        (BARRIER / f"writing-{me}").touch()
        writes = 0
        while not (BARRIER / "disrupted").exists() or writes < 20:
            created = post(isolate_service.url + "/items", {"value": me})
            assert created["instance"] == isolate_service.name
            assert get(isolate_service.url + "/items/%d" % created["id"])["value"] == me
            writes += 1
        (BARRIER / f"done-{me}-{writes}").touch()
'''


def test_stopping_one_workers_service_never_affects_the_others(
    suite: pytest.Pytester, tmp_path_factory: pytest.TempPathFactory
) -> None:
    barrier = tmp_path_factory.mktemp("barrier")
    suite.makepyfile(test_isolation=ISOLATION_TEST)
    os.environ["BARRIER_DIR"] = str(barrier)
    try:
        result = suite.runpytest_subprocess("-n", "4", "--dist", "each", "-p", "no:randomly")
    finally:
        del os.environ["BARRIER_DIR"]
    result.assert_outcomes(passed=4)
    done = sorted(p.name for p in barrier.glob("done-*"))
    assert [d.split("-")[1] for d in done] == ["gw1", "gw2", "gw3"]
    assert all(int(d.split("-")[2]) >= 20 for d in done)
    assert leftovers(run_id_of(result)) == []


def test_no_leftovers_after_a_failing_run_and_log_tail_in_report(suite: pytest.Pytester) -> None:
    suite.makepyfile(
        test_fail="""
        from helpers import post
        def test_fails(isolate_service, isolate_redis_url):
            post(isolate_service.url + "/items", {"value": "x"})
            assert False, "boom"
        def test_passes(isolate_service):
            assert isolate_service.is_running
        """
    )
    result = suite.runpytest_subprocess("-n", "2")
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(["*isolate: app-test-gw* log (last 40 lines)*", "*POST /items*"])
    assert leftovers(run_id_of(result)) == []


def test_crashed_worker_leaks_nothing(suite: pytest.Pytester) -> None:
    suite.makepyfile(
        test_crash="""
        import os, signal
        def test_crash_after_start(isolate_service, isolate_redis):
            assert isolate_service.is_running
            os.kill(os.getpid(), signal.SIGKILL)
        def test_other_a(isolate_service):
            assert isolate_service.is_ready()
        def test_other_b(isolate_service):
            assert isolate_service.is_ready()
        """
    )
    result = suite.runpytest_subprocess("-n", "2", "-p", "no:randomly")
    result.stdout.fnmatch_lines(["*crashed*"])
    outcomes = result.parseoutcomes()
    assert outcomes.get("failed") == 1 and outcomes.get("passed") == 2
    assert leftovers(run_id_of(result)) == []


@pytest.mark.parametrize("dont_write", [True, False])
def test_the_header_says_when_workers_cannot_keep_their_bytecode(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, dont_write: bool
) -> None:
    pytester.makepyfile(test_x="def test_x(): pass")
    if dont_write:
        monkeypatch.setenv("PYTHONDONTWRITEBYTECODE", "1")
    else:
        monkeypatch.delenv("PYTHONDONTWRITEBYTECODE", raising=False)
    result = pytester.runpytest_subprocess("-n", "2", "-p", "no:randomly")
    result.assert_outcomes(passed=1)
    noted = any(line.startswith("isolate: note: PYTHONDONTWRITEBYTECODE is set") for line in result.outlines)
    assert noted == dont_write, result.outlines[:12]


def test_isolates_own_modules_are_not_assertion_rewritten(pytester: pytest.Pytester) -> None:
    """pytest marks every module of a plugin's distribution for rewriting; isolate's load
    as Python loads them (from their bytecode caches), a test module is still rewritten."""
    pytester.makeconftest(
        """
        import pytest
        pytest.register_assert_rewrite("isolate")  # as pytest marks an installed plugin
        import isolate._config, isolate._stack
        """
    )
    pytester.makepyfile(
        test_x="""
        import sys

        def test_loaders():
            isolates = {name: type(module.__loader__).__name__ for name, module in sys.modules.items()
                        if name.startswith("isolate.") and name != "isolate._plainimport"}
            assert isolates and "AssertionRewritingHook" not in isolates.values(), isolates
            assert type(sys.modules[__name__].__loader__).__name__ == "AssertionRewritingHook"
        """
    )
    result = pytester.runpytest_subprocess("-p", "no:randomly", "-p", "no:isolate", "-p", "no:xdist")
    result.assert_outcomes(passed=1)


def test_without_xdist(suite: pytest.Pytester) -> None:
    suite.makepyfile(
        test_plain="""
        def test_plain(isolate_worker, isolate_service, isolate_database):
            assert isolate_worker.worker_id == "main" and isolate_worker.worker_count == 1
            assert isolate_database.schema.startswith("isolate_main_")
        """
    )
    result = suite.runpytest_subprocess("-p", "no:xdist", "-v")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["isolate: run *, backend native*", "isolate: postgres PostgreSQL *"])
    assert leftovers(run_id_of(result)) == []


def test_two_concurrent_runs_do_not_collide(suite: pytest.Pytester) -> None:
    suite.makepyfile(
        test_conc="""
        import time
        from helpers import post
        def test_write(isolate_service, isolate_database):
            for i in range(30):
                post(isolate_service.url + "/items", {"value": str(i)})
            with isolate_database.connect() as conn:
                assert conn.execute("SELECT count(*) FROM items").fetchone() == (30,)
        """
    )
    cmd = [sys.executable, "-m", "pytest", "-n", "2", "-p", "no:randomly", "-p", "pytester"]
    procs = [
        subprocess.Popen(cmd, cwd=suite.path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for _ in range(2)
    ]
    outputs = [p.communicate(timeout=240)[0] for p in procs]
    for proc, out in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, out
    ids = [re.search(r"isolate: run ([0-9a-f]{10})", out).group(1) for out in outputs]  # type: ignore[union-attr]
    assert ids[0] != ids[1]
    assert leftovers(ids[0]) == leftovers(ids[1]) == []


def test_bad_option_is_a_usage_error(suite: pytest.Pytester) -> None:
    suite.makepyfile(test_x="def test_x(): pass")
    result = suite.runpytest_subprocess("--isolate-backend=kubernetes")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*bad value for isolate option 'backend'*must be one of*"])


def test_missing_service_spec_is_explained(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_x="def test_x(isolate_service): pass")
    result = pytester.runpytest_subprocess("-p", "no:xdist")
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*define a session-scoped fixture `isolate_service_spec`*"])


def test_stale_run_of_a_dead_owner_is_reaped(suite: pytest.Pytester) -> None:
    # Fake what a SIGKILLed run leaves: a run dir with a registered live process.
    stale = Path(default_base_dir()) / "isolate-run-deadbeef00"
    (stale / "registry").mkdir(parents=True)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    orphan = subprocess.Popen(["sleep", "300"], start_new_session=True)
    ticks = process_start_ticks(orphan.pid)
    (stale / "owner.json").write_text(f'{{"pid": {dead.pid}, "start_ticks": 1}}')
    (stale / "registry" / "orphan.json").write_text(
        f'{{"name": "orphan", "pid": {orphan.pid}, "start_ticks": {ticks}, "paths": ["{stale}/data"]}}'
    )
    try:
        suite.makepyfile(test_x="def test_x(): pass")
        suite.runpytest_subprocess("-p", "no:xdist").assert_outcomes(passed=1)
        assert orphan.wait(timeout=15) == -signal.SIGTERM
        assert not stale.exists()
    finally:
        if orphan.poll() is None:
            orphan.kill()


def test_timings_json_is_written(suite: pytest.Pytester) -> None:
    suite.makepyfile(test_x="def test_x(isolate_service): pass")
    result = suite.runpytest_subprocess("-n", "2", "--isolate-timings-json=out/timings.json")
    result.assert_outcomes(passed=1)
    text = (suite.path / "out" / "timings.json").read_text()
    for phase in ("postgres_start", "schema_migrations", "redis_start", "service_ready"):
        assert phase in text
    # Quiet by default: one header line and one summary line, no table...
    assert "isolate timings" not in result.stdout.str()
    lines = [line for line in result.stdout.lines if line.startswith("isolate: ")
             and not line.startswith(("isolate: warning: ", "isolate: note: "))]  # (as root: the service runs as root)
    assert len(lines) == 2, lines
    assert re.fullmatch(r"isolate: run \w+ \(native\): PostgreSQL, 1 Redis, 1 service on 1 worker; "
                        r"reaped in [\d.]+s, nothing left running", lines[1]), lines  # fmt: skip
    # ...the table with -v, or --isolate-timings.
    for flag in ("-v", "--isolate-timings"):
        result = suite.runpytest_subprocess("-n", "2", flag)
        result.stdout.fnmatch_lines(["*isolate timings (seconds)*", "postgres_start *"])
    _ = time


def test_shared_redis_mode_gives_each_worker_its_own_db(suite: pytest.Pytester) -> None:
    suite.makepyfile(
        test_redis="""
        import pytest
        import isolate

        @pytest.mark.parametrize("n", range(4))
        def test_db(n, isolate_redis, isolate_redis_client, isolate_worker):
            assert isolate_redis.shared
            assert isolate_redis.db >= 1  # leased: DB 0 is never handed out
            isolate_redis_client.set(f"k{n}", isolate_worker.worker_id)
            # only this worker's keys are visible in its DB
            for key in isolate_redis_client.keys():
                assert isolate_redis_client.get(key) == isolate_worker.worker_id.encode()
            with pytest.raises(isolate.FaultInjectionError, match="per-worker"):
                isolate_redis.cut()
        """
    )
    result = suite.runpytest_subprocess("-n", "2", "--isolate-redis-mode=shared", "-p", "no:randomly")
    result.assert_outcomes(passed=4)
    assert leftovers(run_id_of(result)) == []


def test_native_run_imports_no_docker(suite: pytest.Pytester) -> None:
    """The docker extra is for the docker backend only: a native run never loads it."""
    suite.makepyfile(
        test_mods="""
        import sys

        def test_stack(isolate_service, isolate_redis, isolate_database):
            pass

        def test_no_docker_modules_after_a_stack_started(isolate_service):
            loaded = sorted(
                m for m in sys.modules if m.split(".")[0] in {"docker", "testcontainers"}
            )
            assert loaded == []
        """
    )
    result = suite.runpytest_subprocess("-n", "2", "-p", "no:randomly", "--isolate-backend=native")
    result.assert_outcomes(passed=2)



def test_the_chosen_backend_is_public(suite: pytest.Pytester) -> None:
    suite.makepyfile(
        test_b="""
        import os

        def test_b(isolate_backend, isolate_stack):
            assert isolate_backend == isolate_stack.backend.name
            print("BACKEND", isolate_backend)
        """
    )
    # (no reaping at start: with an engine, auto is docker, and the reaper tests of
    # test_docker.py own the orphan containers they make)
    result = suite.runpytest_subprocess("-n", "1", "--isolate-backend=auto", "-p", "no:randomly",
                                        "--no-isolate-reap-stale", "-rP", "test_b.py")  # fmt: skip
    result.assert_outcomes(passed=1)
    chosen = re.search(r"isolate: run \w+, backend (\w+) \(auto: ", result.stdout.str())
    assert chosen, result.stdout.str()
    result.stdout.fnmatch_lines([f"BACKEND {chosen.group(1)}"])


@needs_root
def test_a_warning_that_changes_what_runs_as_root_is_in_the_summary_under_q(suite: pytest.Pytester) -> None:
    """A worker's warning that its service runs as root (isolate's user cannot reach it)
    is not lost in the worker's captured output: one line in the summary, even with -q."""
    suite.makepyfile(test_x="""
        import pytest
        @pytest.mark.parametrize("n", range(4))
        def test_x(n, isolate_service): pass
    """)
    result = suite.runpytest_subprocess("-n", "2", "-q")
    result.assert_outcomes(passed=4)
    warnings = [line for line in result.stdout.lines if line.startswith("isolate: warning: ")]
    assert len(warnings) == 1, result.stdout.lines  # the same warning of both workers, once
    assert "service 'app' runs as root: isolate cannot reach" in warnings[0]


def test_a_flag_option_does_not_swallow_the_next_word(suite: pytest.Pytester) -> None:
    """``--isolate-timings tests`` runs ``tests`` with the table; ``--no-isolate-timings``
    turns an ini's ``isolate_timings = true`` off."""
    (suite.path / "tests").mkdir()
    (suite.path / "tests" / "test_x.py").write_text("def test_x(isolate_postgres): pass\n")
    result = suite.runpytest_subprocess("--isolate-timings", "tests", "-p", "no:randomly")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["*isolate timings (seconds)*"])
    suite.makeini("[pytest]\nisolate_timings = true\n")
    result = suite.runpytest_subprocess("--no-isolate-timings", "tests", "-p", "no:randomly")
    result.assert_outcomes(passed=1)
    assert "isolate timings" not in result.stdout.str()


PRESTART_TESTS = """
import json
import psycopg
from tenacity import Retrying, stop_after_delay, wait_fixed

def test_uses_postgres(isolate_database):
    assert isolate_database.schema

def test_postgres_is_started_without_asking(isolate_stack):
    # No fixture here starts PostgreSQL: only a start ahead of the tests can.
    state = isolate_stack.run.path / "postgres.json"
    for attempt in Retrying(stop=stop_after_delay(60), wait=wait_fixed(0.05), reraise=True):
        with attempt:
            assert state.exists()

def test_sized_for_every_worker(isolate_stack, isolate_database, isolate_worker):
    from isolate._postgres import tuned_settings
    with psycopg.connect(isolate_database.dsn) as conn:
        (value,) = conn.execute("SHOW max_connections").fetchone()
    conn_per_worker = isolate_stack.settings.pg_conn_per_worker
    assert value == tuned_settings(isolate_worker.worker_count, conn_per_worker)["max_connections"]

def test_uses_redis(isolate_redis):
    assert isolate_redis.url

def test_redis_is_started_without_asking(isolate_stack):
    # No fixture here starts this worker's Redis: only a start ahead of the tests can.
    mine = {"phase": "redis_start", "worker": isolate_stack.worker.worker_id}
    for attempt in Retrying(stop=stop_after_delay(60), wait=wait_fixed(0.05), reraise=True):
        with attempt:
            lines = isolate_stack.run.timings_path.read_text().splitlines()
            assert mine in [{k: json.loads(line)[k] for k in mine} for line in lines]

def test_nothing():
    pass
"""


def _started_postgres(result: pytest.RunResult) -> bool:
    """What the run's summary line says it started (``PostgreSQL, ...``; no line if nothing)."""
    return any(re.match(r"isolate: run \w+ \(native\): PostgreSQL", line) for line in result.outlines)


def test_postgres_starts_while_the_workers_start_when_the_run_is_expected_to_use_it(
    suite: pytest.Pytester,
) -> None:
    suite.makepyfile(test_prestart=PRESTART_TESTS)
    (suite.path / "migrations").mkdir()
    (suite.path / "migrations" / "001.sql").write_text("CREATE TABLE t (id int);\n")

    def run(*args: str, passed: int = 1) -> pytest.RunResult:
        result = suite.runpytest_subprocess("-n", "2", "-p", "no:randomly", *args)
        result.assert_outcomes(passed=passed)
        assert leftovers(run_id_of(result)) == []
        return result

    # No history, no migrations option: nothing ahead, and a run that needs none starts none.
    assert not _started_postgres(run("-k", "test_nothing"))
    run("-k", "test_uses_postgres")  # pytest's cache now says: this suite uses PostgreSQL
    # ...so the next run starts it ahead, sized for its workers (the controller has none).
    run("-k", "test_postgres_is_started_without_asking or test_sized_for_every_worker", passed=2)
    # That run used it; one that does not is remembered too: nothing ahead after it.
    assert _started_postgres(run("-k", "test_nothing"))
    assert not _started_postgres(run("-k", "test_nothing"))
    # The migrations option says the run will use it; so does always.
    run("-k", "test_postgres_is_started_without_asking", "--isolate-migrations=migrations")
    run("-k", "test_postgres_is_started_without_asking", "--isolate-prestart=always")
    # Without xdist, the one process starts it while it collects.
    result = suite.runpytest_subprocess("-p", "no:xdist", "-p", "no:randomly", "--isolate-prestart=always",
                                        "-k", "test_postgres_is_started_without_asking or test_sized")  # fmt: skip
    result.assert_outcomes(passed=2)
    # never: not even after a run that used it.
    run("-k", "test_uses_postgres")
    assert not _started_postgres(run("-k", "test_nothing", "--isolate-prestart=never"))


def _started_redis(result: pytest.RunResult) -> int:
    """How many Redis the run's summary line says it started."""
    found = [re.search(r"(\d+) Redis", line) for line in result.outlines if line.startswith("isolate: run ")]
    return next((int(m.group(1)) for m in found if m), 0)


def test_each_worker_starts_its_redis_while_it_collects_when_the_run_is_expected_to_use_it(
    suite: pytest.Pytester,
) -> None:
    suite.makepyfile(test_prestart=PRESTART_TESTS)

    def run(*args: str) -> pytest.RunResult:
        result = suite.runpytest_subprocess("-n", "2", "-p", "no:randomly", *args)
        result.assert_outcomes(passed=1)
        assert leftovers(run_id_of(result)) == []
        return result

    assert _started_redis(run("-k", "test_nothing")) == 0  # no history: nothing ahead
    run("-k", "test_uses_redis")  # pytest's cache now says: this suite uses Redis
    # ...so in the next run each worker starts its own while it collects, asked or not,
    # and waits for it (timed) before its first test.
    assert _started_redis(run("-k", "test_redis_is_started_without_asking", "--isolate-timings-json=t.json")) == 2
    assert json.loads((suite.path / "t.json").read_text())["prestart_wait"]["count"] == 2
    # That run did not use it (a start ahead is not a use): nothing ahead after it.
    assert _started_redis(run("-k", "test_nothing")) == 0
    run("-k", "test_uses_redis")
    assert _started_redis(run("-k", "test_nothing", "--isolate-prestart=never")) == 0
    # Without xdist, the one process starts its Redis while it collects.
    result = suite.runpytest_subprocess("-p", "no:xdist", "-p", "no:randomly", "--isolate-prestart=always",
                                        "-k", "test_redis_is_started_without_asking")  # fmt: skip
    result.assert_outcomes(passed=1)
    assert leftovers(run_id_of(result)) == []


def test_a_run_that_ends_while_postgres_starts_ahead_leaks_nothing(suite: pytest.Pytester) -> None:
    # A collection error ends the run at once, maybe before PostgreSQL is up: the run
    # waits for the start to end, then reaps it.
    suite.makepyfile(test_broken="import no_such_module_here\n")
    result = suite.runpytest_subprocess("-n", "2", "--isolate-prestart=always")
    assert result.ret == pytest.ExitCode.TESTS_FAILED, result.outlines[-15:]
    result.stdout.fnmatch_lines(["*ERROR collecting test_broken.py*"])
    assert _started_postgres(result)
    assert leftovers(run_id_of(result)) == []


def test_help_and_sessions_that_set_up_no_fixture_start_nothing_ahead(
    suite: pytest.Pytester, tmp_path_factory: pytest.TempPathFactory
) -> None:
    suite.makepyfile(test_x="def test_nothing(): pass")
    always = ("-n", "2", "--isolate-prestart=always")
    for quiet in ("--collect-only", "--fixtures", "--setup-plan"):
        assert not _started_postgres(suite.runpytest_subprocess(*always, quiet)), quiet
    assert _started_postgres(suite.runpytest_subprocess(*always))
    # --help prints no summary: a PostgreSQL that says when it is looked at tells.
    bindir = tmp_path_factory.mktemp("fakepg")
    marker = bindir / "asked"
    for name in ("postgres", "initdb"):
        (bindir / name).write_text(f"#!/bin/sh\ntouch {marker}\necho 'postgres (PostgreSQL) 16.0'\n")
        (bindir / name).chmod(0o755)
    suite.runpytest_subprocess(*always, f"--isolate-pg-bin-dir={bindir}", "--help")
    assert not marker.exists()
    suite.runpytest_subprocess(*always, f"--isolate-pg-bin-dir={bindir}").assert_outcomes(passed=1)
    assert marker.exists()  # a session looks at it


FINALIZED_AT_EXIT = """
import atexit, gc, os

gc.disable()  # only the collections asked for finalize the garbage below (not a timely gen0)

class Finalized:
    def __init__(self, path):
        self.path, self.cycle = path, self

    def __del__(self, _os=os):
        _os.close(_os.open(self.path, _os.O_CREAT | _os.O_WRONLY, 0o600))

def leave_garbage(name):
    # In a reference cycle: left for the interpreter's final collections.
    Finalized(os.path.join(os.environ["MARKS"], name))

def pytest_unconfigure(config):
    name = config.workerinput["workerid"] if hasattr(config, "workerinput") else "controller"
    leave_garbage(name + "-session")  # for pytest's own last collection (this runs before isolate's hook)
    atexit.register(leave_garbage, name)  # after pytest's own collections; before isolate's freeze
"""


@pytest.mark.parametrize("fast", [True, False])
def test_fast_exit_skips_the_final_collections_of_every_process(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, fast: bool
) -> None:
    # Each process leaves an object in a reference cycle whose finalizer marks a file:
    # only the interpreter's final garbage collections can run it. And one at its
    # session's end, which pytest's own last collection finalizes (it reports the
    # unraisable exceptions of the tests' garbage): still in the workers, not in the
    # controller, where no test ran.
    marks = pytester.mkdir("marks")
    monkeypatch.setenv("MARKS", str(marks))
    pytester.makeconftest(FINALIZED_AT_EXIT)
    pytester.makepyfile(test_x="def test_a(): pass\ndef test_b(): pass")
    flag = "--isolate-fast-exit" if fast else "--no-isolate-fast-exit"
    pytester.runpytest_subprocess("-n", "2", "-p", "no:randomly", flag).assert_outcomes(passed=2)
    finalized = sorted(p.name for p in marks.iterdir())
    every = ["controller", "controller-session", "gw0", "gw0-session", "gw1", "gw1-session"]
    assert finalized == (["gw0-session", "gw1-session"] if fast else every)


WATCH_LOG_CAPTURE = """
import os, threading
from _pytest import logging as pytest_logging

enter = pytest_logging.catching_logs.__enter__

def watched(self):
    # pytest iterates every logger here, without a lock: a thread importing modules (each
    # makes its logger) must not be running now.
    starting = [t.name for t in threading.enumerate() if t.name.startswith("isolate-prestart")]
    if starting:
        with open(os.environ["OVERLAPS"], "a") as out:
            out.write(f"{os.environ.get('PYTEST_XDIST_WORKER', 'controller')}: {starting}\\n")
    return enter(self)

pytest_logging.catching_logs.__enter__ = watched
"""


@pytest.mark.parametrize("xdist", [True, False])
def test_starts_ahead_never_run_while_pytest_begins_capturing_logs(
    suite: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, xdist: bool
) -> None:
    # A thread that imports while pytest iterates the loggers ends the run with an
    # INTERNALERROR ("dictionary changed size during iteration"; 2 of 8 runs at 16 workers).
    overlaps = suite.path / "overlaps.txt"
    monkeypatch.setenv("OVERLAPS", str(overlaps))
    suite.makeconftest(WATCH_LOG_CAPTURE)
    suite.makepyfile(test_prestart=PRESTART_TESTS)
    args = ("-n", "2") if xdist else ("-p", "no:xdist")
    result = suite.runpytest_subprocess(*args, "-p", "no:randomly", "--isolate-prestart=always",
                                        "-k", "test_uses_postgres or test_uses_redis")  # fmt: skip
    result.assert_outcomes(passed=2)
    assert _started_postgres(result)
    assert _started_redis(result) == (2 if xdist else 1)
    assert not overlaps.exists(), overlaps.read_text()
    assert leftovers(run_id_of(result)) == []
