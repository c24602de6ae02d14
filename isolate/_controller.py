"""The controller's side of a run: run id, base dir, run dir, backend choice, teardown.

The controller is the xdist controller, or the only pytest process without xdist. It
opens the run before any worker starts and closes it after every worker is done
(crashed ones included): whatever is still registered, or labelled with the run id, is
reaped, and the run dir is removed.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
import time
from pathlib import Path

from ._backends import Backend, decide_backend, make_backend, reap_leftovers
from ._config import Settings
from ._identity import WorkerIdentity
from ._postgres.external import RunLease, check_server
from ._run.liveness import Owner
from ._run.notices import read_notices
from ._run.rundir import RunDir, reap_stale_runs, remove_stale_zygote_dirs
from ._service.forkserver import fork_unavailable, local_services
from ._timings import Timings, read, summarize, what_ran
from ._watchdog import Watchdog

__all__ = ["WORKERINPUT_KEYS", "RunController"]

logger = logging.getLogger(__name__)

#: What the controller stops at the end of every run, leftovers or not.
_THE_RUNS_OWN = {"postgres", "redis-shared"}

#: What the controller hands every xdist worker, so that all agree on the run.
WORKERINPUT_KEYS = ("isolate_run_id", "isolate_backend", "isolate_base_dir")


class RunController:
    """Opens and closes one run."""

    def __init__(self, settings: Settings, run_id: str, rootdir: Path) -> None:
        self.settings = settings
        self.run = RunDir(Path(settings.base_path), run_id)
        self.backend_name, self.backend_reason = decide_backend(settings)
        self.identity = WorkerIdentity("main", 1, run_id)
        self.backend: Backend = make_backend(self.backend_name, settings, self.identity, self.run, rootdir)
        self.timings = Timings(self.run.timings_path, "controller")
        self.watchdog: Watchdog | None = None
        self.lease: RunLease | None = None
        #: Once closed: what the run started, in one phrase, and its processes' notices.
        self.ran = ""
        self.notices: list[str] = []

    @property
    def run_id(self) -> str:
        return self.run.run_id

    def workerinput(self) -> dict[str, str]:
        """The run's facts for a worker (``workerinput``)."""
        values = (self.run_id, self.backend_name, str(self.run.base))
        return dict(zip(WORKERINPUT_KEYS, values, strict=True))

    def open(self) -> None:
        """Reap what dead runs left (if asked), create the run dir, start the watchdog."""
        if self.settings.reap_stale:
            stale = reap_stale_runs(self.run.base)
            remove_stale_zygote_dirs(Path(tempfile.gettempdir()))
            with contextlib.suppress(Exception):  # a missing engine is not this run's problem
                self.backend.reap_orphans()
                labelled = [run.run_id for run in stale if run.had_containers]
                if self.backend.name != "docker" and labelled:
                    from ._docker.containers import reap_run  # testcontainers of a native run

                    for run_id in labelled:
                        reap_run(run_id)
        self.run.create(Owner.current(), backend=self.backend_name)
        self.watchdog = Watchdog(self.run.path, self.backend_name, self.settings.stop_timeout)
        if self.settings.pg_dsn:  # the run's lease on the external server, kept fresh
            self.lease = RunLease(check_server(self.settings.pg_dsn), self.run_id, on_lost=self.run.mark_lost)
            dropped = self.lease.open(reap_stale=self.settings.reap_stale)
            if dropped:
                logger.info("isolate dropped what stale runs left on the external PostgreSQL: %s",
                            ", ".join(dropped))  # fmt: skip

    def close(self) -> dict[str, dict[str, float]]:
        """Reap everything the run still holds and remove its dir; the timing summary.

        If a worker kept its stack (``--isolate-keep``), the run stays: only what dead
        workers left is reaped, and ``python -m isolate cleanup RUN`` removes the rest.
        """
        kept = self.run.is_kept()
        if kept:
            self.run.registry.reap_dead_workers(self.settings.stop_timeout)
        else:
            start = time.perf_counter()
            reaped = reap_leftovers(self.run, self.backend, self.settings.stop_timeout)
            leftovers = [name for name in reaped if name not in _THE_RUNS_OWN]
            if leftovers:  # the run's own shared servers are stopped here as a matter of course
                logger.info("isolate reaped what workers left: %s", ", ".join(leftovers))
            self.timings.add("run_teardown", time.perf_counter() - start)
        if self.lease is not None:  # after the objects: a row goes only once they are gone
            self.lease.close(kept=kept)
        events = read(self.timings.path)
        summary = summarize(events)
        self.ran = what_ran(events, external_pg=bool(self.settings.pg_dsn), external_redis=bool(self.settings.redis_url))
        self.notices = read_notices(self.run.notices_path)
        if not kept:
            self.run.remove()
        if self.watchdog is not None:
            self.watchdog.dismiss()  # nothing left to reap (or kept: it leaves the run alone)
            self.watchdog = None
        return summary

    def header(self) -> list[str]:
        lines = [f"run {self.run_id}, backend {self.backend_name} ({self.backend_reason})"]
        local = local_services(self.backend_name, self.settings)
        if local and self.backend_name != "native":
            lines[0] += f"; services as local processes (from {self.settings.source_of('docker_services')})"
        # Local services are launched as the native backend does (in a container, nothing forks).
        no_fork = local and fork_unavailable("native", self.settings.fork_server)
        if no_fork:
            lines[0] += f"; services with an entry start as new processes ({no_fork})"
        return lines + self.backend.describe()
