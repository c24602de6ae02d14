"""The stack pieces, really started: shared PostgreSQL, worker schema/role, Redis, service."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
import redis
from conftest import MIGRATIONS, app_spec

import isolate
from isolate import ServiceHandle, WorkerDatabase, WorkerStack
from isolate import _ports as isolate_ports
from isolate._retry import poll_until


def post(url: str, payload: dict[str, Any]) -> dict[str, Any]:
    req = urllib.request.Request(url, data=json.dumps(payload).encode(), method="POST")
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.loads(resp.read())  # type: ignore[no-any-return]


def get(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(url, timeout=10) as resp:
        return json.loads(resp.read())  # type: ignore[no-any-return]


def test_connection_lands_in_the_worker_schema_with_migrations(
    isolate_conn: psycopg.Connection[Any], isolate_database: WorkerDatabase
) -> None:
    assert isolate_conn.execute("SELECT current_schema()").fetchone() == (isolate_database.schema,)
    versions = [r[0] for r in isolate_conn.execute("SELECT version FROM schema_version ORDER BY 1")]
    assert versions == [1, 2, 10]  # 010 ran after 002: natural order
    assert isolate_database.tables() == ["items", "schema_version"]


def test_postgres_is_tuned(isolate_postgres: isolate.PostgresServer, isolate_worker: Any) -> None:
    with psycopg.connect(isolate_postgres.admin_dsn) as conn:
        show = {
            name: conn.execute(f"SHOW {name}").fetchone()[0]  # type: ignore[index]
            for name in ("fsync", "synchronous_commit", "full_page_writes", "max_connections",
                         "listen_addresses")
        }  # fmt: skip
    assert show["fsync"] == show["synchronous_commit"] == show["full_page_writes"] == "off"
    assert show["listen_addresses"] == "127.0.0.1"
    assert int(show["max_connections"]) >= isolate_worker.worker_count * 20


def test_the_roles_isolate_makes_take_one_scram_iteration(
    isolate_postgres: isolate.PostgresServer, isolate_database: WorkerDatabase
) -> None:
    """Their passwords are 144 random bits, beyond guessing from a verifier, so the 4096
    iterations that slow guessing (~2.5 ms of CPU at every login) are left out (16+)."""
    roles = (isolate_database.role, isolate_postgres.user)
    with psycopg.connect(isolate_postgres.admin_dsn) as conn:
        rows = conn.execute("SELECT rolname, rolpassword FROM pg_authid WHERE rolname = ANY(%s)", (list(roles),))
        verifiers = {str(name): str(verifier) for name, verifier in rows.fetchall()}
        expected = "1" if conn.info.server_version >= 160000 else "4096"
    iterations = {name: v.removeprefix("SCRAM-SHA-256$").split(":")[0] for name, v in verifiers.items()}
    assert iterations == dict.fromkeys(roles, expected)
    with isolate_database.connect() as conn:  # and the role still logs in with its password
        assert conn.execute("SELECT current_user").fetchone() == (isolate_database.role,)


def test_a_native_servers_shared_memory_goes_with_its_data_dir(isolate_postgres: isolate.PostgresServer) -> None:
    """Dynamic shared memory in files of the data dir, not ``/dev/shm/PostgreSQL.*``: a
    server killed without a clean shutdown (a reaped run) leaves nothing in /dev/shm."""
    if isolate_postgres.backend != "native":
        pytest.skip("a container's /dev/shm goes with the container")  # CI runs this on native
    with psycopg.connect(isolate_postgres.admin_dsn, autocommit=True) as conn:
        assert conn.execute("SHOW dynamic_shared_memory_type").fetchone() == ("mmap",)
        assert conn.execute("SELECT count(*) FROM pg_ls_dir('pg_dynshmem')").fetchone()[0] >= 1  # type: ignore[index]


@pytest.fixture
def other_worker_db(isolate_postgres: isolate.PostgresServer) -> Iterator[WorkerDatabase]:
    """A second worker's schema and role, as another worker would have it."""
    other = WorkerDatabase.create(isolate_postgres, f"other{os.getpid()}", "t")
    other.apply_migrations(lambda conn: conn.execute("CREATE TABLE secrets (v text)"))
    yield other
    other.drop()


def test_worker_role_cannot_read_or_write_another_workers_schema(
    isolate_conn: psycopg.Connection[Any],
    isolate_database: WorkerDatabase,
    other_worker_db: WorkerDatabase,
) -> None:
    other = other_worker_db.schema
    with pytest.raises(psycopg.errors.InsufficientPrivilege):
        isolate_conn.execute(f"SELECT * FROM {other}.secrets")
    with pytest.raises(psycopg.errors.InsufficientPrivilege):
        isolate_conn.execute(f"INSERT INTO {other}.secrets VALUES ('x')")
    with pytest.raises(psycopg.errors.InsufficientPrivilege):
        isolate_conn.execute(f"CREATE TABLE {other}.intruder (v text)")
    with pytest.raises(psycopg.errors.InsufficientPrivilege):
        isolate_conn.execute("CREATE TABLE public.intruder (v text)")
    # ... and the other role cannot reach ours either.
    with other_worker_db.connect(autocommit=True) as conn, pytest.raises(
        psycopg.errors.InsufficientPrivilege
    ):
        conn.execute(f"SELECT * FROM {isolate_database.schema}.items")


def test_reset_empties_tables_but_keeps_schema_version(
    isolate_conn: psycopg.Connection[Any], isolate_database: WorkerDatabase
) -> None:
    isolate_conn.execute("INSERT INTO items (value, instance) VALUES ('a', 't'), ('b', 't')")
    isolate_database.reset()
    assert isolate_conn.execute("SELECT count(*) FROM items").fetchone() == (0,)
    assert isolate_conn.execute("SELECT count(*) FROM schema_version").fetchone() == (3,)
    row = isolate_conn.execute(
        "INSERT INTO items (value, instance) VALUES ('c', 't') RETURNING id"
    ).fetchone()
    assert row == (1,)  # identities restarted


def test_cut_makes_postgres_unavailable_to_this_worker_only(
    isolate_database: WorkerDatabase, other_worker_db: WorkerDatabase
) -> None:
    with isolate_database.connect() as conn:
        isolate_database.cut()
        try:
            with pytest.raises(psycopg.OperationalError):
                conn.execute("SELECT 1")
            with pytest.raises(psycopg.OperationalError):
                isolate_database.connect()
            with other_worker_db.connect() as other:
                assert other.execute("SELECT 1").fetchone() == (1,)
        finally:
            isolate_database.restore()
    with isolate_database.connect() as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)


def test_cut_ends_a_connection_that_was_starting_when_login_was_taken(
    isolate_postgres: isolate.PostgresServer,
) -> None:
    """A connection past its LOGIN check but not yet a session (here held there by
    ``post_auth_delay``, as a loaded machine can hold a service pool's reconnect) does not
    survive the cut: it is ended once it is a session, before cut() returns."""
    db = WorkerDatabase.create(isolate_postgres, f"starting{os.getpid()}", "t")
    result: dict[str, object] = {}
    cut_done = threading.Event()

    def connect() -> None:
        try:
            with db.connect(options="-c post_auth_delay=2") as conn:
                cut_done.wait(30)  # used after the cut, as a pool uses its connections
                result["row"] = conn.execute("SELECT 1").fetchone()
        except psycopg.OperationalError as exc:
            result["error"] = exc

    thread = threading.Thread(target=connect)
    try:
        thread.start()
        assert poll_until(lambda: _starting(isolate_postgres), 20), "the connection never got past its LOGIN check"
        db.cut()
        cut_done.set()
        thread.join(30)
        assert "error" in result, f"the starting connection survived the cut: {result}"
    finally:
        cut_done.set()
        thread.join(30)
        db.restore()
        db.drop()


def test_cut_returns_once_the_roles_sessions_have_ended(isolate_postgres: isolate.PostgresServer) -> None:
    """pg_terminate_backend only signals: a backend of a loaded machine (here a stopped
    one) is still a session after it. cut() returns once the sessions are gone, so a test
    that counts them right after a cut finds none."""
    db = WorkerDatabase.create(isolate_postgres, f"slowend{os.getpid()}", "t")
    conn = db.connect()
    backend = conn.info.backend_pid
    outcome: dict[str, object] = {}

    def cut() -> None:
        try:
            db.cut()
            outcome["done"] = True
        except Exception as exc:  # reported by the assertions below
            outcome["error"] = exc

    thread = threading.Thread(target=cut)
    os.kill(backend, signal.SIGSTOP)
    try:
        thread.start()
        assert poll_until(lambda: _pending(backend, signal.SIGTERM), 20), "cut() never terminated the session"
        thread.join(2)  # it would have returned long since, had it not waited
        assert thread.is_alive(), f"cut() returned while its terminated session still ran: {outcome}"
    finally:
        os.kill(backend, signal.SIGCONT)
        thread.join(30)
        conn.close()
    try:
        assert outcome == {"done": True}
        with psycopg.connect(isolate_postgres.admin_dsn) as admin:
            count = admin.execute("SELECT count(*) FROM pg_stat_activity WHERE usename = %s", (db.role,))
            assert count.fetchone() == (0,)
    finally:
        db.restore()
        db.drop()


def _pending(pid: int, sig: int) -> bool:
    """Whether ``sig`` waits, sent to the process ``pid`` and not yet handled."""
    status = Path(f"/proc/{pid}/status").read_text()
    mask = next(line.split()[1] for line in status.splitlines() if line.startswith("ShdPnd:"))
    return bool(int(mask, 16) & (1 << (sig - 1)))


def _starting(server: isolate.PostgresServer) -> bool:
    """Whether a connection is in its start-up, past authentication (a backend holding a
    virtualxid lock that pg_stat_activity does not show as a session yet)."""
    with psycopg.connect(server.admin_dsn, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT l.pid FROM pg_locks l WHERE l.locktype = 'virtualxid' AND l.pid <> pg_backend_pid() "
            "AND NOT EXISTS (SELECT FROM pg_stat_activity a WHERE a.pid = l.pid AND a.usename IS NOT NULL)"
        ).fetchall()
    return bool(rows)


def test_failed_migration_names_the_file(isolate_postgres: isolate.PostgresServer, tmp_path: Any) -> None:
    (tmp_path / "1_ok.sql").write_text("CREATE TABLE t (v int);")
    (tmp_path / "2_bad.sql").write_text("CREATE TABLE t (v int);")
    db = WorkerDatabase.create(isolate_postgres, f"mig{os.getpid()}", "t")
    try:
        with pytest.raises(isolate.MigrationError, match=r"2_bad\.sql"):
            db.apply_migrations(tmp_path)
    finally:
        db.drop()


def test_redis_is_private_and_can_be_cut_without_losing_data(
    isolate_redis: isolate.RedisServer, isolate_redis_client: redis.Redis
) -> None:
    isolate_redis_client.set("k", "v")
    isolate_redis.cut()
    try:
        with pytest.raises(redis.RedisError):
            isolate_redis.client(socket_timeout=2).get("k")
    finally:
        isolate_redis.restore()
    assert isolate_redis.client().get("k") == b"v"


def test_service_uses_its_worker_stack(
    isolate_service: ServiceHandle, isolate_database: WorkerDatabase, isolate_worker: Any
) -> None:
    assert isolate_service.name == f"fixture-app-test-{isolate_worker.slug}"
    assert isolate_service.url == f"http://127.0.0.1:{isolate_service.port}"
    created = post(isolate_service.url + "/items", {"value": "hello"})
    assert created["instance"] == isolate_service.name
    assert get(f"{isolate_service.url}/items/{created['id']}")["value"] == "hello"
    assert get(isolate_service.url + "/whoami")["schema"] == isolate_database.schema


def test_stop_start_kill_restart_keep_port_and_url(isolate_service: ServiceHandle) -> None:
    url, port = isolate_service.url, isolate_service.port
    assert isolate_service.stop() == 0  # graceful: SIGTERM handled, exit 0
    assert not isolate_service.is_running
    with pytest.raises(OSError):
        get(url + "/health")
    isolate_service.start()
    assert (isolate_service.url, isolate_service.port) == (url, port)
    assert get(url + "/health")["instance"] == isolate_service.name
    assert isolate_service.kill() == 128 + signal.SIGKILL
    assert not isolate_service.is_running
    isolate_service.start()
    pid = isolate_service.pid
    isolate_service.restart()
    assert pid is not None and isolate_service.pid not in (None, pid)
    assert isolate_service.is_running and isolate_service.is_ready()
    logs = isolate_service.logs()
    assert "SIGTERM, shutting down" in logs and "bye" in logs
    assert logs.count("--- isolate: starting") >= 4


def test_function_fixture_restarts_a_stopped_service(isolate_service: ServiceHandle) -> None:
    isolate_service.stop(graceful=False)
    isolate_service.ensure_running()
    assert isolate_service.is_running and isolate_service.is_ready()


STUBBORN = (
    "import signal, socket, sys, time\n"
    "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
    "s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
    "s.bind(('127.0.0.1', int(sys.argv[1]))); s.listen()\n"
    "print('ignoring SIGTERM', flush=True)\n"
    "while True: time.sleep(1)\n"
)


@pytest.fixture
def runtime_service(
    isolate_stack: WorkerStack, isolate_database: WorkerDatabase, isolate_redis_url: str
) -> Iterator[Any]:
    """Extra services on this worker, built the way the plugin builds its own."""
    names = []
    values = {"dsn": isolate_database.dsn, "schema": isolate_database.schema,
              "role": isolate_database.role, "redis_url": isolate_redis_url}  # fmt: skip

    def make(spec: isolate.ServiceSpec) -> ServiceHandle:
        names.append(spec.name)
        return isolate_stack.service(spec, values.__getitem__)

    yield make
    for name in names:
        isolate_stack.close_service(name)


def test_graceful_stop_falls_back_to_sigkill_after_timeout(runtime_service: Any) -> None:
    spec = isolate.ServiceSpec(
        "stubborn", [sys.executable, "-c", STUBBORN, "{port}"],
        health=isolate.TcpCheck(), ready_timeout=10,
    )  # fmt: skip
    handle = runtime_service(spec)
    assert handle.stop(0.3) == 128 + signal.SIGKILL  # the timeout is the first parameter
    assert "ignoring SIGTERM" in handle.logs()
    with pytest.raises(TypeError):
        handle.stop(0.3, False)  # type: ignore[misc]  # graceful is keyword-only


def test_service_that_exits_at_start_reports_exit_code_and_log(runtime_service: Any) -> None:
    with pytest.raises(isolate.ServiceExitedError) as info:
        runtime_service(app_spec("exits-early", EXIT_AT_START="3"))
    assert info.value.context["exit_code"] == 3
    assert "failing on purpose" in str(info.value)


def test_service_never_ready_times_out_with_log(runtime_service: Any) -> None:
    spec = app_spec("never-ready", NEVER_READY="1")
    spec = isolate.ServiceSpec(**{**spec.__dict__, "ready_timeout": 2.0})
    with pytest.raises(isolate.ServiceNotReadyError, match=r"not ready within 2\.0s") as info:
        runtime_service(spec)
    # The error carries the log tail (isolate's start marker or the app's own lines, both
    # naming the instance: the app may still be booting on a loaded machine) and the fix.
    text = str(info.value)
    assert "never-ready-test-" in text.split("last log lines:")[1]
    assert "fix:" in text


def test_port_leases_are_exclusive_across_processes() -> None:
    leases = [isolate.reserve_port() for _ in range(20)]
    try:
        ports = [lease.port for lease in leases]
        assert len(set(ports)) == 20
        probe = (
            "import sys; from isolate._ports import _try_lock\n"
            "sys.exit(0 if _try_lock(int(sys.argv[1])) is None else 1)\n"
        )
        assert subprocess.run([sys.executable, "-c", probe, str(ports[0])], check=False).returncode == 0
        leases[0].release()
        assert subprocess.run([sys.executable, "-c", probe, str(ports[0])], check=False).returncode == 1
    finally:
        for lease in leases:
            lease.release()


HOLD_A_LEASE = """
import sys, isolate
lease = isolate.reserve_port()
print(lease.port, flush=True)
sys.stdin.read()  # held until the test closes our stdin
lease.release()
"""

TRY_THAT_PORT = """
import sys
from pathlib import Path
from isolate._ports import _reserve, lock_dir, machine_lock_dir
port = int(sys.argv[1])
lease, locked_out = _reserve([range(port, port + 1)], lock_dir(), 5, machine_lock_dir(lock_dir()))
print("leased" if lease is not None else "locked out" if locked_out else "not free")
"""


def test_runs_with_different_tmpdirs_see_each_others_port_leases(tmp_path: Path) -> None:
    """Ports are the machine's: a run whose TMPDIR is elsewhere (a CI shard, another
    shell) must not lease a port another run holds in its own TMPDIR's lease dir, or a
    stopped service's port could be taken before its restart."""
    dirs = [tmp_path / "tmp-a", tmp_path / "tmp-b"]
    for d in dirs:
        d.mkdir(mode=0o700)
    env = [{**os.environ, "TMPDIR": str(d)} for d in dirs]
    holder = subprocess.Popen([sys.executable, "-c", HOLD_A_LEASE], env=env[0], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert holder.stdout is not None and holder.stdin is not None
        port = holder.stdout.readline().strip()
        assert (dirs[0] / "isolate-ports" / f"{port}.lock").exists()  # its own TMPDIR's dir
        other = subprocess.run([sys.executable, "-c", TRY_THAT_PORT, port], env=env[1], capture_output=True,
                               text=True, timeout=60, check=True)  # fmt: skip
        assert other.stdout.strip() == "locked out", other.stdout + other.stderr
        holder.stdin.close()
        assert holder.wait(timeout=30) == 0
        again = subprocess.run([sys.executable, "-c", TRY_THAT_PORT, port], env=env[1], capture_output=True,
                               text=True, timeout=60, check=True)  # fmt: skip
        assert again.stdout.strip() == "leased", again.stdout + again.stderr  # released: free again
    finally:
        holder.kill()
        holder.wait()


LEASE_HAMMER = """
import os, sys, time
from pathlib import Path
from isolate._ports import try_lease
path, journal, rounds = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
fd = os.open(journal, os.O_WRONLY | os.O_APPEND)
won = 0
while won < rounds:
    lease = try_lease(path)
    if lease is None:
        continue
    os.write(fd, b"+\\n")
    time.sleep(0.0005)  # widen the critical section: not synchronisation
    os.write(fd, b"-\\n")
    lease.release()
    won += 1
"""


def test_lease_files_are_removed_and_never_held_twice(tmp_path: Path) -> None:
    """Releasing unlinks the lock file, and four processes racing for one name (open,
    lock, unlink) are never inside the lease together: the journal never shows two
    holders."""
    path, journal = tmp_path / "40000.lock", tmp_path / "journal"
    journal.touch()
    racers = [
        subprocess.Popen([sys.executable, "-c", LEASE_HAMMER, str(path), str(journal), "150"])
        for _ in range(4)
    ]
    for racer in racers:
        assert racer.wait(timeout=60) == 0
    marks = journal.read_text().split()
    assert len(marks) == 4 * 150 * 2
    assert "".join(marks) == "+-" * (4 * 150)  # every enter is followed by its own exit
    assert not path.exists()  # the last releaser removed it


def test_a_crashed_holders_lock_file_is_reused_and_removed(tmp_path: Path) -> None:
    path = tmp_path / "40001.lock"
    subprocess.run(
        [
            sys.executable,
            "-c",
            f"from isolate._ports import try_lease; "
            f"import pathlib; assert try_lease(pathlib.Path({str(path)!r}))",
        ],
        check=True,
    )
    assert path.exists()  # the holder died without releasing
    lease = isolate_ports.try_lease(path)
    assert lease is not None
    assert isolate_ports.try_lease(path) is None  # flock is per open file: held
    lease.release()
    assert not path.exists()


LOSES_FIRST_BIND = (
    "import pathlib, sys\n"
    "marker = pathlib.Path(sys.argv[2])\n"
    "if not marker.exists():\n"
    "    marker.write_text(sys.argv[1])\n"
    "    sys.exit('OSError: [Errno 98] Address already in use')\n"
    "import http.server\n"
    "http.server.HTTPServer(('127.0.0.1', int(sys.argv[1])), http.server.SimpleHTTPRequestHandler)"
    ".serve_forever()\n"
)


def test_first_start_that_loses_its_port_moves_to_a_new_one(runtime_service: Any, tmp_path: Any) -> None:
    marker = tmp_path / "first-port"
    spec = isolate.ServiceSpec(
        "loses-bind", [sys.executable, "-c", LOSES_FIRST_BIND, "{port}", str(marker)],
        health=isolate.HttpCheck("/"), ready_timeout=10,
    )  # fmt: skip
    handle = runtime_service(spec)
    assert handle.is_ready()
    assert handle.port != int(marker.read_text())
    assert handle.url == f"http://127.0.0.1:{handle.port}"
    # Later starts keep the (new) port.
    port = handle.port
    handle.restart()
    assert handle.port == port



def test_migrations_are_never_silently_skipped(isolate_stack: WorkerStack, tmp_path: Any) -> None:
    # The worker schema exists with the suite's migrations; asking for other ones is an error.
    (tmp_path / "1.sql").write_text("CREATE TABLE other (v int);")
    isolate_stack.database(MIGRATIONS)
    with pytest.raises(isolate.ConfigError, match="already has migrations"):
        isolate_stack.database(tmp_path)


def test_a_service_listening_on_another_port_is_told_so(runtime_service: Any) -> None:
    other = isolate.reserve_port()
    try:
        spec = isolate.ServiceSpec(
            "wrong-port", [sys.executable, "-m", "http.server", str(other.port), "--bind", "127.0.0.1"],
            health=isolate.TcpCheck(), ready_timeout=3,
        )  # fmt: skip
        with pytest.raises(isolate.ServiceNotReadyError) as info:
            runtime_service(spec)
        assert info.value.context["listening"] == [other.port]
        assert f"it listens on {other.port}, not on the port it was given" in str(info.value)
    finally:
        other.release()
