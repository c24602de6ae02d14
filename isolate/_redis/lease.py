"""A worker's logical DB on a Redis it shares: the run's shared server
(``--isolate-redis-mode=shared``, leased with a lock file in the run dir) or an existing
server (``--isolate-redis-url``, leased with a key in the server itself, kept fresh while
the worker lives, so runs on other machines can share it)."""

from __future__ import annotations

import contextlib
import logging
import threading
from pathlib import Path
from typing import Protocol
from urllib.parse import unquote, urlsplit

import redis
from filelock import FileLock, Timeout

from .._errors import ConfigError
from .server import RedisServer

__all__ = ["LEASE_TTL_S", "DbLease", "ExternalDbLease", "RunDbLease", "parse_redis_url"]

logger = logging.getLogger(__name__)

#: An external lease expires this long after its worker stops refreshing it.
LEASE_TTL_S = 120
_REFRESH_S = 20.0
LEASE_KEY = "isolate:db-lease:{db}"


class DbLease(Protocol):
    """A worker's hold on one logical DB."""

    def release(self) -> None:
        """Empty the DB and give it back (idempotent)."""


class RunDbLease:
    """The lowest DB (from 1; DB 0 is left alone) of the run's shared server that no live
    worker holds: a lock file held for the worker's life, so a crashed worker's DB goes to
    its successor."""

    def __init__(self, run_path: Path, shared: RedisServer, databases: int) -> None:
        self._lock: FileLock | None = None
        for db in range(1, databases):
            lock = FileLock(str(run_path / f"redis-db-{db}.lock"), thread_local=False)
            try:
                lock.acquire(timeout=0)
            except Timeout:
                continue
            self._lock = lock
            self.server = RedisServer(shared.host, shared.port, db, shared.admin_password,
                                      shared=True, backend=shared.backend)  # fmt: skip
            self.server.flush()  # a crashed predecessor's keys are not this worker's
            return
        raise ConfigError(f"all {databases - 1} logical Redis DBs are held by live workers",
                          hint="use --isolate-redis-mode=per-worker")  # fmt: skip

    def release(self) -> None:
        if self._lock is not None:
            self._lock.release(force=True)
            self._lock = None


def parse_redis_url(url: str) -> tuple[str, int, str | None, str | None]:
    """Host, port, user and password of a ``redis://`` URL."""
    parts = urlsplit(url)
    if parts.scheme != "redis" or not parts.hostname:
        raise ConfigError(f"--isolate-redis-url {url.split('@')[-1]!r} is not a redis:// URL",
                          hint="e.g. redis://127.0.0.1:6379 or redis://user:secret@redis:6379")  # fmt: skip
    user = unquote(parts.username) if parts.username else None
    password = unquote(parts.password) if parts.password else None
    return parts.hostname, parts.port or 6379, user, password


class ExternalDbLease:
    """A DB of an existing server, held by a key (``isolate:db-lease:<db>`` in DB 0,
    ``SET NX EX``) that a thread refreshes while the worker lives; flushed when taken and
    when given back."""

    def __init__(self, url: str, holder: str) -> None:
        host, port, user, password = parse_redis_url(url)
        self.holder = holder
        self._admin = redis.Redis(host=host, port=port, username=user, password=password, socket_timeout=5)
        try:
            databases = int(self._admin.config_get("databases").get("databases") or 16)
        except redis.ResponseError:  # CONFIG may be off limits: assume the default
            databases = 16
        except redis.RedisError as exc:
            raise ConfigError(f"cannot reach the --isolate-redis-url server: {exc}",
                              hint="check the URL's host, port and credentials") from None  # fmt: skip
        for db in range(1, databases):
            if self._admin.set(LEASE_KEY.format(db=db), holder, nx=True, ex=LEASE_TTL_S):
                break
        else:
            raise ConfigError(
                f"all {databases - 1} logical DBs of the --isolate-redis-url server are leased",
                hint="run fewer workers at once on it, raise its `databases` setting, or drop "
                "--isolate-redis-url to have isolate start Redis servers",
            )
        self.key = LEASE_KEY.format(db=db)
        self.server = RedisServer(host, port, db, password or "", shared=True, backend="external",
                                  username=user, password=password)  # fmt: skip
        self.server.flush()  # what a dead holder left
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._refresh, name=f"isolate-{self.key}", daemon=True)
        self._thread.start()

    def _refresh(self) -> None:
        while not self._stop.wait(_REFRESH_S):
            try:
                self._admin.expire(self.key, LEASE_TTL_S)
            except redis.RedisError as exc:
                logger.warning("isolate: refreshing %s failed: %s", self.key, exc)

    def release(self) -> None:
        if self._stop.is_set():
            return
        self._stop.set()
        self._thread.join(timeout=5)
        with contextlib.suppress(redis.RedisError):
            self.server.flush()
            if self._admin.get(self.key) == self.holder.encode():
                self._admin.delete(self.key)
        self._admin.close()
