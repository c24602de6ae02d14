"""Containers: the generic server container on a free port, and the reapers."""

from __future__ import annotations

import contextlib
import functools
import io
import logging
import math
import os
import tarfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from .._config import OPTIONS
from .._errors import ServerStartError, tail_text
from .._ports import PortLease
from .._retry import READY_LAG, poll_until, start_on_free_port
from .._run.liveness import open_pidfd, pidfd_exited
from .._run.registry import ProcessRecord
from .context import LABEL, MANAGED_FILTER, DockerRun, owner_of
from .engine import engine, is_docker_error, reason
from .images import ensure_image

__all__ = [
    "ContainerServer",
    "InitWatch",
    "container_logs",
    "container_state",
    "put_file",
    "reap_orphans",
    "reap_run",
    "remove_container",
]

logger = logging.getLogger(__name__)


def remove_container(container: Any) -> None:
    """Force-remove a container and its anonymous volumes (gone already is fine)."""
    with contextlib.suppress(Exception):
        container.remove(force=True, v=True)


def container_state(container: Any) -> dict[str, Any]:
    """Fresh ``State`` of a container (``{}`` if it no longer exists)."""
    try:
        container.reload()
    except Exception:
        return {}
    return dict(container.attrs.get("State") or {})


class InitWatch:
    """Whether a started container's init process still runs, asked of the kernel instead
    of the engine: an inspect is a round trip to dockerd (1.4-2.1 ms, and the engine's CPU)
    that a worker would otherwise make before every test. A pidfd of ``State.Pid``, taken
    only where that pid is a process of this machine's and its cgroup names the container:
    not with a remote engine, nor one whose pids are in another namespace (rootless, a VM).

    "Running" stays the engine's word: the watch only says that the init it saw running
    still runs. Once it has exited (stopped, killed, crashed, restarted from outside), the
    watch is over and the engine is asked again."""

    def __init__(self, pidfd: int) -> None:
        self._pidfd: int | None = pidfd

    @classmethod
    def of(cls, container: Any, state: Mapping[str, Any]) -> InitWatch | None:
        """A watch on the init of ``container`` as ``state`` (its fresh ``State``) shows
        it running; ``None`` where the kernel cannot be asked."""
        pid = int(state.get("Pid") or 0)
        if not state.get("Running") or pid <= 0 or not getattr(container, "id", None):
            return None
        pidfd = open_pidfd(pid)
        if pidfd is None:  # not Linux 5.3+, or not a pid of ours
            return None
        watch = cls(pidfd)
        try:
            # Read after the pidfd is taken, and trusted only if the process behind it
            # still runs afterwards: then /proc named that process, not a reuse of its pid.
            names = _in_cgroup_of(Path(f"/proc/{pid}/cgroup").read_text(), str(container.id))
        except OSError:
            names = False
        if names and watch.alive():
            return watch
        watch.close()
        return None

    def alive(self) -> bool:
        """The init still runs (``False`` once it exited, and from then on)."""
        if self._pidfd is not None and pidfd_exited(self._pidfd, 0):
            self.close()
        return self._pidfd is not None

    def wait(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for the init to exit; whether it has."""
        if self._pidfd is not None and pidfd_exited(self._pidfd, timeout):
            self.close()
        return self._pidfd is None

    def close(self) -> None:
        if self._pidfd is not None:
            os.close(self._pidfd)
            self._pidfd = None


def _in_cgroup_of(cgroups: str, container_id: str) -> bool:
    """Whether a process's ``/proc/<pid>/cgroup`` puts it in the container's own cgroup:
    the last part of a path is the id (cgroupfs: ``/docker/<id>``) or names its systemd
    scope (``docker-<id>.scope``), not merely holds it."""
    ends = (container_id, f"docker-{container_id}.scope")
    return any(line.rpartition(":")[2].rstrip("/").rpartition("/")[2] in ends for line in cgroups.splitlines())


def put_file(container: Any, path: str, text: str, mode: int = 0o644) -> None:
    """Copy a small file into a created (not yet started) container: how secrets reach
    a server without showing in its command line, environment or ``docker inspect``."""
    data = text.encode()
    info = tarfile.TarInfo(path.rsplit("/", 1)[1])
    info.size, info.mode, info.mtime = len(data), mode, int(time.time())
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        tar.addfile(info, io.BytesIO(data))
    container.put_archive(path.rsplit("/", 1)[0] or "/", buffer.getvalue())


def container_logs(container: Any, tail: int | str = "all") -> str:
    try:
        raw = container.logs(stdout=True, stderr=True, tail=tail)
    except Exception:
        return ""
    return bytes(raw).decode("utf-8", "replace")


class ContainerServer:
    """A backing server container (PostgreSQL, Redis) on a free port.

    Subclasses give the create kwargs, a readiness probe and the connection facts.
    """

    kind = "server"
    role = "server"
    container_port = 0

    #: The option naming its image (``pg_image``, ``redis_image``).
    image_option = ""

    def __init__(self, ctx: DockerRun, name: str, container_name: str, start_timeout: float) -> None:
        self.ctx = ctx
        self.name = name
        self.container_name = container_name
        self.image = str(getattr(ctx.settings, self.image_option))
        option = next(opt for opt in OPTIONS if opt.name == self.image_option)
        self.image_hint = (
            f"build or load it locally (docker images), or set {option.cli} / ini "
            f"{option.ini} / env {option.env} to a {self.kind} image that exists "
            f"(official {self.kind.lower()} image contract)"
        )
        self.start_timeout = start_timeout
        self.lease: PortLease | None = None
        self.container: Any = None
        self.on_spawn: Callable[[ProcessRecord], None] | None = None  # containers have labels

    # subclass hooks
    def _create_kwargs(self, port: int) -> dict[str, Any]:
        raise NotImplementedError

    def _probe(self, port: int) -> bool:
        raise NotImplementedError

    def _connected(self, port: int) -> None:
        """Record the connection facts once it is ready (sets ``self.server``)."""
        raise NotImplementedError

    def _files(self) -> dict[str, str]:
        """Files (path: content) to put in the container before it starts: secrets."""
        return {}

    def _run_image(self) -> str:
        """The image the container is created from (``self.image`` unless a subclass
        prepared one from it)."""
        return self.image

    def start(self) -> None:
        """Create and start the container on a free port; block until it is ready."""
        ensure_image(self.ctx.client, self.image, hint=self.image_hint)
        lease = start_on_free_port(self._launch, what=self.kind)
        self._connected(lease.port)

    def _launch(self, lease: PortLease) -> PortLease:
        self.lease, port = lease, lease.port
        try:
            self.container = self.ctx.create(
                self._run_image(), self.container_name, self.role, self.container_port, port,
                **self._create_kwargs(port),
            )  # fmt: skip
            for path, text in self._files().items():
                put_file(self.container, path, text)
            self.container.start()
        except Exception as exc:
            if self.container is not None:
                remove_container(self.container)
            raise ServerStartError(
                f"{self.kind} container {self.container_name} did not start: {reason(exc)}",
                image=self.image,
            ) from None
        checks = [0]

        def ready() -> bool:
            checks[0] += 1
            if checks[0] % 5 == 0 and not container_state(self.container).get("Running"):
                return True  # exited: stop polling, look at the state below
            return self._probe(port)

        poll_until(ready, self.start_timeout, initial=0.01, maximum=0.1, lag=READY_LAG)
        state = container_state(self.container)
        if state.get("Running") and self._probe(port):
            return lease
        log = tail_text(container_logs(self.container, 200), 25)
        remove_container(self.container)
        if state.get("Running"):
            raise ServerStartError(
                f"{self.kind} container {self.container_name} was not ready within "
                f"{self.start_timeout:.0f}s",
                log_tail=log, image=self.image, port=port,
                hint="raise --isolate-pg-start-timeout, or read the container log above",
            )  # fmt: skip
        raise ServerStartError(
            f"{self.kind} container {self.container_name} exited during start-up",
            log_tail=log, exit_code=state.get("ExitCode"), image=self.image,
            hint=f"read the log lines above; check that {self.image} follows the "
            f"official {self.kind} image's contract",
        )  # fmt: skip

    @property
    def is_running(self) -> bool:
        return self.container is not None and bool(container_state(self.container).get("Running"))

    def stop(self, timeout: float | None = None) -> int | None:
        """Stop (the image's stop signal, then SIGKILL) and remove with its volumes."""
        code = None
        if self.container is not None:
            with contextlib.suppress(Exception):
                self.container.stop(timeout=math.ceil(timeout or 10.0))
                code = container_state(self.container).get("ExitCode")
            remove_container(self.container)
        if self.lease is not None:
            self.lease.release()
        return code

    def logs(self) -> str:
        return container_logs(self.container, 200) if self.container is not None else ""

    def record(self) -> None:
        """Containers are reaped by their run label, not through the registry."""
        return None


# -- reaping --------------------------------------------------------------------


def _remove_all(found: list[tuple[str, str, Callable[[], None]]], dry_run: bool) -> list[str]:
    removed = []
    for kind, name, remove in found:
        if not dry_run:
            try:
                remove()
            except Exception as exc:
                if not is_docker_error(exc, "NotFound"):
                    logger.warning("could not remove %s %s: %s", kind, name, reason(exc))
                continue  # gone already (e.g. a volume removed with its container)
        removed.append(f"{kind} {name}")
    return removed


def _find(client: Any, filters: dict[str, str], keep: Callable[[dict[str, str]], bool],
          ) -> list[tuple[str, str, Callable[[], None]]]:  # fmt: skip
    """(kind, name, remove) of every labelled resource ``keep(labels)`` selects.

    Containers first: removing them frees their networks and anonymous volumes.
    """
    found: list[tuple[str, str, Callable[[], None]]] = []
    # ignore_removed: another run may remove its own containers while we list.
    for c in client.containers.list(all=True, filters=filters, ignore_removed=True):
        if keep(c.labels):
            found.append(("container", c.name, functools.partial(c.remove, force=True, v=True)))
    for net in client.networks.list(filters=filters):
        if keep(net.attrs.get("Labels") or {}):
            found.append(("network", net.name, net.remove))
    for vol in client.volumes.list(filters=filters):
        if keep(vol.attrs.get("Labels") or {}):
            found.append(("volume", vol.name, functools.partial(vol.remove, force=True)))
    return found


def reap_run(run_id: str) -> list[str]:
    """Remove every container, network and volume of ``run_id`` (its run is over)."""
    filters = {"label": f"{LABEL.RUN_ID}={run_id}"}
    return _remove_all(_find(engine(), filters, lambda labels: True), dry_run=False)


def reap_orphans(dry_run: bool = False) -> list[str]:
    """Remove containers (then networks and volumes) labelled ``isolate.managed=true``
    whose owner is gone; never those of a live run.

    Returns what was removed (or would be, with ``dry_run``): ``"container NAME"``,
    ``"network NAME"``, ``"volume NAME"``. Raises :class:`DockerUnavailableError` if no
    engine answers.
    """

    def orphaned(labels: dict[str, str]) -> bool:
        owner = owner_of(labels)
        return owner is not None and owner.gone()

    found = _remove_all(_find(engine(), MANAGED_FILTER, orphaned), dry_run)
    for item in found:
        logger.info("reaped orphaned %s", item)
    return found
