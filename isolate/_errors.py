"""One exception hierarchy for everything isolate raises.

Every error carries the context it happened in (worker, paths, exit codes, log
tails) and a hint that names the fix, so a failing run explains itself.
"""

from __future__ import annotations

from collections.abc import Mapping

__all__ = [
    "BinaryNotFoundError",
    "ConfigError",
    "ExternalServerError",
    "DockerUnavailableError",
    "FaultInjectionError",
    "FreshDatabaseError",
    "ImageNotFoundError",
    "IsolateError",
    "LeaseLostError",
    "MigrationError",
    "PortUnavailableError",
    "RunFixtureError",
    "RunStoppingError",
    "ServerStartError",
    "ServiceError",
    "ServiceExitedError",
    "ServiceNotReadyError",
    "UnexpectedFileError",
    "tail_text",
]


def tail_text(text: str, lines: int = 30) -> str:
    """The last ``lines`` lines of ``text`` (an error's ``log_tail``)."""
    return "\n".join(text.splitlines()[-lines:])


class IsolateError(Exception):
    """Base class of every isolate error.

    ``context`` holds the facts (worker id, port, exit code, ...); ``hint`` says
    what to change. Both are rendered into ``str(error)``.
    """

    default_hint: str = ""
    #: How ``log_tail`` is introduced in ``str(error)``.
    tail_label: str = "last log lines"

    def __init__(
        self,
        message: str,
        *,
        hint: str | None = None,
        log_tail: str | None = None,
        **context: object,
    ) -> None:
        self.message = message
        self.hint = hint if hint is not None else self.default_hint
        self.log_tail = log_tail
        self.context: Mapping[str, object] = context
        super().__init__(message)

    def __str__(self) -> str:
        parts = [self.message]
        facts = ", ".join(f"{k}={v}" for k, v in self.context.items() if v is not None)
        if facts:
            parts.append(f"  [{facts}]")
        if self.log_tail:
            indented = "\n".join("    " + line for line in self.log_tail.splitlines())
            parts.append(f"  {self.tail_label}:\n" + indented)
        if self.hint:
            parts.append(f"  fix: {self.hint}")
        return "\n".join(parts)


class ConfigError(IsolateError):
    """An option or declaration has a bad value."""


class BinaryNotFoundError(IsolateError):
    """A server binary (postgres, valkey/redis) could not be found."""


class ServerStartError(IsolateError):
    """A backing server (PostgreSQL, Redis) did not start or did not get ready."""


class MigrationError(IsolateError):
    """A migration failed to apply to a worker's schema."""


class FreshDatabaseError(IsolateError):
    """The pool behind ``isolate_fresh_database`` could not hand out a fresh database."""

    default_hint = (
        "read the error above (a migration that fails when run again, a server out of space "
        "or connections); --isolate-fresh-pool=0 rebuilds the database before each test instead"
    )


class PortUnavailableError(IsolateError):
    """No free port could be reserved."""

    default_hint = "free some ports on 127.0.0.1 or lower the number of workers"


class ServiceError(IsolateError):
    """The service under test misbehaved."""


class ServiceExitedError(ServiceError):
    """The service process or container exited when it should be running."""

    default_hint = "read the log lines above; run the service's command by hand to reproduce"


class ServiceNotReadyError(ServiceError):
    """The service kept running but never passed its health check in time."""

    default_hint = (
        "check that the service listens on the {port} it is given and answers its health "
        "check, or raise ServiceSpec.ready_timeout / --isolate-ready-timeout"
    )


class FaultInjectionError(IsolateError):
    """A fault could not be injected or removed."""


class DockerUnavailableError(IsolateError):
    """No Docker engine answers."""

    default_hint = (
        "start a Docker engine (dockerd) and check `docker info`, or use "
        "--isolate-backend=native"
    )


class ImageNotFoundError(IsolateError):
    """A container image is neither present locally nor pullable."""


class UnexpectedFileError(IsolateError):
    """A tree isolate gives to the run-as user, or takes back, holds something isolate
    never puts there (a symlink, a FIFO, a second hard link): someone else wrote there."""

    default_hint = (
        "another process of the run-as user wrote into isolate's directories; use a "
        "dedicated run-as user (--isolate-run-as) that nothing else runs as"
    )


class ExternalServerError(IsolateError):
    """An external server (``--isolate-pg-dsn``, ``--isolate-redis-url``) refused a step."""


class LeaseLostError(IsolateError):
    """A run lost its hold on an external server's resources to another run: a worker's
    Redis DB, or the run's lease row (its objects were dropped as a dead run's)."""

    default_hint = (
        "the run stalled longer than the lease's expiry (a paused machine, a long network "
        "outage); run the tests again"
    )


class RunStoppingError(IsolateError):
    """The run is being torn down (its reaper runs): nothing new is started."""

    default_hint = "the run was interrupted or its controller ended; nothing to fix in the test"


class RunFixtureError(IsolateError):
    """A run fixture (``@isolate.run_fixture``) failed to set up, or its value could not
    be handed to a worker. ``log_tail`` holds the set-up's traceback in the controller."""

    tail_label = "traceback (in the controller)"
    #: Whether this process is the one to show it in full (the run's first test that needed it).
    first: bool = True
    #: The worker that shows it in full.
    shown_by: str = ""
    #: The set-up called ``pytest.skip()``: the tests that need it are skipped.
    skipped: bool = False
