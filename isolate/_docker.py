"""The Docker backend: the same stack as the native one, in containers.

* one shared PostgreSQL container per run (``isolate-pg-<run id>``), tuned with
  ``-c`` server args, on a leased port;
* one Redis container per worker (``isolate-redis-<worker>-<run id>``);
* each worker's own container of the service under test
  (``<service>-test-<worker>-<run id>``), created once, then stopped/started in
  place so its URL never changes.

Networking. ``host`` (the default on Linux): every container uses the host's
network namespace and binds 127.0.0.1 only, on a port leased by
:func:`isolate._ports.reserve_port`, exactly like the native backend.
``mapped``: containers join a private user-defined network (one per run,
``isolate-<run id>``, or ``--isolate-docker-network-name``; never the default
bridge) and publish ``127.0.0.1:<leased port>`` to their fixed container port.
In mapped mode the service's templates see the container's view: ``{port}`` is
``ServiceSpec.container_port``, ``{host}`` is ``0.0.0.0`` (listen on the
container's interface so the published port reaches it), and ``{dsn}`` /
``{redis_url}`` name the PostgreSQL/Redis containers on the run's network.
``{url}`` and :attr:`ServiceHandle.url` stay the host-side address.

Every container (and the anonymous volumes declared by its image) carries
``isolate.*`` labels naming the run and its owner process, so
:func:`reap_orphan_containers` (and ``python -m isolate cleanup``) can remove
what a run killed with SIGKILL left behind, and never touch a live run's.

testcontainers' Ryuk reaper is disabled (``TESTCONTAINERS_RYUK_DISABLED=true``
unless the user set it): it needs an image pulled from a registry, and isolate
reaps its own containers.
"""

from __future__ import annotations

import contextlib
import fnmatch
import hashlib
import json
import logging
import math
import os
import re
import secrets
import signal
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

# Before anything imports testcontainers: its Ryuk sidecar needs a registry.
if "TESTCONTAINERS_RYUK_DISABLED" not in os.environ:
    os.environ["TESTCONTAINERS_RYUK_DISABLED"] = "true"

import psycopg
from filelock import FileLock

from ._config import Settings
from ._errors import (
    ConfigError,
    DockerUnavailableError,
    ImageNotFoundError,
    ServerStartError,
    ServiceError,
    ServiceExitedError,
)
from ._ports import PortLease, reserve_port
from ._postgres import PostgresConfig, PostgresServer, prepare_database
from ._proc import ProcessRecord, is_alive, poll_until, process_start_ticks
from ._redis import RedisConfig, RedisServer, acl_users, answers_ping
from ._service import ServiceHandle, ServiceSpec, render, tail_text
from ._worker import WorkerIdentity

__all__ = [
    "DockerPostgresRunner",
    "DockerRedisRunner",
    "DockerService",
    "LABEL",
    "engine_available",
    "network_mode",
    "reap_orphan_containers",
    "remove_run_network",
]

logger = logging.getLogger(__name__)


class LABEL:
    """Label keys put on every container, volume and network isolate creates."""

    MANAGED = "isolate.managed"
    RUN_ID = "isolate.run_id"
    WORKER = "isolate.worker"
    ROLE = "isolate.role"
    OWNER_PID = "isolate.owner_pid"
    OWNER_START_TICKS = "isolate.owner_start_ticks"
    OWNER_HOST = "isolate.owner_host"
    OWNER_BOOT_ID = "isolate.owner_boot_id"
    OWNER_PIDNS = "isolate.owner_pidns"
    CREATED = "isolate.created"


MANAGED_FILTER = {"label": f"{LABEL.MANAGED}=true"}
_RUN_PREFIX = "isolate-run-"  # same as isolate._runtime.RUN_PREFIX
_API_TIMEOUT = 120
_PORT_CONFLICT = (
    "address already in use",
    "port is already allocated",
    "could not bind",
    "could not create any tcp/ip",
    "errno 98",
    "eaddrinuse",
)

# -- engine ----------------------------------------------------------------------

_clients: dict[int, Any] = {}
_clients_lock = threading.Lock()


def _new_client(timeout: float) -> Any:
    """A docker SDK client, located the way testcontainers does (DOCKER_HOST,
    ``tc.host`` in ~/.testcontainers.properties, the docker context)."""
    from testcontainers.core.docker_client import DockerClient

    return DockerClient(timeout=timeout).client


def _engine() -> Any:
    """This process's docker client; :class:`DockerUnavailableError` if no engine answers."""
    pid = os.getpid()  # the SDK's connection pool must not cross a fork
    with _clients_lock:
        client = _clients.get(pid)
        if client is None:
            try:
                client = _new_client(10)  # fail fast if nothing answers...
                client.ping()
                client.api.timeout = _API_TIMEOUT  # ...but let slow operations finish
            except Exception as exc:
                raise DockerUnavailableError(
                    f"no Docker engine answers: {_reason(exc)}",
                    docker_host=os.environ.get("DOCKER_HOST"),
                ) from None
            _clients.clear()
            _clients[pid] = client
    return client


def engine_available(timeout: float = 3.0) -> tuple[bool, str]:
    """Whether a Docker engine answers a ping within ``timeout`` seconds, and why."""
    try:
        client = _new_client(timeout)
        try:
            client.ping()
            version = client.version().get("Version", "?")
        finally:
            client.close()
    except Exception as exc:
        return False, f"no engine: {_reason(exc)}"
    return True, f"docker engine answered (server {version})"


def _reason(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:300]


def _is_docker_error(exc: BaseException, *names: str) -> bool:
    return type(exc).__name__ in names or any(cls.__name__ in names for cls in type(exc).__mro__)


def network_mode(settings: Settings) -> str:
    """``host`` or ``mapped`` (``auto``: host on Linux, mapped elsewhere)."""
    if settings.docker_network == "auto":
        return "host" if sys.platform.startswith("linux") else "mapped"
    return settings.docker_network


# -- owner identity and labels --------------------------------------------------


def _read(path: str) -> str:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return ""


def _boot_id() -> str:
    return _read("/proc/sys/kernel/random/boot_id")


def _pidns() -> str:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return ""


def _owner(settings: Settings, run_id: str) -> tuple[int, int | None]:
    """The run owner's (pid, start ticks): the controller, from its ``owner.json``."""
    owner_file = Path(settings.base_path) / f"{_RUN_PREFIX}{run_id}" / "owner.json"
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        data = json.loads(owner_file.read_text())
        ticks = data.get("start_ticks")
        return int(data["pid"]), int(ticks) if ticks is not None else None
    pid = os.getpid()  # no run dir (used outside the plugin): this process owns it
    return pid, process_start_ticks(pid)


def make_labels(
    settings: Settings,
    worker: WorkerIdentity,
    role: str,
    owner: tuple[int, int | None] | None = None,
) -> dict[str, str]:
    """The ``isolate.*`` labels of a container/volume/network of this run."""
    pid, ticks = owner or _owner(settings, worker.run_id)
    return {
        LABEL.MANAGED: "true",
        LABEL.RUN_ID: worker.run_id,
        LABEL.WORKER: worker.worker_id,
        LABEL.ROLE: role,
        LABEL.OWNER_PID: str(pid),
        LABEL.OWNER_START_TICKS: "" if ticks is None else str(ticks),
        LABEL.OWNER_HOST: socket.gethostname(),
        LABEL.OWNER_BOOT_ID: _boot_id(),
        LABEL.OWNER_PIDNS: _pidns(),
        LABEL.CREATED: str(int(time.time())),
    }


def owner_gone(labels: Mapping[str, str]) -> bool:
    """Whether the run that labelled a resource is certainly over.

    Only judged for owners on this machine and in this PID namespace (another
    CI job sharing the engine has pids we cannot see): the owner is gone if
    the machine rebooted since, or its pid is dead or reused.
    """
    try:
        pid = int(labels.get(LABEL.OWNER_PID, ""))
    except ValueError:
        return False
    boot = labels.get(LABEL.OWNER_BOOT_ID, "")
    host = labels.get(LABEL.OWNER_HOST, "")
    if boot and boot != _boot_id():
        return host == socket.gethostname()  # rebooted since (else: another machine)
    pidns = labels.get(LABEL.OWNER_PIDNS, "")
    if pidns and pidns != _pidns():
        return False
    raw_ticks = labels.get(LABEL.OWNER_START_TICKS, "")
    ticks = int(raw_ticks) if raw_ticks.isdigit() else None
    return not is_alive(pid, ticks)


# -- images ---------------------------------------------------------------------


def ensure_image(client: Any, image: str, *, hint: str) -> Any:
    """The local image ``image``, pulled if missing; :class:`ImageNotFoundError` if neither."""
    try:
        return client.images.get(image)
    except Exception as exc:
        if not _is_docker_error(exc, "ImageNotFound", "NotFound"):
            raise DockerUnavailableError(
                f"docker could not inspect image {image!r}: {_reason(exc)}"
            ) from None
    from docker.utils import parse_repository_tag

    repository, tag = parse_repository_tag(image)
    started = time.monotonic()
    try:
        if tag is not None and tag.startswith("sha256:"):
            pulled = client.images.pull(f"{repository}@{tag}")
        else:
            pulled = client.images.pull(repository, tag=tag or "latest")
    except Exception as exc:
        raise ImageNotFoundError(
            f"image {image!r} is not present locally and could not be pulled: {_reason(exc)}",
            hint=hint, image=image, pull_seconds=f"{time.monotonic() - started:.1f}",
        ) from None  # fmt: skip
    logger.info("pulled %s in %.1fs", image, time.monotonic() - started)
    return pulled


def _dockerignore(context: Path) -> list[str]:
    patterns = []
    with contextlib.suppress(OSError):
        for line in (context / ".dockerignore").read_text().splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                patterns.append(line.lstrip("/").rstrip("/"))
    return patterns


def context_digest(context: Path) -> str:
    """Hash of a build context: every file's path, mode and content (12 hex digits)."""
    ignore = [*_dockerignore(context), ".git", "__pycache__", "*.pyc"]

    def ignored(rel: str) -> bool:
        parts = rel.split("/")
        return any(
            fnmatch.fnmatch(rel, pat) or any(fnmatch.fnmatch(p, pat) for p in parts)
            for pat in ignore
        )

    digest = hashlib.sha256()
    for path in sorted(context.rglob("*")):
        rel = path.relative_to(context).as_posix()
        if not path.is_file() or ignored(rel):
            continue
        digest.update(f"{rel}\0{path.stat().st_mode & 0o111}\0".encode())
        digest.update(path.read_bytes())
        digest.update(b"\0")
    return digest.hexdigest()[:12]


def build_image(client: Any, name: str, context: Path) -> str:
    """Build ``context`` as ``isolate-build/<name>:<hash of the context>`` (reused if present)."""
    if not (context / "Dockerfile").is_file():
        raise ConfigError(
            f"build context {context} has no Dockerfile",
            hint="point ServiceSpec.build_context at a directory with a Dockerfile "
            "(relative paths are relative to the pytest rootdir)",
        )
    repo = re.sub(r"[^a-z0-9._-]+", "-", name.lower()).strip("._-") or "service"
    tag = f"isolate-build/{repo}:{context_digest(context)}"
    with contextlib.suppress(Exception):
        client.images.get(tag)
        return tag
    lock_dir = Path(tempfile.gettempdir()) / "isolate-build-locks"
    lock_dir.mkdir(exist_ok=True)
    with FileLock(str(lock_dir / f"{tag.replace('/', '_').replace(':', '_')}.lock")):
        with contextlib.suppress(Exception):
            client.images.get(tag)
            return tag  # another worker built it while we waited
        started = time.monotonic()
        try:
            client.images.build(
                path=str(context), tag=tag, rm=True, forcerm=True, pull=False,
                network_mode="host", labels={"isolate.build_context": str(context)},
            )  # fmt: skip
        except Exception as exc:
            build_log = getattr(exc, "build_log", None) or []
            text = "".join(
                str(chunk.get("stream") or chunk.get("error") or "")
                for chunk in build_log
                if isinstance(chunk, dict)
            )
            raise ImageNotFoundError(
                f"building image {tag} from {context} failed: {_reason(exc)}",
                log_tail=tail_text(text, 20) or None,
                hint="fix the Dockerfile (base images must exist locally or be pullable), "
                "or set ServiceSpec.image to an image that exists",
                context=context,
            ) from None
        logger.info("built %s in %.1fs", tag, time.monotonic() - started)
    return tag


def _volume_mounts(image: Any, labels: Mapping[str, str]) -> list[Any]:
    """Labelled anonymous volumes for the image's ``VOLUME``s (instead of unlabelled ones)."""
    from docker.types import Mount

    volumes = (image.attrs.get("Config") or {}).get("Volumes") or {}
    return [
        Mount(target=target, source=None, type="volume", labels=dict(labels))
        for target in sorted(volumes)
    ]


def _image_env(image: Any) -> dict[str, str]:
    env = (image.attrs.get("Config") or {}).get("Env") or []
    return dict(item.partition("=")[::2] for item in env)


# -- networks (mapped mode) -----------------------------------------------------


def _run_network_name(settings: Settings, run_id: str) -> str:
    return settings.docker_network_name or f"isolate-{run_id}"


def ensure_run_network(client: Any, settings: Settings, worker: WorkerIdentity) -> str:
    """The user-defined network of the run (mapped mode), created once per run."""
    if settings.docker_network_name:
        try:
            client.networks.get(settings.docker_network_name)
        except Exception as exc:
            raise ConfigError(
                f"docker network {settings.docker_network_name!r} does not exist: {_reason(exc)}",
                hint="create it, or unset --isolate-docker-network-name to let isolate make "
                "a private network per run",
            ) from None
        return str(settings.docker_network_name)
    name = _run_network_name(settings, worker.run_id)
    lock_path = Path(settings.base_path) / f"{_RUN_PREFIX}{worker.run_id}" / "network.lock"
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(lock_path)):
        if client.networks.list(names=[name]):
            return name
        client.networks.create(
            name, driver="bridge", check_duplicate=True,
            # published ports default to loopback, whatever a caller asks for
            options={"com.docker.network.bridge.host_binding_ipv4": "127.0.0.1"},
            labels=make_labels(settings, worker, "network"),
        )  # fmt: skip
    return name


def remove_run_network(run_id: str) -> list[str]:
    """Remove the networks isolate created for ``run_id`` (after its containers)."""
    removed = []
    with contextlib.suppress(DockerUnavailableError):
        client = _engine()
        for net in client.networks.list(filters={"label": f"{LABEL.RUN_ID}={run_id}"}):
            try:
                net.remove()
                removed.append(net.name)
            except Exception as exc:
                logger.warning("could not remove network %s: %s", net.name, _reason(exc))
    return removed


def _published_ports(client: Any, run_id: str) -> dict[int, tuple[str, int]]:
    """Host port -> (container name, container port) of this run's containers."""
    mapping: dict[int, tuple[str, int]] = {}
    for entry in client.api.containers(filters={"label": f"{LABEL.RUN_ID}={run_id}"}):
        name = (entry.get("Names") or ["/"])[0].lstrip("/")
        for port in entry.get("Ports") or []:
            if port.get("PublicPort") and port.get("PrivatePort"):
                mapping[int(port["PublicPort"])] = (name, int(port["PrivatePort"]))
    return mapping


# -- containers -----------------------------------------------------------------


def _remove(container: Any) -> None:
    with contextlib.suppress(Exception):
        container.remove(force=True, v=True)


def _remove_stale(client: Any, name: str, run_id: str) -> None:
    """Remove a container of the same name left by this run (a failed earlier try)."""
    try:
        old = client.containers.get(name)
    except Exception:
        return
    if old.labels.get(LABEL.RUN_ID) == run_id:
        _remove(old)


def _state(container: Any) -> dict[str, Any]:
    """Fresh ``State`` of a container (``{}`` if it no longer exists)."""
    try:
        container.reload()
    except Exception:
        return {}
    return dict(container.attrs.get("State") or {})


def _logs(container: Any, tail: int | str = "all") -> str:
    try:
        raw = container.logs(stdout=True, stderr=True, tail=tail)
    except Exception:
        return ""
    return bytes(raw).decode("utf-8", "replace")


def _port_conflict(text: str) -> bool:
    lowered = text.lower()
    return any(marker in lowered for marker in _PORT_CONFLICT)


class _DockerServer:
    """A backing server container (PostgreSQL, Redis) on a leased port."""

    kind = "server"
    role = "server"
    container_port = 0

    def __init__(self, settings: Settings, worker: WorkerIdentity, name: str, container_name: str,
                 image: str, image_hint: str, start_timeout: float) -> None:  # fmt: skip
        self.name = name
        self.settings = settings
        self.worker = worker
        self.container_name = container_name
        self.image = image
        self.image_hint = image_hint
        self.start_timeout = start_timeout
        self.mode = network_mode(settings)
        self.lease: PortLease | None = None
        self.container: Any = None

    # subclass hooks
    def _create_kwargs(self, port: int, image: Any) -> dict[str, Any]:
        raise NotImplementedError

    def _probe(self, port: int) -> bool:
        raise NotImplementedError

    def _ready(self, container: Any, port: int, checks: list[int]) -> bool:
        checks[0] += 1
        if checks[0] % 5 == 0 and not _state(container).get("Running", False):
            return True  # exited: stop polling, the caller looks at the state
        return self._probe(port)

    def start(self) -> None:
        client = _engine()
        image = ensure_image(client, self.image, hint=self.image_hint)
        network = (
            ensure_run_network(client, self.settings, self.worker)
            if self.mode == "mapped"
            else None
        )
        labels = make_labels(self.settings, self.worker, self.role)
        for attempt in range(5):
            self.lease = reserve_port()
            port = self.lease.port
            kwargs = self._create_kwargs(port, image)
            if network is None:
                kwargs["network_mode"] = "host"
            else:
                kwargs.update(
                    network=network,
                    ports={f"{self.container_port}/tcp": ("127.0.0.1", port)},
                )
            _remove_stale(client, self.container_name, self.worker.run_id)
            try:
                container = client.containers.create(
                    self.image, name=self.container_name, labels=labels,
                    mounts=_volume_mounts(image, labels), detach=True, **kwargs,
                )  # fmt: skip
            except Exception as exc:
                self.lease.release()
                raise ServerStartError(
                    f"docker could not create the {self.kind} container "
                    f"{self.container_name}: {_reason(exc)}",
                    image=self.image,
                ) from None
            self.container = container
            try:
                container.start()
            except Exception as exc:
                _remove(container)
                self.lease.release()
                if _port_conflict(str(exc)) and attempt < 4:
                    logger.info("%s: port %d taken; retrying", self.kind, port)
                    continue
                raise ServerStartError(
                    f"{self.kind} container {self.container_name} did not start: {_reason(exc)}",
                    image=self.image,
                ) from None
            checks = [0]
            poll_until(lambda c=container, p=port, n=checks: self._ready(c, p, n),  # type: ignore[misc]
                       self.start_timeout, initial=0.01, maximum=0.1)  # fmt: skip
            state = _state(container)
            if state.get("Running") and self._probe(port):
                break
            log = tail_text(_logs(container, 200), 25)
            _remove(container)
            self.lease.release()
            if state.get("Running"):
                raise ServerStartError(
                    f"{self.kind} container {self.container_name} was not ready within "
                    f"{self.start_timeout:.0f}s",
                    log_tail=log, image=self.image, port=port,
                    hint="raise --isolate-pg-start-timeout, or read the container log above",
                )  # fmt: skip
            if _port_conflict(log) and attempt < 4:
                logger.info("%s: port %d taken; retrying", self.kind, port)
                continue
            raise ServerStartError(
                f"{self.kind} container {self.container_name} exited during start-up",
                log_tail=log, exit_code=state.get("ExitCode"), image=self.image,
                hint=f"read the log lines above; check that {self.image} follows the "
                f"official {self.kind} image's contract",
            )  # fmt: skip

    @property
    def is_running(self) -> bool:
        return self.container is not None and bool(_state(self.container).get("Running"))

    def stop(self, timeout: float | None = None) -> int | None:
        """Stop (the image's stop signal, then SIGKILL) and remove with its volumes."""
        code = None
        if self.container is not None:
            with contextlib.suppress(Exception):
                self.container.stop(timeout=math.ceil(timeout or 10.0))
                code = _state(self.container).get("ExitCode")
            _remove(self.container)
        if self.lease is not None:
            self.lease.release()
        return code

    def logs(self) -> str:
        return _logs(self.container, 200) if self.container is not None else ""

    def record(self) -> ProcessRecord:
        container = self.container.id if self.container is not None else self.container_name
        return ProcessRecord(name=self.name, container=container)


class DockerPostgresRunner(_DockerServer):
    """The run's shared PostgreSQL as a container of ``settings.pg_image``."""

    kind = "PostgreSQL"
    role = "postgres"
    container_port = 5432

    def __init__(self, config: PostgresConfig, settings: Settings, worker: WorkerIdentity,
                 name: str = "postgres") -> None:  # fmt: skip
        super().__init__(
            settings, worker, name, f"isolate-pg-{worker.run_id}", settings.pg_image,
            "build or load it locally (docker images), or set --isolate-pg-image / ini "
            "isolate_pg_image / env ISOLATE_PG_IMAGE to a PostgreSQL image that exists "
            "(official postgres image contract)",
            config.start_timeout,
        )  # fmt: skip
        self.config = config
        self.password = secrets.token_urlsafe(18)
        self.version = ""
        self.server: PostgresServer | None = None

    def _create_kwargs(self, port: int, image: Any) -> dict[str, Any]:
        settings = {k: v for k, v in self.config.settings.items() if k != "port"}
        if self.mode == "mapped":
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
                "POSTGRES_PASSWORD": self.password,
                "POSTGRES_DB": self.config.database,
                "POSTGRES_INITDB_ARGS": "--no-sync",
            },
            "shm_size": "256m",  # parallel query workers use /dev/shm (64MB by default)
        }

    def _dsn(self, port: int) -> str:
        return PostgresServer(
            "127.0.0.1", port, self.config.superuser, self.password, self.config.database, ""
        ).dsn()

    def _probe(self, port: int) -> bool:
        # A real connection to the final server: the entrypoint's init server is
        # socket-only and restarts, so log lines or an open port would lie.
        try:
            with psycopg.connect(self._dsn(port), connect_timeout=2, autocommit=True) as conn:
                row = conn.execute("SHOW server_version").fetchone()
        except psycopg.Error:
            return False
        self.version = str(row[0]).split()[0] if row else ""
        return True

    def start(self) -> None:
        super().start()
        assert self.lease is not None
        self.server = PostgresServer(
            host="127.0.0.1",
            port=self.lease.port,
            user=self.config.superuser,
            password=self.password,
            database=self.config.database,
            version=self.version,
            backend="docker",
            settings=dict(self.config.settings),
        )
        prepare_database(self.server)


class DockerRedisRunner(_DockerServer):
    """A Redis container of ``settings.redis_image`` on a leased port."""

    kind = "Redis"
    role = "redis"
    container_port = 6379

    def __init__(self, config: RedisConfig, settings: Settings, worker: WorkerIdentity,
                 name: str = "redis") -> None:  # fmt: skip
        who = "shared" if name == "redis-shared" else worker.slug
        super().__init__(
            settings, worker, name, f"isolate-redis-{who}-{worker.run_id}", settings.redis_image,
            "build or load it locally (docker images), or set --isolate-redis-image / ini "
            "isolate_redis_image / env ISOLATE_REDIS_IMAGE to a Redis image that exists",
            config.start_timeout,
        )  # fmt: skip
        self.config = config
        self.admin_password = secrets.token_urlsafe(18)
        self.server: RedisServer | None = None

    def _create_kwargs(self, port: int, image: Any) -> dict[str, Any]:
        if self.mode == "mapped":
            # inside its own network namespace; published on 127.0.0.1 only
            net = ["--port", str(self.container_port), "--bind", "0.0.0.0",  # noqa: S104
                   "--protected-mode", "no"]  # fmt: skip
        else:
            net = ["--port", str(port), "--bind", "127.0.0.1", "--protected-mode", "yes"]
        return {
            "command": [
                *net, "--save", "", "--appendonly", "no",
                "--databases", str(self.config.databases),
                *(arg for user in acl_users(self.admin_password) for arg in ("--user", *user)),
            ],
        }  # fmt: skip

    def _probe(self, port: int) -> bool:
        return answers_ping(port)

    def start(self) -> None:
        super().start()
        assert self.lease is not None
        self.server = RedisServer(
            "127.0.0.1", self.lease.port, 0, self.admin_password, backend="docker"
        )


# -- the service under test -------------------------------------------------------

_URL_HOSTPORT = re.compile(r"(?<=[@/])(?:127\.0\.0\.1|localhost):(\d+)")


class DockerService(ServiceHandle):
    """The service under test as a container: ``<name>-test-<worker>-<run id>``.

    The container is created once and then stopped and started in place, so it
    keeps its port (and :attr:`url`), its logs and its id across restarts.
    Exit codes are Docker's: 128+N when killed by signal N (137 after SIGKILL).
    The image's ``WORKDIR`` and environment apply: ``ServiceSpec.cwd`` and
    ``inherit_env`` describe the host and are ignored; ``spec.env`` (rendered)
    and ``ISOLATE_INSTANCE_NAME`` are set on top.
    """

    def __init__(self, spec: ServiceSpec, lease: PortLease, instance_name: str,
                 values: Mapping[str, object], ready_timeout: float, stop_timeout: float, *,
                 settings: Settings, worker: WorkerIdentity, rootdir: Path) -> None:  # fmt: skip
        super().__init__(spec, lease, instance_name, values, ready_timeout, stop_timeout)
        self.settings = settings
        self.worker = worker
        self.rootdir = Path(rootdir)
        self.mode = network_mode(settings)
        self.container_name = f"{spec.name}-test-{worker.slug}-{worker.run_id}"
        if self.mode == "mapped" and spec.container_port is None:
            raise ConfigError(
                f"service {spec.name!r}: docker network mode 'mapped' needs ServiceSpec.container_port",
                hint="set ServiceSpec(container_port=<port the service listens on in its "
                "container>), or use --isolate-docker-network=host",
            )
        self.client = _engine()
        self.image = self._resolve_image()
        self._container: Any = None
        self._final_logs = ""

    def _resolve_image(self) -> str:
        spec = self.spec
        if spec.image:
            ensure_image(
                self.client, spec.image,
                hint=f"build it (docker build -t {spec.image} ...), set ServiceSpec.image to "
                "an image that exists locally, or set ServiceSpec.build_context to its "
                "Dockerfile's directory",
            )  # fmt: skip
            return spec.image
        if spec.build_context:
            context = Path(spec.build_context)
            if not context.is_absolute():
                context = self.rootdir / context
            return build_image(self.client, spec.name, context)
        raise ConfigError(
            f"service {spec.name!r} has neither an image nor a build context",
            hint="set ServiceSpec(image=...) or ServiceSpec(build_context=...) for the docker backend",
        )

    @property
    def container_id(self) -> str | None:
        return self._container.id if self._container is not None else None

    def container_values(self) -> dict[str, object]:
        """Template values as seen from inside the container (differ in mapped mode)."""
        values = dict(self.values)
        if self.mode != "mapped":
            return values
        values["port"] = self.spec.container_port
        values["host"] = "0.0.0.0"  # noqa: S104 - the container's interface; published on 127.0.0.1
        keys = [key for key in ("dsn", "redis_url") if key in values]
        if not keys:
            return values
        published = _published_ports(self.client, self.worker.run_id)

        def swap(match: re.Match[str]) -> str:
            target = published.get(int(match.group(1)))
            return f"{target[0]}:{target[1]}" if target else match.group(0)

        for key in keys:
            values[key] = _URL_HOSTPORT.sub(swap, str(values[key]))
        return values

    def _create(self) -> Any:
        values = self.container_values()
        env = {k: render(v, values) for k, v in self.spec.env.items()}
        env["ISOLATE_INSTANCE_NAME"] = self.name
        command = [render(arg, values) for arg in self.spec.command] or None
        labels = make_labels(self.settings, self.worker, "service")
        labels["isolate.service"] = self.spec.name
        kwargs: dict[str, Any] = {}
        if self.mode == "mapped":
            kwargs.update(
                network=ensure_run_network(self.client, self.settings, self.worker),
                ports={f"{self.spec.container_port}/tcp": ("127.0.0.1", self.port)},
            )
        else:
            kwargs["network_mode"] = "host"
        _remove_stale(self.client, self.container_name, self.worker.run_id)
        try:
            image = self.client.images.get(self.image)
            return self.client.containers.create(
                self.image, command=command, environment=env, name=self.container_name,
                labels=labels, mounts=_volume_mounts(image, labels), detach=True, **kwargs,
            )  # fmt: skip
        except Exception as exc:
            raise ServiceError(
                f"docker could not create container {self.container_name}: {_reason(exc)}",
                image=self.image,
            ) from None

    def _new_port(self) -> None:
        """Lease another port (first start only) and forget the container made for the old one."""
        old = self.lease.port
        self.lease.release()
        self.lease = reserve_port()
        self.values.update(port=self.lease.port, url=f"http://{self.host}:{self.lease.port}")
        if self._container is not None:
            _remove(self._container)
            self._container = None
        logger.info("%s: port %d was taken; retrying on %d", self.name, old, self.lease.port)

    def _launch(self) -> None:
        for attempt in range(5):
            if self._container is None:
                self._container = self._create()
            try:
                self._container.start()
                return
            except Exception as exc:
                if self.starts == 0 and _port_conflict(str(exc)) and attempt < 4:
                    self._new_port()
                    continue
                raise ServiceError(
                    f"container {self.container_name} did not start: {_reason(exc)}",
                    image=self.image,
                    port=self.port,
                ) from None

    def start(self, wait: bool = True) -> None:
        if self.starts > 0 or not wait:
            super().start(wait)
            return
        for attempt in range(5):  # first start: a port taken meanwhile gets a new lease
            try:
                super().start(wait=True)
                return
            except ServiceExitedError as exc:
                if attempt == 4 or not _port_conflict(exc.log_tail or ""):
                    raise
                self.starts = 0
                self._new_port()

    def _state(self) -> dict[str, Any]:
        if self._container is None:
            return {}
        return _state(self._container)

    def _exit_code(self) -> int | None:
        state = self._state()
        if not state or state.get("Running") or state.get("Status") == "created":
            return None
        return int(state.get("ExitCode", 0))

    def _wait_exit(self, timeout: float) -> int | None:
        if self._container is None:
            return None
        poll_until(lambda: not self._state().get("Running"), timeout, initial=0.01, maximum=0.1)
        return self._exit_code()

    def _stop(self, sig: int, timeout: float) -> int | None:
        if self._container is None:
            return None
        if not self._state().get("Running"):
            return self._exit_code()
        if sig == signal.SIGTERM:
            # docker stop -t: the image's stop signal (SIGTERM by default), then SIGKILL.
            # Docker counts whole seconds.
            self._container.stop(timeout=max(0, math.ceil(timeout)))
        else:
            self.signal(sig)
            if self._wait_exit(timeout) is None:
                return self.kill()
        self._wait_exit(5.0)
        return self._exit_code()

    def kill(self) -> int | None:
        if self._container is not None and self._state().get("Running"):
            with contextlib.suppress(Exception):  # it may exit between the check and the kill
                self._container.kill()
            self._wait_exit(10.0)
        self.last_exit_code = self._exit_code()
        return self.last_exit_code

    def signal(self, sig: int) -> None:
        if self._container is not None and self._state().get("Running"):
            with contextlib.suppress(Exception):
                self._container.kill(signal=int(sig))

    @property
    def is_running(self) -> bool:
        return bool(self._state().get("Running"))

    def logs(self) -> str:
        if self._container is None:
            return self._final_logs
        return _logs(self._container) or self._final_logs

    def record(self) -> ProcessRecord:
        return ProcessRecord(
            name=f"service-{self.name}", container=self.container_id or self.container_name
        )

    def close(self) -> None:
        """Stop gracefully, remove the container (and its volumes), give the port back."""
        try:
            super().close()
        finally:
            if self._container is not None:
                self._final_logs = _logs(self._container)
                _remove(self._container)
                self._container = None


# -- reaping --------------------------------------------------------------------


def _remover(obj: Any, **kwargs: Any) -> Callable[[], None]:
    return lambda: obj.remove(**kwargs)


def _orphans(client: Any, kind: str) -> list[tuple[str, Callable[[], None]]]:
    """(name, remove) of every isolate resource of ``kind`` whose owner is gone."""
    found: list[tuple[str, Callable[[], None]]] = []
    if kind == "container":
        # ignore_removed: another run may remove its own containers while we list.
        for container in client.containers.list(
            all=True, filters=MANAGED_FILTER, ignore_removed=True
        ):
            if owner_gone(container.labels):
                found.append((container.name, _remover(container, force=True, v=True)))
    elif kind == "network":
        for network in client.networks.list(filters=MANAGED_FILTER):
            if owner_gone(network.attrs.get("Labels") or {}):
                found.append((network.name, network.remove))
    else:
        for volume in client.volumes.list(filters=MANAGED_FILTER):
            if owner_gone(volume.attrs.get("Labels") or {}):
                found.append((volume.name, _remover(volume, force=True)))
    return found


def reap_orphan_containers(dry_run: bool = False) -> list[str]:
    """Remove containers (then networks and volumes) labelled ``isolate.managed=true``
    whose owner process is gone; never those of a live run.

    Returns what was removed (or would be, with ``dry_run``): ``"container NAME"``,
    ``"network NAME"``, ``"volume NAME"``. Raises :class:`DockerUnavailableError`
    if no engine answers.
    """
    client = _engine()
    removed = []
    # Containers first: their removal frees their networks and (anonymous) volumes.
    for kind in ("container", "network", "volume"):
        for name, remove in _orphans(client, kind):
            if not dry_run:
                try:
                    remove()
                except Exception as exc:
                    if not _is_docker_error(exc, "NotFound"):
                        logger.warning("could not remove %s %s: %s", kind, name, _reason(exc))
                    continue  # gone already (e.g. a volume removed with its container)
            logger.info("reaped orphaned %s %s", kind, name)
            removed.append(f"{kind} {name}")
    return removed
