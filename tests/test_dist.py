"""The duration scheduler in whole xdist runs (pytester, in subprocesses): each test exactly
once, crashed workers, history putting the longest first, the other ``--dist`` modes, and the
durations file pytest-split reads."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from suite_support import CONFTEST, HELPERS, leftovers, run_id_of

from isolate._dist.planner import HEAVY

RECORD = """
import json, os, time
from pathlib import Path

def record(name, seconds=0.0):
    start = time.monotonic()
    time.sleep(seconds)
    entry = {"name": name, "start": start, "end": time.monotonic(),
             "worker": os.environ.get("PYTEST_XDIST_WORKER", "main")}
    with Path(os.environ["DIST_LOG"]).open("a") as fh:
        fh.write(json.dumps(entry) + "\\n")
"""

FORTY = """
import pytest
from record import record

@pytest.mark.parametrize("n", range(40))
def test_n(n):
    record(f"n{n}", 0.02 * (n % 5))
"""


@pytest.fixture
def logged(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> Path:
    log = pytester.path / "log.jsonl"
    monkeypatch.setenv("DIST_LOG", str(log))
    pytester.makepyfile(record=RECORD)
    return log


def entries(log: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def passed_ids(result: pytest.RunResult) -> Counter[str]:
    return Counter(
        line.split(" PASSED ")[1].strip() for line in result.outlines if " PASSED " in line
    )  # fmt: skip


def test_each_of_40_tests_runs_exactly_once_at_4_workers(pytester: pytest.Pytester, logged: Path) -> None:
    pytester.makepyfile(test_forty=FORTY)
    for run in range(2):  # without history, then with it
        logged.unlink(missing_ok=True)
        result = pytester.runpytest_subprocess("-n", "4", "-v", "-p", "no:randomly")
        result.assert_outcomes(passed=40)
        result.stdout.fnmatch_lines(["scheduling tests via DurationScheduling"])
        names = Counter(str(e["name"]) for e in entries(logged))
        assert names == Counter(f"n{n}" for n in range(40)), run
        ids = passed_ids(result)
        assert len(ids) == 40 and set(ids.values()) == {1}, ids
        assert len({e["worker"] for e in entries(logged)}) >= 2


def test_a_second_run_starts_the_longest_tests_first(pytester: pytest.Pytester, logged: Path) -> None:
    pytester.makepyfile(
        test_mixed="""
        import pytest
        from record import record

        @pytest.mark.parametrize("n", range(12))
        def test_short(n):
            record(f"short{n}", 0.05)

        @pytest.mark.parametrize("seconds", [0.4, 0.8, 0.2, 0.6])
        def test_long(seconds):
            record(f"long{seconds}", seconds)
        """
    )
    pytester.runpytest_subprocess("-n", "2", "-p", "no:randomly").assert_outcomes(passed=16)
    history = json.loads((pytester.path / ".pytest_cache" / "v" / "isolate" / "durations").read_text())
    assert history["test_mixed.py::test_long[0.8]"] >= 0.8
    assert len(history) == 16
    logged.unlink()
    # Durations only: on a loaded machine the short tests' per-phase overhead may count as
    # CPU-heavy, and heavy tests run beside the long ones (test_cpu_heavy_tests_start_...).
    (pytester.path / ".pytest_cache" / "v" / "isolate" / "cpu").unlink()
    pytester.runpytest_subprocess("-n", "2", "-p", "no:randomly").assert_outcomes(passed=16)
    by_worker: dict[object, list[dict[str, object]]] = {}
    for entry in sorted(entries(logged), key=lambda e: float(e["start"])):  # type: ignore[arg-type]
        by_worker.setdefault(entry["worker"], []).append(entry)
    assert {runs[0]["name"] for runs in by_worker.values()} == {"long0.8", "long0.6"}
    # the other long ones next, not at the end (the worker that collected first may run a
    # short test before: it held the shortest one to start on 0.8 s before the other came)
    assert {runs[1]["name"] for runs in by_worker.values()} | {runs[2]["name"] for runs in by_worker.values()} >= {
        "long0.4", "long0.2"
    }


def test_a_crashed_worker_s_tests_run_on_the_others(pytester: pytest.Pytester, logged: Path) -> None:
    pytester.makepyfile(
        test_crash="""
        import os, pytest
        from record import record

        @pytest.mark.parametrize("n", range(40))
        def test_n(n):
            if n == 13:
                os._exit(1)
            record(f"n{n}", 0.05)
        """
    )
    result = pytester.runpytest_subprocess("-n", "4", "-v", "-p", "no:randomly", "--max-worker-restart=2")
    result.assert_outcomes(passed=39, failed=1)
    result.stdout.fnmatch_lines(["*replacing crashed worker*", "*FAILED test_crash.py::test_n?13?*"])
    names = Counter(str(e["name"]) for e in entries(logged))
    assert names == Counter(f"n{n}" for n in range(40) if n != 13)
    assert set(passed_ids(result).values()) == {1}


def test_max_worker_restart_is_honoured(pytester: pytest.Pytester, logged: Path) -> None:
    pytester.makepyfile(
        test_crash="""
        import os, pytest
        from record import record

        @pytest.mark.parametrize("n", range(40))
        def test_n(n):
            if n in (3, 20):
                os._exit(1)
            record(f"n{n}", 0.05)
        """
    )
    result = pytester.runpytest_subprocess("-n", "2", "-p", "no:randomly", "--max-worker-restart=1")
    result.stdout.fnmatch_lines(["*maximum crashed workers reached: 1*"])
    outcomes = result.parseoutcomes()
    assert outcomes.get("failed") == 2  # both crashes reported
    # One replacement, no second: after the limit the workers left run what they hold (as
    # with xdist's load: how much that is depends on timing) and the run ends.
    assert result.stdout.str().count("replacing crashed worker") == 1
    runs = entries(logged)
    assert {str(e["worker"]) for e in runs} <= {"gw0", "gw1", "gw2"}
    names = Counter(str(e["name"]) for e in runs)
    assert set(names.values()) <= {1}


def test_a_worker_starts_its_tests_while_another_still_collects(pytester: pytest.Pytester, logged: Path) -> None:
    # gw1 finishes collecting only once a test has run; with xdist's rule (no test before
    # every worker has collected) it gives up after 60 s and the run fails.
    pytester.makeconftest(
        """
        import os
        from pathlib import Path
        import pytest
        import tenacity

        @pytest.hookimpl(tryfirst=True)  # before xdist's own, which reports the collection
        def pytest_collection_finish(session):
            if os.environ.get("PYTEST_XDIST_WORKER") != "gw1":
                return
            marker = Path(os.environ["DIST_LOG"])  # written by the first test that runs

            @tenacity.retry(
                stop=tenacity.stop_after_delay(60), wait=tenacity.wait_fixed(0.05),
                retry=tenacity.retry_if_result(lambda seen: not seen), retry_error_callback=lambda state: False,
            )
            def a_test_ran():
                return marker.exists()

            a_test_ran()
            assert marker.exists(), "no test ran while gw1 was collecting"
        """
    )
    pytester.makepyfile(test_four=FORTY.replace("range(40)", "range(4)"))
    result = pytester.runpytest_subprocess("-n", "2", "-v", "-p", "no:randomly", timeout=120)
    result.assert_outcomes(passed=4)
    result.stdout.fnmatch_lines(["scheduling tests via DurationScheduling"])
    assert Counter(str(e["name"]) for e in entries(logged)) == Counter(f"n{n}" for n in range(4))


def test_workers_that_collected_different_tests_end_the_run(pytester: pytest.Pytester, logged: Path) -> None:
    pytester.makepyfile(
        test_differ="""
        import os, pytest
        from record import record

        @pytest.mark.parametrize("n", range(3 if os.environ.get("PYTEST_XDIST_WORKER") == "gw1" else 2))
        def test_n(n):
            record(f"n{n}")
        """
    )
    result = pytester.runpytest_subprocess("-n", "2", "-p", "no:randomly", timeout=120)
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.stdout.fnmatch_lines(["*Different tests were collected between gw?*", "*1 error*"])
    assert "KeyboardInterrupt" not in result.stdout.str()
    assert set(Counter(str(e["name"]) for e in entries(logged)).values()) <= {1}


def test_serial_tests_last_and_alone_with_history(pytester: pytest.Pytester, logged: Path) -> None:
    pytester.makepyfile(
        test_s="""
        import pytest
        from record import record

        @pytest.mark.parametrize("n", range(16))
        def test_parallel(n):
            record("parallel", 0.05 * (n % 4))

        @pytest.mark.serial
        @pytest.mark.parametrize("n", range(3))
        def test_serial(n):
            record("serial", 0.3)
        """
    )
    for run in range(2):  # the second run has every test's duration: serial ones are long
        logged.unlink(missing_ok=True)
        pytester.runpytest_subprocess("-n", "3", "-p", "no:randomly").assert_outcomes(passed=19)
        runs = entries(logged)
        serial = [r for r in runs if r["name"] == "serial"]
        parallel = [r for r in runs if r["name"] == "parallel"]
        assert len(serial) == 3 and len(parallel) == 16
        last_parallel = max(float(r["end"]) for r in parallel)  # type: ignore[arg-type]
        assert all(float(r["start"]) >= last_parallel for r in serial), run  # type: ignore[arg-type]
        assert len({r["worker"] for r in serial}) == 1, run
        assert len({r["worker"] for r in parallel}) >= 2, run


@pytest.mark.parametrize(
    ("args", "scheduler"),
    [
        (["--dist=load"], "LoadScheduling"),
        (["--dist=loadfile"], "LoadFileScheduling"),
        (["--dist=loadscope"], "LoadScopeScheduling"),
        (["--dist=loadgroup"], "LoadGroupScheduling"),
        (["--dist=worksteal"], "WorkStealingScheduling"),
        (["-d"], "LoadScheduling"),
        (["--isolate-dist=xdist"], "LoadScheduling"),
        ([], "DurationScheduling"),
    ],
)
def test_every_dist_mode_runs_isolate_s_stacks(pytester: pytest.Pytester, args: list[str], scheduler: str) -> None:
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(helpers=HELPERS)
    pytester.makepyfile(
        test_stack="""
        import pytest
        from helpers import get, post

        @pytest.mark.parametrize("n", range(3))
        def test_service_and_database(n, isolate_service, isolate_database, isolate_worker):
            assert post(isolate_service.url + "/items", {"value": f"v{n}"})["id"] > 0
            assert isolate_database.schema.endswith(isolate_worker.run_id)

        @pytest.mark.xdist_group("g")
        @pytest.mark.serial
        def test_serial_restart(isolate_service):
            isolate_service.restart()
            assert isolate_service.is_ready()
        """
    )
    result = pytester.runpytest_subprocess("-n", "2", "-v", "-p", "no:randomly", *args)
    result.assert_outcomes(passed=4)
    result.stdout.fnmatch_lines([f"scheduling tests via {scheduler}"])
    assert leftovers(run_id_of(result)) == []


def test_dist_no_runs_in_one_process(pytester: pytest.Pytester) -> None:
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(test_x="def test_x(isolate_service, isolate_worker): assert isolate_worker.worker_id == 'main'")
    result = pytester.runpytest_subprocess("--dist=no", "-v", "-p", "no:randomly")
    result.assert_outcomes(passed=1)
    assert "scheduling tests via" not in result.stdout.str()
    assert leftovers(run_id_of(result)) == []


def test_the_durations_file_is_what_pytest_split_reads(pytester: pytest.Pytester, logged: Path) -> None:
    pytester.makepyfile(
        test_split="""
        import pytest
        from record import record

        @pytest.mark.parametrize("seconds", [0.3, 0.01, 0.02, 0.03, 0.04, 0.05])
        def test_t(seconds):
            record("t", seconds)
        """
    )
    (pytester.path / ".test_durations").write_text(json.dumps({"gone.py::test_old": 2.5}))
    args = ["-n", "2", "-p", "no:randomly", "--isolate-store-durations=.test_durations"]
    pytester.runpytest_subprocess(*args).assert_outcomes(passed=6)
    text = (pytester.path / ".test_durations").read_text()
    durations = json.loads(text)
    ids = {f"test_split.py::test_t[{s}]" for s in ("0.3", "0.01", "0.02", "0.03", "0.04", "0.05")}
    assert set(durations) == ids | {"gone.py::test_old"}
    assert durations["gone.py::test_old"] == 2.5  # merged, as pytest-split's --store-durations does
    assert 0.3 <= durations["test_split.py::test_t[0.3]"] < 5
    assert list(durations) == sorted(durations) and text.startswith('{\n    "')
    # pytest-split splits by it: the 0.3 s test alone is about half of the suite
    first = pytester.runpytest_subprocess("-p", "no:xdist", "-p", "no:randomly", "-v", "--splits", "2", "--group", "1")
    first.assert_outcomes(passed=1)
    first.stdout.fnmatch_lines(["*test_t?0.3? PASSED*"])


SPIN_AND_WAIT = """
import time
import pytest
from record import record

def spin(seconds):
    end = time.process_time() + seconds
    while time.process_time() < end:
        pass

@pytest.mark.parametrize("n", range(8))
def test_wait(n):
    record("wait", 0.3)

@pytest.mark.parametrize("n", range(12))
def test_spin(n):
    spin(0.1)
    record("spin")
"""
#: ... and tests that compute a little in a fixture, then wait (~5% CPU: they wait).
COMPUTE_THEN_WAIT = SPIN_AND_WAIT + """
@pytest.fixture
def computed():
    spin(0.02)

@pytest.mark.parametrize("n", range(4))
def test_compute_then_wait(n, computed):
    record("wait", 0.4)
"""
#: The tests of COMPUTE_THEN_WAIT that mostly wait.
WAITS = [f"test_c.py::test_wait[{n}]" for n in range(8)] + [f"test_c.py::test_compute_then_wait[{n}]" for n in range(4)]


@pytest.mark.parametrize("args", [["-n", "2"], ["-p", "no:xdist"]])
def test_each_test_s_cpu_time_is_recorded(pytester: pytest.Pytester, logged: Path, args: list[str]) -> None:
    pytester.makepyfile(test_c=COMPUTE_THEN_WAIT)
    pytester.runpytest_subprocess(*args, "-p", "no:randomly").assert_outcomes(passed=24)
    cpu = json.loads((pytester.path / ".pytest_cache/v/isolate/cpu").read_text())
    assert len(cpu) == 24
    durations = json.loads((pytester.path / ".pytest_cache/v/isolate/durations").read_text())
    assert all(cpu[f"test_c.py::test_spin[{n}]"] >= 0.09 for n in range(12)), cpu  # CPU time: load or not
    # waiting: under the scheduler's line for heavy, however busy the machine (CI's may be)
    assert all(cpu[t] < HEAVY * durations[t] for t in WAITS), [(cpu[t], durations[t]) for t in WAITS]


def test_a_busy_machine_does_not_make_a_computing_test_look_idle(pytester: pytest.Pytester, logged: Path) -> None:
    # Two busy loops on the test's CPU: a spinning test gets a third of it or so, and its
    # raw CPU time is a third of its duration. Scaled by the time its thread waited for
    # a CPU, it still shows as computing all along; a waiting test still shows as waiting,
    # also one whose setup computes a little (and waits for the CPU meanwhile): scaled phase
    # by phase, that setup would count as its whole duration, and the test as heavy.
    pytester.makepyfile(test_c=COMPUTE_THEN_WAIT)
    # All on one CPU (the inner run, as this process's child, and two busy loops), so that the
    # other CPUs stay free for the rest of the suite.
    mine = os.sched_getaffinity(0)
    one = {max(mine)}
    hog = "import time\nend = time.monotonic() + 60\nwhile time.monotonic() < end:\n    pass\n"
    hogs = [subprocess.Popen([sys.executable, "-c", hog], preexec_fn=lambda: os.sched_setaffinity(0, one))
            for _ in range(2)]  # fmt: skip
    os.sched_setaffinity(0, one)
    try:
        pytester.runpytest_subprocess("-p", "no:xdist", "-p", "no:randomly").assert_outcomes(passed=24)
    finally:
        os.sched_setaffinity(0, mine)
        for process in hogs:
            process.kill()
            process.wait()
    cpu = json.loads((pytester.path / ".pytest_cache/v/isolate/cpu").read_text())
    durations = json.loads((pytester.path / ".pytest_cache/v/isolate/durations").read_text())
    spins = [f"test_c.py::test_spin[{n}]" for n in range(12)]
    assert all(cpu[t] >= 0.6 * durations[t] for t in spins), [(cpu[t], durations[t]) for t in spins]
    assert all(cpu[t] < HEAVY * durations[t] for t in WAITS), [(cpu[t], durations[t]) for t in WAITS]


ALL_COLLECT_FIRST = """
import os
from pathlib import Path
import pytest
import tenacity

@pytest.hookimpl(tryfirst=True)  # before xdist's own, which reports the collection
def pytest_collection_finish(session):
    workers = os.environ.get("PYTEST_XDIST_WORKER_COUNT")
    if workers is None:
        return
    here = Path(os.environ["DIST_LOG"]).with_name("collected")
    here.mkdir(exist_ok=True)
    (here / os.environ["PYTEST_XDIST_WORKER"]).touch()

    @tenacity.retry(stop=tenacity.stop_after_delay(60), wait=tenacity.wait_fixed(0.02),
                    retry=tenacity.retry_if_result(lambda n: n < int(workers)))
    def arrived():
        return len(list(here.iterdir()))

    arrived()
"""


def test_cpu_heavy_tests_start_beside_the_waiting_ones(pytester: pytest.Pytester, logged: Path) -> None:
    # More workers than the cores feed heavy tests on (one per two cores): with the history
    # saying the spinning tests keep their worker busy, some worker starts on them at once
    # (as many as there are slots at most), where longest first alone would start every
    # worker on a waiting test and leave the spinning ones for last.
    slots = max(1, len(os.sched_getaffinity(0)) // 2)
    workers = slots + 3
    pytester.makeconftest(ALL_COLLECT_FIRST)  # all start together: no latecomer gets the rest
    pytester.makepyfile(test_c=SPIN_AND_WAIT.replace("range(8)", f"range({2 * workers})"))
    cache = pytester.path / ".pytest_cache/v/isolate"
    cache.mkdir(parents=True)
    waits = [f"test_c.py::test_wait[{n}]" for n in range(2 * workers)]
    spins = [f"test_c.py::test_spin[{n}]" for n in range(12)]
    (cache / "durations").write_text(json.dumps({**dict.fromkeys(waits, 0.3), **dict.fromkeys(spins, 0.1)}))
    for history in ({**dict.fromkeys(waits, 0.0), **dict.fromkeys(spins, 0.1)}, None):
        if history is None:
            (cache / "cpu").unlink()
        else:
            (cache / "cpu").write_text(json.dumps(history))
        logged.unlink(missing_ok=True)
        shutil.rmtree(logged.with_name("collected"), ignore_errors=True)  # each pass its own barrier
        # the recorded durations this run writes are not read again: each pass sets its own
        (cache / "durations").write_text(json.dumps({**dict.fromkeys(waits, 0.3), **dict.fromkeys(spins, 0.1)}))
        pytester.runpytest_subprocess("-n", str(workers), "-p", "no:randomly").assert_outcomes(passed=2 * workers + 12)
        first: dict[str, dict[str, object]] = {}
        for entry in sorted(entries(logged), key=lambda e: float(e["start"])):  # type: ignore[arg-type]
            first.setdefault(str(entry["worker"]), entry)
        starting_on_spin = sum(1 for entry in first.values() if entry["name"] == "spin")
        if history is None:
            assert starting_on_spin == 0, first  # longest first
        else:
            assert 1 <= starting_on_spin <= slots, first
