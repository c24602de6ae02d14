"""A worker's Redis/Valkey as a native process on a free port."""

from __future__ import annotations

import logging
import signal
from collections.abc import Mapping
from pathlib import Path

from .._binaries import Binary
from .._ports import PortLease
from .._process import ManagedProcess, RunAs, wait_started
from .._retry import start_on_free_port
from .._server import NativeServer
from .server import RedisConfig, RedisServer, acl_users, answers_ping

__all__ = ["NativeRedisRunner"]

logger = logging.getLogger(__name__)


class NativeRedisRunner(NativeServer):
    """A valkey-server/redis-server process on a leased port, demoted to ``run_as`` when
    isolate runs as root."""

    #: It persists nothing (``save ""``, no AOF) and its dir goes with it: SIGKILL ends it at
    #: once, where SIGTERM waits for its next cron tick (up to 100 ms at the default hz).
    stop_signal = signal.SIGKILL

    def __init__(self, binary: Binary, config: RedisConfig, directory: Path, name: str = "redis",
                 run_as: RunAs | None = None, env: Mapping[str, str] | None = None) -> None:  # fmt: skip
        super().__init__(name, binary, directory, run_as, env)
        self.config = config
        self.server: RedisServer | None = None
        #: SIGKILLed if the worker that started it dies (a per-worker server, nothing kept):
        #: even one the worker had no time to register goes with it.
        self.die_with_worker = False

    def _config(self, port: int) -> bytes:
        """The server's config, with the admin password: it reaches the server on its
        stdin (``valkey-server -``), never as a file."""
        return "\n".join(
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
                *(f"user {' '.join(user)}" for user in acl_users(self.password)),
                "",
            ]
        ).encode()

    def _launch(self, lease: PortLease) -> ManagedProcess:
        proc = ManagedProcess(
            [self._bin(self.binary.path.name), "-"], log_path=self.log_path,
            env=self.env, cwd=self.directory, run_as=self.run_as, stdin=self._config(lease.port),
            die_with_parent=self.die_with_worker,
        )  # fmt: skip
        proc.start()
        self._spawned(proc, lease)
        wait_started(
            proc, lambda: answers_ping(lease.port), self.config.start_timeout, what="Redis",
            hint="read the log lines above; check --isolate-redis-bin points at a server",
        )  # fmt: skip
        return proc

    def start(self) -> None:
        """Start on a free port and wait until it answers PING."""
        self._make_dir(self.directory)  # its working dir: empty, it writes nothing there
        self._hand_over(self.directory)
        start_on_free_port(self._launch, what="Redis")
        assert self.lease is not None
        self.server = RedisServer("127.0.0.1", self.lease.port, 0, self.password)
