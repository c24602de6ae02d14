"""The shared, tuned PostgreSQL server of a run (native backend)."""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import secrets
import shutil
import signal
import subprocess
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from urllib.parse import quote

import psycopg
from filelock import FileLock
from psycopg import sql
from tenacity import Retrying, stop_after_delay, wait_fixed

from ._binaries import Binary, reachable_copy
from ._errors import ServerStartError
from ._ports import PortLease, reserve_port
from ._proc import ManagedProcess, ProcessRecord, RunAs, poll_until, tail

__all__ = ["NativePostgresRunner", "PostgresConfig", "PostgresServer", "tuned_settings"]

logger = logging.getLogger(__name__)

#: Bump when the initdb arguments change, so cached templates are rebuilt.
_INITDB_RECIPE = 2
_BIND_FAILURE = ("could not bind", "Address already in use", "could not create any TCP/IP")


def tuned_settings(
    worker_count: int, conn_per_worker: int, overrides: Mapping[str, str] | None = None
) -> dict[str, str]:
    """Server settings for a throwaway test database, sized for ``worker_count``.

    Durability is traded for speed (nothing here must survive a crash);
    ``overrides`` win over every default.
    """
    settings = {
        "fsync": "off",
        "synchronous_commit": "off",
        "full_page_writes": "off",
        "wal_level": "minimal",
        "max_wal_senders": "0",
        "max_wal_size": "1GB",
        "checkpoint_timeout": "30min",
        "max_connections": str(max(worker_count, 1) * conn_per_worker + 10),
        "shared_buffers": "128MB",
        "jit": "off",
        "listen_addresses": "127.0.0.1",
        "log_min_messages": "warning",
        "log_min_error_statement": "panic",
        "log_checkpoints": "off",
        "timezone": "UTC",
    }
    settings.update(overrides or {})
    return settings


@dataclass(frozen=True)
class PostgresConfig:
    """How to start the shared server."""

    settings: Mapping[str, str]
    start_timeout: float = 60.0
    superuser: str = "isolate"
    database: str = "isolate"


@dataclass(frozen=True)
class PostgresServer:
    """Connection facts of a running server (JSON-serialisable, shared by workers)."""

    host: str
    port: int
    user: str
    password: str
    database: str
    version: str
    backend: str = "native"
    settings: Mapping[str, str] = field(default_factory=dict)

    def dsn(
        self,
        user: str | None = None,
        password: str | None = None,
        database: str | None = None,
        search_path: str | None = None,
    ) -> str:
        """A ``postgresql://`` URL, by default the superuser's."""
        user = user or self.user
        password = self.password if password is None else password
        url = (
            f"postgresql://{quote(user, safe='')}:{quote(password, safe='')}"
            f"@{self.host}:{self.port}/{quote(database or self.database, safe='')}"
        )
        if search_path:
            url += "?options=" + quote(f"-csearch_path={search_path}", safe="")
        return url

    @property
    def admin_dsn(self) -> str:
        return self.dsn()

    def to_json(self) -> dict[str, object]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, object]) -> PostgresServer:
        return cls(**data)  # type: ignore[arg-type]


def prepare_database(server: PostgresServer) -> None:
    """Create the run's database and lock its ``public`` schema down."""
    with psycopg.connect(server.dsn(database="postgres"), autocommit=True) as conn:
        exists = conn.execute(
            "SELECT 1 FROM pg_database WHERE datname = %s", (server.database,)
        ).fetchone()
        if not exists:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(server.database)))
    with psycopg.connect(server.admin_dsn, autocommit=True) as conn:
        conn.execute("REVOKE ALL ON SCHEMA public FROM PUBLIC")


class NativePostgresRunner:
    """initdb + postgres as native processes, demoted to ``run_as`` when root."""

    def __init__(
        self,
        binary: Binary,
        config: PostgresConfig,
        directory: Path,
        run_as: RunAs | None,
        name: str = "postgres",
    ) -> None:
        self.name = name
        self.binary = binary
        self.config = config
        self.directory = directory
        self.run_as = run_as
        self.password = secrets.token_urlsafe(18)
        self.lease: PortLease | None = None
        self._proc: ManagedProcess | None = None
        self.server: PostgresServer | None = None

    @property
    def data_dir(self) -> Path:
        return self.directory / "data"

    @property
    def socket_dir(self) -> Path:
        return self.directory / "sock"

    @property
    def log_path(self) -> Path:
        return self.directory / "postgres.log"

    def _bin(self, name: str) -> str:
        return str(reachable_copy(self.binary, self.run_as) / name)

    def _env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        env.update(LC_ALL="C", LANG="C", HOME=str(self.directory), TZ="UTC")
        return env

    def _prepare_dirs(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        self.socket_dir.mkdir(mode=0o700, exist_ok=True)
        if self.run_as is not None:
            for path in (self.directory, self.socket_dir):
                self.run_as.chown(path)

    def _initdb(self) -> None:
        """Copy a pristine cluster made once by initdb for this binary and user.

        initdb is most of a cold start (~1 s); copying its result takes a fraction.
        The template's superuser password is replaced right after start.
        """
        template = self._template()
        shutil.copytree(template, self.data_dir, symlinks=True)
        if self.run_as is not None:
            for path in [self.data_dir, *self.data_dir.rglob("*")]:
                os.lchown(path, self.run_as.uid, self.run_as.gid)
        os.chmod(self.data_dir, 0o700)

    def _template(self) -> Path:
        uid = self.run_as.uid if self.run_as else os.getuid()
        key = hashlib.sha256(
            f"{_INITDB_RECIPE}:{self.binary.path}:{self.binary.version}:"
            f"{self.config.superuser}:{uid}".encode()
        ).hexdigest()[:16]
        cache = self.directory.parent.parent / "isolate-cache"
        cache.mkdir(mode=0o755, exist_ok=True)
        template = cache / f"pgdata-{key}"
        with FileLock(str(cache / f"pgdata-{key}.lock")):
            if not (template / "PG_VERSION").exists():
                staging = cache / f"pgdata-{key}.tmp-{os.getpid()}"
                shutil.rmtree(staging, ignore_errors=True)
                self._run_initdb(staging)
                self._bake(staging)
                shutil.rmtree(template, ignore_errors=True)
                staging.rename(template)
        return template

    def _bake(self, data_dir: Path) -> None:
        """Create the run database in the template, so runs only copy it."""
        socket_dir = self.directory / "sock-template"
        socket_dir.mkdir(mode=0o700, exist_ok=True)
        if self.run_as is not None:
            self.run_as.chown(socket_dir)
        proc = ManagedProcess(
            [self._bin("postgres"), "-D", str(data_dir), "-c", "listen_addresses=",
             "-c", f"unix_socket_directories={socket_dir}", "-c", "fsync=off"],
            log_path=self.log_path, env=self._env(), cwd=self.directory, run_as=self.run_as,
        )  # fmt: skip
        proc.start()
        try:
            if not poll_until(lambda: (socket_dir / ".s.PGSQL.5432").exists() or not proc.running, 30):
                raise ServerStartError("template server did not start", log_tail=self.logs())
            conninfo = dict(host=str(socket_dir), user=self.config.superuser, autocommit=True)
            for attempt in Retrying(stop=stop_after_delay(30), wait=wait_fixed(0.02), reraise=True):
                with attempt, psycopg.connect(dbname="postgres", **conninfo) as conn:  # type: ignore[arg-type]
                    conn.execute(
                        sql.SQL("CREATE DATABASE {}").format(sql.Identifier(self.config.database))
                    )
            with psycopg.connect(dbname=self.config.database, **conninfo) as conn:  # type: ignore[arg-type]
                conn.execute("REVOKE ALL ON SCHEMA public FROM PUBLIC")
        finally:
            proc.stop(signal.SIGINT, 10.0)
            shutil.rmtree(socket_dir, ignore_errors=True)

    def _run_initdb(self, target: Path) -> None:
        target.mkdir(mode=0o700)
        if self.run_as is not None:
            self.run_as.chown(target)
        pwfile = self.directory / "pwfile"
        pwfile.write_text(secrets.token_urlsafe(18) + "\n")
        pwfile.chmod(0o600)
        if self.run_as is not None:
            self.run_as.chown(pwfile)
        argv = [
            self._bin("initdb"), "-D", str(target), "-U", self.config.superuser,
            f"--pwfile={pwfile}", "--auth-local=trust", "--auth-host=scram-sha-256",
            "-E", "UTF8", "--locale=C", "--no-sync", "--no-instructions",
        ]  # fmt: skip
        run_as = self.run_as
        done = subprocess.run(
            argv, capture_output=True, text=True, env=self._env(), cwd=self.directory,
            check=False, user=run_as.uid if run_as else None,
            group=run_as.gid if run_as else None, extra_groups=[] if run_as else None,
        )  # fmt: skip
        pwfile.unlink()
        if done.returncode != 0:
            raise ServerStartError(
                "initdb failed",
                log_tail="\n".join((done.stdout + done.stderr).splitlines()[-20:]),
                exit_code=done.returncode,
                data_dir=target,
                hint="check that the run_as user can write to --isolate-base-dir",
            )

    def _launch(self, port: int) -> ManagedProcess:
        settings = dict(self.config.settings)
        settings.update(port=str(port), unix_socket_directories=str(self.socket_dir))
        argv = [self._bin("postgres"), "-D", str(self.data_dir)]
        for key, value in settings.items():
            argv += ["-c", f"{key}={value}"]
        proc = ManagedProcess(
            argv, log_path=self.log_path, env=self._env(), cwd=self.directory, run_as=self.run_as
        )
        proc.start()
        return proc

    def _ready(self, proc: ManagedProcess) -> bool:
        if not proc.running:
            return True  # stop polling; the caller looks at the exit
        try:
            lines = (self.data_dir / "postmaster.pid").read_text().splitlines()
        except OSError:
            return False
        return len(lines) >= 8 and lines[7].strip() == "ready"

    def start(self) -> None:
        """initdb, start on a leased port (retrying bind failures), wait until ready."""
        self._prepare_dirs()
        self._initdb()
        for attempt in range(5):
            self.lease = reserve_port()
            proc = self._launch(self.lease.port)
            poll_until(functools.partial(self._ready, proc), self.config.start_timeout)
            if proc.running and self._ready(proc):
                self._proc = proc
                break
            log = tail(self.log_path, 20)
            self.lease.release()
            if proc.running:
                proc.kill()
                raise ServerStartError(
                    f"PostgreSQL did not get ready within {self.config.start_timeout:.0f}s",
                    log_tail=log, data_dir=self.data_dir,
                    hint="raise --isolate-pg-start-timeout or look at the server log",
                )  # fmt: skip
            if any(marker in log for marker in _BIND_FAILURE) and attempt < 4:
                logger.info("postgres could not bind port %d; retrying", self.lease.port)
                continue
            raise ServerStartError(
                "PostgreSQL exited during start-up",
                log_tail=log, exit_code=proc.returncode, data_dir=self.data_dir,
                hint="read the log lines above; a bad --isolate-pg-settings value is a common cause",
            )  # fmt: skip
        assert self.lease is not None
        with psycopg.connect(
            host=str(self.socket_dir), port=self.lease.port, user=self.config.superuser,
            dbname=self.config.database, autocommit=True,
        ) as conn:  # fmt: skip
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

    @property
    def is_running(self) -> bool:
        return self._proc is not None and self._proc.running

    def stop(self, timeout: float | None = None) -> int | None:
        """Fast shutdown (SIGINT), then remove the data dir."""
        code = None
        if self._proc is not None:
            code = self._proc.stop(signal.SIGINT, timeout or 10.0)
        if self.lease is not None:
            self.lease.release()
        shutil.rmtree(self.directory, ignore_errors=True)
        return code

    def logs(self) -> str:
        return tail(self.log_path, 200)

    def record(self) -> ProcessRecord:
        return ProcessRecord(
            name=self.name,
            pid=self._proc.pid if self._proc else None,
            start_ticks=self._proc.start_ticks if self._proc else None,
            stop_signal=signal.SIGINT,
            paths=[str(self.directory)],
        )
