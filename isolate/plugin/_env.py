"""``--isolate-env``: the run's facts for xdist workers before xdist hands them over.

A worker's initial conftests are imported before xdist gives it ``workerinput``, and a
conftest that reads ``DATABASE_URL`` at import must see the worker's. So when
``--isolate-env`` is set, the controller opens the run early and leaves its facts in its
environment (``ISOLATE_RUN_FACTS``, which its workers inherit and services do not: every
``ISOLATE_*`` variable is left out of what they inherit); a worker takes them only if the
controller named is its parent, never an outer run's.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Mapping

import pytest

__all__ = [
    "controller_environment",
    "early_workerinput",
    "share_with_workers",
    "started_as_command",
    "will_have_workers",
    "worker_count",
]

_FACTS = "ISOLATE_RUN_FACTS"


def share_with_workers(facts: Mapping[str, str], zygote: int | None = None) -> None:
    """Leave the run's facts where the workers about to start will find them (their parent
    is this controller, or the ``zygote`` they are forked from)."""
    os.environ[_FACTS] = json.dumps({**facts, "controller": os.getpid(), "zygote": zygote})


def early_workerinput() -> dict[str, object] | None:
    """The run's facts and this worker's identity, for an xdist worker of the controller
    that shared them; ``None`` in any other process."""
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    try:
        facts = json.loads(os.environ.get(_FACTS) or "null")
    except ValueError:
        return None
    if not worker or not isinstance(facts, dict) or os.getppid() not in (facts.get("controller"), facts.get("zygote")):
        return None  # not a worker, or an outer run's facts
    count = os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")
    return {**facts, "workerid": worker, "workercount": int(count) if count.isdigit() else 1}


def will_have_workers(config: pytest.Config) -> bool:
    """Whether this pytest hands its tests to xdist workers (``-n``, ``--dist``, ``--tx``)."""
    args = config.known_args_namespace
    if not config.pluginmanager.hasplugin("xdist"):
        return False
    processes = getattr(args, "numprocesses", None)
    return bool(processes not in (None, 0, "0") or getattr(args, "tx", None)
                or getattr(args, "dist", "no") not in (None, "no"))  # fmt: skip


def started_as_command(config: pytest.Config) -> bool:
    """Whether this process is the ``pytest`` command, not a program that called
    ``pytest.main()`` and goes on afterwards (pytester's in-process runs among them)."""
    invoked = config.invocation_params
    return not invoked.plugins and tuple(invoked.args) == tuple(sys.argv[1:])


def worker_count(config: pytest.Config) -> int:
    """How many xdist workers this run starts (1 without xdist), from the ``--tx`` specs
    xdist makes of ``-n`` (after its ``pytest_cmdline_main``) and their multipliers
    (``--tx 3*popen``)."""
    if not will_have_workers(config):
        return 1
    count = 0
    for spec in config.getoption("tx", None) or ():
        head, star, _ = str(spec).partition("*")
        count += int(head) if star and head.isdigit() else 1
    return max(count, 1)


#: What ``--isolate-env`` templates render to in an xdist controller, which imports the
#: conftests too but runs no test: well-formed values that point nowhere (port 9).
_NOWHERE = {"dsn": "postgresql://isolate_controller@127.0.0.1:9/isolate_controller",
            "schema": "isolate_controller", "role": "isolate_controller",
            "redis_url": "redis://127.0.0.1:9/0", "worker": "controller", "host": "127.0.0.1"}  # fmt: skip


def controller_environment(pairs: tuple[tuple[str, str], ...], run_id: str) -> dict[str, str]:
    """``--isolate-env`` for the xdist controller: its conftests read the variables at
    import like the workers', but it starts no database or Redis of its own."""
    values = {**_NOWHERE, "run_id": run_id}
    return {name: template.format_map(values) for name, template in pairs}
