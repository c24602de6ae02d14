"""Attacks from another local user on a root run (native backend): the attacker runs as
``nobody``, a real other uid, and races the run from start to end.

Each test starts a nested root run whose servers run as ``nobody`` (``--isolate-run-as``,
so that the attacker is the very user isolate hands directories to) and an attacker
process that keeps trying to plant symlinks and FIFOs wherever that user can write, with
the run id known (the strongest attacker: it could also read it from ``/proc``). Root's
files must come out untouched, and the run must not hang.
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from suite_support import CONFTEST, HELPERS, clean_env, leftovers, needs_root

import isolate
from isolate._identity import new_run_id

SYSTEM_PYTHON = Path(f"/usr/bin/python{sys.version_info.major}.{sys.version_info.minor}")

#: The attacker: plants symlinks to root's files under every name isolate writes and swaps
#: directories for symlinks (mode ``plant``), or drops FIFOs into the clusters that a
#: PostgreSQL of the run-as user serves from the template cache (mode ``fifo``; found in
#: /proc, as any local user can). Runs until told to stop.
ATTACKER = r'''
import json, os, sys, time

base, run_id, victim, stop_file, report, mode = sys.argv[1:7]
run = os.path.join(base, "isolate-run-" + run_id)
me = os.getuid()
tried = {"dirs": 0, "symlinks": 0, "swaps": 0, "fifos": 0}
done_swaps = set()

def mine(path):
    try:
        st = os.lstat(path)
    except OSError:
        return False
    return st.st_uid == me and (st.st_mode & 0o170000) == 0o040000

def plant(link, target):
    try:
        os.symlink(target, link)
        tried["symlinks"] += 1
    except OSError:
        pass

def swap(path, target):
    if path in done_swaps:
        return
    try:
        st = os.lstat(path)
    except OSError:
        return
    if (st.st_mode & 0o170000) != 0o040000:
        return
    try:
        os.rename(path, path + ".moved")
    except OSError:
        return
    done_swaps.add(path)
    tried["swaps"] += 1
    plant(path, target)

def candidates():
    found = [os.path.join(run, "postgres")]
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            for slug in ("main", "gw0", "gw1"):
                found.append(os.path.join(run, f"redis-{slug}-{pid}"))
    return found

def served_clusters():
    for pid in os.listdir("/proc"):
        try:
            argv = open(f"/proc/{pid}/cmdline", "rb").read().split(b"\0")
        except OSError:
            continue
        if os.path.basename(argv[0]) == b"postgres" and b"-D" in argv[:-1]:
            yield argv[argv.index(b"-D") + 1].decode()

deadline = time.monotonic() + 600
while not os.path.exists(stop_file) and time.monotonic() < deadline:
    for d in candidates() if mode == "plant" else ():
        if not mine(d):
            continue
        tried["dirs"] += 1
        for name in ("postgres.log", "redis.log", "redis.conf", "pwfile"):
            plant(os.path.join(d, name), os.path.join(victim, "secret"))
        swap(os.path.join(d, "data"), victim)
    for cluster in served_clusters() if mode == "fifo" else ():
        if cluster.startswith(os.path.join(base, "isolate-cache")) and mine(cluster):  # this run's only
            try:
                os.mkfifo(os.path.join(cluster, "planted-fifo"))
                tried["fifos"] += 1
            except OSError:
                pass
with open(report, "w") as fh:
    json.dump(tried, fh)
'''

TESTS = """
def test_stack(n, isolate_service, isolate_conn, isolate_redis_client):
    assert isolate_conn.execute("select 1").fetchone() == (1,)
    assert isolate_redis_client.ping()

def pytest_generate_tests(metafunc):
    metafunc.parametrize("n", range(4))
"""


def _snapshot(root: Path) -> dict[str, tuple[int, int, int, bytes]]:
    """Owner, group, mode and content of every file below ``root``."""
    found = {}
    for path in sorted(root.rglob("*")):
        st = path.lstat()
        content = path.read_bytes() if stat.S_ISREG(st.st_mode) else b""
        found[str(path)] = (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode), content)
    return found


@pytest.fixture
def victim() -> Iterator[Path]:
    """Root's files the attacker aims at: a 0600 secret and a pg_hba.conf."""
    root = Path(tempfile.mkdtemp(prefix="isolate-test-victim-", dir="/tmp"))
    os.chmod(root, 0o755)
    (root / "secret").write_text("root only\n")
    os.chmod(root / "secret", 0o600)
    (root / "pg_hba.conf").write_text("local all all reject\n")
    os.chmod(root / "pg_hba.conf", 0o644)
    yield root
    shutil.rmtree(root, ignore_errors=True)


class Attack:
    """A nested root run (servers as ``nobody``, a cold template cache) raced from start
    to end by the attacker as ``nobody``."""

    def __init__(self, pytester: pytest.Pytester, victim: Path, mode: str) -> None:
        self.nobody = pwd.getpwnam("nobody")
        self.work = Path(tempfile.mkdtemp(prefix="isolate-test-attack-", dir="/tmp"))
        os.chmod(self.work, 0o755)
        self.base = self.work / "base"  # a cold template cache: all of start-up is raced
        self.base.mkdir(mode=0o755)
        (self.work / "attacker.py").write_text(ATTACKER)
        os.chmod(self.work / "attacker.py", 0o644)
        os.chown(self.work, self.nobody.pw_uid, self.nobody.pw_gid)
        self.run_id, self.mark = "a" + new_run_id(), new_run_id()
        self.pytester, self.victim, self.mode = pytester, victim, mode
        pytester.makeconftest(CONFTEST)
        pytester.makepyfile(helpers=HELPERS, test_stack=TESTS)

    def run(self) -> tuple[dict[str, int], str]:
        """Run the suite under attack: what the attacker managed, and the run's output."""
        stop, report = self.work / "stop", self.work / "report.json"
        attacker = subprocess.Popen(
            [str(SYSTEM_PYTHON), str(self.work / "attacker.py"), str(self.base), self.run_id,
             str(self.victim), str(stop), str(report), self.mode],
            user=self.nobody.pw_uid, group=self.nobody.pw_gid, extra_groups=[], cwd="/",
        )  # fmt: skip
        try:
            done = subprocess.run(
                [sys.executable, "-m", "pytest", "-n", "2", "-p", "no:randomly", "-p", "no:cacheprovider",
                 f"--isolate-base-dir={self.base}", "--isolate-run-as=nobody"],
                cwd=self.pytester.path, env=clean_env(ISOLATE_RUN_ID=self.run_id, LEFTOVER_MARK=self.mark),
                capture_output=True, text=True, timeout=300, check=False,
            )  # fmt: skip
        finally:
            stop.touch()
            attacker.wait(timeout=60)
        return json.loads(report.read_text()), done.stdout + done.stderr

    def leftovers(self) -> list[str]:
        return leftovers(self.run_id, self.mark, str(self.base))

    def close(self) -> None:
        shutil.rmtree(self.work, ignore_errors=True)


@needs_root
@pytest.mark.parametrize("attempt", range(3))
def test_root_never_follows_what_the_run_as_user_plants(
    pytester: pytest.Pytester, victim: Path, attempt: int
) -> None:
    """Symlinks to root's files under every name isolate writes (logs, Valkey's config,
    initdb's password file) and the cluster dir swapped for a symlink to root's dir, raced
    as soon as a dir is ``nobody``'s: root's files keep their owner, mode and content."""
    attack = Attack(pytester, victim, "plant")
    before = _snapshot(victim)
    try:
        tried, out = attack.run()
        assert tried["dirs"] > 0, (tried, out)  # the attacker did get at the run's dirs
        assert _snapshot(victim) == before, (tried, out)
        assert "INTERNALERROR" not in out, out
        assert attack.leftovers() == []
    finally:
        attack.close()


@needs_root
def test_a_fifo_planted_in_a_template_being_built_is_refused(pytester: pytest.Pytester, victim: Path) -> None:
    """A FIFO planted in the cluster the template's private server
    serves: the template is refused with an error naming the cause, not copied (root
    would block on the FIFO forever), and the run ends and leaves nothing. The server
    serves for a fraction of a second: up to three cold runs, until the attacker hits."""
    for _ in range(3):
        attack = Attack(pytester, victim, "fifo")
        try:
            tried, out = attack.run()
            assert attack.leftovers() == []
            assert not list(attack.base.glob("isolate-cache-*/*.tmp-*")), "a refused template stays"
            if tried["fifos"]:
                break
        finally:
            attack.close()
    assert tried["fifos"] > 0, (tried, out)
    assert "will not take back" in out and "'planted-fifo' is a FIFO" in out, out
    assert "dedicated run-as user" in out, out  # the fix


PRIVATE = """
import os, stat, subprocess
from pathlib import Path

def as_nobody_can_read(path):
    done = subprocess.run(["su", "nobody", "-s", "/bin/sh", "-c", f"cat {path}"],
                          capture_output=True, timeout=30)
    return done.returncode == 0

def environ(pid):
    raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\\0")
    return dict(item.decode().split("=", 1) for item in raw if b"=" in item)

def test_private(isolate_service, isolate_conn, isolate_redis, isolate_stack):
    run = Path(isolate_stack.run_dir)
    logs = [run / "postgres.log", Path(isolate_service.launcher.log_path)]
    logs += [p for p in run.glob("redis-*.log")] if not isolate_redis.shared else []
    for log in logs:
        st = log.stat()
        assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (0, 0o600), log
        assert not as_nobody_can_read(log), log
    for directory in (log.parent for log in logs if log.parent != run):
        assert stat.S_IMODE(directory.stat().st_mode) == 0o700, directory
    env = environ(isolate_service.pid)
    assert "ISOLATE_PG_SETTINGS" not in env  # inherited: left out
    assert {k for k in env if k.startswith("ISOLATE_")} == {"ISOLATE_INSTANCE_NAME", "ISOLATE_RUN_ID"}  # set
    assert os.environ["SHARED_REDIS"] not in env.values()  # the external URL under another name
"""


@needs_root
def test_logs_and_secrets_are_out_of_other_users_reach(
    pytester: pytest.Pytester, isolate_redis: isolate.RedisServer
) -> None:
    """Logs are root's 0600 files in 0700 dirs (a demoted server or service writes them
    through the descriptor it was started with); a service inherits no ``ISOLATE_*``
    variable and no variable that holds an external server's URL."""
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(test_private=PRIVATE)
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:randomly", "-p", "no:cacheprovider",
         f"--isolate-redis-url={isolate_redis.url}", "--isolate-run-as=nobody"],
        cwd=pytester.path, capture_output=True, text=True, timeout=300, check=False,
        env=clean_env(SHARED_REDIS=isolate_redis.url, ISOLATE_PG_SETTINGS="work_mem=8MB"),
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr


OWN_USER = """
import pwd, stat, subprocess
from pathlib import Path

def test_own_user(isolate_stack, isolate_postgres, isolate_redis):
    user = pwd.getpwnam("isolate")
    assert 0 < user.pw_uid < 1000 and user.pw_shell.endswith(("nologin", "false"))
    assert not Path(user.pw_dir).exists()  # no home
    servers = [Path(isolate_stack.run_dir) / "postgres", *Path(isolate_stack.run_dir).glob("redis-*[0-9]")]
    assert len(servers) == 2
    for directory in servers:
        st = directory.stat()
        assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (user.pw_uid, 0o700), directory
        done = subprocess.run(["su", "nobody", "-s", "/bin/sh", "-c", f"ls {directory}"],
                              capture_output=True, timeout=30)
        assert done.returncode != 0  # nobody's processes are not the servers' peers
"""


@needs_root
def test_servers_run_as_a_user_of_their_own_by_default(pytester: pytest.Pytester) -> None:
    """As root, by default the servers run as ``isolate``, a system user isolate made (no
    login, no home), whose dirs no ``nobody`` process can enter."""
    pytester.makepyfile(test_own=OWN_USER)
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:randomly", "-p", "no:cacheprovider"],
        cwd=pytester.path, capture_output=True, text=True, timeout=300, check=False, env=clean_env(),
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr


FAKE_USERADD = """#!/bin/sh
# /etc/passwd's lock, held by another useradd for the first 0.5 s after the first call
first="$COUNTER.first"
[ -e "$first" ] || date +%s%N > "$first"
echo x >> "$COUNTER"
now=$(date +%s%N)
if [ $(( (now - $(cat "$first")) / 1000000 )) -lt 500 ]; then
    echo "useradd: cannot lock /etc/passwd; try again later." >&2
    exit 10
fi
exec "$REAL_USERADD" "$@"
"""


@needs_root
def test_the_run_as_user_is_made_while_another_useradd_holds_the_lock(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two runs that start at once both run useradd: the one that finds /etc/passwd
    locked tries again (with a pause) and gets the user, instead of failing the run."""
    import shutil
    import subprocess
    import uuid

    import isolate._process as process
    from isolate._retry import poll_until

    real = shutil.which("useradd") or "/usr/sbin/useradd"
    fake = tmp_path / "bin" / "useradd"
    fake.parent.mkdir()
    fake.write_text(FAKE_USERADD)
    fake.chmod(0o755)
    name = f"isot{uuid.uuid4().hex[:8]}"
    monkeypatch.setenv("PATH", f"{fake.parent}:{os.environ['PATH']}")
    monkeypatch.setenv("COUNTER", str(tmp_path / "calls"))
    monkeypatch.setenv("REAL_USERADD", real)
    monkeypatch.setattr(process, "DEDICATED_USER", name)
    try:
        entry = process._make_dedicated_user()
        assert entry.pw_name == name and entry.pw_uid != 0
        assert len((tmp_path / "calls").read_text().split()) >= 2  # it did find the lock held
    finally:  # userdel may find the lock held too (6: no such user)
        assert poll_until(
            lambda: subprocess.run(["userdel", name], capture_output=True, check=False).returncode in (0, 6), 30
        ), f"could not remove the test user {name}"
