"""The command line: ``python -m isolate`` (also the ``isolate`` console script).

``isolate cleanup [--dry-run] [--base-dir DIR]`` removes what runs whose owner
process is gone left behind: their run dirs (with the processes registered
there) and every container, network and volume labelled
``isolate.managed=true`` whose owner is dead. Live runs are never touched.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from . import __version__
from ._config import default_base_dir, resolve_settings
from ._errors import IsolateError
from ._run.rundir import reap_stale_runs, stale_runs

__all__ = ["main"]


def _docker_orphans(dry_run: bool) -> tuple[list[str], str | None]:
    """What the Docker reaper removed (or would), or why it did not run."""
    from ._backends import _docker_installed

    if not _docker_installed():
        return [], "skipped (the docker extra is not installed)"
    from ._docker.containers import reap_orphans
    from ._docker.engine import engine_available

    ok, why = engine_available()
    if not ok:
        return [], f"skipped ({why})"
    return reap_orphans(dry_run=dry_run), None


def cleanup(bases: Sequence[Path], dry_run: bool) -> int:
    """Remove (or list) what runs whose owner is gone left behind."""
    verb = "would remove" if dry_run else "removed"
    found = 0
    for base in bases:
        for run in stale_runs(base) if dry_run else reap_stale_runs(base):
            print(f"{verb} run dir {run.path}")
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


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="isolate", description="isolate: per-worker integration-test stacks for pytest-xdist"
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
    clean.add_argument("--dry-run", action="store_true", help="only print what would be removed")
    clean.add_argument(
        "--base-dir",
        help="where run dirs live (default: ISOLATE_BASE_DIR, else both /dev/shm and the "
        "system temp dir)",
    )
    args = parser.parse_args(argv)
    if args.command == "cleanup":
        try:
            base = args.base_dir or resolve_settings(env=os.environ).base_dir
        except IsolateError as exc:
            print(f"isolate: {exc}", file=sys.stderr)
            return 2
        # default: both places a run may have used (/dev/shm when it had room, else /tmp)
        bases = [base] if base else list(dict.fromkeys([default_base_dir(), tempfile.gettempdir()]))
        return cleanup([Path(b) for b in bases], args.dry_run)
    return 2  # pragma: no cover - argparse rejects unknown commands
