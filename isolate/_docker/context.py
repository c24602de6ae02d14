"""One run on the Docker engine: its labels, its client and, in mapped mode, its network.

Networking. ``host`` (the default on Linux): every container uses the host's network
namespace and binds 127.0.0.1 only, on a leased port, exactly like the native backend.
``mapped``: containers join a private user-defined network (one per run,
``isolate-<run id>``, or ``--isolate-docker-network-name``; never the default bridge) and
publish ``127.0.0.1:<leased port>`` to their fixed container port.

Every container, volume and network carries ``isolate.*`` labels naming the run and its
owner (:class:`~isolate._run.liveness.Owner`), so the reaper judges a container exactly as
it judges a run dir, and never touches a live run's.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from filelock import FileLock

from .._config import Settings
from .._errors import ConfigError
from .._identity import WorkerIdentity
from .._run.liveness import Owner
from .._run.rundir import RunDir
from .engine import engine, network_mode, reason
from .images import volume_mounts

__all__ = ["LABEL", "MANAGED_FILTER", "DockerRun", "owner_of"]

logger = logging.getLogger(__name__)


class LABEL:
    """Label keys put on every container, volume and network isolate creates."""

    MANAGED = "isolate.managed"
    RUN_ID = "isolate.run_id"
    WORKER = "isolate.worker"
    ROLE = "isolate.role"
    OWNER = "isolate.owner_"  # + each Owner field: pid, start_ticks, host, boot_id, pidns
    CREATED = "isolate.created"


MANAGED_FILTER = {"label": f"{LABEL.MANAGED}=true"}


def owner_of(labels: Mapping[str, str]) -> Owner | None:
    """The owner recorded in a resource's labels."""
    fields = ("pid", "start_ticks", "host", "boot_id", "pidns")
    return Owner.parse({f: labels.get(LABEL.OWNER + f) for f in fields})


@dataclass(frozen=True)
class DockerRun:
    """What every container of a run needs: settings, identity, run dir and owner."""

    settings: Settings
    worker: WorkerIdentity
    run: RunDir
    find_owner: Callable[[], Owner]

    @functools.cached_property
    def client(self) -> Any:
        return engine()

    @functools.cached_property
    def owner(self) -> Owner:
        """The run's owner (read once: the controller has recorded it by then)."""
        return self.find_owner()

    @property
    def mode(self) -> str:
        return network_mode(self.settings)

    def labels(self, role: str) -> dict[str, str]:
        """The ``isolate.*`` labels of a resource of this run."""
        owner = {LABEL.OWNER + k: v for k, v in self.owner.to_strings().items()}
        return {
            LABEL.MANAGED: "true", LABEL.RUN_ID: self.worker.run_id,
            LABEL.WORKER: self.worker.worker_id, LABEL.ROLE: role,
            LABEL.CREATED: str(int(time.time())), **owner,
        }  # fmt: skip

    def networking(self, container_port: int | None, host_port: int) -> dict[str, Any]:
        """Create kwargs: host networking, or the run's network with a loopback port."""
        if self.mode != "mapped":
            return {"network_mode": "host"}
        return {
            "network": self.network(),
            "ports": {f"{container_port}/tcp": ("127.0.0.1", host_port)},
        }

    def network(self) -> str:
        """The user-defined network of the run (mapped mode), created once per run."""
        wanted = self.settings.docker_network_name
        if wanted:
            try:
                self.client.networks.get(wanted)
            except Exception as exc:
                raise ConfigError(
                    f"docker network {wanted!r} does not exist: {reason(exc)}",
                    hint="create it, or unset --isolate-docker-network-name to let isolate "
                    "make a private network per run",
                ) from None
            return wanted
        name = f"isolate-{self.worker.run_id}"
        self.run.path.mkdir(parents=True, exist_ok=True)
        with FileLock(str(self.run.path / "network.lock")):
            if not self.client.networks.list(names=[name]):
                self.client.networks.create(
                    name, driver="bridge", check_duplicate=True,
                    # published ports default to loopback, whatever a caller asks for
                    options={"com.docker.network.bridge.host_binding_ipv4": "127.0.0.1"},
                    labels=self.labels("network"),
                )  # fmt: skip
        return name

    def published_ports(self) -> dict[int, tuple[str, int]]:
        """Host port -> (container name, container port) of this run's containers."""
        mapping: dict[int, tuple[str, int]] = {}
        for entry in self.client.api.containers(filters=self.run_filter()):
            name = (entry.get("Names") or ["/"])[0].lstrip("/")
            for port in entry.get("Ports") or []:
                if port.get("PublicPort") and port.get("PrivatePort"):
                    mapping[int(port["PublicPort"])] = (name, int(port["PrivatePort"]))
        return mapping

    def run_filter(self) -> dict[str, str]:
        return {"label": f"{LABEL.RUN_ID}={self.worker.run_id}"}

    def create(self, image: str, name: str, role: str, container_port: int | None,
               host_port: int, *, extra_labels: Mapping[str, str] | None = None,
               extra_mounts: Sequence[Any] = (), image_info: Any = None, **kwargs: Any) -> Any:  # fmt: skip
        """Create (not start) container ``name`` of this run: its labels, labelled
        volumes for the image's ``VOLUME``s (and ``extra_mounts``), and the run's
        networking on ``host_port``. A container of that name left by this run (a failed
        earlier try) goes first. ``image_info``: the image, if the caller inspected it."""
        labels = {**self.labels(role), **(extra_labels or {})}
        self.remove_stale(name)
        info = image_info if image_info is not None else self.client.images.get(image)
        mounts = [*volume_mounts(info, labels), *extra_mounts]
        return self.client.containers.create(
            image, name=name, labels=labels, mounts=mounts, detach=True,
            **kwargs, **self.networking(container_port, host_port),
        )  # fmt: skip

    def remove_stale(self, name: str) -> None:
        """Remove a container of that name left by this run (a failed earlier try)."""
        with contextlib.suppress(Exception):
            old = self.client.containers.get(name)
            if old.labels.get(LABEL.RUN_ID) == self.worker.run_id:
                old.remove(force=True, v=True)
