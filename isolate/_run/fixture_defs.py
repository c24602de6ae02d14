"""What a run fixture is: ``@isolate.run_fixture``, its definitions and the checks
made at collection.

The decorator records a :class:`RunFixtureDef` in :data:`DEFINITIONS` (in every
process that imports the defining module) and returns the session fixture the plugin
makes of it (:data:`FIXTURE_FACTORY`, set when the plugin loads: this module imports no
pytest). :func:`problems` is what makes one unusable: a dependency that is not of the
run, a cycle, a name defined twice.
"""

from __future__ import annotations

import inspect
import os
import sys
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from .._errors import ConfigError

__all__ = [
    "DEFINITIONS",
    "RUN_LEVEL",
    "WORKER_LEVEL",
    "RunFixtureDef",
    "closure",
    "define",
    "problems",
    "run_fixture",
]

F = TypeVar("F", bound=Callable[..., object])

#: What a run fixture may depend on besides other run fixtures: things of the run.
RUN_LEVEL = ("isolate_run", "isolate_postgres", "isolate_backend", "pytestconfig")

#: isolate's fixtures that belong to one worker (named in the error, with the fix).
WORKER_LEVEL = (
    "isolate_stack", "isolate_worker", "isolate_database", "isolate_dsn", "isolate_conn",
    "isolate_fresh_database", "isolate_redis", "isolate_redis_url", "isolate_redis_client",
    "isolate_service", "isolate_service_session", "isolate_services", "isolate_services_session",
    "isolate_migrations", "isolate_bootstrap", "isolate_service_spec", "isolate_service_specs",
)  # fmt: skip

_DEPENDS_HINT = (
    "a run fixture can depend on " + ", ".join(RUN_LEVEL) + " and other run fixtures "
    "(@isolate.run_fixture); make what it needs a run fixture too, or pass it through one"
)


@dataclass(frozen=True)
class RunFixtureDef:
    """A function decorated with ``@isolate.run_fixture``: its name, parameters (the
    fixtures it depends on) and where it is defined, so the controller can import it."""

    name: str
    func: Callable[..., object]
    params: tuple[str, ...]
    module: str
    path: str | None

    @classmethod
    def of(cls, func: Callable[..., object], name: str | None = None) -> RunFixtureDef:
        if not callable(func):
            raise ConfigError(f"@isolate.run_fixture decorates a function, not {func!r}")
        label = str(name or getattr(func, "__name__", repr(func)))
        if inspect.iscoroutinefunction(func) or inspect.isasyncgenfunction(func):
            raise ConfigError(
                f"run fixture {label!r} is async",
                hint="write a plain function or generator; start an event loop inside it if you need one",
            )
        params = []
        for param in inspect.signature(func).parameters.values():
            if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
                raise ConfigError(f"run fixture {label!r} takes *args or **kwargs",
                                  hint="name each fixture it depends on as a parameter")  # fmt: skip
            if param.default is param.empty:  # as for pytest: a default is not a fixture
                params.append(param.name)
        module = getattr(func, "__module__", None) or "?"
        try:
            path = inspect.getsourcefile(func)
        except TypeError:
            path = None
        path = path or getattr(sys.modules.get(module), "__file__", None)
        return cls(label, func, tuple(params), module, os.path.abspath(path) if path else None)

    def location(self) -> dict[str, str | None]:
        return {"module": self.module, "path": self.path}


#: This process's run fixtures, by name (every process that imported their modules).
DEFINITIONS: dict[str, RunFixtureDef] = {}
#: Two definitions of one name in different files (an error at collection).
_CLASHES: list[tuple[RunFixtureDef, RunFixtureDef]] = []
#: Set by the plugin: makes the pytest fixture of a definition.
FIXTURE_FACTORY: Callable[[RunFixtureDef], Any] | None = None


def define(func: Callable[..., object], name: str | None = None) -> RunFixtureDef:
    """Record a run fixture in this process (the same file imported again replaces it)."""
    defn = RunFixtureDef.of(func, name)
    old = DEFINITIONS.get(defn.name)
    if old is not None and old.path != defn.path:
        _CLASHES.append((old, defn))
    DEFINITIONS[defn.name] = defn
    return defn


def run_fixture(func: F | None = None, *, name: str | None = None) -> Any:
    """Make a fixture that is set up once per test run, for all xdist workers, and torn
    down after the last test of the run.

    Decorate a generator function (or a plain function) in a ``conftest.py``; tests use it
    by its name (or ``name``) like any fixture::

        @isolate.run_fixture
        def fake_s3(isolate_run):
            server = start_fake_s3()
            isolate_run.adopt_process(server.pid, "fake-s3")   # reaped even on SIGKILL
            yield {"url": server.url}   # JSON: every worker gets this value
            server.stop()               # once, after the last test of the run

    It runs in the xdist controller (the process that outlives every worker; without
    xdist, the only process), the first time any test needs it, so a ``with`` block, a
    generator's state and objects that cannot be pickled all work; never if no selected
    test uses it. What it yields (or returns) goes to the workers as JSON. It may depend
    on ``isolate_run`` (``isolate.RunScope``), ``isolate_postgres``,
    ``isolate_backend``, ``pytestconfig`` and other run fixtures (which get the other's
    object itself, not its JSON); anything else is an error at collection. A failed
    set-up fails every test that needs it with one error, shown in full once; a failed
    teardown is reported at the end of the run and fails it.
    """

    def decorate(function: F) -> Any:
        if FIXTURE_FACTORY is None:
            raise ConfigError(
                "@isolate.run_fixture needs the isolate pytest plugin",
                hint="use it in a conftest.py of a pytest run with the plugin active (not -p no:isolate)",
            )
        return FIXTURE_FACTORY(define(function, name))

    return decorate(func) if func is not None else decorate


def problems(
    definitions: Mapping[str, RunFixtureDef],
    clashes: Iterable[tuple[RunFixtureDef, RunFixtureDef]] | None = None,
) -> list[tuple[RunFixtureDef, ConfigError]]:
    """What makes run fixtures unusable: a dependency that is not of the run, a cycle,
    a name defined twice. Checked at collection, where every conftest is loaded."""
    found: list[tuple[RunFixtureDef, ConfigError]] = []
    for old, new in _CLASHES if clashes is None else clashes:
        found.append((new, ConfigError(
            f"two run fixtures are named {new.name!r}: in {old.path} and {new.path}",
            hint="a run fixture is one per run: give each its own name",
        )))  # fmt: skip
    for defn in definitions.values():
        for param in defn.params:
            if param in RUN_LEVEL or param in definitions:
                continue
            what = "a fixture of each worker" if param in WORKER_LEVEL else "not a run fixture"
            found.append((defn, ConfigError(
                f"run fixture {defn.name!r} depends on {param!r}, {what}: a run fixture is set "
                "up once for the whole run, in the controller, where only run-level fixtures exist",
                hint=_DEPENDS_HINT,
            )))  # fmt: skip
        cycle = _cycle(defn.name, definitions, ())
        if cycle:
            found.append((defn, ConfigError(
                f"run fixtures depend on each other in a cycle: {' -> '.join(cycle)}",
                hint="remove one dependency of the cycle",
            )))  # fmt: skip
    return found


def _cycle(name: str, definitions: Mapping[str, RunFixtureDef], chain: tuple[str, ...]) -> tuple[str, ...]:
    if name in chain:
        return (*chain, name) if chain[0] == name else ()  # reported from its first member
    defn = definitions.get(name)
    for param in defn.params if defn else ():
        found = _cycle(param, definitions, (*chain, name))
        if found:
            return found
    return ()


def closure(name: str, definitions: Mapping[str, RunFixtureDef]) -> set[str]:
    """``name`` and every run fixture it depends on, directly or not."""
    seen: set[str] = set()
    todo = [name]
    while todo:
        current = todo.pop()
        if current not in seen:
            seen.add(current)
            defn = definitions.get(current)
            todo.extend(p for p in (defn.params if defn else ()) if p in definitions)
    return seen
