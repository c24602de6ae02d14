"""Redis/Valkey for each worker: a private server, or a logical DB on a shared one."""

from __future__ import annotations

import functools
import logging
import secrets
import shutil
import signal
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import redis

from ._binaries import Binary
from ._errors import FaultInjectionError, ServerStartError
from ._ports import PortLease, reserve_port
from ._proc import ManagedProcess, ProcessRecord, poll_until, tail

__all__ = ["NativeRedisRunner", "RedisConfig", "RedisServer"]

logger = logging.getLogger(__name__)

ADMIN_USER = "isolate-admin"


def acl_users(admin_password: str) -> list[list[str]]:
    """The ACL users every isolate Redis gets: an admin (for cut/restore and flush)
    and the passwordless ``default`` user the worker's clients use."""
    return [
        [ADMIN_USER, "on", f">{admin_password}", "~*", "&*", "+@all"],
        ["default", "on", "nopass", "~*", "&*", "+@all"],
    ]


def answers_ping(port: int, host: str = "127.0.0.1") -> bool:
    """Whether a Redis server on ``port`` answers PING."""
    try:
        with redis.Redis(host=host, port=port, socket_timeout=0.5) as client:
            return bool(client.ping())
    except redis.RedisError:
        return False


@dataclass(frozen=True)
class RedisConfig:
    """How to start a Redis-compatible server."""

    databases: int = 16
    start_timeout: float = 30.0


@dataclass(frozen=True)
class RedisServer:
    """Where a worker's Redis is (JSON-serialisable)."""

    host: str
    port: int
    db: int
    admin_password: str
    shared: bool = False
    backend: str = "native"

    @property
    def url(self) -> str:
        """``redis://127.0.0.1:<port>/<db>`` for the worker."""
        return f"redis://{self.host}:{self.port}/{self.db}"

    def client(self, **kwargs: Any) -> redis.Redis:
        """A redis-py client on the worker's DB."""
        return redis.Redis.from_url(self.url, **kwargs)

    def admin(self) -> redis.Redis:
        return redis.Redis(
            host=self.host, port=self.port, db=self.db, username=ADMIN_USER,
            password=self.admin_password, socket_timeout=5,
        )  # fmt: skip

    def flush(self) -> None:
        """Empty the worker's DB."""
        with self.admin() as client:
            client.flushdb()

    def with_db(self, db: int) -> RedisServer:
        return RedisServer(self.host, self.port, db, self.admin_password, self.shared, self.backend)

    # -- fault injection ----------------------------------------------------

    def cut(self) -> None:
        """Make this worker's Redis refuse it (data kept); :meth:`restore` undoes it."""
        if self.shared:
            raise FaultInjectionError(
                "cannot cut Redis for one worker when workers share a server",
                hint="use --isolate-redis-mode=per-worker for Redis fault injection",
            )
        with self.admin() as client:
            client.acl_setuser("default", enabled=False, reset_passwords=False)
            client.execute_command("CLIENT", "KILL", "USER", "default")

    def restore(self) -> None:
        """Undo :meth:`cut`."""
        with self.admin() as client:
            client.acl_setuser("default", enabled=True, nopass=True)

    def to_json(self) -> dict[str, object]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> RedisServer:
        return cls(**data)


class NativeRedisRunner:
    """A valkey-server/redis-server process on a leased port."""

    def __init__(
        self, binary: Binary, config: RedisConfig, directory: Path, name: str = "redis"
    ) -> None:
        self.name = name
        self.binary = binary
        self.config = config
        self.directory = directory
        self.admin_password = secrets.token_urlsafe(18)
        self.lease: PortLease | None = None
        self._proc: ManagedProcess | None = None
        self.server: RedisServer | None = None

    @property
    def log_path(self) -> Path:
        return self.directory / "redis.log"

    def _write_config(self, port: int) -> Path:
        conf = self.directory / "redis.conf"
        conf.write_text(
            "\n".join(
                [
                    f"port {port}",
                    "bind 127.0.0.1",
                    "protected-mode yes",
                    'save ""',
                    "appendonly no",
                    f"dir {self.directory}",
                    "daemonize no",
                    'logfile ""',
                    f"databases {self.config.databases}",
                    *(f"user {' '.join(user)}" for user in acl_users(self.admin_password)),
                    "",
                ]
            )
        )
        conf.chmod(0o600)
        return conf

    def _ready(self, proc: ManagedProcess, port: int) -> bool:
        return not proc.running or answers_ping(port)

    def start(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        for attempt in range(5):
            self.lease = reserve_port()
            conf = self._write_config(self.lease.port)
            proc = ManagedProcess(
                [str(self.binary.path), str(conf)], log_path=self.log_path, cwd=self.directory
            )
            proc.start()
            port = self.lease.port
            poll_until(functools.partial(self._ready, proc, port), self.config.start_timeout)
            if proc.running and self._ready(proc, port):
                self._proc = proc
                break
            log = tail(self.log_path, 20)
            self.lease.release()
            if proc.running:
                proc.kill()
                raise ServerStartError(
                    f"Redis did not answer PING within {self.config.start_timeout:.0f}s",
                    log_tail=log, port=port,
                )  # fmt: skip
            if "Address already in use" in log and attempt < 4:
                continue
            raise ServerStartError(
                "Redis exited during start-up", log_tail=log, exit_code=proc.returncode,
                hint="read the log lines above; check --isolate-redis-bin points at a server",
            )  # fmt: skip
        assert self.lease is not None
        self.server = RedisServer("127.0.0.1", self.lease.port, 0, self.admin_password)

    @property
    def is_running(self) -> bool:
        return self._proc is not None and self._proc.running

    def stop(self, timeout: float | None = None) -> int | None:
        code = self._proc.stop(signal.SIGTERM, timeout or 5.0) if self._proc else None
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
            paths=[str(self.directory)],
        )
