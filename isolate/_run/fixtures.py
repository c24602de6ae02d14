"""Run fixtures in the controller: set up on the first request, torn down once.

:class:`RunFixtures` sets a run fixture (:mod:`isolate._run.fixture_defs`) up the first
time anyone asks, on one thread of its own, keeps what the function yielded (a
generator, a ``with`` block, objects that never leave the process), answers every asker
with the same JSON value, and runs the teardowns once, in reverse order, when the
session ends. A failed set-up is recorded: every later asker gets the same error, and
only the first is told to show it in full (:func:`value_from` is the asker's side).

Pure Python: the plugin supplies the run-level values (``isolate_run``,
``isolate_postgres``...) and how to import a conftest.
"""

from __future__ import annotations

import concurrent.futures
import functools
import inspect
import json
import logging
import queue
import threading
import traceback
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from typing import Any, TypeVar

from .._errors import IsolateError, RunFixtureError
from .fixture_defs import DEFINITIONS, RUN_LEVEL, RunFixtureDef

__all__ = ["Failure", "RunFixtures", "value_from"]

logger = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(frozen=True)
class Failure:
    """A set-up or teardown that raised, as it travels to the workers (JSON)."""

    name: str
    message: str
    traceback: str = ""
    hint: str | None = None
    #: What it is remembered by: the run fixture that failed first (its dependants share it).
    key: str = ""
    #: The set-up skipped (``pytest.skip(...)``): so does every test that needs it.
    skipped: bool = False

    @classmethod
    def of(cls, name: str, exc: BaseException, what: str = "set-up", subject: str = "") -> Failure:
        text = getattr(exc, "message", None) or getattr(exc, "msg", None) or str(exc)
        if type(exc).__name__ == "Skipped":  # pytest.skip() in a set-up: not a failure
            return cls(name=name, message=str(text), key=name, skipped=True)
        subject = subject or f"run fixture {name!r} failed in its {what}"
        return cls(
            name=name,
            message=f"{subject}: {type(exc).__name__}: {text}",
            traceback=_traceback(exc),
            hint=exc.hint or None if isinstance(exc, IsolateError) else None,
            key=name,
        )

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _traceback(exc: BaseException) -> str:
    """The traceback from the user's code on (isolate's frames that called it left out)."""
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None and tb.tb_frame.f_code.co_filename == __file__:
        tb = tb.tb_next
    return "".join(traceback.format_exception(type(exc), exc, tb)).rstrip()


class _Failed(Exception):
    def __init__(self, failure: Failure) -> None:
        super().__init__(failure.message)
        self.failure = failure


class _Thread:
    """One daemon thread that runs every set-up and teardown, in order (a daemon: a
    set-up that never returns cannot keep the controller from exiting)."""

    def __init__(self) -> None:
        self._jobs: queue.SimpleQueue[tuple[Callable[[], Any], concurrent.futures.Future[Any]] | None]
        self._jobs = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._work, name="isolate-run-fixtures", daemon=True)
        self._thread.start()

    def _work(self) -> None:
        while (job := self._jobs.get()) is not None:
            call, future = job
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(call())
                except BaseException as exc:
                    future.set_exception(exc)

    def run(self, call: Callable[[], T]) -> T:
        future: concurrent.futures.Future[T] = concurrent.futures.Future()
        self._jobs.put((call, future))
        return future.result()

    def stop(self) -> None:
        self._jobs.put(None)


class RunFixtures:
    """The controller's run fixtures: set up on the first request, torn down once.

    ``provide(name)`` gives a run-level value (``isolate_run``, ``isolate_postgres``...);
    ``load(location)`` imports the module that defines a run fixture this process has
    not imported (a conftest deeper than the ones the controller loads).
    """

    def __init__(
        self, provide: Callable[[str], object], load: Callable[[Mapping[str, str | None]], None]
    ) -> None:
        self._provide = provide
        self._load = load
        self._lock = threading.Lock()
        self._thread: _Thread | None = None
        self._closed = False
        self._torn_down = False  # set on the set-up thread: every later request is refused
        self._values: dict[str, object] = {}
        self._failures: dict[str, Failure] = {}
        self._shown: dict[str, str] = {}  # failure key -> the worker told to show it in full
        self._finalizers: list[tuple[str, Callable[[], None]]] = []

    def _run(self, call: Callable[[], T]) -> T | None:
        with self._lock:
            if self._closed:
                return None
            if self._thread is None:
                self._thread = _Thread()
            thread = self._thread
        return thread.run(call)

    def ask(self, request: Mapping[str, Any]) -> dict[str, Any]:
        """Answer a request (from any thread): ``{"value": ...}`` or ``{"error": ...}``.

        ``request``: ``name``, ``worker`` (who asks) and ``locations`` (where the asker
        found each run fixture: ``module`` and ``path``).
        """
        answer = self._run(functools.partial(self._answer, request))
        return self._ending(request) if answer is None else answer

    @staticmethod
    def _ending(request: Mapping[str, Any]) -> dict[str, Any]:
        failure = Failure(str(request.get("name")), "the run is ending: its run fixtures are torn down")
        return {"error": failure.to_json(), "first": True, "shown_by": str(request.get("worker"))}

    def _answer(self, request: Mapping[str, Any]) -> dict[str, Any]:
        name, worker = str(request["name"]), str(request.get("worker") or "?")
        if self._torn_down:  # asked after the teardown began: nothing new is set up
            return self._ending(request)
        try:
            value = self._get(name, dict(request.get("locations") or {}), ())
        except _Failed as failed:
            return self._failed(failed.failure, worker)
        try:
            return {"value": json.loads(json.dumps(value))}
        except (TypeError, ValueError) as exc:
            return self._failed(Failure(
                name, f"run fixture {name!r} is set up, but what it yields cannot go to the "
                f"workers: it is not JSON-serialisable ({exc})",
                hint="yield what a test needs to reach it (URLs, ports, paths, ids) as str, int, "
                "float, bool, None, lists and dicts; keep the object itself in the controller, "
                "where another run fixture can depend on it",
                key=f"{name}:json",
            ), worker)  # fmt: skip

    def _failed(self, failure: Failure, worker: str) -> dict[str, Any]:
        key = failure.key or failure.name
        first = key not in self._shown
        shown_by = self._shown.setdefault(key, worker)
        return {"error": failure.to_json(), "first": first, "shown_by": shown_by}

    def _get(self, name: str, locations: Mapping[str, Mapping[str, str | None]], chain: tuple[str, ...]) -> object:
        if name in self._values:
            return self._values[name]
        if name in self._failures:
            raise _Failed(self._failures[name])
        if name in chain:
            raise _Failed(Failure(name, f"run fixtures depend on each other in a cycle: {' -> '.join((*chain, name))}"))
        if name in RUN_LEVEL:
            try:
                return self._provide(name)
            except Exception as exc:
                self._failures[name] = failure = Failure.of(name, exc, subject=f"{name} failed")
                raise _Failed(failure) from None
        defn = self._definition(name, locations.get(name))
        kwargs = {}
        for param in defn.params:
            try:
                kwargs[param] = self._get(param, locations, (*chain, name))
            except _Failed as failed:
                cause = failed.failure
                self._failures[name] = failure = cause if cause.skipped else Failure(
                    name, f"run fixture {name!r} needs {param!r}, which failed: {cause.message}",
                    cause.traceback, cause.hint, key=cause.key or cause.name,
                )  # fmt: skip
                raise _Failed(failure) from None
        logger.info("isolate: setting up run fixture %s", name)
        try:
            value = self._call(defn, kwargs)
        except BaseException as exc:  # pytest.skip() and pytest.fail() are BaseExceptions
            self._failures[name] = failure = Failure.of(name, exc)
            raise _Failed(failure) from None
        self._values[name] = value
        return value

    def _definition(self, name: str, location: Mapping[str, str | None] | None) -> RunFixtureDef:
        defn = DEFINITIONS.get(name)
        if location is not None and (defn is None or defn.path != location.get("path")):
            try:
                self._load(location)
            except Exception as exc:
                failure = Failure.of(name, exc, "import in the controller")
                self._failures[name] = failure
                raise _Failed(failure) from None
            defn = DEFINITIONS.get(name)
        if defn is None:
            self._failures[name] = failure = Failure(
                name, f"run fixture {name!r} is not defined in the controller "
                f"(defined in {(location or {}).get('path') or 'a module it could not import'})",
                hint="define run fixtures in a conftest.py or a plugin module that the xdist "
                "controller can import",
            )  # fmt: skip
            raise _Failed(failure)
        return defn

    def _call(self, defn: RunFixtureDef, kwargs: Mapping[str, object]) -> object:
        result = defn.func(**kwargs)
        if not inspect.isgenerator(result):
            return result
        try:
            value = next(result)
        except StopIteration:
            raise RunFixtureError(f"run fixture {defn.name!r} did not yield",
                                  hint="yield its value once, then tear down") from None  # fmt: skip
        self._finalizers.append((defn.name, functools.partial(_finish, defn.name, result)))
        return value

    def teardown(self) -> list[Failure]:
        """Tear down every run fixture set up, last first (once; later calls do
        nothing); the teardowns that raised. Requests after this are refused."""
        failures = self._run(self._teardown) or [] if self._thread is not None else []
        with self._lock:
            self._closed = True
            if self._thread is not None:
                self._thread.stop()
        return failures

    def _teardown(self) -> list[Failure]:
        self._torn_down = True
        failures = []
        while self._finalizers:
            name, finish = self._finalizers.pop()
            logger.info("isolate: tearing down run fixture %s", name)
            try:
                finish()
            except BaseException as exc:
                failures.append(Failure.of(name, exc, "teardown"))
        return failures


def _finish(name: str, gen: Any) -> None:
    try:
        next(gen)
    except StopIteration:
        return
    gen.close()
    raise RunFixtureError(f"run fixture {name!r} yielded more than once", hint="yield once")


def value_from(answer: Mapping[str, Any]) -> object:
    """The value in the controller's answer, or the :class:`RunFixtureError` it carries
    (with the set-up's traceback if this asker is the one to show it in full)."""
    if "error" not in answer:
        return answer["value"]
    failure = Failure(**answer["error"])
    first = bool(answer.get("first"))
    error = RunFixtureError(failure.message, hint=failure.hint, log_tail=failure.traceback if first else None)
    error.first, error.skipped = first, failure.skipped
    error.shown_by = f"the first test of {answer.get('shown_by') or '?'} that needed it"
    raise error
