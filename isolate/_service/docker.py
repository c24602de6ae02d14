"""The service under test as a container: ``<name>-test-<worker>-<run id>``."""

from __future__ import annotations

import contextlib
import logging
import math
import re
import signal
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from .._docker.containers import InitWatch, container_logs, container_state, remove_container
from .._docker.context import DockerRun
from .._docker.engine import reason
from .._docker.images import build_image, ensure_image
from .._errors import ConfigError, ServiceError, tail_text
from .._retry import poll_until
from .._run.notices import NOTICE
from .._run.registry import ProcessRecord
from .containerfork import ContainerForks, forks_in_container, host_pid
from .forkserver import RunHost
from .native import shell_exit_code
from .spec import ServiceSpec, render

__all__ = ["ContainerLauncher"]

logger = logging.getLogger(__name__)

_URL_HOSTPORT = re.compile(r"(?<=[@/])(?:127\.0\.0\.1|localhost):(\d+)")


class ContainerLauncher:
    """Runs the service's image; created on the first start, then stopped and started
    in place, so it keeps its port, its logs and its id across restarts.

    Exit codes are Docker's: 128+N when killed by signal N (137 after SIGKILL). The
    image's ``WORKDIR`` and environment apply (``ServiceSpec.cwd`` and ``inherit_env``
    describe the host and are ignored); ``spec.env`` (rendered) and
    ``ISOLATE_INSTANCE_NAME`` are set on top. The command is
    ``spec.container_command``, else ``spec.command``, else the image's ``CMD``.

    A service that names an ``entry`` and whose command runs Python forks inside its
    container (:mod:`~isolate._service.containerfork`): the container runs a preloaded
    fork server, started once, and each start forks the service in it; a stop or kill
    ends that process, not the container. The service's environment goes with each fork
    (on top of the container's own, the image's), not into the container's configuration,
    so ``docker inspect`` does not show it and the container needs no values of the
    worker's: with host networking it starts in :meth:`warm`, while the worker makes the
    rest of its stack.
    """

    def __init__(self, ctx: DockerRun, spec: ServiceSpec, instance_name: str, rootdir: Path) -> None:
        self.ctx = ctx
        self.spec = spec
        self.name = instance_name
        self.container_name = f"{spec.name}-test-{ctx.worker.slug}-{ctx.worker.run_id}"
        if ctx.mode == "mapped" and spec.container_port is None:
            raise ConfigError(
                f"service {spec.name!r}: docker network mode 'mapped' needs ServiceSpec.container_port",
                hint="set ServiceSpec(container_port=<port the service listens on in its "
                "container>), or use --isolate-docker-network=host",
            )
        #: Its port is published through Docker's proxy (see ``ServiceHandle.proxied``).
        self.proxied = ctx.mode == "mapped"
        self.image = self._resolve_image(Path(rootdir))
        self.container: Any = None
        self._final_logs = ""
        self._watch: InitWatch | None = None  # see is_running
        #: The fork server in the container (see the class docs), or ``None``.
        self.forks: ContainerForks | None = None
        self._child: int | None = None  # the service it forked last (a pid in the container)
        #: The service's environment, sent with each fork (a container started in warm()).
        self._setenv: dict[str, str] | None = None
        self._warming: threading.Thread | None = None
        #: What warm() started (a container and its fork server), or why it failed.
        self._warmed: tuple[Any, ContainerForks] | BaseException | None = None

    def _resolve_image(self, rootdir: Path) -> str:
        spec = self.spec
        if spec.image:
            ensure_image(
                self.ctx.client, spec.image,
                hint=f"build it (docker build -t {spec.image} ...), set ServiceSpec.image to "
                "an image that exists locally, or set ServiceSpec.build_context to its "
                "Dockerfile's directory",
            )  # fmt: skip
            return spec.image
        if spec.build_context:
            context = rootdir / spec.build_context  # an absolute one stays as it is
            dockerfile = context / spec.dockerfile if spec.dockerfile is not None else None
            return build_image(self.ctx.client, spec.name, context, dockerfile, spec.build_args)
        process = "run it" if spec.command else "give it a command and run it"
        raise ConfigError(
            f"service {spec.name!r} has neither an image nor a build context, which the docker "
            "backend runs services from (--isolate-docker-services=container, the default)",
            hint="set ServiceSpec(image=...) or ServiceSpec(build_context=...), or "
            f"{process} as a local process against the PostgreSQL and Redis containers: "
            "--isolate-docker-services=native (ini isolate_docker_services, env ISOLATE_DOCKER_SERVICES)",
        )

    @property
    def container_id(self) -> str | None:
        return self.container.id if self.container is not None else None

    def container_values(self, values: Mapping[str, object]) -> dict[str, object]:
        """Template values as seen from inside the container (differ in mapped mode):
        ``{port}`` is ``container_port``, ``{host}`` is ``0.0.0.0`` and ``{dsn}`` /
        ``{redis_url}`` name the PostgreSQL/Redis containers on the run's network."""
        inside = dict(values)
        if self.ctx.mode != "mapped":
            return inside
        inside["port"] = self.spec.container_port
        inside["host"] = "0.0.0.0"  # noqa: S104 - the container's interface; published on 127.0.0.1
        if "containers" in inside:  # testcontainers of the worker's, by name on the run's network
            inside["containers"] = {k: c.inside() for k, c in dict(inside["containers"]).items()}  # type: ignore[call-overload]
        keys = [key for key in ("dsn", "redis_url") if key in inside]
        published = self.ctx.published_ports() if keys else {}

        def swap(match: re.Match[str]) -> str:
            target = published.get(int(match.group(1)))
            return f"{target[0]}:{target[1]}" if target else match.group(0)

        for key in keys:
            inside[key] = _URL_HOSTPORT.sub(swap, str(inside[key]))
        return inside

    def _argv(self, values: Mapping[str, object] | None) -> list[str]:
        """The container's command, rendered with ``values`` (as written, if ``None``)."""
        argv = self.spec.container_command
        argv = list(self.spec.command if argv is None else argv)
        return argv if values is None else [render(arg, values) for arg in argv]

    def prepare(self, values: Mapping[str, object]) -> None:
        """Create the container for these values (replacing one made for another port),
        or take the one :meth:`warm` started, whose forks get these values' environment."""
        inside = self.container_values(values)
        env = {k: render(v, inside) for k, v in self.spec.env.items()}
        env["ISOLATE_INSTANCE_NAME"] = self.name
        argv = self._argv(inside)
        self._take_warmed()
        if self.forks is not None and self.ctx.mode != "mapped" and self.forks.runs(argv or self.forks.made_for):
            self._setenv = env  # the container runs: the next fork gets these values
            return
        self.close()
        self._final_logs = ""
        self.container, self.forks = self._create(env, argv, int(str(values["port"])))
        self._setenv = env if self.forks is not None else None

    def _create(self, env: Mapping[str, str], argv: list[str], port: int,
                forking_only: bool = False) -> tuple[Any, ContainerForks | None]:  # fmt: skip
        """A new container running ``argv`` with ``env`` (published on ``port`` in mapped
        mode), or the fork server that runs it where it can (whose forks get ``env``: the
        container has only the image's and ``ISOLATE_INSTANCE_NAME``); ``forking_only``:
        none (``(None, None)``) where it cannot."""
        forks = None
        try:
            image = self.ctx.client.images.get(self.image)  # inspected once: for the fork server and the volumes
            forks = self._forks(argv, image.attrs.get("Config") or {}, quiet=forking_only)
            if forks is None and forking_only:
                return None, None
            command, mounts, environment = (argv, [], dict(env)) if forks is None else (
                forks.command(), forks.mounts(), {"ISOLATE_INSTANCE_NAME": self.name})  # fmt: skip
            container = self.ctx.create(
                self.image, self.container_name, "service", self.spec.container_port, port,
                extra_labels={"isolate.service": self.spec.name}, command=command or None,
                environment=environment, extra_mounts=mounts, image_info=image,
            )  # fmt: skip
        except Exception as exc:
            if forks is not None:
                forks.close()
            raise ServiceError(
                f"docker could not create container {self.container_name}: {reason(exc)}",
                image=self.image,
            ) from None
        return container, forks

    def _forks(self, argv: list[str], config: Mapping[str, Any], quiet: bool = False) -> ContainerForks | None:
        """The fork server that runs ``argv`` in the container (``config``: the image's),
        listening; ``None`` where the container runs its command itself (which a service
        that names an ``entry`` says, unless ``quiet``)."""
        why = forks_in_container(
            self.spec.entry, argv or list(config.get("Cmd") or []), list(config.get("Entrypoint") or []),
            self.ctx.settings.fork_server, str(self.ctx.client.api.base_url),
        )  # fmt: skip
        if why is not None:
            if self.spec.entry is not None and self.ctx.settings.fork_server != "off" and not quiet:
                logger.warning("isolate: service %r names an entry, but its container runs its command on every "
                               "start instead of forking it: %s", self.spec.name, why, extra=NOTICE)  # fmt: skip
            return None
        assert self.spec.entry is not None
        directory = self.ctx.run.worker_dir(self.ctx.worker.slug) / f"fork-{self.spec.name}"
        forks = ContainerForks(directory, self.name, self.spec.entry, self.spec.preload,
                               argv or list(config["Cmd"]), str(config.get("WorkingDir") or "/"))  # fmt: skip
        forks.listen()
        return forks

    def launch(self) -> None:
        if self.forks is not None:
            if not self.forks.connected:  # its first start, or its fork server is gone
                self._start_container()
                self.forks.connect(self.spec.ready_timeout or 30.0, self._exited_why)
            self._child = self.forks.spawn(env=self._setenv)
            return
        self._start_container()

    def warm(self, register: Callable[[ProcessRecord], None], host: RunHost | None = None) -> None:
        """Start the container now if it forks its service and its networking does not
        depend on the service's port (host mode): its start and its preload run while the
        worker makes the rest of its stack, and the first start forks at once."""
        if self.ctx.mode == "mapped" or self.spec.entry is None or self._warming is not None:
            return
        self._warming = threading.Thread(target=self._warm, name=f"isolate-warm-{self.spec.name}", daemon=True)
        self._warming.start()

    def _warm(self) -> None:
        container = forks = None
        try:
            container, forks = self._create({}, self._argv(None), 0, forking_only=True)
            if container is None or forks is None:
                return  # it runs its command on every start: created with its values, then
            self._start(container)
            forks.connect(self.spec.ready_timeout or 30.0, lambda: _why_stopped(container_state(container), container))
            self._warmed = (container, forks)
        except BaseException as exc:  # said by the start that takes it (the worker's)
            if forks is not None:
                forks.close()
            if container is not None:
                remove_container(container)
            self._warmed = exc

    def _take_warmed(self) -> None:
        """Wait for :meth:`warm`'s container, and make it this launcher's (or raise why it
        could not start: a preload that fails says so as a first start would)."""
        if self._warming is None:
            return
        self._warming.join()
        self._warming = None
        warmed, self._warmed = self._warmed, None
        if isinstance(warmed, BaseException):
            raise warmed
        if warmed is not None:
            self.close()
            self._final_logs = ""
            self.container, self.forks = warmed

    def _start_container(self) -> None:
        if self.forks is not None and self._state().get("Running"):
            self.container.kill()  # its fork server lost us: start it again
            self._wait_container(10.0)
        self._start(self.container)

    def _start(self, container: Any) -> None:
        try:
            container.start()
        except Exception as exc:  # a port taken meanwhile says so: the start policy retries
            raise ServiceError(
                f"container {self.container_name} did not start: {reason(exc)}", image=self.image
            ) from None

    def _state(self) -> dict[str, Any]:
        """The engine's word on the container (and the watch on its init re-armed from it)."""
        state = container_state(self.container) if self.container is not None else {}
        if not self._init_runs() and state.get("Running"):
            self._watch = InitWatch.of(self.container, state)
        return state

    def _init_runs(self) -> bool:
        """The init the engine last saw running still runs (the kernel says; no watch,
        or one whose init has exited, says nothing)."""
        if self._watch is not None and not self._watch.alive():
            self._watch = None
        return self._watch is not None

    def _exited_why(self) -> str | None:
        """Why the container stopped, if it has (its code and its log's end)."""
        code = self._container_exit_code()
        return None if code is None else _why_stopped({"ExitCode": code}, self.container, self.logs())

    def exit_code(self) -> int | None:
        if self.forks is not None:
            return shell_exit_code(self.forks.code(self._child)) if self._child is not None else None
        return self._container_exit_code()

    def _container_exit_code(self) -> int | None:
        if self._init_runs():
            return None  # its init runs: so does the container
        state = self._state()
        if not state or state.get("Running") or state.get("Status") == "created":
            return None
        return int(state.get("ExitCode", 0))

    def wait_exit(self, timeout: float) -> int | None:
        if self.forks is not None:
            return shell_exit_code(self.forks.wait(self._child, timeout)) if self._child is not None else None
        return self._wait_container(timeout)

    def _wait_container(self, timeout: float) -> int | None:
        if self.container is None:
            return None
        deadline = time.monotonic() + timeout
        if self._watch is not None and not self._watch.wait(timeout):
            return None  # its init still runs
        # The engine marks it stopped a moment after its init is gone (or, unwatched, whenever).
        poll_until(lambda: not self._state().get("Running"), deadline - time.monotonic(), initial=0.01, maximum=0.1)
        return self._container_exit_code()

    def stop(self, sig: int, timeout: float) -> int | None:
        if not self.is_running:
            return self.exit_code()
        if self.forks is not None:
            self.signal(sig)
            return self.exit_code() if self.wait_exit(timeout) is not None else self.kill()
        if sig == signal.SIGTERM:
            # docker stop -t: the image's stop signal (SIGTERM by default), then SIGKILL.
            # Docker counts whole seconds.
            self.container.stop(timeout=max(0, math.ceil(timeout)))
        else:
            self.signal(sig)
            if self.wait_exit(timeout) is None:
                return self.kill()
        self.wait_exit(5.0)
        return self.exit_code()

    def kill(self) -> int | None:
        if self.forks is not None and self._child is not None:
            self.forks.signal(self._child, signal.SIGKILL, group=True)  # as docker kill: all of it
            return self.wait_exit(10.0)
        if self.is_running:
            with contextlib.suppress(Exception):  # it may exit between the check and the kill
                self.container.kill()
            self.wait_exit(10.0)
        return self.exit_code()

    def signal(self, sig: int) -> None:
        if self.forks is not None:
            if self._child is not None:
                self.forks.signal(self._child, sig)
            return
        if self.is_running:
            with contextlib.suppress(Exception):
                self.container.kill(signal=int(sig))

    @property
    def is_running(self) -> bool:
        """Asked before every test: the kernel answers while the init the engine last saw
        running still runs (:class:`~isolate._docker.containers.InitWatch`), else the engine.
        With a fork server in it: whether the service it forked runs (which it says)."""
        if self.forks is not None:
            return self._child is not None and self.forks.code(self._child) is None
        return self._init_runs() or bool(self._state().get("Running"))

    @property
    def pid(self) -> int | None:
        """The container's main process as seen from the host; with a fork server in it,
        the service process it forked (where this machine's ``/proc`` shows it)."""
        init = int(self._state().get("Pid") or 0) or None
        if init is None or self.forks is None or self._child is None:
            return init
        return host_pid(init, self._child) or init

    def logs(self) -> str:
        if self.container is None:
            return self._final_logs
        return container_logs(self.container) or self._final_logs

    def record(self) -> None:
        """Containers are reaped by their run label, not through the registry."""
        return None

    def close(self) -> None:
        """Remove the container (and its volumes), keeping its logs; and what :meth:`warm`
        started that no start took."""
        if self._warming is not None:
            self._warming.join()
            self._warming = None
        warmed, self._warmed = self._warmed, None
        if isinstance(warmed, tuple):
            warmed[1].close()
            remove_container(warmed[0])
        self._setenv = None
        if self._watch is not None:
            self._watch.close()
            self._watch = None
        if self.container is not None:
            self._final_logs = container_logs(self.container)
            remove_container(self.container)
            self.container = None
        if self.forks is not None:
            self.forks.close()
            self.forks = self._child = None


def _why_stopped(state: Mapping[str, Any], container: Any, logs: str | None = None) -> str | None:
    """Why a container stopped, from the engine's ``state`` of it (its code and its log's
    end); ``None`` while it has not."""
    if not state or state.get("Running") or state.get("Status") == "created":
        return None
    return f"its container exited with code {state.get('ExitCode', 0)}:\n" + tail_text(
        container_logs(container) if logs is None else logs, 20
    )
