"""uvicorn, run programmatically, and the SIGTERM choreography (see ``server``)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from collections.abc import Awaitable, Callable, Iterator
from types import FrameType

import uvicorn

from datastorage.app import create_app
from datastorage.config import Settings
from datastorage.server import EXIT_CONFIG, HANDLED_SIGNALS
from datastorage.service import Service

log = logging.getLogger("datastorage")

EXIT_STARTUP = 3


class _Server(uvicorn.Server):
    """uvicorn.Server that leaves signal handling to :class:`ShutdownCoordinator`."""

    def install_signal_handlers(self) -> None:  # uvicorn < 0.29
        return

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:  # uvicorn >= 0.29
        yield


#: Debug endpoints on: while this Redis key exists, the propagation delay does not end (a
#: test that must see the service inside the delay holds it open instead of racing a timer).
HOLD_DELAY_KEY = "debug:hold-propagation-delay"


class ShutdownCoordinator:
    def __init__(
        self, server: uvicorn.Server, settings: Settings, begin: Callable[[float], None],
        held: Callable[[], Awaitable[bool]] | None = None,
    ) -> None:  # fmt: skip
        self._server = server
        self._held = held
        self._delay = settings.shutdown_propagation_delay
        self._timeout = settings.shutdown_timeout
        self._begin = begin
        self._signals = 0
        self._skip_delay = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    @property
    def requested(self) -> bool:
        return self._signals > 0

    def handle(self, sig: signal.Signals) -> None:
        self._signals += 1
        if self._signals == 1:
            delay = 0.0 if sig == signal.SIGINT else self._delay
            log.info("received %s: shutting down in %.2fs", sig.name, delay)
            # Requests still in flight get SHUTDOWN_TIMEOUT after the listener closes;
            # the DLQ flush may use what is left of it.
            self._begin(time.monotonic() + delay + self._timeout)
            self._task = asyncio.get_running_loop().create_task(self._run(delay), name="shutdown")
        elif not self._server.should_exit:
            log.info("received %s again: skipping the propagation delay", sig.name)
            self._skip_delay.set()
        else:
            log.warning("received %s again: cancelling in-flight requests", sig.name)
            self._force()

    async def _run(self, delay: float) -> None:
        if delay > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._skip_delay.wait(), timeout=delay)
            while not self._skip_delay.is_set() and self._held is not None and await self._held():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._skip_delay.wait(), timeout=0.02)
        log.info("closing the listener; waiting up to %.1fs for in-flight requests", self._timeout)
        self._server.should_exit = True
        await asyncio.sleep(self._timeout + 0.2)  # + one uvicorn tick
        if self._server.server_state.tasks:
            log.warning(
                "shutdown timeout: cancelling %d in-flight request(s)",
                len(self._server.server_state.tasks),
            )
        self._force()

    def _force(self) -> None:
        self._server.should_exit = True
        self._server.force_exit = True
        for task in list(self._server.server_state.tasks):
            task.cancel()
        for connection in list(self._server.server_state.connections):
            transport = getattr(connection, "transport", None)
            if transport is not None:
                transport.close()

    def cancel(self) -> None:
        if self._task is not None:
            self._task.cancel()


async def serve(settings: Settings, early_signals: list[signal.Signals]) -> int:
    """Run the service until it has shut down; the exit status."""
    try:
        service = Service(settings)
    except Exception as exc:  # unparsable DATABASE_URL / REDIS_URL
        log.critical("invalid configuration: %s", exc)
        return EXIT_CONFIG

    config = uvicorn.Config(
        create_app(service),
        host=settings.host,
        port=settings.port,
        lifespan="on",
        ws="none",  # no websocket routes; also skips importing a websocket library
        log_config=None,
        log_level=settings.log_level_number,
        access_log=False,  # MetricsMiddleware writes a cheaper access line
        server_header=False,
    )
    server = _Server(config)
    async def held() -> bool:
        try:
            return bool(await service.redis.exists(HOLD_DELAY_KEY))
        except Exception:  # Redis unreachable (cut by a test): nothing holds the delay
            return False

    coordinator = ShutdownCoordinator(server, settings, service.begin_shutdown,
                                      held if settings.debug_endpoints else None)  # fmt: skip
    loop = asyncio.get_running_loop()

    def on_signal(signum: int, _: FrameType | None) -> None:
        # signal.signal rather than loop.add_signal_handler: the handler must stay
        # in place until the process has exited (a late SIGTERM must not kill it
        # with status 143), and loop.close() would reset it to the default.
        if not loop.is_closed():
            loop.call_soon_threadsafe(coordinator.handle, signal.Signals(signum))

    for sig in HANDLED_SIGNALS:
        signal.signal(sig, on_signal)
    while early_signals:  # received while starting up
        loop.call_soon(coordinator.handle, early_signals.pop(0))
    try:
        await server.serve()
    finally:
        coordinator.cancel()
        if server.force_exit and server.started:
            # uvicorn skips the lifespan shutdown on a forced exit; run it so the
            # lifespan task ends cleanly (Service.stop is idempotent).
            await server.lifespan.shutdown()
        await service.stop()  # no-op unless the lifespan never ran its shutdown
    if not server.started and not coordinator.requested:
        log.critical("startup failed")
        return EXIT_STARTUP
    log.info("exiting")
    return 0
