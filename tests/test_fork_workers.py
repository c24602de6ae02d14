"""--isolate-fork-workers: xdist workers forked from a preloaded copy of the controller
must be what new interpreters are, and leave nothing behind."""

from __future__ import annotations

import json
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from suite_support import Run, clean_env, leftovers, poll, reaper_lock

#: Each process says what it is; each worker also what its conftest saw at import.
RECORDER = """
import json, os, signal, sys
from pathlib import Path

SEEN_AT_IMPORT = os.environ.get("PYTEST_XDIST_WORKER")  # a conftest may read it here

def pytest_configure(config):
    out = Path(os.environ["RECORDS"])
    if not hasattr(config, "workerinput"):
        from isolate.plugin._zygote import ZYGOTE_KEY
        zygote = config.stash.get(ZYGOTE_KEY, None)
        (out / "controller.json").write_text(json.dumps(
            {"pid": os.getpid(), "zygote_dir": str(getattr(zygote, "directory", ""))}))
        return
    name = config.workerinput["workerid"]
    (out / f"{name}.json").write_text(json.dumps({
        "pid": os.getpid(), "ppid": os.getppid(), "seen_at_import": SEEN_AT_IMPORT,
        "argv": sys.argv, "main": sys.modules["__main__"].__dict__.get("__file__"),
        "warnoptions": sys.warnoptions, "cwd": os.getcwd(),
        "stdin_is_null": os.path.samestat(os.fstat(0), os.stat(os.devnull)),
        "random": __import__("random").random(), "numpy_random": _numpy_random(),
        "sigint_ignored": signal.getsignal(signal.SIGINT) == signal.SIG_IGN, "umask": _umask(),
        "blocked": sorted(int(s) for s in signal.pthread_sigmask(signal.SIG_BLOCK, [])),
        "frozen": __import__("gc").get_freeze_count(), "cycle_collected": _cycle_collected(),
    }))


def _cycle_collected():
    import gc, weakref

    class Node:
        pass

    a, b = Node(), Node()
    a.other, b.other = b, a
    gone = weakref.ref(a)
    del a, b
    gc.collect()
    return gone() is None


def _umask():
    mask = os.umask(0o077)
    os.umask(mask)
    return mask


def _numpy_random():
    numpy_random = sys.modules.get("numpy.random")  # imported by a plugin, before the fork
    return None if numpy_random is None else float(numpy_random.random())
"""


def _records(path: Path) -> dict[str, dict[str, object]]:
    return {p.stem: json.loads(p.read_text()) for p in path.glob("*.json")}


def _assert_started_new(result: pytest.RunResult, recorded: Path, reason: str) -> None:
    """Both tests passed, the summary gives ``reason``, and the workers' parent is the controller."""
    result.assert_outcomes(passed=2)
    result.stdout.fnmatch_lines([f"isolate: xdist workers started as new interpreters: {reason}"])
    seen = _records(recorded)
    assert {w["ppid"] for n, w in seen.items() if n != "controller"} == {seen["controller"]["pid"]}


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A new dir for ``TMPDIR`` whose path leaves room for a socket's (108 bytes at most)."""
    tmp = Path(tempfile.mkdtemp(prefix="z", dir="/tmp"))
    yield tmp
    shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture
def recorded(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> Path:
    records = pytester.mkdir("records")
    monkeypatch.setenv("RECORDS", str(records))
    pytester.makeconftest(RECORDER)
    return records


@pytest.mark.parametrize("mode", ["auto", "off"])
def test_workers_are_forked_from_the_controller_and_are_what_new_interpreters_are(
    pytester: pytest.Pytester, recorded: Path, mode: str
) -> None:
    pytester.makepyfile(test_x="def test_a(): pass\ndef test_b(): pass\ndef test_c(): pass")
    result = pytester.runpytest_subprocess("-n", "2", "-p", "no:randomly", "-v", f"--isolate-fork-workers={mode}")
    result.assert_outcomes(passed=3)
    seen = _records(recorded)
    controller = seen.pop("controller")
    assert sorted(seen) == ["gw0", "gw1"]
    for name, worker in seen.items():
        # What a conftest reads at import is the worker's own: conftests are not preloaded.
        assert worker["seen_at_import"] == name
        assert worker["argv"] == ["-c"] and worker["main"] is None  # as `python -c` has them
        assert worker["cwd"] == str(pytester.path)
        assert worker["stdin_is_null"]  # execnet moved its channel off fd 0, as in a new one
        assert worker["cycle_collected"]  # the worker's own garbage is collected
        # Forked: what it inherited is frozen (its collections never walk it).
        assert (int(str(worker["frozen"])) > 1000) == (mode == "auto"), worker["frozen"]
    forked = "2 xdist workers forked from the preloaded controller"
    if mode == "auto":
        # The parent is the zygote, not the controller; it and its directory are gone.
        assert {w["ppid"] for w in seen.values()} != {controller["pid"]}
        assert len({w["ppid"] for w in seen.values()}) == 1
        result.stdout.fnmatch_lines([f"isolate: {forked}"])
        zygote_dir = Path(str(controller["zygote_dir"]))
        assert zygote_dir.name.startswith("isolate-zygote-") and not zygote_dir.exists()
        assert not Path(f"/proc/{next(iter(seen.values()))['ppid']}").exists()
    else:
        assert {w["ppid"] for w in seen.values()} == {controller["pid"]}
        assert forked not in result.stdout.str()
        assert controller["zygote_dir"] == ""


HELPER_PLUGIN = """
def check(value):
    assert value == 2  # a plugin's assert: pytest rewrites it in every process
"""


def test_a_forked_worker_rewrites_a_plugins_asserts_as_a_new_one_does(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(helperplugin=HELPER_PLUGIN, test_x="from helperplugin import check\n"
                        "def test_a(): check(3)")  # fmt: skip
    result = pytester.runpytest_subprocess("-n", "1", "-p", "no:randomly", "-p", "helperplugin", "-v")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["isolate: 1 xdist worker forked from the preloaded controller"])
    result.stdout.fnmatch_lines(["E       assert 3 == 2"])  # introspected: it was rewritten
    assert "PytestAssertRewriteWarning" not in result.stdout.str()


#: Holds xdist's workers back until the zygote has done its work ahead, then (if told)
#: changes a test file the zygote rewrote: the workers must see the new source.
WAITS_FOR_THE_ZYGOTE = """
import os
from pathlib import Path
from tenacity import Retrying, stop_after_delay, wait_fixed

def pytest_xdist_setupnodes(config, specs):
    from isolate.plugin._zygote import ZYGOTE_KEY
    log = config.stash[ZYGOTE_KEY].log
    for attempt in Retrying(stop=stop_after_delay(60), wait=wait_fixed(0.02), reraise=True):
        with attempt:
            assert "idle work done" in (log.read_text() if log.exists() else ""), "the zygote never finished its work ahead"
    if os.environ.get("CHANGE_AFTER"):
        path = Path("test_x.py")
        path.write_text(path.read_text().replace("assert 1 == 2", "assert 1 == 1"))
"""

#: A test module that reports whether its worker took its code from the zygote.
SHARED = """
import sys
from pathlib import Path

def test_shared():  # this module's code is what the zygote made from this very source
    shared = getattr(sys.modules["_pytest.assertion.rewrite"]._rewrite_test, "shared", {})
    assert "conftest.py" in " ".join(shared), sorted(shared)
    assert shared.get(__file__, (b"",))[0] == Path(__file__).read_bytes()

def test_changed():
    assert 1 == 2

def test_introspected():
    assert [1, 2] == [1, 3]
"""


@pytest.mark.parametrize("changed", [False, True])
def test_forked_workers_take_the_test_modules_the_zygote_rewrote_while_unchanged(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, changed: bool
) -> None:
    """With bytecode caches off, the zygote rewrites the conftests and test files while it
    waits, and a worker takes that code for a file whose source is still the same."""
    monkeypatch.setenv("PYTHONDONTWRITEBYTECODE", "1")
    if changed:
        monkeypatch.setenv("CHANGE_AFTER", "1")
    pytester.makeconftest("")
    pytester.makepyfile(waits=WAITS_FOR_THE_ZYGOTE, test_x=SHARED)
    result = pytester.runpytest_subprocess("-n", "2", "-p", "waits", "-p", "no:randomly", "-v", "-rA")
    # a changed file is rewritten again, from its new source
    result.assert_outcomes(passed=1, failed=2)
    result.stdout.fnmatch_lines(["*assert [[]1, 2[]] == [[]1, 3[]]*", "*At index 1 diff: 2 != 3*"])  # rewritten
    shared_failed = any(line.startswith("FAILED test_x.py::test_shared") for line in result.outlines)
    assert shared_failed == changed, result.outlines[-12:]


CRASH = """
import os
def test_crash():
    os._exit(3)
def test_a(): pass
def test_b(): pass
"""


def test_a_crashed_forked_worker_is_reported_and_replaced_by_another_forked_one(
    pytester: pytest.Pytester,
) -> None:
    pytester.makepyfile(test_crash=CRASH)
    result = pytester.runpytest_subprocess("-n", "2", "-p", "no:randomly", "-v", "--max-worker-restart=1")
    result.assert_outcomes(passed=2, failed=1)
    result.stdout.fnmatch_lines(["*worker 'gw*' crashed while running 'test_crash.py::test_crash'*"])
    result.stdout.fnmatch_lines(["isolate: 3 xdist workers forked from the preloaded controller"])


CHANGES_ENV = """
import os

def pytest_configure(config):
    if not hasattr(config, "workerinput"):  # after the fork, before the workers start
        os.environ["PYTHONWARNINGS"] = "error::UserWarning"
"""


def test_a_worker_whose_interpreter_settings_changed_starts_as_a_new_interpreter(
    pytester: pytest.Pytester, recorded: Path
) -> None:
    # A plugin loaded before the fork changes the environment after it (at configure).
    pytester.makepyfile(changes_env=CHANGES_ENV, test_x="def test_a(): pass\ndef test_b(): pass")
    result = pytester.runpytest_subprocess("-n", "2", "-p", "no:randomly", "-p", "changes_env", "-v")
    result.assert_outcomes(passed=2)
    result.stdout.fnmatch_lines([
        "isolate: 0 xdist workers forked from the preloaded controller; the others started as new "
        "interpreters: PYTHONWARNINGS changed after the controller started"
    ])  # fmt: skip
    seen = _records(recorded)
    controller = seen.pop("controller")
    for worker in seen.values():
        assert worker["ppid"] == controller["pid"]
        assert worker["warnoptions"] == ["error::UserWarning"]  # read at its start, as it must


@pytest.mark.parametrize("options", [["-O"], ["-X", "dev"], ["-W", "error::UserWarning"]])
def test_a_controller_started_with_interpreter_options_starts_new_interpreters(
    pytester: pytest.Pytester, recorded: Path, options: list[str]
) -> None:
    pytester.makepyfile(test_x="def test_a(): pass\ndef test_b(): pass")
    result = pytester.run(sys.executable, *options, "-m", "pytest", "-n", "2", "-p", "no:randomly", "-v")
    _assert_started_new(result, recorded, "the controller's interpreter was started with *")


HANG = """
import os, time
from pathlib import Path

def test_hang_a():
    Path(os.environ["FAULT_DIR"], "up-" + os.environ["PYTEST_XDIST_WORKER"]).touch()
    time.sleep(120)

def test_hang_b():
    Path(os.environ["FAULT_DIR"], "up-" + os.environ["PYTEST_XDIST_WORKER"]).touch()
    time.sleep(120)
"""


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_nothing_outlives_a_controller_killed_while_its_forked_workers_run(
    pytester: pytest.Pytester, short_tmp: Path, sig: signal.Signals
) -> None:
    pytester.makepyfile(test_hang=HANG)
    run = Run(pytester.path, "-n", "2", "test_hang.py", env={**clean_env(), "TMPDIR": str(short_tmp)})
    run.wait_up(2)
    running = leftovers(run.run_id, run.mark)
    # the controller, its zygote, two launchers and two workers at least
    assert len([p for p in running if p.startswith("pid ")]) >= 6, running
    assert len(list(short_tmp.glob("isolate-zygote-*"))) == 1
    os.kill(run.proc.pid, sig)
    run.finish(60)
    poll(run.leftovers, 60)
    poll(lambda: list(short_tmp.glob("isolate-zygote-*")), 20)  # the zygote removed its dir as it went


def test_pytest_main_called_by_a_program_starts_new_interpreters(
    pytester: pytest.Pytester, recorded: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A fork of a program that calls pytest.main() would carry the program's state.
    monkeypatch.delenv("PYTEST_XDIST_WORKER", raising=False)  # this suite's own xdist worker
    pytester.makepyfile(test_x="def test_a(): pass\ndef test_b(): pass")
    program = "import sys, pytest; sys.exit(pytest.main(['-n', '2', '-p', 'no:randomly', '-v']))"
    result = pytester.run(sys.executable, "-c", program)
    _assert_started_new(result, recorded, "pytest was called by a program (pytest.main), not started as a command")


USES_NUMPY = """
import numpy.random  # at import: a plugin's, so the zygote holds numpy's global generator
"""


def test_forked_workers_draw_different_random_numbers(pytester: pytest.Pytester, recorded: Path) -> None:
    # Workers that share a generator's state would draw the same "unique" ids.
    pytester.makepyfile(uses_numpy=USES_NUMPY, test_x="def test_a(): pass\ndef test_b(): pass")
    result = pytester.runpytest_subprocess("-n", "2", "-p", "no:randomly", "-p", "uses_numpy", "-v")
    result.assert_outcomes(passed=2)
    result.stdout.fnmatch_lines(["isolate: 2 xdist workers forked from the preloaded controller"])
    seen = _records(recorded)
    gw0, gw1 = seen["gw0"], seen["gw1"]
    assert gw0["random"] != gw1["random"]
    assert gw0["numpy_random"] is not None and gw0["numpy_random"] != gw1["numpy_random"]


SETS_UMASK = """
import os

def pytest_configure(config):
    if not hasattr(config, "workerinput"):
        os.umask(0o007)
"""


def _in_the_background() -> None:
    """As a shell starts a background job: Ctrl-C ignored; and SIGUSR2 blocked."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGUSR2])


@pytest.mark.parametrize("mode", ["auto", "off"])
def test_workers_inherit_the_signals_and_umask_a_new_interpreter_would(
    pytester: pytest.Pytester, recorded: Path, mode: str
) -> None:
    # A plugin loaded before the fork changes the controller's umask after it.
    pytester.makepyfile(sets_umask=SETS_UMASK, test_x="def test_a(): pass\ndef test_b(): pass")
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-n", "2", "-p", "no:randomly", "-p", "sets_umask", "-v",
         f"--isolate-fork-workers={mode}"],
        cwd=pytester.path, capture_output=True, text=True, timeout=120, preexec_fn=_in_the_background,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert ("2 xdist workers forked" in done.stdout) == (mode == "auto"), done.stdout
    seen = _records(recorded)
    for name in ("gw0", "gw1"):
        assert seen[name]["sigint_ignored"] is True  # Ctrl-C stays the shell's business
        assert int(signal.SIGUSR2) in seen[name]["blocked"]  # type: ignore[operator]
        assert seen[name]["umask"] == 0o007



SITECUSTOMIZE = """
import coverage
coverage.process_startup()  # measures every interpreter that starts with COVERAGE_PROCESS_START
"""


def test_forked_workers_of_a_run_measured_by_coverage_from_its_start_save_their_own_data(
    pytester: pytest.Pytester, recorded: Path
) -> None:
    # coverage.py measures the controller from its start; a fork keeps measuring, and saves
    # as its own process, what a new interpreter would have measured.
    site = pytester.mkdir("site")
    (site / "sitecustomize.py").write_text(SITECUSTOMIZE)
    (pytester.path / ".coveragerc").write_text("[run]\nparallel = true\n")
    pytester.makepyfile(test_x="def test_a():\n    x = 1\n\ndef test_b():\n    y = 2\n")
    env = {**os.environ, "COVERAGE_PROCESS_START": str(pytester.path / ".coveragerc"),
           "PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])}  # fmt: skip
    done = subprocess.run([sys.executable, "-m", "pytest", "-n", "2", "-p", "no:randomly", "-v"],
                          cwd=pytester.path, env=env, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert "isolate: 2 xdist workers forked from the preloaded controller" in done.stdout, done.stdout
    workers = {str(w["pid"]) for n, w in _records(recorded).items() if n != "controller"}
    files = {m.group(1): p for p in pytester.path.glob(".coverage.*") if (m := re.search(r"\.pid(\d+)\.", p.name))}
    assert workers <= set(files), (workers, sorted(files))  # each worker saved its own data
    import coverage

    lines: set[int] = set()
    for pid in workers:
        data = coverage.CoverageData(basename=str(files[pid]))
        data.read()
        lines |= set(data.lines(str(pytester.path / "test_x.py")) or ())
    assert {2, 5} <= lines  # both tests' bodies, measured in the workers that ran them


def test_cleanup_removes_the_directories_of_gone_zygotes_and_nothing_else(
    tmp_path_factory: pytest.TempPathFactory, short_tmp: Path
) -> None:
    # A zygote SIGKILLed with its controller cannot remove its directory: `cleanup` (and the
    # next run's start) does, if nobody listens on its socket, it is this user's, and old.
    from isolate._run.rundir import ZYGOTE_PREFIX

    tmp = short_tmp  # a socket's path must fit
    made = {}
    for name in ("gone", "alive", "young", "theirs"):
        path = made[name] = tmp / (ZYGOTE_PREFIX + name)
        path.mkdir(mode=0o700)
    with socket.socket(socket.AF_UNIX) as dead:  # bound once, by a process now gone
        dead.bind(str(made["gone"] / "sock"))
    alive = socket.socket(socket.AF_UNIX)
    alive.bind(str(made["alive"] / "sock"))
    alive.listen(1)
    os.chown(made["theirs"], pwd.getpwnam("nobody").pw_uid, -1)
    old = time.time() - 3600
    for name in ("gone", "alive", "theirs"):
        os.utime(made[name], (old, old))
    env = {**os.environ, "TMPDIR": str(tmp)}
    with reaper_lock(tmp_path_factory):  # it reaps the machine's orphan containers too
        done = subprocess.run([sys.executable, "-m", "isolate", "cleanup", "--base-dir", str(tmp)],
                              env=env, capture_output=True, text=True, timeout=120)  # fmt: skip
    alive.close()
    assert done.returncode == 0, done.stderr
    assert f"removed zygote dir {made['gone']}" in done.stdout, done.stdout
    assert sorted(p.name for p in tmp.iterdir()) == sorted(ZYGOTE_PREFIX + n for n in ("alive", "young", "theirs"))


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["tests"], ["conftest.py", "tests/conftest.py", "tests/sub/test_b.py", "tests/test_a.py"]),
        (["tests/test_a.py::test_x"], ["conftest.py", "tests/conftest.py", "tests/test_a.py"]),
        ([], ["conftest.py", "tests/conftest.py", "tests/sub/test_b.py", "tests/test_a.py"]),  # testpaths
    ],
)
def test_the_zygote_rewrites_what_a_worker_would_collect_in_its_order(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, args: list[str], expected: list[str]
) -> None:
    """Conftests from the root down first, then the test files under the run's paths as
    pytest walks them: not a helper module, not an ignored dir or a virtualenv, not
    outside the run's paths."""
    from isolate.plugin._precompile import RewrittenModules

    pytester.makeini("[pytest]\ntestpaths = tests\n")
    for name in ("conftest.py", "tests/conftest.py", "tests/test_a.py", "tests/helper.py", "tests/sub/test_b.py",
                 "tests/build/test_c.py", "tests/venv/test_d.py", "tests/.hidden/test_e.py", "other/test_f.py"):  # fmt: skip
        path = pytester.path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("def test_x():\n    assert 1\n")
    (pytester.path / "tests/venv/pyvenv.cfg").write_text("home = /usr/bin\n")
    config = pytester.parseconfig(*args)
    monkeypatch.setattr(sys, "dont_write_bytecode", True)
    ahead = RewrittenModules(config)
    while ahead.step():
        pass
    assert [Path(p).relative_to(pytester.path).as_posix() for p in ahead.code] == expected
    monkeypatch.setattr(sys, "dont_write_bytecode", False)  # pytest caches them: nothing to do ahead
    ahead = RewrittenModules(config)
    while ahead.step():
        pass
    assert ahead.code == {}


@pytest.mark.parametrize("ahead_s", [60.0, 0.0])
def test_a_request_waits_for_the_work_ahead_within_its_bound(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, ahead_s: float
) -> None:
    """A worker forked before the zygote's work ahead is done would redo the rest itself,
    beside the zygote: a request first lets the zygote finish, for up to ``AHEAD_S`` from
    the first request on."""
    from isolate.plugin import _zygote_server

    monkeypatch.setattr(_zygote_server, "AHEAD_S", ahead_s)
    steps: list[int] = []

    def idle() -> bool:
        steps.append(len(steps))
        return len(steps) < 5

    read_end, write_end = os.pipe()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        server = _zygote_server.Server(listener, read_end, tmp_path / "workers.log", idle)
        server.work_ahead()
        assert (steps, server.busy) == (([0, 1, 2, 3, 4], False) if ahead_s else ([], True))
        server.work_ahead()  # the bound counts from the first request
        assert len(steps) == (5 if ahead_s else 0)
    finally:
        listener.close()
        os.close(read_end)
        os.close(write_end)


def test_a_launcher_request_decodes_to_what_the_launcher_had() -> None:
    """The launcher's request (built without ``json``: it must start fast) carries a
    process's strings, undecodable bytes and ``=`` in values included."""
    from isolate.plugin._zygote_client import decode, encode

    env = {b"A": b"1=2", b"ODD": b"caf\xe9", b"EMPTY": b""}
    packed = encode(b"/w/d\xe9", 0o022, [13, 2], [], [b"-u", b"-c", b"import sys"], env)
    request = decode(packed[4:])
    assert int.from_bytes(packed[:4], "big") == len(packed) - 4
    assert request == {
        "cwd": os.fsdecode(b"/w/d\xe9"), "umask": 0o022, "ignored": [13, 2], "blocked": [],
        "argv": ["-u", "-c", "import sys"], "env": {"A": "1=2", "ODD": os.fsdecode(b"caf\xe9"), "EMPTY": ""},
    }  # fmt: skip
    for bad in (b"", b"isolate-zygote/1\0/\x0018\0\0\0\x000", packed[4:] + b"\0NOEQUALS", packed[4:-40]):
        with pytest.raises(ValueError, match="malformed"):
            decode(bad)


@pytest.mark.parametrize("known", [True, False])
def test_the_bootstrap_runs_the_gateway_compiled_once_and_the_rest_where_it_stands(
    monkeypatch: pytest.MonkeyPatch, known: bool
) -> None:
    """What execnet's bootstrap line receives starts with its gateway's source, which the
    zygote compiles once: the rest runs after it, in the same namespace, on its own line
    numbers; a source that does not start with it runs as sent."""
    import io
    import traceback

    from isolate.plugin._zygote_server import _bootstrap

    gateway = "GATEWAY = 1\n\ndef double(x):\n    return 2 * x\n"
    compiled = compile(gateway, "<string>", "exec", dont_inherit=True)
    rest = "RESULT = double(GATEWAY) + len(sys.argv)\nraise LookupError(RESULT)"
    sent = (gateway if known else gateway.replace("2 *", "3 *")) + "\n" + rest
    monkeypatch.setattr(sys, "stdin", io.StringIO(repr(sent) + "\n"))
    namespace: dict[str, object] = {}
    with pytest.raises(LookupError) as caught:
        _bootstrap(namespace, (gateway, compiled))
    assert namespace["RESULT"] == (2 if known else 3) + len(sys.argv)
    assert namespace["sys"] is sys
    where = traceback.extract_tb(caught.value.__traceback__)[-1]
    assert (where.filename, where.lineno) == ("<string>", sent.count("\n") + 1)
