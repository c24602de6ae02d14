"""Container removal for the reaper, importable without the Docker SDK loaded."""

from __future__ import annotations

import logging
import subprocess

__all__ = ["remove_container"]

logger = logging.getLogger(__name__)


def remove_container(container: str) -> bool:
    """Force-remove a container (and its anonymous volumes); True if it existed."""
    try:
        done = subprocess.run(
            ["docker", "rm", "--force", "--volumes", container],
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
    except (OSError, subprocess.TimeoutExpired) as exc:
        logger.warning("could not remove container %s: %s", container, exc)
        return False
    return done.returncode == 0
