"""``@pytest.mark.serial``: a serial test runs while no other test of the run runs, in the
same ``pytest -n N`` run; the rest stays parallel (whole runs, timestamps across workers)."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest

RECORD = """
import json, os, time
from pathlib import Path

LOG = Path(os.environ["SERIAL_LOG"])


def record(kind):
    start = time.monotonic()
    time.sleep(0.25)
    entry = {"kind": kind, "start": start, "end": time.monotonic(),
             "worker": os.environ.get("PYTEST_XDIST_WORKER", "main")}
    with LOG.open("a") as fh:
        fh.write(json.dumps(entry) + "\\n")
"""

# Three modules (loadscope and loadfile keep a module on one worker) and a class.
SUITE = {
    "test_a": """
import pytest
from record import record

@pytest.mark.parametrize("n", range(8))
def test_parallel_a(n):
    record("parallel")

@pytest.mark.serial
@pytest.mark.parametrize("n", range(3))
def test_serial(n):
    record("serial")
""",
    "test_b": """
import pytest
from record import record

@pytest.mark.parametrize("n", range(8))
def test_parallel_b(n):
    record("parallel")
""",
    "test_c": """
import pytest
from record import record

class TestClass:
    @pytest.mark.serial
    def test_serial_in_class(self):
        record("serial")

    @pytest.mark.parametrize("n", range(3))
    def test_parallel_in_class(self, n):
        record("parallel")
""",
}


def intervals(log: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in log.read_text().splitlines()]


@pytest.mark.parametrize("dist", ["duration", "load", "loadscope", "loadfile", "loadgroup", "worksteal"])
def test_serial_tests_run_alone_and_the_rest_in_parallel(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, dist: str
) -> None:
    log = pytester.path / "log.jsonl"
    monkeypatch.setenv("SERIAL_LOG", str(log))
    pytester.makepyfile(record=RECORD, **SUITE)
    # duration: isolate's scheduler, the default without a --dist (and here without history)
    dist_args = [] if dist == "duration" else [f"--dist={dist}"]
    args = ["-n", "4", *dist_args, "-p", "randomly", "-p", "no:cacheprovider"]
    result = pytester.runpytest_subprocess(*args)
    result.assert_outcomes(passed=23)
    runs = intervals(log)
    assert len(runs) == 23
    serial = [r for r in runs if r["kind"] == "serial"]
    assert len(serial) == 4
    for one in serial:
        for other in runs:
            if other is not one:  # nothing else runs while a serial test runs
                assert other["end"] <= one["start"] or other["start"] >= one["end"], (one, other)
    # ...and the parallel part still runs in parallel: some parallel tests overlap.
    parallel = sorted((r for r in runs if r["kind"] == "parallel"), key=lambda r: r["start"])
    overlapping = sum(
        1 for a, b in itertools.pairwise(parallel) if b["start"] < a["end"]
    )
    assert overlapping >= 3, parallel
    assert len({r["worker"] for r in parallel}) >= 2


def test_serial_is_a_no_op_without_xdist(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SERIAL_LOG", str(pytester.path / "log.jsonl"))
    pytester.makepyfile(record=RECORD, **SUITE)
    result = pytester.runpytest_subprocess("-p", "no:xdist", "-p", "no:randomly", "-W", "error::pytest.PytestUnknownMarkWarning")
    result.assert_outcomes(passed=23)


def test_serial_survives_a_crashed_worker(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    """A worker that dies holding the gate (here: in a serial test) never blocks the run."""
    monkeypatch.setenv("SERIAL_LOG", str(pytester.path / "log.jsonl"))
    pytester.makepyfile(
        test_crash="""
        import os, signal, pytest

        @pytest.mark.serial
        def test_dies_alone():
            os.kill(os.getpid(), signal.SIGKILL)

        @pytest.mark.parametrize("n", range(8))
        def test_other(n):
            pass
        """
    )
    result = pytester.runpytest_subprocess("-n", "2", "--max-worker-restart=2", "-p", "no:randomly")
    result.assert_outcomes(passed=8, failed=1)


def test_the_last_parallel_tests_run_together_and_the_serial_test_after_them(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With isolate's scheduler, the worker kept for the serial tests holds a last parallel
    test it can start only once it holds the next one. It gets the serial tests as soon as
    the other workers' last tests have begun, so its own last test runs beside theirs, not
    after them, and the serial gate holds the serial test until they end. Here each of the
    two parallel tests waits for the other to begin: one run after the other would time out."""
    monkeypatch.setenv("MEET_DIR", str(pytester.path))
    pytester.makepyfile(
        test_meet="""
        import os
        from pathlib import Path

        import pytest
        from tenacity import Retrying, retry_if_exception_type, stop_after_delay, wait_fixed

        HERE = Path(os.environ["MEET_DIR"])

        @pytest.mark.parametrize("me, other", [("a", "b"), ("b", "a")])
        def test_meet(me, other):
            (HERE / f"started-{me}").touch()
            for attempt in Retrying(stop=stop_after_delay(30), wait=wait_fixed(0.01),
                                    retry=retry_if_exception_type(AssertionError), reraise=True):
                with attempt:
                    assert (HERE / f"started-{other}").exists(), f"{other} did not begin while {me} ran"
            (HERE / f"done-{me}").touch()

        @pytest.mark.serial
        def test_serial_last():
            assert (HERE / "done-a").exists() and (HERE / "done-b").exists()
        """
    )
    result = pytester.runpytest_subprocess("-n", "2", "-p", "no:randomly", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=3)
