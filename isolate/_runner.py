"""The one protocol every backing-service runner satisfies."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from ._proc import ProcessRecord

__all__ = ["Runner"]


@runtime_checkable
class Runner(Protocol):
    """Starts, stops and describes one server process or container.

    Native and Docker runners of PostgreSQL, Redis and the service under test all
    satisfy it, so the layers above never care which backend runs them.
    """

    name: str

    def start(self) -> None:
        """Start and block until ready; raise an ``IsolateError`` if it cannot."""

    def stop(self, timeout: float | None = None) -> int | None:
        """Stop gracefully within ``timeout`` (then force); the exit code if known."""

    @property
    def is_running(self) -> bool:
        """Whether the process or container is up."""

    def logs(self) -> str:
        """Its log output so far."""

    def record(self) -> ProcessRecord:
        """What a reaper needs to stop it if its owner dies."""
