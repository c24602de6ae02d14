"""Pure logic: names, ordering, templates, tuning, permissions, worker identity."""

from __future__ import annotations

import os
import shutil
import signal
import stat
import sys
import tempfile
import time
from pathlib import Path

import pytest
from suite_support import needs_proc, needs_root
from tenacity import Retrying, stop_after_delay, wait_fixed

from isolate import ConfigError, HttpCheck, ServiceSpec, TcpCheck, WorkerIdentity
from isolate._database import migration_files, schema_name
from isolate._errors import ServiceExitedError
from isolate._identity import new_run_id, worker_from_env
from isolate._postgres import PostgresServer, tuned_settings
from isolate._process import ManagedProcess, can_access
from isolate._retry import poll_until
from isolate._run.liveness import is_alive, process_start_ticks
from isolate._service.spec import placeholders, render
from isolate._timings import summarize


def test_worker_identity_from_workerinput_and_env() -> None:
    w = worker_from_env("abc", env={}, workerinput={"workerid": "gw3", "workercount": 4})
    assert (w.worker_id, w.worker_count, w.index, w.is_xdist) == ("gw3", 4, 3, True)
    w = worker_from_env("abc", env={"PYTEST_XDIST_WORKER": "gw1", "PYTEST_XDIST_WORKER_COUNT": "2"})
    assert (w.worker_id, w.worker_count) == ("gw1", 2)
    w = worker_from_env("abc", env={})
    assert (w.worker_id, w.worker_count, w.is_xdist, w.slug) == ("main", 1, False, "main")


def test_run_ids_are_distinct() -> None:
    ids = {new_run_id() for _ in range(1000)}
    assert len(ids) == 1000


def test_schema_names_unique_per_worker_and_run() -> None:
    assert schema_name("gw0", "abc123") == "isolate_gw0_abc123"
    assert schema_name("gw0", "abc123") != schema_name("gw1", "abc123")
    assert schema_name("gw0", "abc123") != schema_name("gw0", "def456")
    with pytest.raises(ConfigError):
        schema_name("gw0", "x" * 80)


def test_migration_files_in_natural_order(tmp_path: Path) -> None:
    for name in ("10_c.sql", "2_b.sql", "1_a.sql", "notes.txt"):
        (tmp_path / name).write_text("SELECT 1;")
    assert [p.name for p in migration_files(tmp_path)] == ["1_a.sql", "2_b.sql", "10_c.sql"]


def test_migration_dir_errors_name_the_fix(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="isolate-migrations"):
        migration_files(tmp_path / "missing")
    with pytest.raises(ConfigError, match=r"no \.sql files"):
        migration_files(tmp_path)


def test_tuned_settings_scale_with_workers_and_accept_overrides() -> None:
    s1 = tuned_settings(1, 20)
    s8 = tuned_settings(8, 20, {"fsync": "on", "work_mem": "8MB"})
    assert int(s8["max_connections"]) > int(s1["max_connections"])
    assert int(s8["max_connections"]) >= 8 * 20
    assert s1["fsync"] == "off" and s1["synchronous_commit"] == "off"
    assert s1["full_page_writes"] == "off" and s1["listen_addresses"] == "127.0.0.1"
    assert s8["fsync"] == "on" and s8["work_mem"] == "8MB"


def test_dsn_quotes_and_bakes_search_path() -> None:
    server = PostgresServer("127.0.0.1", 5999, "admin", "p@ss/word", "db", "PostgreSQL 18")
    dsn = server.dsn(user="r", password="x y", search_path="isolate_gw0_abc")
    assert dsn == "postgresql://r:x%20y@127.0.0.1:5999/db?options=-csearch_path%3Disolate_gw0_abc"
    assert "p%40ss%2Fword" in server.admin_dsn


def test_templates() -> None:
    assert placeholders("--port={port} {dsn}") == {"port", "dsn"}
    assert render("{{literal}} {port}", {"port": 5}) == "{literal} 5"
    with pytest.raises(ConfigError, match="needs"):
        render("{dsn}", {})


def test_service_spec_validation() -> None:
    spec = ServiceSpec("api", ["run", "--port", "{port}"], env={"DB": "{dsn}"})
    assert spec.uses() == {"port", "dsn"}
    with pytest.raises(ConfigError, match="unknown placeholder"):
        ServiceSpec("api", ["run", "{prot}"])
    with pytest.raises(ConfigError, match="is not valid"):
        ServiceSpec("Bad Name!", ["run"])
    with pytest.raises(ConfigError, match="list of arguments"):
        ServiceSpec("api", "run --port {port}")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="need a build_context"):
        ServiceSpec("api", image="api:1", dockerfile="api.Dockerfile")
    with pytest.raises(ConfigError, match="need a build_context"):
        ServiceSpec("api", build_args={"V": "1"})
    with pytest.raises(ConfigError, match="map names to strings"):
        ServiceSpec("api", build_context=".", build_args={"V": 3})  # type: ignore[dict-item]
    spec = ServiceSpec("api", build_context=".", dockerfile="/abs/api.Dockerfile", build_args={"V": "3"})
    assert (spec.dockerfile, dict(spec.build_args)) == ("/abs/api.Dockerfile", {"V": "3"})


def test_a_tcp_check_with_settle_tells_a_listener_from_a_hang_up() -> None:
    """What Docker's proxy does when nothing listens behind it: accept, then close."""
    import socket
    import threading

    stop = threading.Event()

    def hang_up(server: socket.socket) -> None:
        while not stop.is_set():
            try:
                server.accept()[0].close()
            except TimeoutError:
                continue

    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        server.settimeout(0.1)
        port = server.getsockname()[1]
        assert TcpCheck(settle=0.2)("127.0.0.1", port)  # accepted (backlog), stays open
        thread = threading.Thread(target=hang_up, args=(server,))
        thread.start()
        try:
            assert TcpCheck()("127.0.0.1", port)  # accepted is enough: fooled
            assert not TcpCheck(settle=5)("127.0.0.1", port)  # the hang-up comes before 5 s
        finally:
            stop.set()
            thread.join(10)


def test_http_check_is_false_when_nothing_listens() -> None:
    assert HttpCheck("/health")("127.0.0.1", 1) is False


def test_error_renders_context_log_tail_and_hint() -> None:
    err = ServiceExitedError("service x exited", log_tail="line1\nline2", exit_code=3)
    text = str(err)
    assert "exit_code=3" in text and "    line2" in text and "fix:" in text


def test_can_access_follows_every_parent() -> None:
    # Not tmp_path: pytest's base temp dir is 0700 itself, which is the very case checked.
    tmp_path = Path(tempfile.mkdtemp(prefix="isolate-test-"))
    locked = tmp_path / "locked"
    locked.mkdir()
    target = locked / "bin"
    target.write_text("#!/bin/sh\n")
    os.chmod(target, 0o755)
    os.chmod(tmp_path, 0o755)
    os.chmod(locked, 0o700)
    other_uid, other_gid = 65534, 65534
    assert not can_access(target, other_uid, other_gid, execute=True)
    os.chmod(locked, 0o711)
    assert can_access(target, other_uid, other_gid, execute=True)
    os.chmod(target, stat.S_IRWXU)
    assert not can_access(target, other_uid, other_gid, execute=True)
    shutil.rmtree(tmp_path)


def test_is_alive_checks_pid_reuse() -> None:
    ticks = process_start_ticks(os.getpid())
    assert is_alive(os.getpid(), ticks)
    assert not is_alive(os.getpid(), (ticks or 0) + 1)
    assert not is_alive(2**22 + 1)


def test_timing_summary() -> None:
    events = [{"phase": "redis_start", "seconds": s, "worker": "gw0"} for s in (0.1, 0.3, 0.2)]
    events.append({"phase": "postgres_start", "seconds": 1.0, "worker": "gw0"})
    summary = summarize(events)  # type: ignore[arg-type]
    assert list(summary) == ["postgres_start", "redis_start"]
    assert summary["redis_start"]["median"] == pytest.approx(0.2)
    assert summary["redis_start"]["count"] == 3


def test_worker_slug_is_sql_safe() -> None:
    assert WorkerIdentity("gw12", 16, "r").slug == "gw12"
    assert WorkerIdentity("GW-1", 2, "r").slug == "gw_1"


def test_docker_backend_without_the_extra_names_the_install_line(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import isolate._backends as backends
    from isolate import resolve_settings
    from isolate._run.rundir import RunDir

    monkeypatch.setattr(backends, "docker_installed", lambda: False)
    settings = resolve_settings({"backend": "docker"}, {}, {})
    with pytest.raises(ConfigError) as err:
        backends.make_backend("docker", settings, WorkerIdentity("main", 1, "abcd"),
                              RunDir(tmp_path, "abcd"), tmp_path)  # fmt: skip
    assert "pip install 'pytest-isolate-stacks[docker]'" in str(err.value)
    auto = resolve_settings({"backend": "auto"}, {}, {})
    assert backends.decide_backend(auto) == ("native", "auto: the docker extra is not installed")


def test_a_directory_named_docker_is_not_the_docker_extra(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import importlib.metadata
    import importlib.util

    import isolate._backends as backends

    (tmp_path / "docker").mkdir()  # like this repository's own docker/ (Dockerfiles)
    (tmp_path / "testcontainers").mkdir()
    monkeypatch.syspath_prepend(str(tmp_path))
    assert importlib.util.find_spec("docker") is not None  # what an import check would see
    real = importlib.metadata.version

    def not_installed(dist: str) -> str:
        if dist in ("docker", "testcontainers"):
            raise importlib.metadata.PackageNotFoundError(dist)
        return real(dist)

    monkeypatch.setattr(importlib.metadata, "version", not_installed)
    assert backends.docker_installed() is False


def test_ports_are_picked_outside_the_ephemeral_range(tmp_path: Path) -> None:
    from isolate._ports import candidate_ports, ephemeral_range

    assert candidate_ports((32768, 60999)) == [range(15000, 32768), range(61000, 65536)]
    assert candidate_ports((1024, 65535)) == []  # no room: the kernel chooses
    (tmp_path / "range").write_text("40000\t50000\n")
    assert ephemeral_range(tmp_path / "range") == (40000, 50000)
    assert ephemeral_range(tmp_path / "missing") == (49152, 65535)
    import isolate

    low, high = ephemeral_range()
    leases = [isolate.reserve_port() for _ in range(20)]
    try:
        assert all(not low <= lease.port <= high for lease in leases)
    finally:
        for lease in leases:
            lease.release()


@pytest.mark.parametrize(
    "data", [{}, [], "x", {"pid": "nan"}, {"pid": -1}, {"pid": 1, "start_ticks": "soon"}]
)
def test_malformed_owner_records_are_not_owners(data: object) -> None:
    from isolate._run.liveness import Owner

    assert Owner.parse(data) is None


@pytest.mark.parametrize("have_proc", [True, False], ids=["linux-proc", "psutil"])
def test_liveness_on_each_platform(monkeypatch: pytest.MonkeyPatch, have_proc: bool) -> None:
    """The /proc reader (Linux) and psutil (macOS and others), with the platform faked."""
    import subprocess
    import sys

    from isolate._run import liveness

    monkeypatch.setattr(liveness, "HAVE_PROC", have_proc)
    me = liveness.process_start_ticks(os.getpid())
    assert me is not None and liveness.is_alive(os.getpid(), me)
    assert not liveness.is_alive(os.getpid(), me + 1)  # same pid, another start: reused
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    assert not liveness.is_alive(dead.pid) and liveness.process_start_ticks(dead.pid) is None
    zombie = subprocess.Popen([sys.executable, "-c", "pass"])
    for attempt in Retrying(stop=stop_after_delay(10), wait=wait_fixed(0.02), reraise=True):
        with attempt:
            assert not liveness.is_alive(zombie.pid)  # exited, not yet reaped: a zombie
    zombie.wait()
    owner = liveness.Owner.current()
    assert owner.start_ticks == me and not owner.gone()


@needs_proc
def test_a_command_name_with_parentheses_and_spaces_does_not_shift_the_fields(tmp_path: Path) -> None:
    import subprocess

    from isolate._run import groups, liveness

    odd = tmp_path / "a) b (c d)"  # the kernel's command name: the file's, 15 bytes at most
    shutil.copy("/bin/sleep", odd)
    proc = subprocess.Popen([str(odd), "30"], start_new_session=True)
    try:
        fields = liveness.stat_fields(proc.pid)
        assert fields is not None and fields[0] in {"R", "S"} and int(fields[1]) == os.getpid()
        assert int(fields[2]) == int(fields[3]) == proc.pid  # its own group and session
        assert groups.members(proc.pid, liveness.process_start_ticks(proc.pid)) == [proc.pid]
    finally:
        proc.kill()
        proc.wait()


_GROUP_LEADER = """
import signal, subprocess, sys, time
stubborn, ready = sys.argv[1], sys.argv[2]
signal.signal(signal.SIGTERM, signal.SIG_IGN if stubborn == "leader" else lambda *a: sys.exit(0))
child = ("import signal, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN if sys.argv[1] == 'child' "
         "else lambda *a: sys.exit(0)); open(sys.argv[2], 'w').close(); time.sleep(60)")
subprocess.Popen([sys.executable, "-c", child, stubborn, ready])  # in the leader's group and session
time.sleep(60)
"""


@needs_proc
@pytest.mark.parametrize(("stubborn", "graceful"), [("none", True), ("child", False), ("leader", False)])
def test_stopping_a_group_ends_all_of_it_and_says_whether_it_ended_on_the_signal(
    tmp_path: Path, stubborn: str, graceful: bool
) -> None:
    # The leader's exit is waited for on its pidfd: a child that outlives it (ignoring
    # SIGTERM) must still be found and killed, and the stop reported as not graceful.
    import subprocess

    from isolate._run import groups

    ready = tmp_path / "ready"
    leader = subprocess.Popen([sys.executable, "-c", _GROUP_LEADER, stubborn, str(ready)], start_new_session=True)
    try:
        ticks = process_start_ticks(leader.pid)
        assert poll_until(ready.exists, 30)  # both have set how they take SIGTERM
        assert len(groups.members(leader.pid, ticks)) == 2
        assert groups.stop_group(leader.pid, ticks, signal.SIGTERM, timeout=1.0) is graceful
        assert groups.members(leader.pid, ticks) == []
        assert leader.wait(5) == (0 if stubborn != "leader" else -signal.SIGKILL)
    finally:
        leader.kill()
        leader.wait()


def _tree(top: Path) -> dict[str, tuple[int, bytes | None]]:
    """Every entry below ``top``: its mode, and a file's bytes."""
    return {
        str(p.relative_to(top)): (stat.S_IMODE(p.lstat().st_mode), p.read_bytes() if p.is_file() else None)
        for p in sorted(top.rglob("*"))
    }


def _template(top: Path) -> Path:
    (top / "base" / "1").mkdir(parents=True, mode=0o700)
    (top / "global").mkdir(mode=0o750)
    (top / "PG_VERSION").write_bytes(b"16\n")
    (top / "base" / "1" / "1259").write_bytes(os.urandom(3 << 20))  # over one copy's megabyte
    (top / "base" / "1" / "empty").touch()
    (top / "global" / "pg_control").write_bytes(b"x" * 8192)
    for path, mode in ((top / "PG_VERSION", 0o600), (top / "global" / "pg_control", 0o640)):
        path.chmod(mode)
    return top


def test_a_copied_tree_has_the_same_content_and_modes_and_a_private_top(tmp_path: Path) -> None:
    from isolate._fs import copy_tree

    src = _template(tmp_path / "src")
    copy_tree(src, tmp_path / "copy")
    assert _tree(tmp_path / "copy") == _tree(src)
    assert stat.S_IMODE((tmp_path / "copy").stat().st_mode) == 0o700
    with pytest.raises(FileExistsError):  # never into what is there
        copy_tree(src, tmp_path / "copy")


@pytest.mark.parametrize("planted", ["symlink", "fifo"])
def test_a_tree_holding_what_isolate_never_puts_there_is_not_copied(tmp_path: Path, planted: str) -> None:
    from isolate._errors import UnexpectedFileError
    from isolate._fs import copy_tree

    src = _template(tmp_path / "src")
    if planted == "symlink":
        (src / "base" / "link").symlink_to("/etc/passwd")
    else:
        os.mkfifo(src / "base" / "fifo")
    with pytest.raises(UnexpectedFileError, match="a symlink" if planted == "symlink" else "a FIFO"):
        copy_tree(src, tmp_path / "copy")


@needs_root
def test_a_tree_copied_for_another_user_is_all_theirs(tmp_path: Path) -> None:
    import pwd

    from isolate._fs import copy_tree

    nobody = pwd.getpwnam("nobody")
    src = _template(tmp_path / "src")
    copy_tree(src, tmp_path / "copy", (nobody.pw_uid, nobody.pw_gid))
    entries = [tmp_path / "copy", *(tmp_path / "copy").rglob("*")]
    assert len(entries) == len(_tree(src)) + 1
    assert {(p.lstat().st_uid, p.lstat().st_gid) for p in entries} == {(nobody.pw_uid, nobody.pw_gid)}
    assert _tree(tmp_path / "copy") == _tree(src)


def test_sizes_parse_as_powers_of_1024() -> None:
    from isolate._cache import parse_size

    assert parse_size("512MB") == 512 << 20
    assert parse_size("2G") == parse_size("2GiB") == 2 << 30
    assert parse_size("1.5gb") == 3 << 29
    assert parse_size("0") == 0
    with pytest.raises(ValueError, match="like 512MB"):
        parse_size("lots")


def test_the_cache_bound_evicts_the_least_recently_used_entry_nobody_holds(tmp_path: Path) -> None:
    """Over the bound, the oldest entries go first, but never one a process holds (in use)
    nor the one just made."""
    from isolate._cache import dir_size, evict, hold_entry, release_entry

    for age, name in enumerate(["old", "older", "oldest"]):
        (tmp_path / name).mkdir()
        (tmp_path / name / "data").write_bytes(b"x" * (1 << 20))
        (tmp_path / f"{name}.lock").touch()
        os.utime(tmp_path / f"{name}.lock", (1000 - age, 1000 - age))
    hold_entry(lambda: tmp_path, "oldest.lock")  # in use by a live run
    try:
        gone = evict(tmp_path, limit=dir_size(tmp_path / "old") + 4096, keep="old")
    finally:
        release_entry(lambda: tmp_path, "oldest.lock")
    assert gone == ["older"]  # not "oldest": it is held; not "old": just made
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == ["old", "oldest"]
    assert not (tmp_path / "older.lock").exists()
    assert evict(tmp_path, limit=0) == []  # 0: no bound


def test_a_cache_dir_another_clean_up_removed_meanwhile_has_no_entries(tmp_path: Path) -> None:
    """Two ``cleanup --caches`` at once: one removes the emptied cache dir while the other
    is about to list it. The second one used to end with a traceback (exit status 1)."""
    from isolate._cache import entries
    from isolate._cli import _clean_cache_dir

    cache = tmp_path / "isolate-cache"
    cache.mkdir()
    (cache / "entry").mkdir()
    (cache / "making.tmp-1").mkdir()
    assert [p.name for p in entries(cache)] == ["entry"]
    shutil.rmtree(cache)
    assert entries(cache) == []
    assert _clean_cache_dir(cache, dry_run=False) == ([], [])


HOLDER = """
import sys
from pathlib import Path
from isolate._cache import hold_or_make

cache, name = Path(sys.argv[1]), sys.argv[2]
entry = cache / name
hold_or_make(lambda: cache, name + ".lock", entry.exists, entry.mkdir)
(cache / f"made-by-{sys.argv[3]}").write_text(str(entry.exists()))
sys.stdin.read()  # holds the entry until its stdin closes
"""


def test_an_entry_gone_while_held_is_made_again_without_waiting_for_its_holders(tmp_path: Path) -> None:
    """A cache entry (a binary copy, an image) removed from outside while a live process
    holds it is made again by the next process at once, not after its holders end (a
    worker used to wait, for ever, on a lock that every live holder kept)."""
    import subprocess
    import sys

    def holder(tag: str) -> subprocess.Popen[str]:
        return subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path), "entry", tag],
                                stdin=subprocess.PIPE, text=True)  # fmt: skip

    first = holder("first")
    try:
        for attempt in Retrying(stop=stop_after_delay(60), wait=wait_fixed(0.05), reraise=True):
            with attempt:
                assert (tmp_path / "made-by-first").exists()
        (tmp_path / "entry").rmdir()  # docker rmi -f, rm -rf: the holder lives on
        second = holder("second")
        try:
            for attempt in Retrying(stop=stop_after_delay(60), wait=wait_fixed(0.05), reraise=True):
                with attempt:
                    assert second.poll() is None, "the second holder died"
                    assert (tmp_path / "made-by-second").exists(), "the second holder still waits"
            assert (tmp_path / "entry").is_dir()
        finally:
            second.communicate("", timeout=30)
    finally:
        first.communicate("", timeout=30)


def test_a_clean_up_removes_an_entry_under_its_lock_and_a_held_lock_survives_its_dir(tmp_path: Path) -> None:
    """What ``cleanup --caches`` removes that is not a file (an image) goes while it holds
    the entry's lock, so no process takes the entry in between; a process whose lock file
    was removed with its dir (by hand) locks the one there now."""
    import fcntl

    from isolate._cache import _locked, hold_entry, release_entry, remove_unused

    def cache() -> Path:
        return tmp_path

    seen: list[object] = []

    def remove() -> None:  # a process taking the entry now would block, not get it
        seen.append(_locked(cache, "img.lock", fcntl.LOCK_SH | fcntl.LOCK_NB))

    (tmp_path / "img.lock.make").touch()
    assert remove_unused(tmp_path, "img.lock", remove=remove)
    assert seen == [None]
    assert not (tmp_path / "img.lock").exists() and not (tmp_path / "img.lock.make").exists()

    hold_entry(cache, "img.lock")
    try:
        (tmp_path / "img.lock").unlink()  # its dir removed and made again, say
        assert remove_unused(tmp_path, "img.lock", remove=remove)  # nobody holds the new file
        hold_entry(cache, "img.lock")  # held again: this time, the file there
        assert not remove_unused(tmp_path, "img.lock", remove=remove)
    finally:
        release_entry(cache, "img.lock")
    assert remove_unused(tmp_path, "img.lock")


def test_what_ran_says_it_in_one_phrase() -> None:
    from isolate._timings import what_ran

    def ev(phase: str, worker: str) -> dict[str, object]:
        return {"phase": phase, "worker": worker, "seconds": 0.1}

    events = [ev("postgres_start", "gw0"), *(ev("postgres_wait", w) for w in ("gw0", "gw1")),
              *(ev("redis_start", w) for w in ("gw0", "gw1")),
              *(ev("service_ready", w) for w in ("gw0", "gw0", "gw0", "gw1", "gw1", "gw1")),
              ev("worker_teardown", "gw2"), ev("run_teardown", "controller")]  # fmt: skip
    assert what_ran(events, external_pg=False, external_redis=False) == "PostgreSQL, 2 Redis, 6 services on 2 workers"
    assert what_ran([ev("postgres_start", "main"), ev("postgres_wait", "main")], external_pg=True,
                    external_redis=True) == "an external PostgreSQL, an external Redis on 1 worker"  # fmt: skip
    assert what_ran([ev("worker_teardown", "gw0")], external_pg=False, external_redis=False) == ""


def test_a_migrations_callable_never_runs_in_two_threads_at_once() -> None:
    """The fresh-database pool migrates spares in a background thread while the worker
    migrates in its own: a callable (Alembic's, Django's: module-level state) runs in one
    thread at a time."""
    import threading
    import time

    from isolate._database import run_migrations

    inside, overlaps = [0], []

    def migrate(conn: object) -> None:
        inside[0] += 1
        overlaps.append(inside[0])
        time.sleep(0.05)
        inside[0] -= 1

    threads = [threading.Thread(target=run_migrations, args=(None, migrate, "x")) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert overlaps == [1, 1, 1, 1]


def test_a_throttled_check_is_asked_at_once_then_not_again_within_its_interval() -> None:
    from isolate._service.handle import _at_most_every

    asked: list[int] = []
    check = _at_most_every(3600.0, lambda: asked.append(1) is None)
    assert check() is True  # asked at once: a service that exited at start is seen at once
    assert check() is False and check() is False  # not asked again within the interval
    assert len(asked) == 1
    every_time = _at_most_every(0.0, lambda: asked.append(1) is None)
    assert every_time() and every_time() and len(asked) == 3


@needs_proc
def test_the_run_queue_clock_reads_the_calling_thread_even_after_a_fork() -> None:
    import threading

    from isolate.plugin._durations import _RunQueueClock

    def cpu_ns(clock: _RunQueueClock) -> int:  # the first field: CPU time of the task it reads
        return int(os.pread(clock._fd, 128, 0).split()[0])

    clock = _RunQueueClock()
    assert clock() >= 0.0
    end = time.thread_time() + 0.05
    while time.thread_time() < end:
        pass
    mine = cpu_ns(clock)
    assert mine >= 40_000_000  # this thread's, 50 ms spent
    other: list[int] = []
    thread = threading.Thread(target=lambda: (clock(), other.append(cpu_ns(clock))))
    thread.start()
    thread.join()
    assert other and other[0] < mine  # a new thread's, not this one's
    clock()
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            clock()
            os.write(write, str(cpu_ns(clock)).encode())
        finally:
            os._exit(0)
    os.close(write)
    child = int(os.read(read, 64) or b"-1")
    os.close(read)
    os.waitpid(pid, 0)
    assert 0 <= child < mine  # the forked child's own, not its parent's
    clock.close()


LOCAL_ENGINE = "http+docker://localhost"


@pytest.mark.parametrize(
    ("entry", "argv", "entrypoint", "setting", "engine", "why"),
    [
        ("app:main", ["python3", "-m", "app"], [], "auto", LOCAL_ENGINE, None),
        ("app:main", ["/usr/local/bin/python3.12", "app.py"], ["tini", "--"], "worker", LOCAL_ENGINE, None),
        ("app:main", ["python", "-m", "app"], ["/usr/bin/dumb-init"], "auto", LOCAL_ENGINE, None),
        (None, ["python3", "-m", "app"], [], "auto", LOCAL_ENGINE, "names no ServiceSpec.entry"),
        ("app:main", ["python3", "-m", "app"], [], "off", LOCAL_ENGINE, "--isolate-fork-server=off"),
        ("app:main", ["uvicorn", "app:api"], [], "auto", LOCAL_ENGINE, "does not run python"),
        ("app:main", ["python3-config"], [], "auto", LOCAL_ENGINE, "does not run python"),
        ("app:main", [], [], "auto", LOCAL_ENGINE, "does not run python"),
        ("app:main", ["python3", "-m", "app"], ["/entrypoint.sh"], "auto", LOCAL_ENGINE, "ENTRYPOINT"),
        ("app:main", ["python3", "-m", "app"], [], "auto", "http://10.0.0.5:2375", "not this machine's"),
    ],
)
def test_which_containers_fork_their_service(
    entry: str | None, argv: list[str], entrypoint: list[str], setting: str, engine: str, why: str | None
) -> None:
    from isolate._service.containerfork import forks_in_container

    reason = forks_in_container(entry, argv, entrypoint, setting, engine)
    assert (reason is None) if why is None else (reason is not None and why in reason), reason


def test_a_managed_process_wait_gives_its_exit_code_or_none_at_the_timeout(tmp_path: Path) -> None:
    # On Linux the wait is on the process's pidfd (Popen's own wait pauses up to 50 ms between looks).
    log = tmp_path / "p.log"
    code = "import signal, sys, time; signal.signal(signal.SIGTERM, lambda *a: sys.exit(3)); print('up', flush=True); time.sleep(60)"
    proc = ManagedProcess([sys.executable, "-c", code], log_path=log)
    proc.start()
    try:
        assert poll_until(lambda: log.exists() and "up" in log.read_text(), 30)
        assert proc.wait(0.05) is None  # still running
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 3
        assert proc.wait(0) == 3 and not proc.running  # reaped: asked again, the same
    finally:
        proc.kill()
