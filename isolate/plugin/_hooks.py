"""Options and the run's hooks: the controller opens and closes the run, every process
gets its worker stack."""

from __future__ import annotations

import atexit
import gc
import json
import logging
import os
import sys
from collections.abc import Generator, Mapping
from pathlib import Path
from typing import Any

import pytest

from .. import _plainimport
from .._config import OPTIONS, Option, Settings, redact_password, resolve_settings
from .._controller import WORKERINPUT_KEYS, RunController
from .._errors import ConfigError, IsolateError, RunFixtureError, tail_text
from .._identity import new_run_id, worker_from_env
from .._run.notices import NoticeHandler
from .._run.rundir import RunDir
from .._run.serial import SerialGate, record_serial_ids
from .._stack import WorkerStack
from ._durations import CpuMeter, DurationRecorder
from ._env import (
    controller_environment,
    early_workerinput,
    share_with_workers,
    started_as_command,
    will_have_workers,
)
from ._interrupts import InterruptDeadline, catch_interrupts, restore_interrupts
from ._prestart import Prestart, remember_fork_servers, remember_use, wait_for_start
from ._runfixtures import (
    close_run_fixtures,
    connect_run_fixtures,
    open_run_fixtures,
    report_problems,
    teardown_failures,
)
from ._slots import release_slot, share_slots, take_slot
from ._xdist import XdistHooks
from ._zygote import ZYGOTE_KEY, fork_workers, summary_line

STACK_KEY = pytest.StashKey[WorkerStack]()
CONTROLLER_KEY = pytest.StashKey[RunController]()
_SUMMARY_KEY = pytest.StashKey[dict[str, dict[str, float]]]()
_SEEN_KEY = pytest.StashKey[set[tuple[str, str]]]()
GATE_KEY = pytest.StashKey[SerialGate]()
_NOTICES_KEY = pytest.StashKey[logging.Handler]()
_EXPLICIT_DIST_KEY = pytest.StashKey[bool]()
#: On a test item: one of its reports (set-up, call) failed.
FAILED_KEY = pytest.StashKey[bool]()
_FRESH_PATHS_KEY = pytest.StashKey[tuple[Path, ...]]()
_FREEZE_AT_END_KEY = pytest.StashKey[bool]()  # an xdist controller freezes at its end (_exit_fast)

SERIAL_MARKER = (
    "serial: run while no other test of the run runs (isolate; in an xdist run the serial "
    "tests are scheduled last and the other workers wait; without xdist, no effect)"
)
FRESH_MARKER = (
    "fresh_database: the test gets isolate_fresh_database, a fresh migrated database, without "
    "naming it (isolate; --isolate-fresh-paths does it for directories)"
)


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_cmdline_main(config: pytest.Config) -> Generator[None, object, object]:
    """Before xdist turns ``-n N`` into ``--dist load``: did the user choose a ``--dist``?"""
    dist = getattr(config.option, "dist", "no")
    config.stash[_EXPLICIT_DIST_KEY] = dist not in (None, "no") or bool(getattr(config.option, "distload", False))
    return (yield)


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("isolate", "isolate: per-worker stacks for integration tests")
    for opt in OPTIONS:
        help_text = f"{opt.help} (ini {opt.ini}, env {opt.env}, default: {opt.default or 'unset'})"
        dest = f"isolate_{opt.name}"
        if opt.is_flag:  # no value: `--isolate-timings tests` keeps `tests` a path
            group.addoption(opt.cli, dest=dest, action="store_const", const="true", default=None, help=help_text)
            group.addoption(opt.negative_cli, dest=dest, action="store_const", const="false",
                            help=f"the opposite of {opt.cli}")  # fmt: skip
        elif opt.repeatable:
            group.addoption(opt.cli, dest=dest, action="append", default=None, help=help_text)
        else:
            group.addoption(opt.cli, dest=dest, default=None, help=help_text)
        if opt.repeatable:  # one per line
            parser.addini(opt.ini, help=help_text, default=[], type="linelist")
        else:
            parser.addini(opt.ini, help=help_text, default="")


def _settings(config: pytest.Config, *, early: bool = False) -> Settings:
    """The options, resolved; ``early``: from the arguments parsed before the initial
    conftests are loaded (``pytest_load_initial_conftests``)."""
    def cli(opt: Option) -> str | None:
        dest = f"isolate_{opt.name}"
        value = getattr(config.known_args_namespace, dest, None) if early else config.getoption(dest)
        return "\n".join(value) if isinstance(value, list) else value  # a repeated option

    values = {opt.name: cli(opt) for opt in OPTIONS}
    ini = {opt.name: _ini(config, opt) for opt in OPTIONS}
    try:
        return resolve_settings(values, ini, os.environ)
    except ConfigError as exc:
        raise pytest.UsageError(str(exc)) from None


def _ini(config: pytest.Config, opt: Option) -> str:
    value = config.getini(opt.ini)
    return "\n".join(value) if isinstance(value, list) else str(value or "")


def _from_controller(workerinput: Mapping[str, Any]) -> tuple[str, str, Path]:
    facts = [str(workerinput.get(key) or "") for key in WORKERINPUT_KEYS]
    if not all(facts):
        raise pytest.UsageError(
            "isolate: the xdist controller did not pass the run's facts; the isolate "
            "plugin must be active in the controller too"
        )
    return facts[0], facts[1], Path(facts[2])


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_load_initial_conftests(early_config: pytest.Config) -> Generator[None, object, object]:
    """With ``--isolate-env``, this process opens (or joins) the run and exports its
    values here, before pytest's own wrapper imports the initial conftests: a conftest
    that reads ``DATABASE_URL`` at import sees this worker's. First of all, an xdist
    controller forks the zygote its workers are forked from (``--isolate-fork-workers``).
    pytest's rewrite hook is in place now: isolate's own modules go back ahead of it."""
    _plainimport.install()
    if _is_worker():  # its turn to collect (--isolate-collect-slots)
        take_slot(early_config)
    settings = _settings(early_config, early=True)
    if settings.fork_workers == "auto" and will_have_workers(early_config) and not _is_worker():
        fork_workers(early_config)
    if settings.env:
        _join(early_config, settings, early=True)
    return (yield)


def _is_worker() -> bool:
    """An xdist worker, before xdist gives it ``workerinput``: ``python -c`` with the
    worker's id (an outer run's id in the environment of a nested pytest is not enough)."""
    return sys.argv[:1] == ["-c"] and bool(os.environ.get("PYTEST_XDIST_WORKER"))


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", SERIAL_MARKER)
    config.addinivalue_line("markers", FRESH_MARKER)
    settings = _settings(config)
    config.stash[_FRESH_PATHS_KEY] = tuple(config.rootpath / p for p in settings.fresh_paths)
    if settings.fast_exit:
        _exit_fast(config)
    if STACK_KEY not in config.stash:
        _join(config, settings, early=False)
    stack = config.stash[STACK_KEY]
    controller = config.stash.get(CONTROLLER_KEY, None)
    runs_tests = controller is None or not will_have_workers(config)
    if controller is not None and not runs_tests:  # its workers start after this
        share_slots(config, settings, controller.workerinput(), getattr(config.stash.get(ZYGOTE_KEY, None), "pid", None))
    if runs_tests:
        config.pluginmanager.register(CpuMeter(), "isolate-cpu")
    # --isolate-prestart: the run's PostgreSQL and this process's Redis, started ahead.
    config.pluginmanager.register(Prestart(stack, owner=controller is not None, runs_tests=runs_tests),
                                  "isolate-prestart")  # fmt: skip
    try:
        if controller is None:  # a worker: it asks the controller for run fixtures
            connect_run_fixtures(config, stack.worker.worker_id, stack.run.path)
            return
        open_run_fixtures(config, controller, stack.worker.worker_id)  # they live here
    except IsolateError as exc:
        raise pytest.UsageError(str(exc)) from None
    recorder = DurationRecorder(config, settings.store_durations)
    config.pluginmanager.register(recorder, "isolate-durations")
    if config.pluginmanager.hasplugin("xdist"):
        duration = settings.dist == "duration" and not config.stash.get(_EXPLICIT_DIST_KEY, False)
        config.pluginmanager.register(XdistHooks(controller, recorder, duration), "isolate-xdist")
    config.pluginmanager.register(InterruptDeadline(controller, settings.stop_timeout + 20),
                                  "isolate-interrupt-deadline")  # fmt: skip
    catch_interrupts(config)


def _exit_fast(config: pytest.Config) -> None:
    """``--isolate-fast-exit``: freeze every object left when the interpreter exits, so
    that its final garbage collections skip them. A worker that ran a suite holds ~100,000
    objects; collecting them at exit takes ~0.25 s of CPU, which the controller waits for
    (all workers at once on the machine's cores), and the memory goes back to the system
    anyway. At exit, not now: a program that calls ``pytest.main()`` and goes on keeps
    collecting its garbage.

    An xdist controller started as the ``pytest`` command freezes earlier, at its session's
    end (:func:`pytest_unconfigure`): pytest's own last collection, which looks for the
    unraisable exceptions of the tests' garbage, then skips what the controller made, and
    no test ran in it (~0.1 s at the end of every run)."""
    atexit.unregister(gc.freeze)  # once, however many sessions this process runs
    atexit.register(gc.freeze)
    if not hasattr(config, "workerinput") and will_have_workers(config) and started_as_command(config):
        config.stash[_FREEZE_AT_END_KEY] = True


def _join(config: pytest.Config, settings: Settings, *, early: bool) -> None:
    """Open the run (the controller, or the only process) or join it (an xdist worker),
    and make this process's stack; with ``--isolate-env``, export its values."""
    workerinput = getattr(config, "workerinput", None)
    if workerinput is None and early:
        workerinput = early_workerinput()  # a worker, before xdist hands it workerinput
    try:
        if workerinput is not None:
            run_id, backend, base = _from_controller(workerinput)
            run = RunDir(base, run_id)
            # A worker replacing a crashed one: release what the dead one held, now.
            run.registry.reap_dead_workers(settings.stop_timeout)
        else:
            controller = RunController(settings, settings.run_id or new_run_id(), config.rootpath)
            controller.open()
            config.stash[CONTROLLER_KEY] = controller
            run_id, backend, run = controller.run_id, controller.backend_name, controller.run
            if early and will_have_workers(config):  # they export before their conftests
                zygote = config.stash.get(ZYGOTE_KEY, None)
                share_with_workers(controller.workerinput(), getattr(zygote, "pid", None))
        # Not an xdist worker: "main", whatever PYTEST_XDIST_* an outer run left in the env.
        worker = worker_from_env(
            run_id, env={} if workerinput is None else None, workerinput=workerinput
        )
        stack = WorkerStack(settings, worker, run, backend, config.rootpath)
        config.stash[STACK_KEY] = stack
        notices = NoticeHandler(run.notices_path)  # warnings for the run's summary
        logging.getLogger("isolate").addHandler(notices)
        config.stash[_NOTICES_KEY] = notices
        if workerinput is not None:
            # If the controller dies, its watchdog stops this worker too (frozen first).
            stack.register_worker(_worker_record(worker.worker_id))
            config.stash[GATE_KEY] = SerialGate(run.path)
        if settings.env and workerinput is None and will_have_workers(config):
            os.environ.update(controller_environment(settings.env, run_id))  # it runs no test
        elif settings.env:
            os.environ.update(stack.environment(settings.env))
    except IsolateError as exc:
        raise pytest.UsageError(str(exc)) from None


def _worker_record(worker_id: str) -> str:
    return f"worker-{worker_id}-{os.getpid()}"


@pytest.hookimpl(wrapper=True)
def pytest_collection_modifyitems(
    session: pytest.Session, config: pytest.Config, items: list[pytest.Item]
) -> Generator[None]:
    """Serial tests go last (after any reordering by other plugins, e.g. pytest-randomly),
    so that in an xdist run they are handed out after the parallel ones; their ids go to
    the run dir for the duration scheduler, before the worker reports its collection."""
    result = yield
    stack = config.stash.get(STACK_KEY, None)
    if hasattr(config, "workerinput") and stack is not None:
        items.sort(key=lambda item: item.get_closest_marker("serial") is not None)
        serial = [item.nodeid for item in items if item.get_closest_marker("serial")]
        if serial:
            record_serial_ids(stack.run.path, stack.worker.worker_id, serial)
    if stack is not None and any(wants_fresh(item) for item in items):
        stack.fresh_wanted = True  # its pool starts with its database: spares made ahead
    report_problems(session)
    return result


@pytest.hookimpl(tryfirst=True)
def pytest_collection_finish(session: pytest.Session) -> None:
    waited = release_slot(session.config)  # the next worker collects now
    if waited is not None and STACK_KEY in session.config.stash:
        session.config.stash[STACK_KEY].timings.add("collect_slot_wait", waited)


def wants_fresh(item: pytest.Item) -> bool:
    """Whether ``item`` takes ``isolate_fresh_database``: by name, by the
    ``fresh_database`` marker, or by living under ``--isolate-fresh-paths``."""
    if "isolate_fresh_database" in getattr(item, "fixturenames", ()) or item.get_closest_marker("fresh_database"):
        return True
    return any(item.path.is_relative_to(p) for p in item.config.stash.get(_FRESH_PATHS_KEY, ()))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> Generator[None, object, object]:
    """In an xdist run, a ``serial`` test runs alone: see :mod:`isolate._run.serial`."""
    gate = item.config.stash.get(GATE_KEY, None)
    if gate is None:
        return (yield)
    with gate.exclusive() if item.get_closest_marker("serial") else gate.shared():
        return (yield)


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session: pytest.Session) -> None:
    config = session.config
    wait_for_start(config)
    stack = config.stash.get(STACK_KEY, None)
    if stack is not None:
        stack.close()
    controller = config.stash.get(CONTROLLER_KEY, None)
    if controller is None:
        return
    close_run_fixtures(config, session)  # after the last test, before the run is reaped
    if stack is not None:
        remember_fork_servers(session, stack)
    summary = controller.close()
    config.stash[_SUMMARY_KEY] = summary
    remember_use(session, summary)
    path = controller.settings.timings_json
    if path:
        target = Path(path)
        if not target.is_absolute():
            target = config.rootpath / target
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(json.dumps(summary, indent=2) + "\n")


def pytest_unconfigure(config: pytest.Config) -> None:
    release_slot(config)
    notices = config.stash.get(_NOTICES_KEY, None)
    if notices is not None:
        logging.getLogger("isolate").removeHandler(notices)
    stack = config.stash.get(STACK_KEY, None)
    if stack is not None and hasattr(config, "workerinput"):
        stack.release_process(_worker_record(stack.worker.worker_id))
    gate = config.stash.get(GATE_KEY, None)
    if gate is not None:
        gate.close()
    controller = config.stash.get(CONTROLLER_KEY, None)
    if controller is not None and controller.run.exists():
        close_run_fixtures(config)
        wait_for_start(config)
        controller.close()  # sessionfinish did not run (internal error)
    restore_interrupts(config)
    if config.stash.get(_FREEZE_AT_END_KEY, False):  # see _exit_fast; pytest's own
        gc.freeze()  # unconfigure, which collects, is a builtin's: it runs after this one


#: xdist workers start faster with pytest's caches of rewritten modules (docs/how-to/ci.md).
BYTECODE_NOTE = (
    "note: PYTHONDONTWRITEBYTECODE is set, so every worker rewrites and compiles the test "
    "modules, conftests{} again at each start; unset it for faster starts "
    "(PYTHONPYCACHEPREFIX keeps the caches out of the source tree)"
)


def pytest_report_header(config: pytest.Config) -> list[str]:
    """One line; with ``-v``, what the backend runs (binaries or images) too."""
    controller = config.stash.get(CONTROLLER_KEY, None)
    if controller is None:
        return []
    lines = controller.header()
    lines = lines if config.option.verbose > 0 else lines[:1]
    if sys.dont_write_bytecode and will_have_workers(config):
        forked = not isinstance(config.stash.get(ZYGOTE_KEY, "none"), str)  # the zygote rewrote the plugins
        lines.append(BYTECODE_NOTE.format("" if forked else " and plugins"))
    return [f"isolate: {line}" for line in lines]


def _kept_lines(controller: RunController) -> list[str]:
    lines = []
    for info in controller.run.kept():
        lines.append(f"worker {info.get('worker')}:")
        external = info.get("external") or []
        for key in ("dsn", "redis_url"):
            if info.get(key):
                value = redact_password(str(info[key])) if key in external else info[key]  # type: ignore[operator]
                lines.append(f"  {key}: {value}")
        for svc in info.get("services") or []:  # type: ignore[attr-defined]
            lines.append(f"  service {svc['name']}: {svc['url']} (log: {svc['log'] or 'docker logs'})")
        for box in info.get("containers") or []:  # type: ignore[attr-defined]
            lines.append(f"  container {box['name']}: {redact_password(str(box['url']))} (docker: {box['container']})")
        for kept in info.get("fresh_kept") or []:  # type: ignore[attr-defined]
            dsn = redact_password(kept["dsn"]) if "dsn" in external else kept["dsn"]  # type: ignore[operator]
            lines.append(f"  database of {kept['test']}: {dsn}")
    if lines:
        if any(info.get("external") for info in controller.run.kept()):
            lines.append(f"  (*** : an external server's password, not printed; it is in "
                         f"{controller.run.kept_dir}/, readable by you only)")
        lines.append(f"remove them: python -m isolate cleanup {controller.run_id}")
    return lines


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    controller = config.stash.get(CONTROLLER_KEY, None)
    failures = teardown_failures(config)
    if failures:
        terminalreporter.section("isolate: run fixture teardown failed", red=True)
        for failure in failures:
            terminalreporter.write_line(failure.message, red=True)
            terminalreporter.write_line(failure.traceback)
    kept = _kept_lines(controller) if controller is not None else []
    if kept:
        terminalreporter.section("isolate: stacks kept (--isolate-keep)")
        for line in kept:
            terminalreporter.write_line(line)
    summary = config.stash.get(_SUMMARY_KEY, None)
    for notice in controller.notices if controller is not None else ():
        terminalreporter.write_line(f"isolate: warning: {notice}", yellow=True)  # whatever the verbosity
    forked = summary_line(config)
    if forked and config.option.verbose > 0:
        terminalreporter.write_line(forked)  # how the workers started, with -v
    if controller is None or not summary or not controller.ran:
        return  # isolate started nothing
    teardown = summary.get("run_teardown", {}).get("max", 0.0)
    terminalreporter.write_line(
        f"isolate: run {controller.run_id} ({controller.backend_name}): {controller.ran}; "
        + ("kept (see above)" if kept else f"reaped in {teardown:.2f}s, nothing left running")
    )
    if config.option.verbose <= 0 and not controller.settings.timings:
        return  # quiet unless asked: -v or --isolate-timings shows isolate's own timings
    terminalreporter.section("isolate timings (seconds)")
    terminalreporter.write_line(f"{'phase':<22}{'count':>6}{'min':>9}{'median':>9}{'max':>9}")
    for phase, row in summary.items():
        terminalreporter.write_line(
            f"{phase:<22}{int(row['count']):>6}{row['min']:>9.3f}{row['median']:>9.3f}{row['max']:>9.3f}"
        )


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    if report.failed:
        item.stash[FAILED_KEY] = True  # --isolate-keep: its fresh database is set aside
        stack = item.config.stash.get(STACK_KEY, None)
        if stack is not None:
            stack.failed = True  # --isolate-keep=failed keeps this worker's stack
    error = call.excinfo.value if call.excinfo is not None else None
    if report.when == "setup" and report.failed and isinstance(error, IsolateError):
        # A session fixture that failed fails every later test of the worker with the
        # same error: show it in full once, then in one line.
        seen = item.config.stash.setdefault(_SEEN_KEY, set())
        key = (type(error).__name__, error.message)
        if isinstance(error, RunFixtureError) and not error.first:  # once per run
            report.longrepr = f"{key[0]}: {error.message} (in full at {error.shown_by})"
        elif key in seen:
            report.longrepr = f"{key[0]}: {error.message} (in full at this worker's first error)"
        elif isinstance(error, RunFixtureError):  # its traceback is the controller's
            report.longrepr = f"{key[0]}: {error}"
        seen.add(key)
    names = getattr(item, "fixturenames", ())
    if report.failed and ("isolate_service" in names or "isolate_services" in names):
        stack = item.config.stash.get(STACK_KEY, None)
        for handle in stack.running_services() if stack else ():
            report.sections.append(
                (f"isolate: {handle.name} log (last 40 lines)", tail_text(handle.logs(), 40))
            )
    return report
