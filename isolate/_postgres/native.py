"""The shared PostgreSQL as native processes: a cached initdb template, copied and started."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import secrets
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from tenacity import Retrying, stop_after_delay, wait_fixed

from .._binaries import Binary
from .._cache import entry_lock, evict, touch
from .._errors import ServerStartError
from .._fs import copy_tree, own_dir, read_beneath, take_back
from .._lazy import lazy
from .._ports import PortLease
from .._process import ManagedProcess, RunAs, as_user, stdin_pipe, wait_started
from .._retry import poll_until, start_on_free_port
from .._server import NativeServer
from .server import CHEAP_SCRAM, PostgresConfig, PostgresServer, Seed

if TYPE_CHECKING:
    import psycopg
    from psycopg import sql
else:
    psycopg = lazy("psycopg")
    sql = lazy("psycopg.sql")

__all__ = ["NativePostgresRunner"]

logger = logging.getLogger(__name__)

#: Dynamic shared memory in files of the data dir (``pg_dynshmem``), not in ``/dev/shm``:
#: a server killed without a clean shutdown (a reaped run, a crash) leaves nothing
#: outside the dir that goes with its run (under the default base dir, that dir is on tmpfs too).
_DSM_IN_DATA_DIR = {"dynamic_shared_memory_type": "mmap"}

#: Bump when the initdb arguments change, so cached templates are rebuilt.
_INITDB_RECIPE = 3


class NativePostgresRunner(NativeServer):
    """initdb + postgres as native processes, demoted to ``run_as`` when root."""

    stop_signal = signal.SIGINT  # fast shutdown

    def __init__(
        self,
        binary: Binary,
        config: PostgresConfig,
        directory: Path,
        run_as: RunAs | None,
        name: str = "postgres",
        env: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(name, binary, directory, run_as, env)
        self.config = config
        self.data_dir = directory / "data"
        self.socket_dir = directory / "sock"
        self.server: PostgresServer | None = None

    def _env(self) -> dict[str, str]:
        env = {k: v for k, v in self.env.items() if not k.startswith("PG")}
        env.update(LC_ALL="C", LANG="C", HOME=str(self.directory), TZ="UTC")
        return env

    def _build(self) -> None:
        """The server's dir, built by root while only root can enter it (0700), then
        handed to the run-as user in one pass, its top last: a copy of a pristine cluster
        made once by initdb for this binary and user (initdb is most of a cold start,
        ~1 s; a copy takes a fraction), and the socket dir. The template's superuser
        password is replaced right after start."""
        self._make_dir(self.directory)
        with self._template() as template:
            if self.config.seed is None:
                self._copy_cluster(template, self.data_dir)
            else:
                with self._seeded(template, self.config.seed) as seeded:
                    self._copy_cluster(seeded, self.data_dir)
        self.socket_dir.mkdir(mode=0o700)
        self._hand_over(self.socket_dir)
        self._hand_over(self.directory, content=False)  # the copy is the run-as user's already

    def _copy_cluster(self, template: Path, target: Path) -> None:
        """Copy a cached cluster (this user's own, checked when it was taken back), given
        to the run-as user as it is made (``target`` last)."""
        copy_tree(template, target, (self.run_as.uid, self.run_as.gid) if self.run_as else None)

    def _cache(self) -> Path:
        # This user's own cache; the run-as user may traverse it (to bake a new
        # template) but owns nothing in it: a finished template belongs to us.
        return own_dir(self.directory.parent.parent / f"isolate-cache-{os.geteuid()}", 0o711)

    def _template(self) -> contextlib.AbstractContextManager[Path]:
        uid = self.run_as.uid if self.run_as else os.getuid()
        key = hashlib.sha256(
            f"{_INITDB_RECIPE}:{self.binary.path}:{self.binary.version}:"
            f"{self.config.superuser}:{uid}".encode()
        ).hexdigest()[:16]
        return self._cached(f"pgdata-{key}", self._run_initdb, self._bake)

    def _seeded(self, template: Path, seed: Seed) -> contextlib.AbstractContextManager[Path]:
        """A copy of ``template`` that holds what ``seed`` creates, made once per seed key
        (and binary, user: the template's own key is in the name)."""

        def create(staging: Path) -> None:
            self._copy_cluster(template, staging)  # the run-as user's: its private server writes there

        return self._cached(f"{template.name}-seed-{seed.key[:24]}", create, lambda d: self._serve(d, seed.create))

    @contextlib.contextmanager
    def _cached(self, name: str, create: Callable[[Path], None], bake: Callable[[Path], None]) -> Iterator[Path]:
        """``<cache>/<name>`` for a ``with`` block: a cluster made by ``create`` and
        ``bake`` once (under the entry's lock, exclusively), owned by this user, not by
        the run-as user, and used under the entry's shared lock, so that ``cleanup
        --caches`` never removes it while a run copies it."""
        target = self._cache() / name
        lock = f"{name}.lock"
        while True:
            with entry_lock(self._cache, lock, shared=True):
                if (target / "PG_VERSION").exists():
                    touch(target.parent, lock)  # its last use: the size bound evicts the oldest
                    yield target
                    return
            with entry_lock(self._cache, lock, shared=False):
                if not (target / "PG_VERSION").exists():
                    self._make_cached(target, create, bake)
            evict(target.parent, self.config.cache_size, keep=name)  # never what was just made

    def _make_cached(self, target: Path, create: Callable[[Path], None], bake: Callable[[Path], None]) -> None:
        staging = target.with_name(f"{target.name}.tmp-{os.getpid()}")
        shutil.rmtree(staging, ignore_errors=True)
        try:
            create(staging)
            bake(staging)
            if self.run_as is not None:  # ours again, checked: nothing planted is kept
                take_back(staging)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        shutil.rmtree(target, ignore_errors=True)
        staging.rename(target)

    def _bake(self, data_dir: Path) -> None:
        """Create the run database in the template, so runs only copy it."""

        def create_database(connect: Callable[[str], psycopg.Connection[tuple[object, ...]]]) -> None:
            with connect("postgres") as conn:
                conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(self.config.database)))
            with connect(self.config.database) as conn:
                conn.execute("REVOKE ALL ON SCHEMA public FROM PUBLIC")

        self._serve(data_dir, create_database)

    def _serve(self, data_dir: Path, work: Callable[[Callable[[str], psycopg.Connection[tuple[object, ...]]]], None]) -> None:
        """Run ``work(connect)`` against ``data_dir`` served privately (a socket only)."""
        # Short (a socket's path has at most 107 bytes), new and ours until handed over.
        socket_dir = Path(tempfile.mkdtemp(prefix="isolate-sock-"))
        self._hand_over(socket_dir)
        settings = {"listen_addresses": "", "unix_socket_directories": str(socket_dir), "fsync": "off", **_DSM_IN_DATA_DIR}
        proc = ManagedProcess(
            self._postgres_argv(data_dir, settings), log_path=self.log_path, env=self._env(),
            cwd=data_dir.parent, run_as=self.run_as,
        )  # fmt: skip
        proc.start()
        try:
            if not poll_until(lambda: (socket_dir / ".s.PGSQL.5432").exists() or not proc.running, 30):
                raise ServerStartError("template server did not start", log_tail=self.logs())
            def connect(dbname: str) -> psycopg.Connection[tuple[object, ...]]:
                return psycopg.connect(host=str(socket_dir), user=self.config.superuser, dbname=dbname,
                                       autocommit=True)  # fmt: skip

            for attempt in Retrying(stop=stop_after_delay(30), wait=wait_fixed(0.02), reraise=True):
                with attempt, connect("postgres"):
                    pass  # accepting connections
            work(connect)
        finally:
            proc.stop(signal.SIGINT, 10.0)
            shutil.rmtree(socket_dir, ignore_errors=True)

    def _run_initdb(self, target: Path) -> None:
        self._make_dir(target)
        self._hand_over(target)
        # The (throwaway: replaced at every start) password comes on initdb's stdin, so
        # no file holds it and nothing is written where the run-as user can plant.
        argv = [
            self._bin("initdb"), "-D", str(target), "-U", self.config.superuser,
            "--pwfile=/dev/stdin", "--auth-local=trust", "--auth-host=scram-sha-256",
            "-E", "UTF8", "--locale=C", "--no-sync", "--no-instructions",
        ]  # fmt: skip
        password = stdin_pipe(secrets.token_urlsafe(18).encode() + b"\n", self.run_as)
        try:
            done = subprocess.run(
                argv, stdin=password, capture_output=True, text=True, env=self._env(),
                cwd=target.parent, check=False, **as_user(self.run_as),
            )  # fmt: skip
        finally:
            os.close(password)
        if done.returncode != 0:
            raise ServerStartError(
                "initdb failed",
                log_tail="\n".join((done.stdout + done.stderr).splitlines()[-20:]),
                exit_code=done.returncode,
                data_dir=target,
                hint="check that the run_as user can write to --isolate-base-dir",
            )

    def _ready(self) -> bool:
        raw = read_beneath(self.directory, "data/postmaster.pid")  # the run-as user's tree
        lines = raw.decode(errors="replace").splitlines() if raw else []
        return len(lines) >= 8 and lines[7].strip() == "ready"

    def _postgres_argv(self, data_dir: Path, settings: Mapping[str, str]) -> list[str]:
        return [self._bin("postgres"), "-D", str(data_dir),
                *(arg for key, value in settings.items() for arg in ("-c", f"{key}={value}"))]  # fmt: skip

    def _launch(self, lease: PortLease) -> ManagedProcess:
        settings = {**_DSM_IN_DATA_DIR, **self.config.settings}  # --isolate-pg-settings may say otherwise
        settings.update(port=str(lease.port), unix_socket_directories=str(self.socket_dir))
        proc = ManagedProcess(
            self._postgres_argv(self.data_dir, settings), log_path=self.log_path, env=self._env(),
            cwd=self.directory, run_as=self.run_as,
        )
        proc.start()
        self._spawned(proc, lease)
        wait_started(
            proc, self._ready, self.config.start_timeout, what="PostgreSQL",
            hint="read the log lines above; a bad --isolate-pg-settings value is a common cause",
        )  # fmt: skip
        return proc

    def start(self) -> None:
        """initdb (template copy), start on a free port, wait until ready."""
        self._build()
        start_on_free_port(self._launch, what="PostgreSQL")
        assert self.lease is not None
        with psycopg.connect(
            host=str(self.socket_dir), port=self.lease.port, user=self.config.superuser,
            dbname=self.config.database, autocommit=True,
        ) as conn:  # fmt: skip
            conn.execute(CHEAP_SCRAM)
            conn.execute(
                sql.SQL("ALTER ROLE {} PASSWORD {}").format(
                    sql.Identifier(self.config.superuser), sql.Literal(self.password)
                )
            )
        self.server = PostgresServer(
            host="127.0.0.1",
            port=self.lease.port,
            user=self.config.superuser,
            password=self.password,
            database=self.config.database,
            version=self.binary.version,
            settings=dict(self.config.settings),
        )
