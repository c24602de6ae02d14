"""Starting what a run will use while pytest starts (``--isolate-prestart``).

A run's PostgreSQL is otherwise started by the first worker that needs it, after that
worker has imported everything and collected, and its first test waits for it; a
worker's Redis, by that worker's first test that needs it. Instead:

- the controller of an xdist run, which has nothing to do while xdist starts the
  workers, starts PostgreSQL then, in a thread (without xdist, the one process does so
  while it collects); it waits for the start to end before it hands out any test, which
  the workers would wait for anyway. Whoever asks for it later finds it started, or waits
  for the start under way (:meth:`isolate._stack.WorkerStack.shared`);
- every process that runs tests starts its own Redis in a thread while it collects, and
  its first test waits for the start to end (see :class:`Prestart` for why);
- the run's owner starts the run's fork servers the last run started (their preload is
  what a worker's first service start waits for otherwise; :mod:`isolate._service.hubs`).

``auto`` starts what the last run used (pytest's cache remembers; a run that did not use
something says so for the next; the fork servers are remembered in this user's cache
dir), and PostgreSQL whenever ``--isolate-migrations`` is set.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Generator, Mapping
from pathlib import Path

import pytest

from .._config import Settings
from .._errors import IsolateError
from .._service.forkserver import forks_from_the_runs
from .._stack import WorkerStack
from ._env import worker_count

__all__ = ["Prestart", "remember_fork_servers", "remember_use", "start_ahead", "wait_for_start"]

logger = logging.getLogger(__name__)

#: In pytest's cache: what the last run used (``{"postgres": bool, "redis": bool}``).
CACHE_KEY = "isolate/used"


#: Sessions that set up no fixture: ``--collect-only``, ``--fixtures``,
#: ``--fixtures-per-test``, ``--setup-plan``.
_NO_FIXTURES_RUN = ("collectonly", "showfixtures", "show_fixtures_per_test", "setupplan")


def _last_run_used(config: pytest.Config, part: str) -> bool:
    cache = getattr(config, "cache", None)
    used = cache.get(CACHE_KEY, None) if cache is not None else None
    return isinstance(used, dict) and used.get(part) is True


def _may_start(config: pytest.Config, settings: Settings) -> bool:
    return settings.prestart != "never" and not any(config.getoption(name, False) for name in _NO_FIXTURES_RUN)


def wanted(config: pytest.Config, settings: Settings) -> bool:
    """Whether the run's owner starts its PostgreSQL early (see the module's doc)."""
    if not _may_start(config, settings) or settings.pg_dsn or settings.db_isolation != "schema":
        return False  # database mode starts it from a cluster cached for its migrations
    return settings.prestart == "always" or bool(settings.migrations) or _last_run_used(config, "postgres")


def redis_wanted(config: pytest.Config, settings: Settings) -> bool:
    """Whether a process that runs tests starts its Redis early (see the module's doc)."""
    return _may_start(config, settings) and (settings.prestart == "always" or _last_run_used(config, "redis"))


def fork_servers_wanted(config: pytest.Config, stack: WorkerStack) -> bool:
    """Whether the run's owner starts the run's fork servers the last run started: where
    services fork from one."""
    return _may_start(config, stack.settings) and forks_from_the_runs(stack.backend.name, stack.settings)


def _start_fork_servers(config: pytest.Config, stack: WorkerStack) -> None:
    from .._backends.native import NativeBackend  # what the controller does not load otherwise
    from .._service import hubs

    native = NativeBackend(stack.settings, config.rootpath)  # its services' environment and user
    recipes = hubs.recall(hubs.memory_path(Path(stack.settings.base_path)), config.rootpath)
    if recipes:
        hubs.prestart(stack.run, recipes, native.env, native.run_as)


_THREADS_KEY = pytest.StashKey[list[threading.Thread]]()


class Prestart:
    """When the starts ahead run (a plugin: pytest hooks only). A start runs in a thread,
    and importing modules there creates their loggers, which pytest's log capture iterates
    without a lock each time it begins (``catching_logs``: before a session's collection,
    its test loop, and every phase of every test). So a thread starts only after pytest
    has begun capturing for a span with no such beginning inside, and is over before the
    span ends: in a process that runs tests, its collection; in an xdist controller, its
    session's start, while xdist starts the workers (it runs no test)."""

    def __init__(self, stack: WorkerStack, *, owner: bool, runs_tests: bool) -> None:
        self.stack = stack
        self.owner = owner
        self.runs_tests = runs_tests

    @pytest.hookimpl(tryfirst=True)
    def pytest_collection(self, session: pytest.Session) -> None:
        if self.runs_tests:
            start_ahead(session.config, self.stack, owner=self.owner, runs_tests=True)

    @pytest.hookimpl(trylast=True)
    def pytest_collection_finish(self, session: pytest.Session) -> None:
        # Before the first test's log capture begins; how long this process waited for its
        # starts ahead is part of its stack's start-up (``prestart_wait``).
        if session.config.stash.get(_THREADS_KEY, []):
            with self.stack.timings.measure("prestart_wait"):
                wait_for_start(session.config)

    @pytest.hookimpl(wrapper=True, trylast=True)
    def pytest_sessionstart(self, session: pytest.Session) -> Generator[None, object, object]:
        if not self.owner or self.runs_tests:
            return (yield)
        # Inside pytest's capture of the session's start, around xdist's, which starts the
        # workers one after another: PostgreSQL starts meanwhile, and is ready (or failed)
        # before the collection's capture begins.
        start_ahead(session.config, self.stack, owner=True, runs_tests=False)
        try:
            return (yield)
        finally:
            wait_for_start(session.config)

    @pytest.hookimpl(wrapper=True, trylast=True)
    def pytest_runtestloop(self, session: pytest.Session) -> Generator[None, object, object]:
        try:
            return (yield)
        finally:
            wait_for_start(session.config)  # before the session's end begins its capture


def start_ahead(config: pytest.Config, stack: WorkerStack, *, owner: bool, runs_tests: bool) -> None:
    """Start in threads what :func:`wanted` and :func:`redis_wanted` say: the run's
    PostgreSQL if this process owns the run (sized for the run's workers), its Redis if
    it runs tests. Call it where :class:`Prestart` does."""
    starts: list[tuple[str, Callable[[], object]]] = []
    if owner and wanted(config, stack.settings):
        count = worker_count(config)
        starts.append(("PostgreSQL", lambda: stack.prestart_postgres(count)))
    if owner and fork_servers_wanted(config, stack):
        starts.append(("fork servers", lambda: _start_fork_servers(config, stack)))
    if runs_tests and redis_wanted(config, stack.settings):
        starts.append(("Redis", stack.prestart_redis))
    threads = config.stash.setdefault(_THREADS_KEY, [])
    for what, start in starts:
        thread = threading.Thread(target=_start, args=(what, start), name=f"isolate-prestart-{what}", daemon=True)
        thread.start()
        threads.append(thread)


def _start(what: str, start: Callable[[], object]) -> None:
    try:
        start()
    except Exception as exc:  # whoever needs it starts it again, and gets the error
        logger.debug("isolate: starting %s ahead failed: %s", what, exc)


def wait_for_start(config: pytest.Config) -> None:
    """Wait for the starts under way to end: nothing may be starting while the stack is
    closed or the run is reaped, nor while pytest begins a capture of the logs."""
    for thread in config.stash.get(_THREADS_KEY, []):
        thread.join()


def remember_use(session: pytest.Session, summary: Mapping[str, object]) -> None:
    """Tell the next run whether this one used PostgreSQL and Redis (its timings say so:
    ``postgres_wait`` and ``redis_wait`` are recorded by a use, not by a start ahead); a
    run that ran no test (``--collect-only``, nothing selected) leaves what it found."""
    cache = getattr(session.config, "cache", None)
    if cache is not None and session.testscollected and not session.config.getoption("collectonly", False):
        cache.set(CACHE_KEY, {"postgres": "postgres_wait" in summary, "redis": "redis_wait" in summary})


def remember_fork_servers(session: pytest.Session, stack: WorkerStack) -> None:
    """Tell the next run which fork servers this one started (before the run dir goes);
    as :func:`remember_use`, a run that ran no test leaves what it found, and so does a run
    whose services could not fork from them (the docker backend's containers, a run with
    ``--isolate-fork-server=off``): a project run on both backends in turn would otherwise
    forget at every docker run what its next native run starts ahead."""
    ran = session.testscollected and not session.config.getoption("collectonly", False)
    if ran and forks_from_the_runs(stack.backend.name, stack.settings):
        from .._service import hubs

        try:
            hubs.remember(stack.run, hubs.memory_path(Path(stack.settings.base_path)), session.config.rootpath)
        except (OSError, IsolateError) as exc:  # the next run starts them as before
            logger.debug("isolate: cannot remember the run's fork servers: %s", exc)
