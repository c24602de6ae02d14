"""Starting the run's PostgreSQL while pytest starts (``--isolate-prestart``).

A run's PostgreSQL is otherwise started by the first worker that needs it, after that
worker has imported everything and collected, and its first test waits for it. The
controller of an xdist run has nothing to do while xdist starts the workers, so it starts
PostgreSQL then, in a thread; without xdist, the one process does so while it collects.
Whoever asks for it later finds it started, or waits for the start under way
(:meth:`isolate._stack.WorkerStack.shared`).

``auto`` starts it when the run is expected to use it: ``--isolate-migrations`` is set,
or the last run used PostgreSQL (pytest's cache remembers; a run that did not use it
says so for the next).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping

import pytest

from .._config import Settings
from .._stack import WorkerStack
from ._env import worker_count

__all__ = ["remember_use", "start_ahead", "wait_for_start"]

logger = logging.getLogger(__name__)

#: In pytest's cache: what the last run used (``{"postgres": bool}``).
CACHE_KEY = "isolate/used"


#: Sessions that set up no fixture: ``--collect-only``, ``--fixtures``,
#: ``--fixtures-per-test``, ``--setup-plan``.
_NO_FIXTURES_RUN = ("collectonly", "showfixtures", "show_fixtures_per_test", "setupplan")


def _cache_says_used(config: pytest.Config) -> bool:
    cache = getattr(config, "cache", None)
    used = cache.get(CACHE_KEY, None) if cache is not None else None
    return isinstance(used, dict) and used.get("postgres") is True


def wanted(config: pytest.Config, settings: Settings) -> bool:
    """Whether this run starts its PostgreSQL early (see the module's doc)."""
    if settings.prestart == "never" or settings.pg_dsn or settings.db_isolation != "schema":
        return False  # database mode starts it from a cluster cached for its migrations
    if any(config.getoption(name, False) for name in _NO_FIXTURES_RUN):
        return False
    return settings.prestart == "always" or bool(settings.migrations) or _cache_says_used(config)


_THREAD_KEY = pytest.StashKey[threading.Thread]()


def start_ahead(config: pytest.Config, stack: WorkerStack) -> None:
    """In the process that owns the run: start its PostgreSQL in a thread if
    :func:`wanted`, sized for the run's workers."""
    if wanted(config, stack.settings):
        thread = threading.Thread(target=_start, args=(stack, worker_count(config)),
                                  name="isolate-prestart", daemon=True)  # fmt: skip
        thread.start()
        config.stash[_THREAD_KEY] = thread


def _start(stack: WorkerStack, workers: int) -> None:
    try:
        stack.prestart_postgres(workers)
    except Exception as exc:  # recorded in the run dir: whoever needs it gets the error
        logger.debug("isolate: starting PostgreSQL ahead failed: %s", exc)


def wait_for_start(config: pytest.Config) -> None:
    """Wait for a start under way to end: nothing may be starting while the run is reaped."""
    thread = config.stash.get(_THREAD_KEY, None)
    if thread is not None:
        thread.join()


def remember_use(session: pytest.Session, summary: Mapping[str, object]) -> None:
    """Tell the next run whether this one used PostgreSQL (its timings say so); a run
    that ran no test (``--collect-only``, nothing selected) leaves what it found."""
    cache = getattr(session.config, "cache", None)
    if cache is not None and session.testscollected and not session.config.getoption("collectonly", False):
        cache.set(CACHE_KEY, {"postgres": "postgres_wait" in summary})
