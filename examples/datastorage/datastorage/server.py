"""Process entry point: configuration, logging, uvicorn and graceful shutdown.

Signal handling is done here rather than by uvicorn, because uvicorn's own
handling differs between versions (>= 0.29 re-raises the captured SIGTERM
after shutdown, which would make the exit status 143 instead of 0) and has no
notion of a readiness propagation delay. On the first SIGTERM:

1. readiness reports 503 ``shutting_down`` at once (liveness stays 200);
2. requests are served normally for ``SHUTDOWN_PROPAGATION_DELAY`` seconds,
   so load balancers / Kubernetes endpoints stop routing here;
3. the listening socket is closed, idle keep-alive connections are closed and
   in-flight requests may finish within ``SHUTDOWN_TIMEOUT`` (then they are
   cancelled);
4. the DLQ is flushed into PostgreSQL if it is reachable (else it stays in
   Redis), pools are closed and the process exits with status 0.

A second SIGTERM/SIGINT skips the remaining propagation delay; a third one
cancels in-flight requests. A first SIGINT (Ctrl-C) skips the delay. A signal
that arrives while the process is still starting is remembered and acted on
as soon as the server runs; after the shutdown, further signals are ignored.
So the exit status is 0 whenever the process was asked to stop.

This module stays cheap to import (handlers are installed before uvicorn and
the libraries load); :mod:`datastorage.runner` does the rest.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
from types import FrameType

from datastorage.config import ConfigError, Settings

log = logging.getLogger("datastorage")

EXIT_CONFIG = 2
HANDLED_SIGNALS = (signal.SIGTERM, signal.SIGINT)

# Signals that arrive before the event loop runs; replayed once it does.
_early_signals: list[signal.Signals] = []


def _configure_logging(level: int) -> None:
    logging.basicConfig(
        stream=sys.stderr,
        level=level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # psycopg_pool logs every connection hand-out at INFO.
    logging.getLogger("psycopg.pool").setLevel(max(level, logging.WARNING))


def _record_early_signal(signum: int, _: FrameType | None) -> None:
    _early_signals.append(signal.Signals(signum))


def main() -> int:
    # Until the event loop runs, just remember a SIGTERM/SIGINT: it is acted on
    # as soon as the server can shut down properly (so the exit status is 0).
    for sig in HANDLED_SIGNALS:
        signal.signal(sig, _record_early_signal)
    try:
        settings = Settings.from_env(os.environ)
    except ConfigError as exc:
        logging.basicConfig(stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
        for message in exc.problems:
            log.critical("configuration error: %s", message)
        return EXIT_CONFIG
    _configure_logging(settings.log_level_number)
    import asyncio  # the heavy imports come after the handlers are in place

    from datastorage.runner import serve

    status = asyncio.run(serve(settings, _early_signals))
    # Interpreter shutdown resets handlers to the default (a late SIGTERM would
    # then kill the process with status 143), but leaves "ignore" alone.
    for sig in HANDLED_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    return status
