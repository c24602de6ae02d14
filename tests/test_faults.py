"""Every way a run can end, and a machine shared with another user: nothing is left
behind, and nothing is trusted that isolate did not make (native backend; the docker
versions are in test_docker.py)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
import urllib.request
from pathlib import Path

import pytest
from suite_support import (
    CONFTEST,
    HELPERS,
    Run,
    clean_env,
    needs_root,
    poll,
    signal_state,
)

from isolate._config import default_base_dir
from isolate._identity import new_run_id

SYSTEM_PYTHON = Path(f"/usr/bin/python{sys.version_info.major}.{sys.version_info.minor}")

HANG = """
import os, time
from pathlib import Path

def test_hang_a(isolate_service, isolate_redis, isolate_database):
    Path(os.environ["FAULT_DIR"], "up-" + os.environ.get("PYTEST_XDIST_WORKER", "main")).touch()
    time.sleep(300)

def test_hang_b(isolate_service, isolate_redis, isolate_database):
    Path(os.environ["FAULT_DIR"], "up-" + os.environ.get("PYTEST_XDIST_WORKER", "main")).touch()
    time.sleep(300)
"""


@pytest.fixture
def suite(pytester: pytest.Pytester) -> pytest.Pytester:
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(helpers=HELPERS, test_hang=HANG)
    return pytester


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP])
def test_a_signal_to_the_controller_ends_the_run_and_leaves_nothing(
    suite: pytest.Pytester, sig: signal.Signals
) -> None:
    run = Run(suite.path, "-n", "2", "test_hang.py")
    run.wait_up(2)
    assert run.leftovers()  # the detector sees the live run
    before = signal_state(run.proc.pid)
    run.proc.send_signal(sig)
    try:
        out = run.finish(60)
    except subprocess.TimeoutExpired:
        run.proc.send_signal(signal.SIGABRT)  # PYTHONFAULTHANDLER: every thread's stack
        pytest.fail(f"no exit after {sig.name}; signal masks before it: {before}\n{run.finish(30)}")
    assert run.proc.returncode == pytest.ExitCode.INTERRUPTED, out
    poll(run.leftovers, 15)


def test_a_sigkilled_controller_is_reaped_by_the_watchdog(suite: pytest.Pytester) -> None:
    run = Run(suite.path, "-n", "2", "test_hang.py")
    run.wait_up(2)
    run.proc.send_signal(signal.SIGKILL)
    run.finish(30)
    started = time.monotonic()
    poll(run.leftovers, 10)  # workers, services, Valkey, PostgreSQL and the run dir
    assert time.monotonic() - started < 10


CHURN = """
import os, signal
from pathlib import Path
import pytest

@pytest.mark.parametrize("n", range(4))
def test_churn(n, isolate_service):
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a worker that will not stop when asked
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    Path(os.environ["FAULT_DIR"], "up-" + os.environ.get("PYTEST_XDIST_WORKER", "main")).touch()
    while True:  # a new service process every moment, until the run is reaped
        isolate_service.restart()
"""


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_workers_still_starting_processes_when_the_run_is_reaped_leave_nothing(
    suite: pytest.Pytester, sig: signal.Signals
) -> None:
    """Workers that ignore SIGTERM and SIGINT and keep starting processes while the
    controller (or, after SIGKILL, the watchdog) reaps: they are frozen before the pass,
    what they spawned is stopped with them, and no start happens after it."""
    suite.makepyfile(test_churn=CHURN)
    for _ in range(2):
        shutil.rmtree(suite.path / "fault", ignore_errors=True)
        run = Run(suite.path, "-n", "2", "--isolate-stop-timeout=3", "test_churn.py")
        run.wait_up(2)
        run.proc.send_signal(sig)
        run.finish(90)
        poll(run.leftovers, 30)


@pytest.mark.parametrize(
    ("module", "runner", "start"),
    [("isolate._postgres.native", "NativePostgresRunner", "postgres"),
     ("isolate._redis.native", "NativeRedisRunner", "redis")],
    ids=["postgres", "valkey"],
)  # fmt: skip
def test_a_worker_killed_while_a_server_starts_leaves_nothing(
    suite: pytest.Pytester, module: str, runner: str, start: str
) -> None:
    """Servers are registered when spawned, not when ready: a worker SIGKILLed in
    between leaves nothing once the run ends."""
    suite.makepyfile(
        test_die=f"""
        import os, signal
        import {module} as native

        real = native.{runner}._spawned

        def spawned_then_die(self, proc, lease):
            real(self, proc, lease)
            os.kill(os.getpid(), signal.SIGKILL)  # before the server is ready

        def test_die(monkeypatch, isolate_stack):
            monkeypatch.setattr(native.{runner}, "_spawned", spawned_then_die)
            isolate_stack.{start}()
        """
    )
    run = Run(suite.path, "-n", "1", "test_die.py")
    out = run.finish()
    assert "crashed" in out or "worker" in out.lower(), out
    poll(run.leftovers, 15)


@pytest.mark.parametrize("piece", ["valkey", "service"])
def test_a_worker_killed_before_it_registered_what_it_spawned_leaves_nothing(
    suite: pytest.Pytester, piece: str
) -> None:
    """The narrowest window: the worker dies after spawning its Valkey (or its service)
    and before writing it to the registry, so no reaper knows of it. A worker's own
    processes die with it (PR_SET_PDEATHSIG) when nothing may keep them up."""
    if piece == "valkey":
        body = """
        def spawned_then_die(self, proc, lease):
            os.kill(os.getpid(), signal.SIGKILL)  # spawned, not registered

        def test_die(monkeypatch, isolate_stack):
            monkeypatch.setattr(native.NativeRedisRunner, "_spawned", spawned_then_die)
            isolate_stack.redis()
        """
        module = "isolate._redis.native"
    else:
        body = """
        real = native.ProcessLauncher.launch

        def launch_then_die(self):
            real(self)
            os.kill(os.getpid(), signal.SIGKILL)  # spawned, not registered

        def test_die(monkeypatch, isolate_stack, isolate_service_spec):
            monkeypatch.setattr(native.ProcessLauncher, "launch", launch_then_die)
            isolate_stack.service(isolate_service_spec)
        """
        module = "isolate._service.native"
    suite.makepyfile(test_die=f"import os, signal\nimport {module} as native\n" + textwrap.dedent(body))
    run = Run(suite.path, "-n", "1", "--max-worker-restart=0", "test_die.py")
    out = run.finish()
    assert "crashed" in out or "worker" in out.lower(), out
    poll(run.leftovers, 15)


def test_a_pytest_timeout_kill_leaves_nothing(suite: pytest.Pytester) -> None:
    """pytest-timeout's thread method ends the worker with os._exit: no finalizer runs."""
    suite.makepyfile(
        test_slow="""
        import time

        def test_slow(isolate_service, isolate_redis, isolate_database):
            time.sleep(60)
        """
    )
    run = Run(suite.path, "-n", "2", "--timeout=3", "--timeout-method=thread", "test_slow.py")
    out = run.finish()
    assert "crashed while running 'test_slow.py::test_slow'" in out, out  # os._exit by the timeout
    poll(run.leftovers, 15)


def test_a_failed_shared_start_is_one_error_everywhere(suite: pytest.Pytester) -> None:
    suite.makepyfile(
        test_db="""
        import pytest

        @pytest.mark.parametrize("n", range(4))
        def test_db(n, isolate_database):
            pass
        """
    )
    run = Run(suite.path, "-n", "2", "test_db.py", "--isolate-pg-settings=shared_buffers=lots")
    out = run.finish()
    assert run.proc.returncode == pytest.ExitCode.TESTS_FAILED, out
    assert "4 errors" in out, out
    assert "FileExistsError" not in out
    # The first worker's error (PostgreSQL's own words), and the same cause in every other.
    assert "shared_buffers" in out and "PostgreSQL exited during start-up" in out
    assert "postgres failed to start in worker" in out
    poll(run.leftovers, 15)


def test_a_cut_left_by_a_failing_test_is_restored(suite: pytest.Pytester) -> None:
    suite.makepyfile(
        test_cut="""
        import psycopg, pytest, redis

        def test_1_cuts_and_fails(isolate_database, isolate_redis):
            isolate_database.cut()
            isolate_redis.cut()
            assert False, "fails with both cut"

        def test_2_is_not_cut(isolate_database, isolate_redis):
            with isolate_database.connect() as conn:
                assert conn.execute("SELECT 1").fetchone() == (1,)
            assert isolate_redis.client().ping()

        def test_3_context_managers(isolate_database, isolate_redis):
            with isolate_database.cut(), isolate_redis.cut():
                with pytest.raises(psycopg.OperationalError):
                    isolate_database.connect()
                with pytest.raises(redis.RedisError):
                    isolate_redis.client(socket_timeout=2).ping()
            with isolate_database.connect() as conn:
                assert conn.execute("SELECT 1").fetchone() == (1,)
            assert isolate_redis.client().ping()
        """
    )
    run = Run(suite.path, "-p", "no:xdist", "test_cut.py")
    out = run.finish()
    assert "1 failed, 2 passed" in out, out


# -- a machine shared with another user ------------------------------------------------


def as_nobody(script: str) -> None:
    subprocess.run(["su", "nobody", "-s", "/bin/sh", "-c", script], check=True, timeout=30)


@needs_root
def test_files_planted_by_another_user_are_never_trusted(suite: pytest.Pytester, tmp_path: Path) -> None:
    # A base dir of the test's own, world-writable and sticky like /dev/shm: in the shared
    # one, another test's run as nobody (test_two_users) would reap the planted runs as its
    # own stale ones, which they are, as far as nobody is concerned.
    base = Path(tempfile.mkdtemp(prefix="isolate-test-base-", dir=default_base_dir()))
    os.chmod(base, 0o1777)
    victim_dir = tmp_path / "root-only"
    victim_dir.mkdir(mode=0o700)
    (victim_dir / "keep").write_text("root's")
    victim = subprocess.Popen(["sleep", "300"], start_new_session=True)
    ticks = Path(f"/proc/{victim.pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    tag = new_run_id()
    planted = [base / f"isolate-run-pl{tag}", base / f"isolate-run-pm{tag}"]
    record = {"name": "x", "pid": victim.pid, "start_ticks": int(ticks), "paths": [str(victim_dir)]}
    try:
        # A stale-looking run naming root's process and dir, and one with owner.json {}.
        as_nobody(
            f"mkdir -p {planted[0]}/registry {planted[1]} && "
            f"echo '{json.dumps({'pid': dead.pid, 'start_ticks': 1})}' > {planted[0]}/owner.json && "
            f"echo '{json.dumps(record)}' > {planted[0]}/registry/x.json && "
            f"echo '{{}}' > {planted[1]}/owner.json"
        )
        suite.makepyfile(test_x="def test_x(isolate_service): pass")
        result = suite.runpytest_subprocess("-p", "no:xdist", f"--isolate-base-dir={base}", "test_x.py")
        result.assert_outcomes(passed=1)
        assert "INTERNALERROR" not in result.stdout.str()
        assert victim.poll() is None  # not signalled
        assert (victim_dir / "keep").read_text() == "root's"  # not removed
        assert all(p.exists() for p in planted)  # not ours to remove either
    finally:
        victim.kill()
        victim.wait()
        shutil.rmtree(base, ignore_errors=True)


@needs_root
def test_a_lease_dir_planted_by_another_user_is_not_used() -> None:
    """$TMPDIR/isolate-ports made by someone else (not sticky): leases go to a private dir."""
    tmp = Path(tempfile.mkdtemp(prefix="isolate-test-tmp-", dir="/tmp"))
    os.chmod(tmp, 0o1777)
    request_cleanup = tmp
    as_nobody(f"mkdir -m 0777 {tmp}/isolate-ports")
    code = (
        "import isolate, pathlib, tempfile\n"
        "lease = isolate.reserve_port()\n"
        "print(sorted(p.name for p in pathlib.Path(tempfile.gettempdir()).iterdir()))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], env={**os.environ, "TMPDIR": str(tmp)},
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    try:
        assert done.returncode == 0, done.stderr
        assert f"isolate-ports-{os.geteuid()}" in done.stdout
        assert not list((tmp / "isolate-ports").iterdir())  # nothing written into the planted dir
    finally:
        shutil.rmtree(request_cleanup, ignore_errors=True)


def test_status_lists_runs(tmp_path: Path) -> None:
    base = tmp_path / "base"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    for name, pid in (("alive1", os.getpid()), ("stale1", dead.pid)):
        (base / f"isolate-run-{name}").mkdir(parents=True)
        (base / f"isolate-run-{name}" / "owner.json").write_text(
            json.dumps({"pid": pid, "start_ticks": None, "backend": "native", "created": time.time()})
        )
    done = subprocess.run(
        [sys.executable, "-m", "isolate", "status", "--base-dir", str(base)],
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    lines = done.stdout.splitlines()
    assert lines[0].split() == ["RUN", "STATE", "OWNER", "BACKEND", "AGE", "DIR"]
    assert lines[1].split()[:4] == ["alive1", "alive", str(os.getpid()), "native"]
    assert lines[2].split()[:4] == ["stale1", "stale", str(dead.pid), "native"]


def test_a_bad_migration_is_shown_once_per_worker(suite: pytest.Pytester) -> None:
    (suite.path / "bad").mkdir()
    (suite.path / "bad" / "1.sql").write_text("CREATE TABLE broken (id serial PRIMARY KEY,);")
    suite.makeconftest(CONFTEST.replace(str(Path(__file__).parent / "fixture_app" / "migrations"), "bad"))
    suite.makepyfile(
        test_db="""
        import pytest

        @pytest.mark.parametrize("n", range(20))
        def test_db(n, isolate_database):
            pass
        """
    )
    run = Run(suite.path, "-n", "2", "test_db.py")
    out = run.finish()
    assert "20 errors" in out, out
    full = out.count("fix: fix the SQL")
    assert 1 <= full <= 4, out  # in full at each worker's first error...
    assert out.count("(in full at this worker's first error)") >= 20 - full, out  # ...then one line
    assert len(out.splitlines()) < 150 * full + 10 * 20, out
    poll(run.leftovers, 15)


def test_replaced_workers_get_a_working_stack_and_their_predecessors_leftovers_go(
    suite: pytest.Pytester,
) -> None:
    """--max-worker-restart: 17 workers crash in turn (more than the 16 logical Redis DBs
    of the shared mode); each successor gets a Redis DB, and the dead worker's service
    is stopped when its successor starts, not at the end of the run."""
    suite.makepyfile(
        test_crash="""
        import os, signal
        from pathlib import Path
        import pytest

        @pytest.mark.parametrize("n", range(17))
        def test_crash(n, isolate_redis, isolate_redis_client, isolate_service):
            pids = Path(os.environ["FAULT_DIR"], "service-pids")
            for line in pids.read_text().split() if pids.exists() else ():
                assert not Path(f"/proc/{line}").exists() or Path(f"/proc/{line}/stat").read_text().split(") ")[1][0] == "Z"
            assert isolate_redis_client.dbsize() == 0  # nothing of the dead predecessor's
            isolate_redis_client.set("mine", "1")
            with pids.open("a") as fh:
                fh.write(f"{isolate_service.pid}\\n")
            os.kill(os.getpid(), signal.SIGKILL)
        """
    )
    run = Run(suite.path, "-n", "1", "--max-worker-restart=20", "--isolate-redis-mode=shared", "test_crash.py")
    pids = run.fault_dir / "service-pids"
    steps = 0
    while run.proc.poll() is None and steps < 17:  # a budget per crash, not one for the chain
        def advanced(seen: int = steps) -> bool:
            return run.proc.poll() is not None or (pids.exists() and len(pids.read_text().split()) > seen)

        poll(advanced, 120)
        steps = len(pids.read_text().split()) if pids.exists() else steps
    out = run.finish(120)
    assert "17 failed" in out, out  # each test crashed its worker...
    assert "AssertionError" not in out and "out of range" not in out, out  # ...and nothing else failed
    poll(run.leftovers, 15)


def test_keep_failed_leaves_the_failing_workers_stack_up_until_cleanup(suite: pytest.Pytester) -> None:
    suite.makepyfile(
        test_keep="""
        def test_fails(isolate_service, isolate_database, isolate_redis):
            assert False, "keep me"
        """
    )
    run = Run(suite.path, "-p", "no:xdist", "--isolate-keep=failed", "test_keep.py")
    out = run.finish()
    assert "1 failed" in out, out
    assert "isolate: stacks kept (--isolate-keep)" in out, out
    url = next(line.split(": ", 1)[1].split(" ")[0] for line in out.splitlines()
               if line.strip().startswith("service app-test-main:"))  # fmt: skip
    assert f"python -m isolate cleanup {run.run_id}" in out
    with urllib.request.urlopen(url + "/health", timeout=5) as resp:  # still serving
        assert resp.status == 200
    status = subprocess.run([sys.executable, "-m", "isolate", "status"], capture_output=True,
                            text=True, timeout=60, check=True).stdout  # fmt: skip
    assert any(line.split()[:2] == [run.run_id, "kept"] for line in status.splitlines()), status
    # A later run's stale-run reaper leaves a kept run alone.
    suite.makepyfile(test_x="def test_x(): pass")
    later = Run(suite.path, "-p", "no:xdist", "test_x.py")
    assert "1 passed" in later.finish()
    assert run.leftovers()
    done = subprocess.run([sys.executable, "-m", "isolate", "cleanup", run.run_id],
                          capture_output=True, text=True, timeout=120, check=False)  # fmt: skip
    assert done.returncode == 0, done.stderr
    poll(run.leftovers, 15)


def test_a_teardown_that_hangs_after_an_interruption_is_cut_short(suite: pytest.Pytester) -> None:
    """After SIGTERM, the session gets the stop timeout + 20 s to finish; a plugin that hangs
    in its teardown does not keep the job (and the run's servers) alive past that."""
    suite.makeconftest(CONFTEST + (
        "\nimport time\n"
        "@pytest.hookimpl(tryfirst=True)\n"
        "def pytest_sessionfinish(session):\n"
        "    time.sleep(300)  # a plugin stuck in its teardown\n"
    ))  # fmt: skip
    run = Run(suite.path, "-n", "2", "--isolate-stop-timeout=1", "test_hang.py")
    run.wait_up(2)
    run.proc.send_signal(signal.SIGTERM)
    out = run.finish(60)
    assert run.proc.returncode == pytest.ExitCode.INTERRUPTED, out
    assert "did not end within 21s of the interruption" in out
    poll(run.leftovers, 15)


def test_a_run_id_a_live_run_uses_is_refused(suite: pytest.Pytester) -> None:
    """A second run given the live run's id stops with a clear error and touches nothing
    of the live run."""
    first = Run(suite.path, "-n", "1", "test_hang.py")
    first.wait_up(1)
    running = first.leftovers()
    try:
        second = subprocess.run(
            [sys.executable, "-m", "pytest", "-p", "no:randomly", "-p", "no:cacheprovider", "test_hang.py"],
            cwd=suite.path, env=clean_env(ISOLATE_RUN_ID=first.run_id), capture_output=True, text=True,
            timeout=120, check=False,
        )  # fmt: skip
        out = second.stdout + second.stderr
        assert second.returncode == pytest.ExitCode.USAGE_ERROR, out
        assert f"run id {first.run_id} is in use by a live run (pid {first.proc.pid})" in out, out
        assert "--isolate-run-id" in out
        assert set(first.leftovers()) >= set(running)  # nothing of the live run touched
    finally:
        first.proc.send_signal(signal.SIGTERM)
        first.finish(60)
    poll(first.leftovers, 15)


CACHED = """
import os
from pathlib import Path
from tenacity import Retrying, stop_after_delay, wait_fixed

def test_cached(isolate_redis, isolate_database):
    Path(os.environ["FAULT_DIR"], "up").touch()
    for attempt in Retrying(stop=stop_after_delay(120), wait=wait_fixed(0.1), reraise=True):
        with attempt:
            assert Path(os.environ["FAULT_DIR"], "go").exists()
    assert isolate_redis.client().ping()
"""


@needs_root
def test_cleanup_caches_keeps_what_a_live_run_uses(suite: pytest.Pytester) -> None:
    """``cleanup --caches`` during a run: the binary copy its Valkey runs from stays (the
    worker holds it), the run goes on; once the run is over, the next clean-up removes it.
    (Its own base and temp dirs: a clean-up of the shared ones would empty other tests'.)"""
    import isolate._binaries as binaries

    own = Path(tempfile.mkdtemp(prefix="isolate-test-caches-", dir=default_base_dir()))
    os.chmod(own, 0o755)  # the run-as user traverses it
    private = own / "private"  # 0700: the run-as user cannot run Valkey from here: isolate copies it
    private.mkdir(mode=0o700)
    valkey = binaries.find_redis().path
    (private / "valkey" / "bin").mkdir(parents=True)  # an install tree: <prefix>/bin/valkey-server
    private = private / "valkey" / "bin"
    shutil.copy(valkey, private / valkey.name)
    # No engine for it: with build locks in its own temp dir, it would take every image
    # other tests' runs use for unused.
    env = clean_env(TMPDIR=str(own), ISOLATE_BASE_DIR=str(own), DOCKER_HOST=f"unix://{own}/no-engine.sock")
    cleanup = [sys.executable, "-m", "isolate", "cleanup", "--caches"]
    suite.makepyfile(test_cached=CACHED)
    try:
        run = Run(suite.path, "-p", "no:xdist", f"--isolate-redis-bin={private / valkey.name}", "test_cached.py",
                  env=env)  # fmt: skip
        run.wait_for("up")
        cleaned = subprocess.run(cleanup, env=env, capture_output=True, text=True, timeout=120, check=True).stdout
        copies = [Path(line.split()[1]) for line in cleaned.splitlines()
                  if line.startswith("kept ") and f"/{valkey.name}-" in line]  # fmt: skip
        assert copies and all(line.endswith("(a live run uses it)") for line in cleaned.splitlines()
                              if line.startswith("kept ")), cleaned  # fmt: skip
        assert all(copy.exists() for copy in copies)
        (run.fault_dir / "go").touch()
        out = run.finish()
        assert "1 passed" in out, out
        cleaned = subprocess.run(cleanup, env=env, capture_output=True, text=True, timeout=120, check=True).stdout
        assert not any(copy.exists() for copy in copies), cleaned
    finally:
        shutil.rmtree(own, ignore_errors=True)


HOLDER = r"""
import fcntl, os, resource, sys, time
shared, ready, stop, ports = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:]
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
held = []
for spec in ports:
    low, high = map(int, spec.split("-"))
    for port in range(low, high):
        fd = os.open(os.path.join(shared, f"{port}.lock"), os.O_CREAT | os.O_RDONLY, 0o644)
        fcntl.flock(fd, fcntl.LOCK_EX)
        held.append(fd)
open(ready, "w").close()
while not os.path.exists(stop):
    time.sleep(0.1)
"""


@needs_root
def test_a_lease_dir_whose_locks_another_user_holds_falls_back_to_a_private_one() -> None:
    """Another user holds the lock of every candidate port in the shared lease dir: the
    leases go to a private dir (with a warning), not to PortUnavailableError."""
    from isolate._ports import candidate_ports, ephemeral_range

    tmp_path = Path(tempfile.mkdtemp(prefix="isolate-test-ports-", dir="/tmp"))
    os.chmod(tmp_path, 0o755)
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    os.chmod(tmp, 0o1777)
    shared = tmp / "isolate-ports"  # root's, sticky and world-writable: the shared dir
    shared.mkdir()
    os.chmod(shared, 0o1777)
    (tmp_path / "holder.py").write_text(HOLDER)
    ranges = candidate_ports(ephemeral_range())
    split = [f"{r.start}-{r.stop}" for r in ranges for r in (r[: len(r) // 2], r[len(r) // 2 :])]
    halves = [split[0::2], split[1::2]]  # each holder half of every range: fds per process are limited
    ready, stop = tmp / "ready", tmp / "stop"
    holders = [subprocess.Popen(
        ["su", "nobody", "-s", "/bin/sh", "-c", f"ulimit -n $(ulimit -Hn); exec {SYSTEM_PYTHON} "
         f"{tmp_path / 'holder.py'} {shared} {ready}{i} {stop} {' '.join(half)}"],
    ) for i, half in enumerate(halves)]  # fmt: skip
    try:
        poll(lambda: all(h.poll() is None for h in holders) and all(
            Path(f"{ready}{i}").exists() for i in range(2)), 120)
        code = "import isolate, logging\nlogging.basicConfig()\nprint(isolate.reserve_port().port)\n"
        done = subprocess.run([sys.executable, "-c", code], env={**clean_env(), "TMPDIR": str(tmp)},
                              capture_output=True, text=True, timeout=120, check=False)  # fmt: skip
        assert done.returncode == 0, done.stderr
        assert "is held or owned by someone else; leasing in" in done.stderr, done.stderr
        assert f"isolate-ports-{os.geteuid()}" in done.stderr
    finally:
        stop.touch()
        for holder in holders:
            holder.wait(60)
        shutil.rmtree(tmp_path, ignore_errors=True)


@needs_root
def test_an_image_hold_another_user_keeps_locked_is_waited_for_a_bounded_time(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Another user planted an image's hold in the machine's dir and keeps it locked
    exclusively (as a clean-up does while it removes the image, but for ever): a worker
    waits :data:`HOLD_WAIT` for it, then holds the image with its own user's lock alone and
    says so; once the lock is let go, the machine-wide hold is taken again."""
    import fcntl
    import secrets

    from isolate._docker import images
    from isolate._fs import machine_dir, open_lock_file

    monkeypatch.setattr(images, "HOLD_WAIT", 0.5)
    holds = machine_dir(images.IMAGE_HOLDS)
    assert holds is not None
    tag = f"isolate-build/planted:{secrets.token_hex(6)}"
    path = holds / images._lock_name(tag)
    reachable = Path(tempfile.mkdtemp(prefix="isolate-test-holds-", dir="/tmp"))  # nobody sees it
    os.chmod(reachable, 0o755)
    stop = reachable / "stop"
    holder = subprocess.Popen(["su", "nobody", "-s", "/bin/sh", "-c",
                               f"exec flock -x {path} sh -c 'while [ ! -e {stop} ]; do sleep 0.1; done'"])  # fmt: skip

    def locked_out() -> bool:
        fd = open_lock_file(path)
        assert fd is not None
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        finally:
            os.close(fd)
        return False

    try:
        poll(lambda: holder.poll() is None and path.exists() and path.stat().st_uid != 0 and locked_out(), 30)
        with caplog.at_level("WARNING", logger="isolate._docker.images"):
            images._hold_machine_wide(tag)
        assert str(path) not in images._MACHINE_HELD
        assert f"image {tag} is held for this user's clean-ups only" in caplog.text, caplog.text
        assert "exclusively" in caplog.text
        stop.touch()
        holder.wait(30)
        images._hold_machine_wide(tag)  # the planted file, unlocked, is a lock like any other
        assert str(path) in images._MACHINE_HELD
        assert not locked_out()  # shared: other holders are welcome
    finally:
        stop.touch()
        holder.wait(30)
        images.release_image(tag)
        with contextlib.suppress(OSError):
            path.unlink()
        shutil.rmtree(reachable, ignore_errors=True)


@needs_root
def test_a_fifo_planted_as_a_lock_file_is_refused_not_waited_on() -> None:
    """Another user plants FIFOs under the names of a port's lease and an image's hold in
    the machine's shared dirs: opening one for reading would block until a writer comes,
    for ever. A lease skips that port, a hold goes on with the user's lock alone (and says
    so), and a clean-up keeps the image rather than guess; none of them waits. (Each in a
    process of its own, with a timeout: a regression fails instead of hanging the suite.)"""
    import secrets

    from isolate._docker.images import IMAGE_HOLDS, _lock_name
    from isolate._fs import machine_dir
    from isolate._ports import MACHINE_LOCK_DIR, machine_lock_dir

    holds, ports = machine_dir(IMAGE_HOLDS), machine_lock_dir(Path("/nowhere"))
    assert holds is not None and ports == MACHINE_LOCK_DIR
    tag = f"isolate-build/fifo:{secrets.token_hex(6)}"
    hold, lease = holds / _lock_name(tag), ports / "9.lock"  # port 9: never one isolate leases
    code = textwrap.dedent(f"""
        import logging, sys
        from pathlib import Path
        logging.basicConfig()
        from isolate._docker import images
        from isolate._ports import try_lease
        assert try_lease(Path({str(lease)!r})) is None, "a FIFO is no lease"
        images._hold_machine_wide({tag!r})
        assert not images._MACHINE_HELD, images._MACHINE_HELD
        with images._machine_unheld(Path({str(holds)!r}), {hold.name!r}, dry_run=False) as unheld:
            assert not unheld, "a hold that cannot be opened keeps the image"
        with images._machine_unheld(Path({str(holds)!r}), {hold.name!r}, dry_run=True) as unheld:
            assert not unheld
        print("done")
    """)
    as_nobody(f"mkfifo {hold} {lease}")
    try:
        done = subprocess.run([sys.executable, "-c", code], env=clean_env(), capture_output=True,
                              text=True, timeout=60, check=False)  # fmt: skip
        assert done.returncode == 0 and "done" in done.stdout, done.stdout + done.stderr
        assert f"image {tag} is held for this user's clean-ups only" in done.stderr, done.stderr
        assert "no lock file isolate can open" in done.stderr
        assert hold.exists() and lease.exists()  # another user's: left to them
    finally:
        as_nobody(f"rm -f {hold} {lease}")


@needs_root
def test_machine_dirs_another_user_made_are_not_trusted(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Another user made the machine's shared lock dirs first, as their own (sticky and
    world-writable, but theirs: they may unlink or swap any file in them): isolate leases
    ports and holds images without them, writes nothing there, and says once that its
    images are held for this user's clean-ups only, naming the dir and the fix. (A ``/tmp``
    of the test's own: planting in the machine's would touch every run on it.)"""
    import isolate._fs
    from isolate._docker import images
    from isolate._ports import machine_lock_dir

    tmp = Path(tempfile.mkdtemp(prefix="isolate-test-machine-", dir="/tmp"))
    os.chmod(tmp, 0o1777)
    monkeypatch.setattr(isolate._fs, "MACHINE_TMP", tmp)
    monkeypatch.setattr(isolate._fs, "_UNTRUSTED", set())
    try:
        as_nobody(f"mkdir -m 1777 {tmp}/{images.IMAGE_HOLDS} {tmp}/isolate-ports")
        with caplog.at_level("WARNING"):
            assert machine_lock_dir(Path("/elsewhere")) is None
            assert machine_lock_dir(Path("/elsewhere")) is None
        said = [r.getMessage() for r in caplog.records if "seen only by runs with this TMPDIR" in r.getMessage()]
        assert len(said) == 1, said
        assert f"{tmp}/isolate-ports is not a directory isolate can trust" in said[0]
        caplog.clear()
        with caplog.at_level("WARNING", logger="isolate._docker.images"):
            images._hold_machine_wide("isolate-build/planted-dir:1")
            images._hold_machine_wide("isolate-build/planted-dir:2")
        said = [r.getMessage() for r in caplog.records if "held for this user's clean-ups only" in r.getMessage()]
        assert len(said) == 1, said
        assert f"{tmp}/{images.IMAGE_HOLDS} is not a directory isolate can trust" in said[0]
        assert "remove it if another user made it" in said[0]
        assert not any(str(tmp) in path for path in images._MACHINE_HELD)
        assert not list((tmp / images.IMAGE_HOLDS).iterdir())  # nothing written into it
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
