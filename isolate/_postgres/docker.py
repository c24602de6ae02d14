"""The shared PostgreSQL as a container of ``--isolate-pg-image`` (official image contract)."""

from __future__ import annotations

import secrets
from typing import TYPE_CHECKING, Any

from .._docker.containers import ContainerServer
from .._docker.context import DockerRun
from .._lazy import lazy
from .server import PostgresConfig, PostgresServer, prepare_database

if TYPE_CHECKING:
    import psycopg
else:
    psycopg = lazy("psycopg")

__all__ = ["DockerPostgresRunner"]

_SECRET_PATH = "/tmp/isolate-postgres-password"  # noqa: S105, S108 - a path in the container


class DockerPostgresRunner(ContainerServer):
    """The run's shared PostgreSQL as ``isolate-pg-<run id>``, on a free port."""

    kind = "PostgreSQL"
    role = "postgres"
    container_port = 5432
    image_option = "pg_image"

    def __init__(self, ctx: DockerRun, config: PostgresConfig, name: str = "postgres") -> None:
        super().__init__(ctx, name, f"isolate-pg-{ctx.worker.run_id}", config.start_timeout)
        self.config = config
        self.password = secrets.token_urlsafe(18)
        self.version = ""
        self.server: PostgresServer | None = None

    def _create_kwargs(self, port: int) -> dict[str, Any]:
        settings = {k: v for k, v in self.config.settings.items() if k != "port"}
        if self.ctx.mode == "mapped":
            listen, server_port = "*", self.container_port  # reached through the published port
        else:
            listen, server_port = "127.0.0.1", port
        settings["listen_addresses"] = listen
        args = ["-p", str(server_port)]
        for key, value in settings.items():
            args += ["-c", f"{key}={value}"]
        return {
            "command": args,
            "environment": {
                "POSTGRES_USER": self.config.superuser,
                "POSTGRES_PASSWORD_FILE": _SECRET_PATH,  # the password is not in inspect
                "POSTGRES_DB": self.config.database,
                "POSTGRES_INITDB_ARGS": "--no-sync",
            },
            "shm_size": "256m",  # parallel query workers use /dev/shm (64MB by default)
        }

    def _files(self) -> dict[str, str]:
        return {_SECRET_PATH: self.password}

    def _facts(self, port: int) -> PostgresServer:
        return PostgresServer(
            host="127.0.0.1", port=port, user=self.config.superuser, password=self.password,
            database=self.config.database, version=self.version, backend="docker",
            settings=dict(self.config.settings),
        )  # fmt: skip

    def _probe(self, port: int) -> bool:
        # A real connection to the final server: the entrypoint's init server is
        # socket-only and restarts, so log lines or an open port would lie.
        try:
            with psycopg.connect(self._facts(port).dsn(), connect_timeout=2, autocommit=True) as conn:
                row = conn.execute("SHOW server_version").fetchone()
        except psycopg.Error:
            return False
        self.version = str(row[0]).split()[0] if row else ""
        return True

    def _connected(self, port: int) -> None:
        self.server = self._facts(port)
        prepare_database(self.server)
