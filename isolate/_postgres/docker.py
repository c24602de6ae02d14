"""The shared PostgreSQL as a container of ``--isolate-pg-image`` (official image contract).

The image's entrypoint runs ``initdb`` when its data directory is empty, then a socket-only
server for its init scripts, then the real one: ~1-2 s of every start. So isolate starts
from a *seeded* image instead, made once per base image by committing a container of it
after its init (``isolate-pgseed:<key>``; its data directory lies outside the image's
``VOLUME``, so the commit keeps it). The password the seed was made with is thrown away:
each run's container first sets the run's own superuser password in single-user mode (the
SQL in a file copied in before the start, as the password file of an unseeded start is),
then starts the server. Should seeding fail (an image that does not follow the official
contract closely enough), or a seeded start, the run starts from the base image as before.
``python -m isolate cleanup --caches`` removes the seeded images no live run uses.
"""

from __future__ import annotations

import hashlib
import logging
import secrets
import time
from typing import TYPE_CHECKING, Any

from .._docker.containers import ContainerServer, container_logs, put_file, remove_container
from .._docker.context import DockerRun
from .._docker.images import BUILD_LABEL, hold_image, volume_mounts
from .._errors import ServerStartError
from .._lazy import lazy
from .._retry import poll_until
from .._run.notices import NOTICE
from .server import CHEAP_SCRAM, PostgresConfig, PostgresServer, prepare_database

if TYPE_CHECKING:
    import psycopg
    from psycopg import sql
else:
    psycopg = lazy("psycopg")
    sql = lazy("psycopg.sql")

__all__ = ["DockerPostgresRunner", "seeded_image"]

logger = logging.getLogger(__name__)

_SECRET_PATH = "/tmp/isolate-postgres-password"  # noqa: S105, S108 - a path in the container
#: The seeded cluster's data directory: not the image's ``VOLUME``, so a commit keeps it.
_SEED_DATA = "/var/lib/postgresql/isolate-data"
_SEED_RECIPE = "3"  # 3: without the seeding run's labels
_PASSWORD_SQL = "/tmp/isolate-postgres-password.sql"  # noqa: S105, S108 - a path in the container
#: A seeded container's entrypoint: set the run's password in single-user mode, then start
#: the server; both through the image's own entrypoint (which drops to the postgres user).
_SEEDED_START = (
    'set -e; docker-entrypoint.sh postgres --single -D "$PGDATA" postgres < ' + _PASSWORD_SQL
    + ' > /dev/null; exec docker-entrypoint.sh "$@"'
)
_INIT_DONE = b"PostgreSQL init process complete"
_READY = b"database system is ready to accept connections"


def seeded_image(ctx: DockerRun, base: str, config: PostgresConfig) -> str:
    """The seeded image of ``base``, made now if missing. This process holds it (the
    image's build lock) for its life: ``cleanup --caches`` leaves it alone meanwhile."""
    client = ctx.client
    base_id = client.images.get(base).id
    key = hashlib.sha256(
        f"{_SEED_RECIPE}:{base_id}:{config.superuser}:{config.database}".encode()
    ).hexdigest()[:16]
    tag = f"isolate-pgseed:{key}"

    def make() -> None:
        started = time.monotonic()
        _commit_seed(ctx, base, tag, config)
        logger.info("seeded %s from %s in %.1fs", tag, base, time.monotonic() - started)

    hold_image(client, tag, make)
    return tag


def _commit_seed(ctx: DockerRun, base: str, tag: str, config: PostgresConfig) -> None:
    """Run ``base``'s init once (no network), stop it cleanly, commit the result as ``tag``.
    Its superuser's password is random and forgotten: every run sets its own."""
    password = secrets.token_urlsafe(18)
    client = ctx.client
    labels = ctx.labels("pg-seed")  # reaped with the run should this fail half-way
    container = client.containers.create(
        base, name=f"isolate-pgseed-{ctx.worker.run_id}-{secrets.token_hex(3)}",
        command=["postgres", "-c", "listen_addresses="], network_mode="none", detach=True,
        labels=labels, mounts=volume_mounts(client.images.get(base), labels),
        environment={
            "POSTGRES_USER": config.superuser, "POSTGRES_DB": config.database,
            "POSTGRES_PASSWORD_FILE": _SECRET_PATH, "POSTGRES_INITDB_ARGS": "--no-sync",
            "PGDATA": _SEED_DATA,
        },
    )  # fmt: skip
    try:
        put_file(container, _SECRET_PATH, password)
        container.start()
        def initialised() -> bool:
            logs = bytes(container.logs())
            done = logs.find(_INIT_DONE)
            return done >= 0 and logs.find(_READY, done) >= 0

        def settled() -> bool:  # initialised, or the container gone
            if initialised():
                return True
            container.reload()
            return bool(container.status != "running")

        if not poll_until(settled, config.start_timeout, initial=0.05, maximum=0.5) or not initialised():
            raise RuntimeError(f"{base} did not finish its init: {container_logs(container, 20)}")
        container.stop(timeout=30)  # the image's stop signal: a clean (fast) shutdown
        put_file(container, _SECRET_PATH, "")  # the password must not be in the image
        # A commit keeps the container's labels, and every container made from the image
        # inherits them: this run's would mark those as its own, and once it is gone the
        # next run's reaper would remove them. Docker cannot drop a label: blank them.
        blank = " ".join(f'{key}=""' for key in labels)
        container.commit(
            repository=tag.split(":")[0], tag=tag.split(":")[1],
            changes=[f"ENV PGDATA={_SEED_DATA}", f"LABEL {blank}", f"LABEL {BUILD_LABEL}=pg-seed"],
        )  # fmt: skip
    finally:
        remove_container(container)


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
        self._seeded: str | None = None  # the seeded image, once made (see the module doc)

    def start(self) -> None:
        try:
            self._seeded = seeded_image(self.ctx, self._base_image(), self.config)
        except Exception as exc:
            logger.warning("isolate: starting PostgreSQL from %s without a seeded image: %s", self.image, exc, extra=NOTICE)
        if self._seeded:
            try:
                super().start()
                return
            except ServerStartError as exc:
                logger.warning("isolate: PostgreSQL from the seeded %s did not start (%s); "
                               "starting from %s", self._seeded, exc.message, self.image, extra=NOTICE)  # fmt: skip
                self._seeded = None
        super().start()

    def _base_image(self) -> str:
        from .._docker.images import ensure_image

        ensure_image(self.ctx.client, self.image, hint=self.image_hint)
        return self.image

    def _run_image(self) -> str:
        return self._seeded or self.image

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
        environment = {
            "POSTGRES_USER": self.config.superuser,
            "POSTGRES_PASSWORD_FILE": _SECRET_PATH,  # the password is not in inspect
            "POSTGRES_DB": self.config.database,
            "POSTGRES_INITDB_ARGS": "--no-sync",
        }
        seeded: dict[str, Any] = {}
        if self._seeded:  # initialised already: set the password, then straight to the server
            environment = {"PGDATA": _SEED_DATA}
            seeded = {"entrypoint": ["sh", "-c", _SEEDED_START, "isolate-postgres"]}
        return {
            "command": args,
            "environment": environment,
            "shm_size": "256m",  # parallel query workers use /dev/shm (64MB by default)
            **seeded,
        }

    def _files(self) -> dict[str, str]:
        if not self._seeded:
            return {_SECRET_PATH: self.password}
        role = sql.Identifier(self.config.superuser).as_string(None)
        return {_PASSWORD_SQL: f"{CHEAP_SCRAM}\nALTER ROLE {role} PASSWORD '{self.password}'\n"}

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
