"""Redis/Valkey facts shared by both backends: config, connection facts, ACL users."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from .._errors import FaultInjectionError
from .._fault import Fault
from .._lazy import lazy

if TYPE_CHECKING:
    import redis
else:
    redis = lazy("redis")

__all__ = ["ADMIN_USER", "RedisConfig", "RedisServer", "acl_users", "answers_ping"]

#: (host, port, db) of the servers this process has cut.
_CUT: set[tuple[str, int, int]] = set()

ADMIN_USER = "isolate-admin"


def acl_users(admin_password: str) -> list[list[str]]:
    """The ACL users every isolate Redis gets: an admin (for cut/restore and flush)
    and the passwordless ``default`` user the worker's clients use."""
    return [
        [ADMIN_USER, "on", f">{admin_password}", "~*", "&*", "+@all"],
        ["default", "on", "nopass", "~*", "&*", "+@all"],
    ]


def answers_ping(port: int, host: str = "127.0.0.1") -> bool:
    """Whether a Redis server on ``port`` answers PING."""
    try:
        with redis.Redis(host=host, port=port, socket_timeout=0.5) as client:
            return bool(client.ping())
    except redis.RedisError:
        return False


@dataclass(frozen=True)
class RedisConfig:
    """How to start a Redis-compatible server."""

    databases: int = 16
    start_timeout: float = 30.0


@dataclass(frozen=True)
class RedisServer:
    """Where a worker's Redis is (JSON-serialisable)."""

    host: str
    port: int
    db: int
    admin_password: str
    shared: bool = False
    backend: str = "native"
    #: An external server's credentials (``--isolate-redis-url``), used by the worker's
    #: clients and for flushing; isolate's own servers need none.
    username: str | None = None
    password: str | None = None

    @property
    def url(self) -> str:
        """``redis://127.0.0.1:<port>/<db>`` for the worker (with an external server's
        credentials, if it has any)."""
        auth = ""
        if self.password is not None:
            auth = f"{quote(self.username or '', safe='')}:{quote(self.password, safe='')}@"
        elif self.username:
            auth = f"{quote(self.username, safe='')}@"
        return f"redis://{auth}{self.host}:{self.port}/{self.db}"

    def client(self, **kwargs: Any) -> redis.Redis:
        """A redis-py client on the worker's DB."""
        return redis.Redis.from_url(self.url, **kwargs)

    def admin(self) -> redis.Redis:
        external = self.backend == "external"
        return redis.Redis(
            host=self.host, port=self.port, db=self.db, username=self.username if external else ADMIN_USER,
            password=self.password if external else self.admin_password, socket_timeout=5,
        )  # fmt: skip

    def flush(self) -> None:
        """Empty the worker's DB."""
        with self.admin() as client:
            client.flushdb()

    # -- fault injection ----------------------------------------------------

    @property
    def is_cut(self) -> bool:
        """Whether :meth:`cut` is in effect (as far as this process cut it)."""
        return (self.host, self.port, self.db) in _CUT

    def cut(self) -> Fault:
        """Make this worker's Redis refuse it (data kept). :meth:`restore`, or leaving
        ``with redis.cut():``, undoes it; the plugin restores it after the test anyway."""
        if self.backend == "external":
            raise FaultInjectionError(
                "cannot cut an external Redis (--isolate-redis-url) for one worker",
                hint="drop --isolate-redis-url for the tests that cut Redis: isolate then starts "
                "a Redis per worker that it can cut",
            )
        if self.shared:
            raise FaultInjectionError(
                "cannot cut Redis for one worker when workers share a server",
                hint="use --isolate-redis-mode=per-worker for Redis fault injection",
            )
        _CUT.add((self.host, self.port, self.db))
        with self.admin() as client:
            client.acl_setuser("default", enabled=False, reset_passwords=False)
            client.execute_command("CLIENT", "KILL", "USER", "default")
        return Fault(f"Redis cut on port {self.port}", self.restore)

    def restore(self) -> None:
        """Undo :meth:`cut` (idempotent)."""
        with self.admin() as client:
            client.acl_setuser("default", enabled=True, nopass=True)
        _CUT.discard((self.host, self.port, self.db))

    def to_json(self) -> dict[str, object]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> RedisServer:
        return cls(**data)
