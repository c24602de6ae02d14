"""A worker's logical DB on a Redis it shares: the run's shared server
(``--isolate-redis-mode=shared``, leased with a lock file in the run dir) or an existing
server (``--isolate-redis-url``, leased with a key in the server itself, kept fresh while
the worker lives, so runs on other machines can share it)."""

from __future__ import annotations

import contextlib
import logging
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Protocol
from urllib.parse import unquote, urlsplit

from filelock import FileLock, Timeout

from .._errors import ConfigError
from .._lazy import lazy
from .._run.notices import NOTICE
from .server import RedisServer

if TYPE_CHECKING:
    import redis
else:
    redis = lazy("redis")

__all__ = ["LEASE_TTL_S", "MARK_KEY", "DbLease", "ExternalDbLease", "RunDbLease", "parse_redis_url"]

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


#: Take DB ARGV[3] (lease key KEYS[1], mark KEYS[2], both in DB 0) for holder ARGV[1]:
#: 0 if someone holds it, -1 if it holds keys that are not isolate's (never flushed), else
#: mark it isolate's and empty it (what a dead holder left), all in one step.
_TAKE = """
if not redis.call('SET', KEYS[1], ARGV[1], 'NX', 'EX', ARGV[2]) then return 0 end
redis.call('SELECT', ARGV[3])
local size = redis.call('DBSIZE')
redis.call('SELECT', 0)
if size > 0 and redis.call('EXISTS', KEYS[2]) == 0 then
  redis.call('DEL', KEYS[1])
  return -1
end
redis.call('SET', KEYS[2], '1')
redis.call('SELECT', ARGV[3])
redis.call('FLUSHDB')
redis.call('SELECT', 0)
return 1
"""
#: Extend the lease only if ARGV[1] still holds it: 1, else 0.
_REFRESH = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
return redis.call('EXPIRE', KEYS[1], ARGV[2])
"""
#: Empty DB ARGV[2] and end the lease only if ARGV[1] still holds it: 1, else 0.
_GIVE_BACK = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('SELECT', ARGV[2])
redis.call('FLUSHDB')
redis.call('SELECT', 0)
redis.call('DEL', KEYS[1])
return 1
"""
MARK_KEY = "isolate:db-mark:{db}"


class ExternalDbLease:
    """A DB of an existing server, held by a key (``isolate:db-lease:<db>`` in DB 0,
    ``SET NX EX``) that a thread refreshes while the worker lives.

    Every step that acts on the DB checks, in the same server-side script, that this
    worker still holds the lease: a worker that stalled past the lease's expiry (and whose
    DB another shard took) neither refreshes nor flushes what is now the other's; it
    records the loss (:attr:`lost`) and the plugin fails its next test with
    :class:`~isolate.LeaseLostError`. A DB is flushed only if it is empty or marked as
    isolate's (``isolate:db-mark:<db>``, set when isolate first takes it): a DB holding
    someone else's keys is skipped, never emptied.
    """

    def __init__(self, url: str, holder: str) -> None:
        host, port, user, password = parse_redis_url(url)
        self.holder = holder
        #: Why the lease was lost (another holder took the DB), or ``None``.
        self.lost: str | None = None
        self._admin = redis.Redis(host=host, port=port, username=user, password=password, socket_timeout=5)
        try:
            databases = int(self._admin.config_get("databases").get("databases") or 16)
        except redis.ResponseError:  # CONFIG may be off limits: assume the default
            databases = 16
        except redis.RedisError as exc:
            raise ConfigError(f"cannot reach the --isolate-redis-url server: {exc}",
                              hint="check the URL's host, port and credentials") from None  # fmt: skip
        foreign = []
        for db in range(1, databases):
            taken = self._admin.eval(_TAKE, 2, LEASE_KEY.format(db=db), MARK_KEY.format(db=db),
                                     holder, LEASE_TTL_S, db)  # fmt: skip
            if taken == 1:
                break
            if taken == -1:
                foreign.append(db)
        else:
            if foreign:
                raise ConfigError(
                    f"no logical DB of the --isolate-redis-url server is free for isolate: DB(s) "
                    f"{', '.join(map(str, foreign))} hold keys isolate did not write, and it never "
                    "empties those",
                    hint="point --isolate-redis-url at a server (or DBs) for tests, or empty them "
                    "yourself (FLUSHDB), or mark one isolate's: SET isolate:db-mark:<db> 1 in DB 0",
                )
            raise ConfigError(
                f"all {databases - 1} logical DBs of the --isolate-redis-url server are leased",
                hint="run fewer workers at once on it, raise its `databases` setting, or drop "
                "--isolate-redis-url to have isolate start Redis servers",
            )
        if foreign:
            logger.warning("isolate: DB(s) %s of the --isolate-redis-url server hold keys isolate did "
                           "not write; skipped", ", ".join(map(str, foreign)), extra=NOTICE)  # fmt: skip
        self.key = LEASE_KEY.format(db=db)
        self.server = RedisServer(host, port, db, password or "", shared=True, backend="external",
                                  username=user, password=password)  # fmt: skip
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._refresh, name=f"isolate-{self.key}", daemon=True)
        self._thread.start()

    def _refresh(self) -> None:
        while not self._stop.wait(_REFRESH_S) and self._refresh_once():
            pass

    def _refresh_once(self) -> bool:
        """Extend the lease if this worker still holds it; ``False`` once it is lost."""
        try:
            if not self._admin.eval(_REFRESH, 1, self.key, self.holder, LEASE_TTL_S):
                self._lose()
                return False
        except redis.RedisError as exc:  # the next refresh may get through
            logger.warning("isolate: refreshing %s failed: %s", self.key, exc)
        return True

    def _lose(self) -> None:
        self.lost = (
            f"this worker lost its lease on DB {self.server.db} of the --isolate-redis-url server "
            f"(it was not refreshed within {LEASE_TTL_S}s, and another worker took the DB)"
        )
        logger.error("isolate: %s", self.lost, extra=NOTICE)

    def release(self) -> None:
        if self._stop.is_set():
            return
        self._stop.set()
        self._thread.join(timeout=5)
        with contextlib.suppress(redis.RedisError):
            if self.lost is None and not self._admin.eval(_GIVE_BACK, 1, self.key, self.holder, self.server.db):
                self._lose()  # not ours any more: its keys are the new holder's
        self._admin.close()
