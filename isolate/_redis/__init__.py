"""Redis/Valkey: a worker's own server or a DB on a shared one; its facts (``server``)
and its launchers (``native``: a process; ``docker``: a container)."""

from .server import ADMIN_USER, RedisConfig, RedisServer, acl_users, answers_ping

__all__ = ["ADMIN_USER", "RedisConfig", "RedisServer", "acl_users", "answers_ping"]
