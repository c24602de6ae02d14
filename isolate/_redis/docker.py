"""A worker's Redis (or the shared one) as a container of ``--isolate-redis-image``."""

from __future__ import annotations

import secrets
from typing import Any

from .._docker.containers import ContainerServer
from .._docker.context import DockerRun
from .server import RedisConfig, RedisServer, acl_users, answers_ping

__all__ = ["DockerRedisRunner"]

_ACL_FILE = "/tmp/isolate-users.acl"  # noqa: S108 - inside the container; not in inspect


class DockerRedisRunner(ContainerServer):
    """``isolate-redis-<worker|shared>-<run id>`` on a free port."""

    kind = "Redis"
    role = "redis"
    container_port = 6379
    image_option = "redis_image"

    def __init__(self, ctx: DockerRun, config: RedisConfig, name: str, *, shared: bool) -> None:
        who = "shared" if shared else ctx.worker.slug
        super().__init__(ctx, name, f"isolate-redis-{who}-{ctx.worker.run_id}", config.start_timeout)
        self.config = config
        self.admin_password = secrets.token_urlsafe(18)
        self.server: RedisServer | None = None

    def _create_kwargs(self, port: int) -> dict[str, Any]:
        if self.ctx.mode == "mapped":
            # inside its own network namespace; published on 127.0.0.1 only
            net = ["--port", str(self.container_port), "--bind", "0.0.0.0",  # noqa: S104
                   "--protected-mode", "no"]  # fmt: skip
        else:
            net = ["--port", str(port), "--bind", "127.0.0.1", "--protected-mode", "yes"]
        return {
            "command": [
                *net, "--save", "", "--appendonly", "no",
                "--databases", str(self.config.databases), "--aclfile", _ACL_FILE,
            ],
        }  # fmt: skip

    def _files(self) -> dict[str, str]:
        users = acl_users(self.admin_password)
        return {_ACL_FILE: "".join(f"user {' '.join(user)}\n" for user in users)}

    def _probe(self, port: int) -> bool:
        return answers_ping(port)

    def _connected(self, port: int) -> None:
        self.server = RedisServer("127.0.0.1", port, 0, self.admin_password, backend="docker")
