"""A worker's Redis as part of its stack: its own server, a DB of the run's shared one,
or a DB leased on an external server."""

from __future__ import annotations

import os
import time

from .._redis import RedisConfig, RedisServer
from .._redis.lease import ExternalDbLease, RunDbLease
from .base import StackBase

__all__ = ["RedisPart"]


class RedisPart(StackBase):
    """This worker's Redis."""

    def redis(self) -> RedisServer:
        """The worker's Redis (own server, or own DB on the shared one). The first ask
        records how long it waited (``redis_wait``): what tells the next run that this
        one used Redis (``--isolate-prestart``)."""
        waited = time.perf_counter()
        with self._redis_lock:
            server = self._redis_locked()
            first, self._redis_used = not self._redis_used, True
        if first:
            self.timings.add("redis_wait", time.perf_counter() - waited)
        return server

    def prestart_redis(self) -> None:
        """Start the worker's Redis now unless it runs: what a worker does while it
        collects, when the run is expected to use Redis. Recorded as started, not as used."""
        with self._redis_lock:
            self._redis_locked()

    def _redis_locked(self) -> RedisServer:
        if self._redis is None:
            if self.settings.redis_url:
                holder = f"{self.worker.run_id}/{self.worker.worker_id}/{os.getpid()}"
                self._redis_lease = lease = ExternalDbLease(self.settings.redis_url, holder)
                self._redis = lease.server
            elif self.settings.redis_mode == "shared":
                state = self.shared("redis", lambda: self._start_redis("redis-shared", shared=True).to_json())
                self._redis_lease = run_lease = RunDbLease(self.run.path, RedisServer.from_json(state),
                                                           self._redis_databases())  # fmt: skip
                self._redis = run_lease.server
            else:
                self._redis = self._start_redis(f"redis-{self.worker.slug}-{os.getpid()}", shared=False)
        return self._redis

    def _redis_databases(self) -> int:
        return max(16, self.worker.worker_count + 2)

    def _start_redis(self, name: str, *, shared: bool) -> RedisServer:
        with self.timings.measure("redis_start"):
            config = RedisConfig(databases=self._redis_databases())
            runner = self.backend.redis(config, self.run.path / name, name, shared=shared)
            server = self._start(runner, shared=shared)
            if not shared:
                self._redis_runner = runner
            return server

    def stop_redis(self) -> None:
        """Stop the worker's own Redis server (idempotent; kept with ``--isolate-keep``)."""
        if self.keeping:
            return
        if self._redis_runner is not None:
            self._redis_runner.stop()
            self.run.registry.unregister(self._redis_runner.name)
            self._redis_runner = None
        if self._redis_lease is not None:
            self._redis_lease.release()
            self._redis_lease = None
        self._redis = None
