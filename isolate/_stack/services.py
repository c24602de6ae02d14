"""The services under test as part of a worker's stack, and the template values they
(and ``--isolate-env``) are given."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence

from .._errors import ConfigError
from .._service import ServiceHandle, ServiceSpec
from .._service.spec import placeholders, render, start_order
from .containers import ContainersPart
from .databases import DatabasePart
from .redis import RedisPart

__all__ = ["ServicesPart"]

logger = logging.getLogger(__name__)


class ServicesPart(DatabasePart, RedisPart, ContainersPart):
    """This worker's instances of the services under test."""

    def service(
        self, spec: ServiceSpec, resolve: Callable[[str], object] | None = None
    ) -> ServiceHandle:
        """The worker's running instance of ``spec`` (created and started on first call).

        ``resolve(field)`` supplies ``dsn``/``schema``/``role``/``redis_url`` on demand,
        so only what the templates use gets started.
        """
        handle = self._services.get(spec.name)
        if handle is not None:
            return handle
        started = time.perf_counter()
        instance = f"{spec.name}-test-{self.worker.slug}"
        values: dict[str, object] = {
            "host": "127.0.0.1", "name": instance, "worker": self.worker.worker_id,
            "run_id": self.worker.run_id,
        }  # fmt: skip
        missing = [dep for dep in spec.depends_on if dep not in self._services]
        if missing:
            raise ConfigError(
                f"service {spec.name!r} depends on {', '.join(missing)}, not started on this worker",
                hint="declare every service in the isolate_service_specs fixture (started in "
                "depends_on order), or start those first",
            )
        values["services"] = dict(self._services)  # the handles: {services[NAME].url}
        values["containers"] = dict(self._containers)  # {containers[NAME].url}
        self._refuse_if_stopping()
        launcher = self.backend.service(spec, instance, self.run.worker_dir(self.worker.slug) / f"{instance}.log")
        launcher.warm(self.run.registry.register, self.run)  # a fork server preloads meanwhile
        early = self._start_redis_early(spec)  # Redis starts while the database is made
        try:
            for field_name in sorted(spec.uses() - set(values) - {"port", "url"}):
                values[field_name] = (resolve or self._resolve_field)(field_name)
        except BaseException:
            launcher.close()
            raise
        finally:
            if early is not None:
                early.join()
        handle = ServiceHandle(
            spec, instance, values, launcher, ready_timeout=self.settings.ready_timeout,
            stop_timeout=self.settings.stop_timeout, on_start=self._register_service,
            timings=self.timings, before_start=self._refuse_if_stopping,
        )  # fmt: skip
        self._services[spec.name] = handle
        try:
            with self.timings.measure("service_ready"):
                handle.start()
        except BaseException:
            self.close_service(spec.name)
            raise
        self.timings.add("worker_stack_ready", time.perf_counter() - started)
        return handle

    def services(
        self, specs: Sequence[ServiceSpec], resolve: Callable[[str], object] | None = None
    ) -> dict[str, ServiceHandle]:
        """The worker's running instances of ``specs``, started in ``depends_on`` order."""
        order = start_order(specs, set(self._services))
        return {spec.name: self.service(spec, resolve) for spec in order}

    def _register_service(self, handle: ServiceHandle) -> None:
        record = handle.record()
        if record is not None:
            self.run.registry.register(record)

    def _start_redis_early(self, spec: ServiceSpec) -> threading.Thread | None:
        """Start the worker's Redis in a thread when ``spec`` needs it and the database
        too: the two starts overlap. A failure here is left to the caller's own
        ``redis()``, which tries again and raises it."""
        uses = spec.uses()
        if "redis_url" not in uses or not uses & {"dsn", "schema", "role"} or self._redis is not None:
            return None

        def start() -> None:
            try:
                self.redis()
            except Exception as exc:
                logger.debug("early Redis start failed (retried when asked for): %s", exc)

        thread = threading.Thread(target=start, name="isolate-redis-early", daemon=True)
        thread.start()
        return thread

    def environment(self, pairs: Sequence[tuple[str, str]]) -> dict[str, str]:
        """``--isolate-env``: each NAME with its template rendered for this worker; what
        a template names (the database with ``--isolate-migrations``, Redis) starts now."""
        values: dict[str, object] = {"host": "127.0.0.1", "worker": self.worker.worker_id,
                                     "run_id": self.worker.run_id}  # fmt: skip
        for _, template in pairs:
            for field_name in sorted(placeholders(template) - set(values)):
                if field_name in ("dsn", "schema", "role"):
                    self.database(self.settings.migrations)
                values[field_name] = self._resolve_field(field_name)
        return {name: render(template, values) for name, template in pairs}

    def _resolve_field(self, name: str) -> object:
        if name in ("dsn", "schema", "role"):
            db = self.database()
            return {"dsn": db.dsn, "schema": db.schema, "role": db.role}[name]
        if name == "redis_url":
            return self.redis().url
        raise ConfigError(f"unknown template field {name!r}")

    def running_services(self) -> list[ServiceHandle]:
        """This worker's service handles."""
        return list(self._services.values())

    def close_service(self, name: str) -> None:
        """Stop a service for good and remove what runs it."""
        if self.keeping:
            return
        handle = self._services.pop(name, None)
        if handle is not None:
            handle.close()
            for kind in ("service", "forkserver"):
                self.run.registry.unregister(f"{kind}-{handle.name}")
