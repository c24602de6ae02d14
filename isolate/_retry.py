"""Waiting and retrying, on tenacity: readiness polls and the one start policy.

Every server and service isolate starts goes through :func:`start_on_free_port`:
lease a free port, launch, and if the launch lost its port to another process
(one classifier, :func:`is_bind_failure`, reads the error), release the lease and
try again on a new one.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TypeVar

from tenacity import (
    RetryCallState,
    Retrying,
    retry_if_exception,
    retry_if_result,
    stop_after_attempt,
    stop_after_delay,
    wait_exponential,
)

from ._ports import PortLease, reserve_port

__all__ = ["BIND_FAILURE_MARKERS", "READY_LAG", "is_bind_failure", "poll_until", "start_on_free_port"]

logger = logging.getLogger(__name__)

T = TypeVar("T")

#: What servers, services and the Docker engine say when a port is taken (lower case).
BIND_FAILURE_MARKERS = (
    "address already in use",  # Linux strerror (PostgreSQL, Valkey, Python, Docker)
    "eaddrinuse",
    "errno 98",
    "could not bind",  # PostgreSQL
    "could not create any tcp/ip",  # PostgreSQL
    "port is already allocated",  # Docker port publishing
)

#: The ``lag`` of every wait for a server or service to get ready (see :func:`poll_until`):
#: each such wait delays a worker's stack or a test's restart, and its probes (a refused
#: connect, a ping) cost far less than the milliseconds doubling would leave unseen.
READY_LAG = 0.1


def is_bind_failure(error: BaseException | str) -> bool:
    """Whether an error (its rendered text, log tail included) says a port was taken."""
    text = str(error).lower()
    return any(marker in text for marker in BIND_FAILURE_MARKERS)


def poll_until(
    predicate: Callable[[], object], timeout: float, *, initial: float = 0.005, maximum: float = 0.1,
    lag: float | None = None,
) -> bool:
    """Poll ``predicate()`` until true or ``timeout``: at once, then with exponential
    back-off from ``initial`` up to ``maximum`` seconds between probes.

    ``lag`` (a fraction, e.g. 0.1) is for waits that delay a start and whose probes are
    cheap: each pause is instead ``lag`` times the time waited so far (within
    ``initial``..``maximum``), so a success is seen at most that fraction late. Doubling
    sees a server ready after 36 ms at 65 ms; ``lag=0.1`` at ~40 ms, for ~2x the probes.

    Returns whether it became true, so callers decide what a timeout means.
    """
    def in_step(state: RetryCallState) -> float:
        assert lag is not None
        return min(maximum, max(initial, lag * (state.seconds_since_start or 0.0)))

    wait = wait_exponential(multiplier=initial, max=maximum) if lag is None else in_step
    retrying = Retrying(
        retry=retry_if_result(lambda ok: not ok),
        wait=wait,
        stop=stop_after_delay(timeout),
        retry_error_callback=lambda state: False,
        reraise=False,
    )
    return bool(retrying(predicate))


def start_on_free_port(launch: Callable[[PortLease], T], *, what: str, attempts: int = 5) -> T:
    """Lease a port and ``launch(lease)``; on a bind failure, retry on a new port.

    ``launch`` starts the thing and blocks until it is ready, or raises. On any
    failure the lease is released (``launch`` must clean up what it started);
    only :func:`is_bind_failure` errors are retried, at most ``attempts`` times.
    On success the caller owns the lease.
    """

    def attempt() -> T:
        lease = reserve_port()
        try:
            return launch(lease)
        except BaseException:
            lease.release()
            raise

    def log_retry(state: RetryCallState) -> None:
        logger.info("%s lost its port to another process (attempt %d); retrying on a new port",
                    what, state.attempt_number)  # fmt: skip

    retrying = Retrying(
        retry=retry_if_exception(is_bind_failure),
        stop=stop_after_attempt(attempts),
        before_sleep=log_retry,
        reraise=True,
    )
    return retrying(attempt)
