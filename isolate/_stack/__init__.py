"""A worker's side of a run: its stack, started on demand, torn down at its end.

Pure Python (no pytest): the plugin creates one :class:`WorkerStack` per pytest process
and its fixtures ask it for pieces. Shared servers are started once per run by the
first worker that needs one (:meth:`WorkerStack.shared`); per-worker pieces belong to
this process and are stopped by :meth:`WorkerStack.close` (or, if the worker dies, by
the controller's reaper).
"""

from __future__ import annotations

import os
from dataclasses import replace

from .._errors import LeaseLostError
from .._redis.lease import ExternalDbLease
from .services import ServicesPart

__all__ = ["WorkerStack"]


class WorkerStack(ServicesPart):
    """Everything one worker process gets: PostgreSQL schema, Redis, service instances.

    Get it from the ``isolate_stack`` fixture. Pieces start on first use. (Its parts are
    in ``isolate/_stack/``: ``base``, ``databases``, ``redis``, ``containers``,
    ``services``.)
    """

    def check(self) -> None:
        """Raise :class:`~isolate.LeaseLostError` if the run or this worker lost its hold
        on an external server (its objects, or its Redis DB, are another run's now): a
        test must not go on writing there."""
        why = self.run.lost() if self.settings.pg_dsn else None
        lease = self._redis_lease
        why = why or (lease.lost if isinstance(lease, ExternalDbLease) else None)
        if why:
            raise LeaseLostError(why)

    def heal(self) -> list[str]:
        """Restore this worker's PostgreSQL and Redis if a test left them cut; what was."""
        healed = []
        if self._database is not None and self._database.is_cut:
            self._database.restore()
            healed.append("postgres")
        if self._redis is not None and self._redis.is_cut:
            self._redis.restore()
            healed.append("redis")
        return healed

    def keep(self) -> dict[str, object]:
        """Leave this worker's stack up after the run, recorded in the run dir for the
        controller's summary and ``python -m isolate cleanup RUN``; what was kept."""
        info: dict[str, object] = {"worker": self.worker.worker_id, "pid": os.getpid()}
        if self._database is not None:
            info.update(dsn=self._database.dsn, schema=self._database.schema)
        if self.fresh_kept:
            info["fresh_kept"] = list(self.fresh_kept)
        if self._redis is not None:
            info["redis_url"] = self._redis.url
        #: What lives on a server isolate did not start: printed without its password.
        info["external"] = [key for key, on in (("dsn", bool(self.settings.pg_dsn)),
                                                ("redis_url", bool(self.settings.redis_url))) if on]  # fmt: skip
        info["services"] = [
            {"name": h.name, "url": h.url, "running": h.is_running,
             "log": str(getattr(h.launcher, "log_path", "") or "") or None}
            for h in self._services.values() if h.lease is not None
        ]  # fmt: skip
        info["containers"] = [
            {"name": c.name, "url": c.url, "container": c.container_name} for c in self._containers.values()
        ]  # fmt: skip
        for record in self.run.registry.records():  # outlive this worker now
            if record.owner_pid == os.getpid():
                self.run.registry.register(replace(record, scope="run"))
        self.run.mark_kept(self.worker.slug, info)
        return info

    def close(self) -> None:
        """Stop this worker's services and Redis, drop its schema (idempotent), or keep
        them all (``--isolate-keep``)."""
        self.close_pool()
        if self.keeping:
            if self._database or self._redis or self._services or self._containers:
                self.keep()
            return
        with self.timings.measure("worker_teardown"):
            for name in list(self._services):
                self.close_service(name)
            self.stop_redis()
            self.drop_database()
