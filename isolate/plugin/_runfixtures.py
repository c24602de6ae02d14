"""``@isolate.run_fixture`` in pytest: in every process a session fixture whose body asks
the controller for the value; in the controller, the set-up on request, the teardown
when the session finishes, and what is reported."""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pytest

from .._controller import RunController
from .._errors import ConfigError, RunFixtureError
from .._identity import WorkerIdentity
from .._run import fixture_defs
from .._run.channel import ChannelServer, ask
from .._run.fixture_defs import DEFINITIONS, RunFixtureDef, closure, problems
from .._run.fixtures import Failure, RunFixtures, value_from
from .._runscope import RunScope
from .._stack import WorkerStack
from ._env import worker_count

__all__ = [
    "close_run_fixtures",
    "connect_run_fixtures",
    "open_run_fixtures",
    "report_problems",
    "teardown_failures",
]

logger = logging.getLogger(__name__)

Asker = Callable[[Mapping[str, Any]], dict[str, Any]]

_ASKER_KEY = pytest.StashKey[tuple[str, Asker]]()
_HOST_KEY = pytest.StashKey[RunFixtures]()
_CHANNEL_KEY = pytest.StashKey[ChannelServer]()
_FAILURES_KEY = pytest.StashKey[list[Failure]]()


def _make_fixture(defn: RunFixtureDef) -> Any:
    def run_fixture_value(pytestconfig: pytest.Config) -> object:
        return _value(pytestconfig, defn.name)

    run_fixture_value.__doc__ = defn.func.__doc__ or f"Run fixture {defn.name!r}: set up once per run."
    return pytest.fixture(scope="session", name=defn.name)(run_fixture_value)


fixture_defs.FIXTURE_FACTORY = _make_fixture


def _value(config: pytest.Config, name: str) -> object:
    needed = closure(name, DEFINITIONS)
    for defn, error in problems(DEFINITIONS):
        if defn.name in needed:
            failed = RunFixtureError(error.message, hint=error.hint)
            failed.first, failed.shown_by = False, "the collection error"
            raise failed
    worker, asker = config.stash[_ASKER_KEY]
    request = {
        "name": name, "worker": worker,
        "locations": {n: d.location() for n, d in DEFINITIONS.items()},
    }  # fmt: skip
    try:
        return value_from(asker(request))
    except RunFixtureError as exc:
        if exc.skipped:
            pytest.skip(exc.message)
        raise


# -- where the value comes from ----------------------------------------------------------


def connect_run_fixtures(config: pytest.Config, worker: str, run_path: Path) -> None:
    """An xdist worker asks the controller through the run dir's socket."""
    config.stash[_ASKER_KEY] = (worker, lambda request: ask(run_path, request))


def _load(config: pytest.Config, location: Mapping[str, str | None]) -> None:
    """Import, in the controller, the module that defines a run fixture: a conftest
    deeper than the ones pytest loads before collection (the controller never collects)."""
    path, module = location.get("path"), location.get("module")
    if path and Path(path).name == "conftest.py":
        manager: Any = config.pluginmanager
        importmode = config.getoption("importmode")
        try:
            manager._loadconftestmodules(Path(path).parent, importmode, config.rootpath,
                                         consider_namespace_packages=config.getini("consider_namespace_packages"))  # fmt: skip
        except (TypeError, ValueError):  # pytest 8.0
            manager._loadconftestmodules(Path(path).parent, importmode, config.rootpath)
    elif module:
        try:
            importlib.import_module(module)
        except ImportError as exc:
            raise ConfigError(
                f"the controller cannot import {module} ({path}) to set up its run fixture: {exc}",
                hint="define run fixtures in a conftest.py, or in a plugin module importable "
                "from where pytest starts (not in a test module)",
            ) from None


def open_run_fixtures(config: pytest.Config, controller: RunController, worker: str) -> None:
    """The controller's run fixtures: set up in this process, asked for directly by its
    own tests (without xdist) and through the run dir's socket by xdist workers."""
    scopes: list[RunScope] = []

    def run_scope() -> RunScope:
        if not scopes:
            identity = WorkerIdentity("run", worker_count(config), controller.run_id)
            stack = WorkerStack(controller.settings, identity, controller.run,
                                controller.backend_name, config.rootpath)  # fmt: skip
            scopes.append(RunScope(stack))
        return scopes[0]

    def provide(name: str) -> object:
        if name == "pytestconfig":
            return config
        if name == "isolate_backend":
            return controller.backend_name
        if name == "isolate_postgres":
            return run_scope().postgres()
        return run_scope()

    host = RunFixtures(provide, lambda location: _load(config, location))
    config.stash[_HOST_KEY] = host
    config.stash[_ASKER_KEY] = (worker, host.ask)
    if getattr(config.option, "dist", "no") != "no":  # xdist workers will ask
        try:
            config.stash[_CHANNEL_KEY] = ChannelServer(controller.run.path, host.ask)
        except (ConfigError, OSError) as exc:  # only a run that uses run fixtures needs it
            logger.warning("isolate: run fixtures cannot be served to the workers: %s", exc)


def close_run_fixtures(config: pytest.Config, session: pytest.Session | None = None) -> None:
    """Tear down the run fixtures (once; the controller, after the last test). A failed
    teardown fails the run and is shown in the terminal summary."""
    host = config.stash.get(_HOST_KEY, None)
    if host is None:
        return
    channel = config.stash.get(_CHANNEL_KEY, None)
    if channel is not None:
        channel.close()
    failures = host.teardown()
    if failures:
        config.stash.setdefault(_FAILURES_KEY, []).extend(failures)
        if session is not None and session.exitstatus == pytest.ExitCode.OK:
            session.exitstatus = pytest.ExitCode.TESTS_FAILED


def teardown_failures(config: pytest.Config) -> list[Failure]:
    return config.stash.get(_FAILURES_KEY, [])


# -- collection ---------------------------------------------------------------------------


def report_problems(session: pytest.Session) -> None:
    """A run fixture that cannot work (it depends on a worker's fixture, a cycle, a name
    defined twice) is a collection error, reported against the file that defines it."""
    for defn, error in problems(DEFINITIONS):
        where = Path(defn.path) if defn.path else session.config.rootpath
        try:
            nodeid = str(where.relative_to(session.config.rootpath))
        except ValueError:
            nodeid = str(where)
        report = pytest.CollectReport(nodeid, "failed", str(error), [])
        session.ihook.pytest_collectreport(report=report)
