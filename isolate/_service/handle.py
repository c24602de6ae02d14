"""One worker's instance of the service under test, whatever runs it.

:class:`ServiceHandle` holds everything backend-neutral (the port lease, health
checks, stop/kill/restart semantics, timings); a thin :class:`Launcher` (a native
process group, or a container) does the rest.
"""

from __future__ import annotations

import logging
import signal
import time
from collections.abc import Callable, Mapping
from typing import Protocol

from .._errors import ServiceExitedError, ServiceNotReadyError, tail_text
from .._ports import PortLease
from .._process import listening_ports
from .._retry import READY_LAG, is_bind_failure, poll_until, start_on_free_port
from .._run.registry import ProcessRecord
from .._timings import Timings
from .forkserver import RunHost
from .spec import ServiceSpec, TcpCheck

__all__ = ["Launcher", "ServiceHandle"]

logger = logging.getLogger(__name__)

#: Seconds a ``TcpCheck``'s connection must stay open behind Docker's proxy (its hang-up
#: comes within milliseconds when nothing listens).
PROXY_SETTLE = 0.25


#: Seconds between two checks of whether a service that is not ready yet has exited.
EXIT_CHECK_INTERVAL = 0.1


def _at_most_every(seconds: float, check: Callable[[], bool]) -> Callable[[], bool]:
    """``check``, asked at once and then at most every ``seconds`` (``False`` between)."""
    last = float("-inf")

    def throttled() -> bool:
        nonlocal last
        now = time.monotonic()
        if now - last < seconds:
            return False
        last = now
        return check()

    return throttled


class Launcher(Protocol):
    """Runs one service instance: a native process group or a container."""

    def warm(self, register: Callable[[ProcessRecord], None], host: RunHost | None = None) -> None:
        """Begin what can start before the template values are known (the fork server's
        preload, or the run's fork server's fork for this worker: ``host`` is the run dir),
        ``register``-ing any process it starts for the reaper."""

    def prepare(self, values: Mapping[str, object]) -> None:
        """(Re)configure for these template values; forgets an earlier configuration."""

    def launch(self) -> None:
        """Start it (not waiting for readiness)."""

    def exit_code(self) -> int | None:
        """Its exit code if it has exited, else ``None``."""

    def stop(self, sig: int, timeout: float) -> int | None:
        """Send ``sig``, wait up to ``timeout``, then SIGKILL; the exit code."""

    def kill(self) -> int | None:
        """SIGKILL at once; the exit code."""

    def signal(self, sig: int) -> None:
        """Send ``sig`` without waiting."""

    def wait_exit(self, timeout: float) -> int | None:
        """Wait up to ``timeout`` for it to exit by itself; the exit code or ``None``."""

    @property
    def is_running(self) -> bool:
        """Whether it is up."""

    @property
    def pid(self) -> int | None:
        """Its main process id on this machine, while it runs."""

    def logs(self) -> str:
        """Everything it logged so far (all starts)."""

    def record(self) -> ProcessRecord | None:
        """What the reaper needs if its worker dies (``None``: found another way)."""

    def close(self) -> None:
        """Release what :meth:`prepare` created (a container); it is stopped already."""


class ServiceHandle:
    """One worker's instance of the service under test.

    The first start picks a free port (and moves to another if the service loses
    it to another process); after that the port, and so :attr:`url`, is fixed for
    the handle's life: stop, start and restart keep it, so a test can hold the
    handle across them.
    """

    def __init__(
        self,
        spec: ServiceSpec,
        instance_name: str,
        values: Mapping[str, object],
        launcher: Launcher,
        *,
        ready_timeout: float,
        stop_timeout: float,
        on_start: Callable[[ServiceHandle], None] | None = None,
        timings: Timings | None = None,
        before_start: Callable[[], None] | None = None,
    ) -> None:
        self.spec = spec
        self.name = instance_name
        self.host = "127.0.0.1"
        self.values = dict(values)
        self.launcher = launcher
        #: Whether :attr:`url` is a port Docker publishes (port-mapped mode): Docker's proxy
        #: accepts connections while the container runs, listening or not, and hangs up on
        #: them when nothing listens, so a closed listener shows as a connection closed
        #: without a response, not as refused. A ``TcpCheck`` then needs the connection to
        #: stay open a moment.
        self.proxied = bool(getattr(launcher, "proxied", False))
        self.ready_timeout = spec.ready_timeout or ready_timeout
        self.stop_timeout = spec.stop_timeout or stop_timeout
        self.on_start = on_start
        #: Called before every start; raises to refuse it (the run is stopping).
        self.before_start = before_start
        self.timings = timings
        self.lease: PortLease | None = None
        self.last_exit_code: int | None = None
        self.starts = 0
        self._log_mark = 0

    @property
    def port(self) -> int:
        if self.lease is None:
            raise RuntimeError(f"{self.name} has no port before its first start")
        return self.lease.port

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def is_running(self) -> bool:
        return self.launcher.is_running

    @property
    def pid(self) -> int | None:
        """The main process id of the running instance (a container's too), else None."""
        return self.launcher.pid if self.is_running else None

    def logs(self) -> str:
        """Everything the service logged so far (all starts)."""
        return self.launcher.logs()

    def record(self) -> ProcessRecord | None:
        return self.launcher.record()

    # -- lifecycle ----------------------------------------------------------

    def start(self, wait: bool = True) -> None:
        """Start it on its port; by default block until healthy."""
        if self.is_running:
            raise RuntimeError(f"{self.name} is already running")
        if self.lease is not None:
            self._start(wait)
            return

        def first_start(lease: PortLease) -> None:
            self.lease = lease
            self.values.update(port=lease.port, url=self.url)
            try:
                self.launcher.prepare(self.values)
                self._start(wait)
            except BaseException:
                self.lease = None
                self.starts = 0
                raise

        start_on_free_port(first_start, what=self.name, attempts=3)

    def _start(self, wait: bool) -> None:
        if self.before_start is not None:
            self.before_start()
        self._log_mark = len(self.logs())
        self.launcher.launch()
        self.starts += 1
        if self.on_start is not None:
            self.on_start(self)
        if wait:
            self.wait_ready()

    def stop(self, timeout: float | None = None, *, graceful: bool = True) -> int | None:
        """SIGTERM, wait up to ``timeout`` seconds (default: the stop timeout), then SIGKILL
        the whole process group (and session). ``stop(20)`` waits 20 s.

        ``graceful=False`` is :meth:`kill`. Returns the exit code; on both backends a
        process killed by signal N reports 128+N (137 after SIGKILL), as a shell does.
        """
        if not graceful:
            return self.kill()
        limit = self.stop_timeout if timeout is None else timeout
        self.last_exit_code = self.launcher.stop(signal.SIGTERM, limit)
        return self.last_exit_code

    def kill(self) -> int | None:
        """SIGKILL the whole process group (and session) at once; returns the exit code
        (137 on both backends)."""
        self.last_exit_code = self.launcher.kill()
        return self.last_exit_code

    def signal(self, sig: int) -> None:
        """Send a signal without waiting (e.g. SIGTERM to watch a graceful shutdown)."""
        self.launcher.signal(sig)

    def restart(self, timeout: float | None = None, *, graceful: bool = True) -> None:
        """Stop (gracefully by default, waiting up to ``timeout``) and start again on the
        same port. Services that depend on this one are not restarted."""
        started = time.perf_counter()
        self.stop(timeout, graceful=graceful)
        self.start()
        self._timed_restart(started)

    def ensure_running(self) -> None:
        """Start it if a previous test stopped or killed it."""
        if not self.is_running:
            logger.info("restarting %s, stopped by an earlier test", self.name)
            started = time.perf_counter()
            self.start()
            self._timed_restart(started)

    def ensure_ready(self, grace: float = 1.0) -> None:
        """Make it running *and* healthy: start it if it is down; if it runs but does
        not pass its health check within ``grace`` seconds (an earlier test left it
        shutting down, or cut off), restart it."""
        self.ensure_running()
        if poll_until(self.is_ready, grace, maximum=0.03, lag=READY_LAG):  # probes at once, then backs off
            return
        logger.info("restarting %s: running but not ready (left so by an earlier test)", self.name)
        self.restart()

    def _timed_restart(self, started: float) -> None:
        if self.timings is not None:
            self.timings.add("service_restart", time.perf_counter() - started)

    def wait_exit(self, timeout: float | None = None) -> int | None:
        """Wait for the service to exit by itself; its exit code, or None on timeout."""
        code = self.launcher.wait_exit(self.stop_timeout if timeout is None else timeout)
        if code is not None:
            self.last_exit_code = code
        return code

    def is_ready(self) -> bool:
        """One health-check probe."""
        check = self.spec.health
        if self.proxied and isinstance(check, TcpCheck) and not check.settle:
            check = TcpCheck(settle=PROXY_SETTLE)
        return check(self.host, self.port)

    def wait_ready(self, timeout: float | None = None) -> None:
        """Poll the health check until it passes; raise if it exits or times out."""
        limit = self.ready_timeout if timeout is None else timeout
        started = time.monotonic()
        # Short back-off cap: each probe is a cheap loopback request, and readiness
        # latency adds straight to every worker's stack start-up and every restart. Whether
        # it exited is asked less often: for a container, that is a call to the engine.
        exited = _at_most_every(EXIT_CHECK_INTERVAL, lambda: self.launcher.exit_code() is not None)
        done = poll_until(lambda: self.is_ready() or exited(), limit, maximum=0.03, lag=READY_LAG)
        code = self.launcher.exit_code()
        if done and code is None:
            return
        log_tail = tail_text(self.logs()[self._log_mark :])
        if code is not None:
            self.last_exit_code = code
            hint = None
            demoted = getattr(self.launcher, "run_as", None)
            if is_bind_failure(log_tail):
                hint = (f"another process holds port {self.port}; the service must listen on "
                        "the {port} it is given (and isolate retries a first start elsewhere)")  # fmt: skip
            elif demoted is not None:
                hint = (f"isolate ran it as {demoted.name}, not as root (--isolate-demote-services=auto): "
                        f"if the log says 'Permission denied', {demoted.name} cannot reach what it runs; "
                        "install it where that user can read it, or set --isolate-demote-services=never; "
                        "else run the service's command by hand to reproduce")  # fmt: skip
            raise ServiceExitedError(
                f"service {self.name} exited with code {code} before it was ready",
                log_tail=log_tail, exit_code=code, port=self.port, hint=hint,
            )  # fmt: skip
        if not done:
            pid = self.pid
            listening = sorted(listening_ports(pid)) if pid else []
            hint = None
            if listening and self.port not in listening:
                hint = (f"it listens on {', '.join(map(str, listening))}, not on the port it was "
                        f"given ({self.port}): pass {{port}} to it in ServiceSpec.command or env")  # fmt: skip
            self.stop(graceful=False)  # never hand a later test a half-started service
            raise ServiceNotReadyError(
                f"service {self.name} was not ready within {limit:.1f}s",
                log_tail=log_tail, port=self.port, url=self.url, health=self.spec.health,
                listening=listening or None, waited=f"{time.monotonic() - started:.1f}s",
                hint=hint,
            )  # fmt: skip

    def close(self) -> None:
        """Stop for good (``spec.close_signal``, the stop timeout, then SIGKILL), release
        what runs it and give the port back."""
        try:
            if self.is_running:
                self.last_exit_code = self.launcher.stop(self.spec.close_signal, self.stop_timeout)
        finally:
            self.launcher.close()
            if self.lease is not None:
                self.lease.release()

    def __repr__(self) -> str:
        where = self.url if self.lease is not None else "not started"
        return f"<ServiceHandle {self.name} {where} running={self.is_running}>"
