"""Two users on one machine: root and ``nobody`` run isolate at the same time, and
neither run, its clean-up nor its caches touch the other's (native backend)."""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from suite_support import (
    CONFTEST,
    HELPERS,
    HERE,
    clean_env,
    leftovers,
    needs_root,
    reaper_lock,
    run_id_of,
)
from tenacity import Retrying, retry_if_exception_type, stop_after_delay, wait_fixed

import isolate
from isolate._identity import new_run_id
from isolate._ports import lock_dir

#: The system interpreter of the venv's Python version: a venv's own (or pyenv's)
#: interpreter may sit below root's 0700 home, out of another user's reach.
SYSTEM_PYTHON = Path(f"/usr/bin/python{sys.version_info.major}.{sys.version_info.minor}")

WAITING = """
import os, time
from pathlib import Path
from tenacity import Retrying, retry_if_exception_type, stop_after_delay, wait_fixed
from helpers import get

def wait_for_go():
    Path(os.environ["FAULT_DIR"], "up-" + os.environ["PYTEST_XDIST_WORKER"]).touch()
    for attempt in Retrying(stop=stop_after_delay(120), wait=wait_fixed(0.1), reraise=True):
        with attempt:
            assert Path(os.environ["FAULT_DIR"], "go").exists()

def test_a(isolate_service, isolate_conn, isolate_redis_client):
    wait_for_go()
    assert get(isolate_service.url + "/health")
    assert isolate_conn.execute("select 1").fetchone() == (1,)
    assert isolate_redis_client.ping()

test_b = test_a
"""


def poll(check: object, timeout: float) -> None:
    """Until ``check()`` is true; other errors than a false check end it at once."""
    for attempt in Retrying(stop=stop_after_delay(timeout), wait=wait_fixed(0.1), reraise=True,
                            retry=retry_if_exception_type(AssertionError)):  # fmt: skip
        with attempt:
            assert check()  # type: ignore[operator]


def up(proc: subprocess.Popen[str], fault: Path) -> bool:
    if proc.poll() is not None:
        raise RuntimeError(f"nobody's run ended early:\n{proc.communicate()[0]}")
    return len(list(fault.glob("up-*"))) == 2


@pytest.fixture(scope="module")
def reachable_python() -> Iterator[Path]:
    """This environment's packages (and isolate) copied where ``nobody`` can read them."""
    if not SYSTEM_PYTHON.exists():
        pytest.fail(f"{SYSTEM_PYTHON} is missing: the two-users test runs nobody's pytest with it")
    root = Path(tempfile.mkdtemp(prefix="isolate-test-site-", dir="/tmp"))
    os.chmod(root, 0o755)
    skip = shutil.ignore_patterns(
        "mypy", "mypy-*", "*__mypyc*", "pip", "pip-*", "virtualenv*", "*.pth"
    )
    shutil.copytree(
        sysconfig.get_paths()["purelib"], root, symlinks=True, ignore=skip, dirs_exist_ok=True
    )
    shutil.copytree(
        Path(isolate.__file__).parent, root / "isolate", dirs_exist_ok=True
    )  # editable installs
    shutil.copytree(HERE / "fixture_app", root / "fixture_app", dirs_exist_ok=True)
    if not (root / "async_timeout").exists():  # redis-py wants it below Python 3.11.3
        (root / "async_timeout.py").write_text("from asyncio import timeout as timeout\n")
    try:
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


@needs_root
def test_two_users_run_side_by_side(
    reachable_python: Path, pytester: pytest.Pytester, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """nobody's run is up when root runs, reaps stale runs and cleans caches; root's
    run passes, nobody's keeps working, and both leave nothing behind."""
    nobody = pwd.getpwnam("nobody")
    project = Path(tempfile.mkdtemp(prefix="isolate-test-nobody-", dir="/tmp"))
    fault = project / "fault"
    fault.mkdir()
    (project / "conftest.py").write_text(
        CONFTEST.replace(str(HERE / "fixture_app"), str(reachable_python / "fixture_app"))
    )
    (project / "helpers.py").write_text(HELPERS)
    (project / "test_wait.py").write_text(WAITING)
    for path in (project, fault, *project.iterdir()):
        os.chown(path, nobody.pw_uid, nobody.pw_gid)
    their_run, their_mark = "u" + new_run_id(), uuid.uuid4().hex
    theirs = subprocess.Popen(
        [str(SYSTEM_PYTHON), "-m", "pytest", "-n", "2", "-p", "no:randomly", "-p", "no:cacheprovider"],
        cwd=project, user=nobody.pw_uid, group=nobody.pw_gid, extra_groups=[],
        env=clean_env(PYTHONPATH=str(reachable_python), HOME=str(project), FAULT_DIR=str(fault),
                      PYTEST_DEBUG_TEMPROOT=str(project), USER="nobody", LOGNAME="nobody",
                      ISOLATE_RUN_ID=their_run, LEFTOVER_MARK=their_mark),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        poll(lambda: up(theirs, fault), 180)
        running = leftovers(their_run, their_mark)
        assert any("postgres" in p or "isolate-run" in p for p in running), running

        # root's run, its stale-run reaping and a full clean-up, while nobody's run is up
        pytester.makeconftest(CONFTEST)
        pytester.makepyfile(helpers=HELPERS, test_mine="""
            from helpers import get
            def test_mine(n, isolate_service, isolate_conn, isolate_redis_client):
                assert get(isolate_service.url + "/health")
                assert isolate_conn.execute("select 1").fetchone() == (1,)
                assert isolate_redis_client.ping()
            def pytest_generate_tests(metafunc):
                metafunc.parametrize("n", range(4))
        """)  # fmt: skip
        result = pytester.runpytest_subprocess("-n", "2", "-p", "no:randomly")
        result.assert_outcomes(passed=4)
        stale = lock_dir() / "99999.lock"  # as a crashed lease of root's leaves it
        stale.touch()
        held = [p for p in lock_dir().glob("*.lock") if p.stat().st_uid == nobody.pw_uid]
        assert held  # nobody's leases of its servers' and services' ports
        with reaper_lock(tmp_path_factory):  # it reaps the machine's orphans: not beside the tests that make them
            for args in (["cleanup"], ["cleanup", "--caches"]):
                subprocess.run([sys.executable, "-m", "isolate", *args], check=True, timeout=120,
                               env=clean_env())  # fmt: skip
        assert leftovers(run_id_of(result)) == []
        assert not stale.exists()
        assert all(p.exists() for p in held)
        assert len(leftovers(their_run, their_mark)) >= len(running)  # nothing of theirs touched

        (fault / "go").touch()
        out = theirs.communicate(timeout=180)[0]
        assert theirs.returncode == 0, out
        assert "2 passed" in out, out
        poll(lambda: leftovers(their_run, their_mark) == [], 30)
    finally:
        if theirs.poll() is None:
            theirs.kill()
            theirs.communicate()
        shutil.rmtree(project, ignore_errors=True)


DEMOTED_APP = """
import http.server, os, sys

class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200)
        self.end_headers()
        self.wfile.write(str(os.getuid()).encode())

http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), Handler).serve_forever()
"""

DEMOTION_SUITE = """
import pwd, urllib.request
import pytest
import isolate

@pytest.fixture(scope="session")
def isolate_service_spec():
    return isolate.ServiceSpec(name="who", command=[{program!r}, "app.py", "{{port}}"],
                               cwd={cwd!r}, ready_timeout=20)

def test_who(isolate_service):
    uid = int(urllib.request.urlopen(isolate_service.url, timeout=10).read())
    assert uid == {expected}  # the default run-as user, isolate's own, or root
"""


@needs_root
@pytest.mark.parametrize("mode", ["auto", "never"])
def test_services_are_demoted_when_they_can_be(pytester: pytest.Pytester, mode: str) -> None:
    """As root, a service whose program and directory the run-as user can reach runs as
    that user (``auto``, the default), or as root with ``never``."""
    app_dir = Path(tempfile.mkdtemp(prefix="isolate-test-svc-", dir="/tmp"))
    os.chmod(app_dir, 0o755)
    (app_dir / "app.py").write_text(DEMOTED_APP)
    os.chmod(app_dir / "app.py", 0o644)
    expected = 'pwd.getpwnam("isolate").pw_uid' if mode == "auto" else 0
    pytester.makepyfile(test_who=DEMOTION_SUITE.format(program=str(SYSTEM_PYTHON), cwd=str(app_dir),
                                                expected=expected))  # fmt: skip
    try:
        result = pytester.runpytest_subprocess("-p", "no:randomly", f"--isolate-demote-services={mode}")
        result.assert_outcomes(passed=1)
    finally:
        shutil.rmtree(app_dir, ignore_errors=True)


@needs_root
def test_demotion_that_cannot_happen_names_the_fix(pytester: pytest.Pytester) -> None:
    """``always`` with a program below a 0700 dir: one clear error, not a service as root."""
    private = Path(tempfile.mkdtemp(prefix="isolate-test-private-", dir="/tmp"))  # 0700
    shutil.copy(SYSTEM_PYTHON, private / "python")
    (private / "app.py").write_text(DEMOTED_APP)
    pytester.makepyfile(test_who=DEMOTION_SUITE.format(program=str(private / "python"), cwd=str(private),
                                                expected=0))  # fmt: skip
    try:
        result = pytester.runpytest_subprocess("-p", "no:randomly", "--isolate-demote-services=always")
        result.assert_outcomes(errors=1)
        out = result.stdout.str()
        assert "must run as isolate (demote_services=always), but isolate cannot reach" in out
        assert "--isolate-demote-services=auto" in out
    finally:
        shutil.rmtree(private, ignore_errors=True)


@needs_root
def test_a_wrapper_is_judged_by_what_it_runs(pytester: pytest.Pytester) -> None:
    """``sh -c "<python below a 0700 dir> app.py"``: ``sh`` is reachable, the interpreter it
    runs is not, so the service runs as root (with the warning) instead of being demoted
    and dying with ``Permission denied``."""
    private = Path(tempfile.mkdtemp(prefix="isolate-test-private-", dir="/tmp"))  # 0700
    shutil.copy(SYSTEM_PYTHON, private / "python")
    (private / "app.py").write_text(DEMOTED_APP)
    suite = DEMOTION_SUITE.format(program="/bin/sh", cwd="/tmp", expected=0).replace(  # a cwd it reaches
        '[{!r}, "app.py", "{{port}}"]'.format("/bin/sh"),
        '["/bin/sh", "-c", {!r}]'.format(f"exec {private / 'python'} {private / 'app.py'} {{port}}"),
    )
    assert "exec " in suite
    pytester.makepyfile(test_who=suite)
    try:
        result = pytester.runpytest_subprocess("-p", "no:randomly")
        result.assert_outcomes(passed=1)
    finally:
        shutil.rmtree(private, ignore_errors=True)


@needs_root
def test_a_demoted_service_that_cannot_start_says_it_was_demoted(pytester: pytest.Pytester) -> None:
    """A wrapper whose target cannot be read off (``sh -c '"$0" ...' PYTHON``) is demoted
    and dies with ``Permission denied``: the error says isolate ran it as another user and
    how to stop that."""
    private = Path(tempfile.mkdtemp(prefix="isolate-test-private-", dir="/tmp"))  # 0700
    shutil.copy(SYSTEM_PYTHON, private / "python")
    (private / "app.py").write_text(DEMOTED_APP)
    pytester.makepyfile(test_who=f"""
        import pytest
        import isolate

        @pytest.fixture(scope="session")
        def isolate_service_spec():
            return isolate.ServiceSpec(name="who", command=["/bin/sh", "-c", 'exec "$0" "$1" "$2"',
                                       {str(private / 'python')!r}, {str(private / 'app.py')!r}, "{{port}}"],
                                       cwd="/tmp", ready_timeout=20)

        def test_who(isolate_service):
            pass
    """)  # fmt: skip
    try:
        result = pytester.runpytest_subprocess("-p", "no:randomly")
        result.assert_outcomes(errors=1)
        out = result.stdout.str()
        assert "Permission denied" in out, out
        assert "isolate ran it as isolate, not as root" in out and "--isolate-demote-services=never" in out, out
    finally:
        shutil.rmtree(private, ignore_errors=True)
