"""The shared PostgreSQL as a container of ``--isolate-pg-image`` (official image contract).

The image's entrypoint runs ``initdb`` when its data directory is empty, then a socket-only
server for its init scripts, then the real one: ~1-2 s of every start. So isolate starts
from a *seeded* image instead, made once per base image (and user) by committing a
container of it after its init: ``isolate-pgseed:<key>``, with the data directory outside
the image's ``VOLUME`` (a commit keeps it). Its superuser password is this user's, kept in
the user's cache dir (0600); each run connects with it once and sets a new one of its own.
Should seeding fail (an image that does not follow the official contract closely enough),
the run starts from the base image as before. ``python -m isolate cleanup --caches``
removes the seeded images.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import secrets
import time
from typing import TYPE_CHECKING, Any

from .._docker.containers import ContainerServer, container_logs, put_file, remove_container
from .._docker.context import DockerRun
from .._docker.images import BUILD_LABEL, hold_image, volume_mounts
from .._fs import own_dir
from .._lazy import lazy
from .server import PostgresConfig, PostgresServer, prepare_database

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
_SEED_RECIPE = "1"
_INIT_DONE = b"PostgreSQL init process complete"
_READY = b"database system is ready to accept connections"


def seeded_image(ctx: DockerRun, base: str, config: PostgresConfig) -> tuple[str, str]:
    """The seeded image of ``base`` and its superuser password, made now if missing. This
    process holds it (the image's build lock) for its life: ``cleanup --caches`` leaves it."""
    client = ctx.client
    base_id = client.images.get(base).id
    cache = own_dir(ctx.run.path.parent / f"isolate-cache-{os.geteuid()}", 0o711)
    # Keyed by the cache too: the password lives there, the image is the engine's.
    key = hashlib.sha256(
        f"{_SEED_RECIPE}:{base_id}:{config.superuser}:{config.database}:{cache}".encode()
    ).hexdigest()[:16]
    tag = f"isolate-pgseed:{key}"
    secret = cache / f"docker-pgseed-{key}.json"
    found: list[str] = []

    def ready() -> bool:
        try:
            record = json.loads(secret.read_text())
            if client.images.get(tag).id == record["id"]:  # not remade elsewhere meanwhile
                found[:] = [str(record["password"])]
                return True
        except Exception:  # noqa: S110 - missing image or password: make both again
            pass
        return False

    def make() -> None:
        password = secrets.token_urlsafe(18)
        started = time.monotonic()
        image_id = _commit_seed(ctx, base, tag, config, password)
        tmp = secret.with_name(f".{secret.name}.{os.getpid()}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "w") as fh:
            json.dump({"password": password, "image": tag, "id": image_id, "base": base}, fh)
        tmp.replace(secret)
        found[:] = [password]
        logger.info("seeded %s from %s in %.1fs", tag, base, time.monotonic() - started)

    hold_image(client, tag, make, ready)
    return tag, found[0]


def _commit_seed(ctx: DockerRun, base: str, tag: str, config: PostgresConfig, password: str) -> str:
    """Run ``base``'s init once (no network), stop it cleanly, commit the result as ``tag``;
    the new image's id."""
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
        deadline = time.monotonic() + config.start_timeout
        while True:
            logs = bytes(container.logs())
            done = logs.find(_INIT_DONE)
            if done >= 0 and logs.find(_READY, done) >= 0:
                break
            container.reload()
            if container.status != "running" or time.monotonic() > deadline:
                raise RuntimeError(f"{base} did not finish its init: {container_logs(container, 20)}")
            time.sleep(0.05)
        container.stop(timeout=30)  # the image's stop signal: a clean (fast) shutdown
        put_file(container, _SECRET_PATH, "")  # the password must not be in the image
        image = container.commit(
            repository=tag.split(":")[0], tag=tag.split(":")[1],
            changes=[f"ENV PGDATA={_SEED_DATA}", f"LABEL {BUILD_LABEL}=pg-seed"],
        )  # fmt: skip
        return str(image.id)
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
            self._seeded, self.password = seeded_image(self.ctx, self._base_image(), self.config)
        except Exception as exc:
            logger.warning("isolate: starting PostgreSQL from %s without a seeded image: %s", self.image, exc)
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
        if self._seeded:  # initialised already: the entrypoint goes straight to the server
            environment = {"PGDATA": _SEED_DATA}
        return {
            "command": args,
            "environment": environment,
            "shm_size": "256m",  # parallel query workers use /dev/shm (64MB by default)
        }

    def _files(self) -> dict[str, str]:
        return {} if self._seeded else {_SECRET_PATH: self.password}

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
        if self._seeded:  # the seed's password is this user's: the run gets its own
            password = secrets.token_urlsafe(18)
            with psycopg.connect(self._facts(port).dsn(), autocommit=True) as conn:
                conn.execute(
                    sql.SQL("ALTER ROLE {} PASSWORD {}").format(
                        sql.Identifier(self.config.superuser), sql.Literal(password)
                    )
                )
            self.password = password
        self.server = self._facts(port)
        prepare_database(self.server)
