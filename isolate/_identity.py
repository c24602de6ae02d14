"""Who this process is within a test run."""

from __future__ import annotations

import os
import re
import uuid
from collections.abc import Mapping
from dataclasses import dataclass

__all__ = ["WorkerIdentity", "new_run_id", "worker_from_env"]

_WORKER_RE = re.compile(r"^gw(\d+)$")


def new_run_id() -> str:
    """A short id, distinct between concurrent runs."""
    return uuid.uuid4().hex[:10]


@dataclass(frozen=True)
class WorkerIdentity:
    """The worker id (``gw0``... or ``main``), worker count and run id."""

    worker_id: str
    worker_count: int
    run_id: str

    @property
    def is_xdist(self) -> bool:
        return self.worker_id != "main"

    @property
    def index(self) -> int:
        """0 for ``main`` and ``gw0``, N for ``gwN``."""
        match = _WORKER_RE.match(self.worker_id)
        return int(match.group(1)) if match else 0

    @property
    def slug(self) -> str:
        """Lower-case identifier safe in SQL names, container names and paths."""
        return re.sub(r"[^a-z0-9]+", "_", self.worker_id.lower()).strip("_") or "main"


def worker_from_env(
    run_id: str, env: Mapping[str, str] | None = None, workerinput: Mapping[str, object] | None = None
) -> WorkerIdentity:
    """Build the identity from xdist's ``workerinput`` or its environment variables."""
    env = os.environ if env is None else env
    worker_id = None
    count = None
    if workerinput is not None:
        worker_id = str(workerinput.get("workerid", "")) or None
        raw_count = workerinput.get("workercount")
        count = int(str(raw_count)) if raw_count is not None else None
    worker_id = worker_id or env.get("PYTEST_XDIST_WORKER") or "main"
    if count is None:
        raw = env.get("PYTEST_XDIST_WORKER_COUNT")
        count = int(raw) if raw and raw.isdigit() else 1
    return WorkerIdentity(worker_id=worker_id, worker_count=max(count, 1), run_id=run_id)
