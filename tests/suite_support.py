"""What the whole-run tests share: a small suite on the fixture app, and a detector
of everything a run can leave behind (not a test module)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from filelock import FileLock
from tenacity import Retrying, stop_after_delay, wait_fixed

from isolate._config import default_base_dir
from isolate._identity import new_run_id

IN_CI = os.environ.get("CI", "").strip().lower() in {"1", "true", "yes"}

#: Tests that act as another user (``su nobody``) need root. Outside CI they skip when
#: not root; in CI (which runs as root) nothing may pass by skipping, so they run, and
#: fail if CI ever loses root.
needs_root = pytest.mark.skipif(
    os.geteuid() != 0 and not IN_CI, reason="acts as another user (su nobody): needs root"
)
#: Tests that read Linux's per-thread scheduler statistics under ``/proc``: elsewhere (macOS)
#: they skip, but not in CI, which runs on Linux.
needs_proc = pytest.mark.skipif(
    not Path("/proc/thread-self/schedstat").exists() and not IN_CI, reason="reads Linux's /proc"
)


def docker_client(what: str) -> Iterator[Any]:
    """A Docker SDK client for a test module's fixture; without an engine the tests skip,
    except with ``CI=true``, where they fail (nothing may pass by skipping there)."""
    from isolate._docker.engine import engine_available

    ok, why = engine_available()
    if not ok:
        if IN_CI:
            pytest.fail(f"CI=true and {what} need a Docker engine: {why}", pytrace=False)
        pytest.skip(f"no Docker engine ({why})")
    import docker

    client = docker.from_env()
    yield client
    client.close()


def reaper_lock(tmp_path_factory: pytest.TempPathFactory) -> FileLock:
    """Serialises the tests that make orphan containers or reap them (a reaper reaps
    everyone's orphans): the same lock in every worker of the suite."""
    return FileLock(str(tmp_path_factory.getbasetemp().parent / "isolate-docker-reaper.lock"))


def signals_as_in_a_terminal() -> None:
    """``preexec_fn`` for a nested run that a test interrupts with a signal: a shell that
    starts this suite in the background makes its children ignore SIGINT, ``nohup`` makes
    them ignore SIGHUP (isolate then leaves those alone, as it should), and a thread's
    blocked signals are inherited; a user's pytest in a terminal has them at their
    defaults, unblocked."""
    interrupts = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP}
    for sig in interrupts:
        signal.signal(sig, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, interrupts)


def signal_state(pid: int) -> str:
    """The blocked, ignored and caught signal masks of ``pid`` (for a failure message)."""
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    except OSError as exc:
        return str(exc)
    return " ".join(line for line in lines if line.startswith(("SigBlk", "SigIgn", "SigCgt")))


def clean_env(**extra: str) -> dict[str, str]:
    """Environment for a nested pytest: nothing of the outer xdist worker or isolate run."""
    env = {
        k: v for k, v in os.environ.items()
        if not k.startswith(("PYTEST_XDIST", "ISOLATE_", "PYTEST_ADDOPTS", "PYTEST_CURRENT"))
    }  # fmt: skip
    env.update(extra)
    return env

HERE = Path(__file__).parent

CONFTEST = f"""
import sys
import pytest
import isolate

@pytest.fixture(scope="session")
def isolate_migrations():
    return {str(HERE / "fixture_app" / "migrations")!r}

@pytest.fixture(scope="session")
def isolate_service_spec():
    return isolate.ServiceSpec(
        name="app",
        command=[sys.executable, {str(HERE / "fixture_app" / "app.py")!r}],
        env={{"PORT": "{{port}}", "DATABASE_URL": "{{dsn}}", "REDIS_URL": "{{redis_url}}",
             "ISOLATE_RUN_ID": "{{run_id}}"}},
        ready_timeout=20, stop_timeout=5,
    )
"""

HELPERS = '''
import json, urllib.request

def post(url, payload):
    req = urllib.request.Request(url, data=json.dumps(payload).encode(), method="POST")
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.loads(resp.read())

def get(url):
    with urllib.request.urlopen(url, timeout=10) as resp:
        return json.loads(resp.read())
'''


def run_id_of(result: pytest.RunResult) -> str:
    match = re.search(r"isolate: run ([0-9a-f]{10})", result.stdout.str())
    assert match, result.stdout.str()
    return match.group(1)


def leftovers(run_id: str, mark: str | None = None, base: str | None = None) -> list[str]:
    """Processes and the run dir of a run that still exist.

    A process belongs to the run if its command line or environment names the run id
    (the watchdog, services), its environment carries ``LEFTOVER_MARK=<mark>``
    (every process the run's pytest started: workers, Valkey, services), or its working
    directory is inside the run dir (PostgreSQL, which rewrites its title and environ
    area, and Valkey). Titles are never trusted: Valkey and PostgreSQL rewrite them.
    """
    run_dir = f"{base or default_base_dir()}/isolate-run-{run_id}"
    needles = [run_id.encode(), f"ISOLATE_RUN_ID={run_id}".encode()]
    if mark:
        needles.append(f"LEFTOVER_MARK={mark}".encode())
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes()
            environ = (proc / "environ").read_bytes()
            state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
            cwd = os.readlink(proc / "cwd")
        except OSError:
            continue
        if state == "Z":
            continue
        if any(n in cmdline or n in environ for n in needles) or cwd.startswith(run_dir):
            readable = cmdline.replace(b"\0", b" ").decode(errors="replace")[:120]
            found.append(f"pid {proc.name} (cwd {cwd}): {readable}")
    if Path(run_dir).exists():
        found.append(run_dir)
    return found


def hang_report(stderr: str | bytes | None, keep: int = 6) -> str:
    """What faulthandler dumped of a hung run, short enough for a CI log: per thread, its
    header and the ``keep`` innermost frames (isolate's and the tests' own first)."""
    text = stderr.decode(errors="replace") if isinstance(stderr, bytes) else stderr or ""
    out = []
    for block in re.split(r"\n(?=(?:Thread|Current thread) 0x)", text):
        lines = block.strip().splitlines()
        if not lines or not re.match(r"(?:Thread|Current thread) 0x", lines[0]):
            continue
        frames = [line.strip() for line in lines[1:] if line.strip().startswith("File ")]
        ours = [f for f in frames if "/isolate/" in f or "test_" in f or "conftest" in f]
        shown = (ours or frames)[:keep]
        if shown:
            out.append(lines[0] + "\n  " + "\n  ".join(shown))
    return "\n".join(out) or text[-4000:]


def poll(check: object, timeout: float = 20.0) -> None:
    for attempt in Retrying(stop=stop_after_delay(timeout), wait=wait_fixed(0.1), reraise=True):
        with attempt:
            assert check() in ((), [], None, True), check()  # type: ignore[operator]


class Run:
    """A nested pytest run in a subprocess, with a marker in its environment."""

    def __init__(self, path: Path, *args: str, env: dict[str, str] | None = None) -> None:
        self.run_id = "f" + new_run_id()
        self.mark = uuid.uuid4().hex
        self.fault_dir = path / "fault"
        self.fault_dir.mkdir(exist_ok=True)
        env = {**(env or clean_env()), "ISOLATE_RUN_ID": self.run_id, "LEFTOVER_MARK": self.mark,
               "FAULT_DIR": str(self.fault_dir), "PYTHONFAULTHANDLER": "1"}  # fmt: skip
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "pytest", "-p", "no:randomly", "-p", "no:cacheprovider", *args],
            cwd=path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            preexec_fn=signals_as_in_a_terminal,
        )  # fmt: skip

    def wait_for(self, name: str) -> None:
        """Until the run's tests create ``FAULT_DIR/name`` (the run's output if it ends first)."""

        def there() -> bool:
            if self.proc.poll() is not None:
                pytest.fail(f"the run ended early:\n{self.finish(10)}")
            return (self.fault_dir / name).exists()

        poll(there, 120)

    def wait_up(self, count: int) -> None:
        def up() -> bool:
            assert self.proc.poll() is None, self.proc.communicate()[0]
            return len(list(self.fault_dir.glob("up-*"))) >= count

        poll(up, 120)

    def finish(self, timeout: float = 120) -> str:
        return self.proc.communicate(timeout=timeout)[0]

    def leftovers(self) -> list[str]:
        return leftovers(self.run_id, self.mark)
def run_objects(conn: psycopg.Connection[tuple[object, ...]], *run_ids: str) -> list[str]:
    """The roles, databases, schemas, event triggers and lease rows of runs ``run_ids`` on a
    server (of its database the connection is in, for schemas and event triggers)."""
    found = []
    for run_id in run_ids:
        like = f"isolate\\_%\\_{run_id}"
        for query in ("SELECT rolname FROM pg_roles WHERE rolname LIKE %s",
                      "SELECT datname FROM pg_database WHERE datname LIKE %s",
                      "SELECT nspname FROM pg_namespace WHERE nspname LIKE %s",
                      "SELECT evtname FROM pg_event_trigger WHERE evtname LIKE %s"):  # fmt: skip
            found += [str(name) for (name,) in conn.execute(query, (like,))]
        if conn.execute("SELECT to_regclass('isolate_run_leases')").fetchone() != (None,):
            found += [f"lease {r}" for (r,) in conn.execute("SELECT run_id FROM isolate_run_leases "
                                                           "WHERE run_id = %s", (run_id,))]  # fmt: skip
    return found
