"""The command line: ``python -m isolate`` (also the ``isolate-stacks`` console script).

``isolate status [--base-dir DIR]`` lists the runs on this machine.

``isolate cleanup [--dry-run] [--caches] [--base-dir DIR]`` removes what runs whose owner
process is gone left behind: their run dirs (with the processes registered
there) and every container, network and volume labelled
``isolate.managed=true`` whose owner is dead. Live runs are never touched.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from . import __version__
from ._backends import docker_installed
from ._cache import dir_size, entries, format_size, remove_unused
from ._config import default_base_dir, resolve_settings
from ._errors import IsolateError
from ._fs import owned_by_me
from ._ports import lock_dir, machine_lock_dir, try_lease
from ._run.rundir import RUN_PREFIX, RunDir, reap_stale_runs, remove_stale_zygote_dirs, stale_runs
from ._watchdog import reap_run_dir

__all__ = ["build_parser", "main"]


def _docker_unavailable() -> str | None:
    """Why the Docker steps cannot run here, or ``None`` if they can."""
    if not docker_installed():
        return "the docker extra is not installed"
    from ._docker.engine import engine_available

    ok, why = engine_available()
    return None if ok else why


def _docker_orphans(dry_run: bool) -> tuple[list[str], str | None]:
    """What the Docker reaper removed (or would), or why it did not run."""
    why = _docker_unavailable()
    if why is not None:
        return [], f"skipped ({why})"
    from ._docker.containers import reap_orphans

    return reap_orphans(dry_run=dry_run), None


def cleanup(bases: Sequence[Path], dry_run: bool) -> int:
    """Remove (or list) what runs whose owner is gone left behind."""
    verb = "would remove" if dry_run else "removed"
    found = 0
    for base in bases:
        for run in stale_runs(base) if dry_run else reap_stale_runs(base):
            print(f"{verb} run dir {run.path}")
            found += 1
    for path in remove_stale_zygote_dirs(Path(tempfile.gettempdir()), dry_run):
        print(f"{verb} zygote dir {path}")
        found += 1
    try:
        removed, skipped = _docker_orphans(dry_run)
    except IsolateError as exc:
        print(f"docker: failed: {exc}", file=sys.stderr)
        return 1
    if skipped:
        print(f"docker: {skipped}")
    for item in removed:
        print(f"{verb} {item}")
    found += len(removed)
    if not found:
        print("nothing to clean up")
    return 0


def _age(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{int(seconds // size)}{unit}"
    return f"{int(seconds)}s"


def remove_run(bases: Sequence[Path], run_id: str, dry_run: bool) -> int:
    """Remove one run of this user's (a kept one, say): processes, containers, dir."""
    verb = "would remove" if dry_run else "removed"
    for base in bases:
        run = RunDir(base, run_id)
        if not run.exists():
            continue
        owner = run.owner()
        if owner is None:
            print(f"isolate: {run.path} is not this user's run", file=sys.stderr)
            return 1
        if not owner.gone() and not run.is_kept():
            print(f"isolate: run {run_id} is running (pid {owner.pid}); not removing it", file=sys.stderr)
            return 1
        if not dry_run:
            backend = str(run.facts().get("backend") or "native")
            for item in reap_run_dir(run, backend, stop_timeout=10.0):
                print(f"{verb} {item}")
        print(f"{verb} run {run_id} ({run.path})")
        return 0
    print(f"isolate: no run {run_id} under {', '.join(map(str, bases))}", file=sys.stderr)
    return 1


def status(bases: Sequence[Path]) -> int:
    """List the runs on this machine: id, state, owner, backend, age, dir."""
    rows = []
    for base in bases:
        for path in sorted(base.glob(RUN_PREFIX + "*")):
            run = RunDir(base, path.name[len(RUN_PREFIX) :])
            owner, facts = run.owner(), run.facts()
            if owner is None:
                state = "foreign" if not owned_by_me(path) else "unknown"
                rows.append((run.run_id, state, "-", "-", "-", str(path)))
                continue
            age = _age(time.time() - float(str(facts.get("created") or time.time())))
            state = "kept" if run.is_kept() else "stale" if owner.gone() else "alive"
            rows.append((run.run_id, state, str(owner.pid),
                         str(facts.get("backend") or "?"), age, str(path)))  # fmt: skip
    if not rows:
        print("no isolate runs")
    else:
        _table(("RUN", "STATE", "OWNER", "BACKEND", "AGE", "DIR"), rows)
    caches = [(str(path), str(len(entries(path))),
               format_size(dir_size(path))) for path in _cache_dirs(bases)]  # fmt: skip
    if caches:
        print()
        _table(("CACHE", "ENTRIES", "SIZE"), caches)
    return 0


def _table(header: tuple[str, ...], rows: Sequence[tuple[str, ...]]) -> None:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())


def _cache_dirs(bases: Sequence[Path]) -> list[Path]:
    """This user's cache dirs: templates (per base dir) and binary copies."""
    uid = os.geteuid()
    paths = (*(b / f"isolate-cache-{uid}" for b in bases), Path(tempfile.gettempdir()) / f"isolate-bin-cache-{uid}")
    return [p for p in paths if owned_by_me(p)]


def _stale_port_locks(dry_run: bool) -> list[Path]:
    """This user's lock files in the port lease dir that no lease holds (removed by
    taking and releasing each as a lease)."""
    found = []
    primary = lock_dir()
    machine = machine_lock_dir(primary)
    for path in sorted(p for d in (primary, machine) if d is not None for p in d.glob("*.lock")):
        if not owned_by_me(path):
            continue
        lease = try_lease(path)
        if lease is not None:
            found.append(path)
            lease.release(unlink=not dry_run)
    return found


def _clean_cache_dir(cache: Path, dry_run: bool) -> tuple[list[str], list[str]]:
    """Every entry of a cache dir (a template, a binary copy) that no live process holds,
    with its lock file and what a crashed build left; (removed, kept)."""
    removed, kept = [], []
    names = {p.name for p in entries(cache)}
    names |= {p.name[: -len(".lock")] for p in cache.glob("*.lock")}
    for name in sorted(names):
        entry = cache / name
        leftovers = sorted(cache.glob(f"{name}.tmp-*"))
        if remove_unused(cache, f"{name}.lock", entry, *leftovers, dry_run=dry_run):
            removed.append(str(entry))
        else:
            kept.append(str(entry))
    if not dry_run:
        with contextlib.suppress(OSError):
            cache.rmdir()  # only if empty: a run may be making a new entry right now
    return removed, kept


def clean_caches(bases: Sequence[Path], dry_run: bool) -> list[str]:
    """This user's caches: initdb templates, binary copies, build locks and, with the
    docker extra and an engine, the built service images, and the port lock files a
    crashed process left. What a live run uses (it holds the entry's lock: a template
    it copies, binaries its servers run, an image its containers run) is kept."""
    verb = "would remove" if dry_run else "removed"
    uid = os.geteuid()
    tmp = Path(tempfile.gettempdir())
    done = []
    for cache in _cache_dirs(bases):
        removed, kept = _clean_cache_dir(cache, dry_run)
        done += [f"{verb} {path}" for path in removed]
        done += [f"kept {path} (a live run uses it)" for path in kept]
    done += [f"{verb} {path}" for path in _stale_port_locks(dry_run)]
    if _docker_unavailable() is None:
        from ._docker.images import remove_built_images

        images, in_use = remove_built_images(dry_run)
        done += [f"{verb} {item}" for item in images]
        done += [f"kept {item}" for item in in_use]
    else:
        locks = tmp / f"isolate-build-locks-{uid}"
        for path in sorted(locks.glob("*.lock")) if owned_by_me(locks) else ():
            remove_unused(locks, path.name, dry_run=dry_run)
    return done


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``python -m isolate`` (the docs' CLI reference is made from it)."""
    parser = argparse.ArgumentParser(
        prog="python -m isolate",
        description="isolate (pytest-isolate-stacks): per-worker integration-test stacks for pytest-xdist",
    )
    parser.add_argument("--version", action="version", version=f"isolate {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    clean = commands.add_parser(
        "cleanup",
        help="remove run dirs, processes and containers left by runs whose owner is gone",
        description="Remove native run dirs (and their processes) and docker containers, "
        "networks and volumes labelled isolate.managed=true whose owner process is gone. "
        "Resources of live runs are kept.",
    )
    clean.add_argument(
        "run", nargs="?", help="remove this run (a kept one, or a stale one) instead of every stale run"
    )
    clean.add_argument("--dry-run", action="store_true", help="only print what would be removed")
    clean.add_argument(
        "--caches", action="store_true",
        help="also remove this user's caches: initdb templates and clusters with a migrated "
        "template, binary copies, build locks, stale port lock files, built service images "
        "and seeded PostgreSQL images",
    )  # fmt: skip
    stat = commands.add_parser(
        "status", help="list the isolate runs on this machine (owner, alive or stale, backend, age) "
        "and this user's caches (entries, size)",
    )
    for sub in (clean, stat):
        sub.add_argument(
            "--base-dir",
            help="where run dirs live (default: ISOLATE_BASE_DIR, else both /dev/shm and the "
            "system temp dir)",
        )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        base = args.base_dir or resolve_settings(env=os.environ).base_dir
    except IsolateError as exc:
        print(f"isolate: {exc}", file=sys.stderr)
        return 2
    # default: both places a run may have used (/dev/shm when it had room, else /tmp)
    bases = [Path(b) for b in ([base] if base else dict.fromkeys([default_base_dir(), tempfile.gettempdir()]))]
    if args.command == "status":
        return status(bases)
    if args.run:
        return remove_run(bases, args.run, args.dry_run)
    code = cleanup(bases, args.dry_run)
    if args.caches:
        for line in clean_caches(bases, args.dry_run):
            print(line)
    return code
