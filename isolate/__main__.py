"""``python -m isolate`` (also the ``isolate`` console script).

``isolate cleanup [--dry-run] [--base-dir DIR]`` removes what runs whose owner
process is gone left behind: their native run dirs (with the processes and
containers registered there) and every container, network and volume labelled
``isolate.managed=true`` whose owner is dead. Live runs are never touched.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from . import __version__
from ._config import default_base_dir, resolve_settings
from ._errors import IsolateError
from ._proc import is_alive

__all__ = ["main"]

RUN_PREFIX = "isolate-run-"


def _stale_run_dirs(base: Path) -> list[Path]:
    """Run dirs whose owner process is gone (what ``reap_stale_runs`` would remove)."""
    stale = []
    for run_dir in sorted(base.glob(RUN_PREFIX + "*")):
        try:
            owner = json.loads((run_dir / "owner.json").read_text())
            alive = is_alive(int(owner["pid"]), owner.get("start_ticks"))
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if not alive:
            stale.append(run_dir)
    return stale


def cleanup(bases: Sequence[Path], dry_run: bool) -> int:
    verb = "would remove" if dry_run else "removed"
    found = 0
    for base in bases:
        if dry_run:
            runs = _stale_run_dirs(base)
        else:
            from ._runtime import reap_stale_runs

            runs = reap_stale_runs(base)
        for run_dir in runs:
            print(f"{verb} run dir {run_dir}")
            found += 1

    from ._docker import engine_available, reap_orphan_containers

    ok, why = engine_available()
    if not ok:
        print(f"docker: skipped ({why})")
    else:
        try:
            removed = reap_orphan_containers(dry_run=dry_run)
        except IsolateError as exc:
            print(f"docker: failed: {exc}", file=sys.stderr)
            return 1
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


if __name__ == "__main__":
    sys.exit(main())
