"""Run fixtures (``@isolate.run_fixture``): set up once per run in the controller, the
same value in every worker, torn down once after the last test, and every way a run can
end (nested pytest runs at -n 4 and without xdist; the host and the checks on their own
at the end)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
from collections.abc import Iterator

import pytest
from suite_support import CONFTEST, Run, poll, signal_state

from isolate import RunFixtureError
from isolate._run.fixture_defs import RunFixtureDef, closure, problems
from isolate._run.fixtures import RunFixtures, value_from

EVENTS = '''
import json, os, time
from pathlib import Path

def event(kind, **facts):
    """One line per event, appended (O_APPEND): the file's order is the order they happened."""
    with Path(os.environ["FAULT_DIR"], "events").open("a") as fh:
        fh.write(json.dumps({"kind": kind, "pid": os.getpid(),
                             "worker": os.environ.get("PYTEST_XDIST_WORKER", "main"), **facts}) + "\\n")
'''

RUN_FIXTURES = CONFTEST + '''
import os, subprocess, threading, uuid
from events import event

@isolate.run_fixture
def shared_thing(isolate_run):
    """A process of the run's, adopted so that the run stops it however the run ends."""
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"],
                               start_new_session=True)
    isolate_run.adopt_process(sleeper.pid, "shared-sleeper")
    event("setup", sleeper=sleeper.pid, workers=isolate_run.worker_count)
    yield {"controller": os.getpid(), "token": uuid.uuid4().hex, "sleeper": sleeper.pid}
    sleeper.terminate()
    sleeper.wait()
    isolate_run.release_process("shared-sleeper")
    event("teardown")

@isolate.run_fixture
def lock_of_the_run():
    yield threading.Lock()  # cannot leave the controller: only run fixtures use it

@isolate.run_fixture
def derived(shared_thing, lock_of_the_run, isolate_postgres):
    with lock_of_the_run:
        return {"token": shared_thing["token"], "pg_port": isolate_postgres.port}
'''

TESTS = """
import os
import pytest
from events import event

@pytest.mark.parametrize("n", range(8))
def test_uses_it(n, shared_thing):
    event("test", token=shared_thing["token"])
    assert os.getpid() != shared_thing["controller"] or "PYTEST_XDIST_WORKER" not in os.environ
    event("end")

def test_derived(derived, shared_thing, isolate_postgres):
    assert derived == {"token": shared_thing["token"], "pg_port": isolate_postgres.port}
    event("end")

def test_without_it():
    event("plain")
"""


def events(run: Run) -> list[dict[str, object]]:
    path = run.fault_dir / "events"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def kinds(found: list[dict[str, object]], kind: str) -> list[dict[str, object]]:
    return [e for e in found if e["kind"] == kind]


@pytest.fixture
def suite(pytester: pytest.Pytester) -> pytest.Pytester:
    pytester.makeconftest(RUN_FIXTURES)
    pytester.makepyfile(events=EVENTS, test_run=TESTS)
    return pytester


@pytest.mark.parametrize("args", [("-n", "4"), ("-p", "no:xdist")], ids=["n4", "no-xdist"])
def test_set_up_once_the_same_value_everywhere_torn_down_after_the_last_test(
    suite: pytest.Pytester, args: tuple[str, ...]
) -> None:
    run = Run(suite.path, *args, "test_run.py")
    out = run.finish(180)
    assert run.proc.returncode == 0, out
    found = events(run)
    setups, teardowns = kinds(found, "setup"), kinds(found, "teardown")
    assert len(setups) == 1 and len(teardowns) == 1, found
    # In the controller (the nested pytest itself), sized for the run's workers.
    assert setups[0]["pid"] == teardowns[0]["pid"] == run.proc.pid, found
    assert setups[0]["workers"] == (4 if args[0] == "-n" else 1)
    tests = kinds(found, "test")
    assert len(tests) == 8 and len({t["token"] for t in tests}) == 1, tests
    if args[0] == "-n":
        assert len({t["worker"] for t in tests}) >= 2, tests  # several workers, one value
    # Torn down after the last test of the run had ended, every worker's.
    assert found.index(teardowns[0]) > max(i for i, e in enumerate(found) if e["kind"] in ("end", "plain"))
    poll(run.leftovers, 15)  # the adopted process too


def test_never_set_up_when_no_selected_test_uses_it(suite: pytest.Pytester) -> None:
    run = Run(suite.path, "-n", "2", "test_run.py", "-k", "without_it")
    out = run.finish()
    assert "1 passed" in out, out
    assert [e["kind"] for e in events(run)] == ["plain"]
    poll(run.leftovers, 15)


def test_a_worker_killed_mid_run_does_not_end_it(suite: pytest.Pytester) -> None:
    suite.makepyfile(
        test_kill="""
        import os, signal
        import pytest
        from events import event

        @pytest.mark.parametrize("n", range(6))
        def test_uses_it(n, shared_thing):
            event("test", token=shared_thing["token"])
            if n == 1:
                os.kill(os.getpid(), signal.SIGKILL)  # this worker dies holding the value
            os.kill(shared_thing["sleeper"], 0)  # what the run fixture started is still up
        """
    )
    run = Run(suite.path, "-n", "2", "--max-worker-restart=2", "test_kill.py")
    out = run.finish(180)
    assert "1 failed, 5 passed" in out, out
    assert "crashed while running" in out, out
    found = events(run)
    assert len(kinds(found, "setup")) == 1 and len(kinds(found, "teardown")) == 1, found
    assert len({t["token"] for t in kinds(found, "test")}) == 1, found  # the replacement got it too
    poll(run.leftovers, 15)


HANG = """
import os, time
from pathlib import Path

def test_hang_a(shared_thing, isolate_database):
    Path(os.environ["FAULT_DIR"], "up-" + os.environ.get("PYTEST_XDIST_WORKER", "main")).touch()
    time.sleep(300)

def test_hang_b(shared_thing, isolate_database):
    Path(os.environ["FAULT_DIR"], "up-" + os.environ.get("PYTEST_XDIST_WORKER", "main")).touch()
    time.sleep(300)
"""


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP])
def test_interrupting_the_controller_runs_the_teardown(suite: pytest.Pytester, sig: signal.Signals) -> None:
    suite.makepyfile(test_hang=HANG)
    run = Run(suite.path, "-n", "2", "test_hang.py")
    run.wait_up(2)
    before = signal_state(run.proc.pid)
    run.proc.send_signal(sig)
    try:
        out = run.finish(90)
    except subprocess.TimeoutExpired:
        run.proc.send_signal(signal.SIGABRT)  # PYTHONFAULTHANDLER: every thread's stack
        pytest.fail(f"no exit after {sig.name}; signal masks before it: {before}\n{run.finish(30)}")
    assert run.proc.returncode == pytest.ExitCode.INTERRUPTED, out
    found = events(run)
    assert len(kinds(found, "setup")) == 1 and len(kinds(found, "teardown")) == 1, (found, out)
    poll(run.leftovers, 15)


def test_a_sigkilled_controller_leaves_what_it_registered_to_the_watchdog(suite: pytest.Pytester) -> None:
    suite.makepyfile(test_hang=HANG)
    run = Run(suite.path, "-n", "2", "test_hang.py")
    run.wait_up(2)
    sleeper = int(str(kinds(events(run), "setup")[0]["sleeper"]))
    os.kill(sleeper, 0)
    run.proc.send_signal(signal.SIGKILL)
    run.finish(30)
    poll(run.leftovers, 15)  # workers, PostgreSQL, the adopted process, the run dir
    assert not kinds(events(run), "teardown")  # the teardown could not run: the reaper did


@pytest.mark.parametrize("args", [("-n", "2"), ("-p", "no:xdist")], ids=["n2", "no-xdist"])
def test_a_failed_set_up_is_one_error_shown_once_in_full(pytester: pytest.Pytester, args: tuple[str, ...]) -> None:
    pytester.makepyfile(events=EVENTS)
    pytester.makeconftest(
        CONFTEST + '''
from events import event

@isolate.run_fixture
def bucket():
    event("setup")
    raise ValueError("no bucket today")

@isolate.run_fixture
def uses_bucket(bucket):
    return bucket
'''
    )
    pytester.makepyfile(
        test_b="""
        import pytest

        @pytest.mark.parametrize("n", range(6))
        def test_bucket(n, bucket):
            pass

        @pytest.mark.parametrize("n", range(3))
        def test_uses_bucket(n, uses_bucket):
            pass

        def test_fine():
            pass
        """
    )
    run = Run(pytester.path, *args, "test_b.py")
    out = run.finish()
    assert run.proc.returncode == pytest.ExitCode.TESTS_FAILED, out
    assert "1 passed, 9 errors" in out, out
    assert len(kinds(events(run), "setup")) == 1  # tried once, for the whole run
    # (the short summary repeats each message: in full where CI is set, so count above it)
    reports = out.split("short test summary info")[0]
    assert reports.count('raise ValueError("no bucket today")') == 1, out  # the traceback, once
    assert reports.count("traceback (in the controller)") == 1, out
    assert reports.count("(in full at ") == 8, out  # every other test: one line
    assert "run fixture 'uses_bucket' needs 'bucket', which failed" in out, out
    assert "_run/fixtures.py" not in out  # the user's frames, not isolate's
    poll(run.leftovers, 15)


def test_a_failed_teardown_is_reported_and_fails_the_run(pytester: pytest.Pytester) -> None:
    pytester.makeconftest(
        CONFTEST + '''
@isolate.run_fixture
def fragile():
    yield "up"
    raise RuntimeError("teardown broke")

@isolate.run_fixture
def sturdy(fragile):
    yield fragile
    open(os.environ["FAULT_DIR"] + "/sturdy-down", "w").close()

import os
'''
    )
    pytester.makepyfile(test_t="def test_t(sturdy):\n    assert sturdy == 'up'\n")
    for args in (("-n", "2"), ("-p", "no:xdist")):
        run = Run(pytester.path, *args, "test_t.py")
        out = run.finish()
        assert "1 passed" in out, out
        assert run.proc.returncode == pytest.ExitCode.TESTS_FAILED, out
        assert "isolate: run fixture teardown failed" in out, out
        assert "run fixture 'fragile' failed in its teardown: RuntimeError: teardown broke" in out, out
        assert 'raise RuntimeError("teardown broke")' in out, out
        assert (run.fault_dir / "sturdy-down").exists()  # the others are torn down all the same
        (run.fault_dir / "sturdy-down").unlink()
        poll(run.leftovers, 15)


def test_depending_on_a_worker_fixture_is_an_error_at_collection(pytester: pytest.Pytester) -> None:
    pytester.makeconftest(
        CONFTEST + '''
@isolate.run_fixture
def wrong(isolate_database):
    return isolate_database.dsn
'''
    )
    pytester.makepyfile(test_w="def test_w(wrong):\n    pass\n\ndef test_other():\n    pass\n")
    for args in (("-n", "2"), ("-p", "no:xdist")):
        run = Run(pytester.path, *args, "test_w.py")
        out = run.finish()
        assert run.proc.returncode != 0, out
        assert "ERROR collecting conftest.py" in out, out
        assert "run fixture 'wrong' depends on 'isolate_database', a fixture of each worker" in out, out
        assert "fix: a run fixture can depend on isolate_run, isolate_postgres" in out, out
        poll(run.leftovers, 15)


def test_a_value_that_is_not_json_is_a_clear_error(pytester: pytest.Pytester) -> None:
    pytester.makeconftest(
        CONFTEST + '''
import threading

@isolate.run_fixture
def lock():
    return threading.Lock()
'''
    )
    pytester.makepyfile(test_l="def test_l(lock):\n    pass\n")
    run = Run(pytester.path, "-n", "1", "test_l.py")
    out = run.finish()
    assert "1 error" in out, out
    assert "run fixture 'lock' is set up, but what it yields cannot go to the workers: it is not JSON-serialisable" in out
    assert "fix: yield what a test needs to reach it" in out, out


def test_a_run_fixture_in_a_conftest_the_controller_never_loaded(pytester: pytest.Pytester) -> None:
    """The xdist controller does not collect: it imports the defining conftest when asked."""
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(events=EVENTS)
    deep = pytester.path / "tests" / "deeper" / "still"
    deep.mkdir(parents=True)
    (deep / "conftest.py").write_text(
        "import isolate\nfrom events import event\n\n"
        "@isolate.run_fixture\ndef deep_one():\n    event('setup')\n    return 'deep'\n"
    )
    (deep / "test_deep.py").write_text("def test_deep(deep_one):\n    assert deep_one == 'deep'\n")
    run = Run(pytester.path, "-n", "2", "tests")
    out = run.finish()
    assert "1 passed" in out, out
    assert [e["pid"] for e in kinds(events(run), "setup")] == [run.proc.pid]


# -- the host on its own ---------------------------------------------------------------


def _def(name: str, func: object, *params: str) -> RunFixtureDef:
    return RunFixtureDef(name, func, params, __name__, __file__)  # type: ignore[arg-type]


def test_the_checks_name_the_problem() -> None:
    defs = {
        "a": _def("a", lambda b: b, "b"),
        "b": _def("b", lambda isolate_postgres, pytestconfig: 1, "isolate_postgres", "pytestconfig"),
        "c": _def("c", lambda isolate_redis: 1, "isolate_redis"),
        "d": _def("d", lambda my_session_fixture: 1, "my_session_fixture"),
        "e": _def("e", lambda f: 1, "f"),
        "f": _def("f", lambda e: 1, "e"),
    }
    found = {(d.name, e.message.split(":")[0]) for d, e in problems(defs, clashes=[])}
    assert found == {
        ("c", "run fixture 'c' depends on 'isolate_redis', a fixture of each worker"),
        ("d", "run fixture 'd' depends on 'my_session_fixture', not a run fixture"),
        ("e", "run fixtures depend on each other in a cycle"),
        ("f", "run fixtures depend on each other in a cycle"),
    }
    assert closure("a", defs) == {"a", "b"}
    clash = problems({}, clashes=[(defs["a"], RunFixtureDef("a", print, (), "x", "/elsewhere.py"))])
    assert "two run fixtures are named 'a'" in clash[0][1].message


@pytest.fixture
def host() -> Iterator[RunFixtures]:
    from isolate._run import fixture_defs as fixtures

    saved = dict(fixtures.DEFINITIONS)
    host = RunFixtures(lambda name: f"<{name}>", lambda location: None)
    yield host
    host.teardown()
    fixtures.DEFINITIONS.clear()
    fixtures.DEFINITIONS.update(saved)


def test_the_host_sets_up_once_for_concurrent_askers_and_tears_down_last_first(host: RunFixtures) -> None:
    from isolate._run import fixture_defs as fixtures

    calls: list[str] = []

    def base(isolate_run: str) -> Iterator[dict[str, str]]:
        calls.append("base up " + threading.current_thread().name)
        yield {"run": isolate_run}
        calls.append("base down")

    def top(base: dict[str, str]) -> Iterator[str]:
        calls.append("top up")
        yield base["run"] + "!"
        calls.append("top down")

    fixtures.define(base)
    fixtures.define(top)
    answers: list[object] = []
    askers = [
        threading.Thread(target=lambda: answers.append(host.ask({"name": "top", "worker": "gw0"})))
        for _ in range(8)
    ]
    for thread in askers:
        thread.start()
    for thread in askers:
        thread.join(30)
    assert answers == [{"value": "<isolate_run>!"}] * 8
    assert calls == ["base up isolate-run-fixtures", "top up"]
    assert host.teardown() == []
    assert calls[2:] == ["top down", "base down"]
    assert host.teardown() == []  # once
    refused = host.ask({"name": "top", "worker": "gw1"})
    assert "the run is ending" in refused["error"]["message"]


def test_a_failure_is_shown_in_full_to_the_first_asker_only(host: RunFixtures) -> None:
    from isolate._run import fixture_defs as fixtures

    def broken() -> None:
        raise KeyError("gone")

    fixtures.define(broken)
    first = host.ask({"name": "broken", "worker": "gw3"})
    later = host.ask({"name": "broken", "worker": "gw0"})
    with pytest.raises(RunFixtureError) as shown:
        value_from(first)
    assert shown.value.first and "KeyError: 'gone'" in str(shown.value)
    with pytest.raises(RunFixtureError) as short:
        value_from(later)
    assert not short.value.first and short.value.log_tail is None
    assert short.value.shown_by == "the first test of gw3 that needed it"


def test_a_skip_in_the_set_up_skips_what_needs_it(host: RunFixtures) -> None:
    from isolate._run import fixture_defs as fixtures

    def needs_an_engine() -> None:
        pytest.skip("no engine here")

    def on_top(needs_an_engine: None) -> None:
        raise AssertionError("never set up")

    fixtures.define(needs_an_engine)
    fixtures.define(on_top)
    for name in ("needs_an_engine", "on_top"):
        with pytest.raises(RunFixtureError) as skipped:
            value_from(host.ask({"name": name, "worker": "gw0"}))
        assert skipped.value.skipped and skipped.value.message == "no engine here"
