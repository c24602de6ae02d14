"""The service under test as a native process group (``<name>-test-<worker>``)."""

from __future__ import annotations

import logging
import os
import shlex
import shutil
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Literal

from .._errors import ConfigError
from .._fs import open_log
from .._process import ManagedProcess, RunAs, inherited_env
from .._run.notices import NOTICE
from .._run.registry import ProcessRecord
from .forkserver import ForkServer, RunHost
from .spec import ServiceSpec, render

__all__ = ["ProcessLauncher", "service_cwd", "service_user", "shell_exit_code", "wrapped_programs"]

logger = logging.getLogger(__name__)
_warned: set[str] = set()


def service_cwd(spec: ServiceSpec, rootdir: Path) -> Path:
    """Where a native service runs: ``spec.cwd`` relative to the rootdir; the rootdir by default."""
    return rootdir / spec.cwd if spec.cwd is not None else rootdir


def service_user(
    spec: ServiceSpec, cwd: Path, run_as: RunAs | None, mode: Literal["auto", "always", "never"]
) -> RunAs | None:
    """Who runs ``spec`` natively: ``run_as`` (isolate runs as root) unless ``mode`` is
    ``never``, or, with ``auto``, that user cannot reach the program or ``cwd``."""
    if run_as is None or mode == "never" or not spec.command:
        return None
    env_path = spec.env.get("PATH") or os.environ.get("PATH")
    names = wrapped_programs(spec.command)
    programs = [shutil.which(name, path=env_path) if "{" not in name else None for name in names]
    needed = [p for program in programs if program for p in (Path(program).parent, Path(program))]
    blocked = [str(p) for p in (*needed, cwd) if not _reaches(run_as, p)]
    if all(programs) and not blocked:
        return run_as
    missing = [name for name, program in zip(names, programs, strict=True) if not program]
    why = ", ".join(blocked) if not missing else f"{missing[0]!r} (not found on PATH)"
    if mode == "always":
        raise ConfigError(
            f"service {spec.name!r} must run as {run_as.name} (demote_services=always), "
            f"but {run_as.name} cannot reach {why}",
            hint="install the service's interpreter and code where that user can read them "
            "(not below root's 0700 home), or set --isolate-demote-services=auto",
        )
    if spec.name not in _warned:
        _warned.add(spec.name)
        logger.warning("service %r runs as root: %s cannot reach %s", spec.name, run_as.name, why, extra=NOTICE)
    return None


_SHELLS = {"sh", "bash", "dash", "zsh", "ash", "ksh"}


def wrapped_programs(command: Sequence[str]) -> list[str]:
    """The program ``command`` runs and, where it is a wrapper whose target can be read
    off (``sh -c "PROG ..."``, ``env [A=b] PROG ...``), the program it runs in turn: a
    demoted service must be able to reach both."""
    programs = [command[0]]
    name, rest = Path(command[0]).name, list(command[1:])
    if name in _SHELLS and "-c" in rest[:-1]:
        try:
            words = shlex.split(rest[rest.index("-c") + 1])
        except ValueError:
            return programs
    elif name == "env":
        words = rest
    else:
        return programs
    words = [w for w in words if w != "exec" and "=" not in w.split("/")[0] and not w.startswith("-")]
    if words and not words[0].startswith("$"):
        programs += wrapped_programs(words)
    return programs


def _reaches(run_as: RunAs, path: Path) -> bool:
    try:
        return run_as.can_reach(path, execute=True)
    except OSError:
        return False


def shell_exit_code(code: int | None) -> int | None:
    """A process's exit status as a shell (and Docker) reports it: killed by signal N
    is 128+N (137 after SIGKILL), not Python's -N."""
    return 128 - code if code is not None and code < 0 else code


class ProcessLauncher:
    """Runs ``spec.command`` in its own session, output appended to ``log_path``, in
    ``spec.cwd`` (relative paths and the default are the pytest rootdir)."""

    def __init__(
        self, spec: ServiceSpec, instance_name: str, log_path: Path, rootdir: Path,
        run_as: RunAs | None = None, forkserver: ForkServer | None = None,
        env: Mapping[str, str] | None = None,
    ) -> None:  # fmt: skip
        if not spec.command:
            raise ConfigError(
                f"service {spec.name!r} has no command",
                hint="set ServiceSpec(command=[...]) to run it natively",
            )
        self.spec = spec
        self.name = instance_name
        self.log_path = log_path
        #: ``spec.cwd``, relative to the rootdir; the rootdir by default.
        self.cwd = service_cwd(spec, rootdir)
        self.port: object = None
        #: The unprivileged user it runs as (see :func:`service_user`), or ``None``.
        self.run_as = run_as
        #: Starts it by forking a preloaded parent (``spec.entry``), or ``None``.
        self.forkserver = forkserver
        #: SIGKILLed if the worker dies (unless ``--isolate-keep`` may keep it up).
        self.die_with_worker = False
        #: What it inherits (``spec.inherit_env``: this environment without isolate's secrets).
        self.base_env = dict(env) if env is not None else (inherited_env() if spec.inherit_env else {})
        self._proc: ManagedProcess | None = None

    @property
    def proc(self) -> ManagedProcess:
        if self._proc is None:
            raise RuntimeError(f"{self.name} was never prepared")
        return self._proc

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def prepare(self, values: Mapping[str, object]) -> None:
        env = dict(self.base_env)
        env.update({k: render(v, values) for k, v in self.spec.env.items()})
        env["ISOLATE_INSTANCE_NAME"] = self.name
        self.port = values["port"]
        self._proc = ManagedProcess(
            [render(arg, values) for arg in self.spec.command],
            log_path=self.log_path, env=env, cwd=self.cwd, run_as=self.run_as,
            spawner=self.forkserver, die_with_parent=self.die_with_worker,
        )  # fmt: skip

    def warm(self, register: Callable[[ProcessRecord], None], host: RunHost | None = None) -> None:
        """Start the fork server's preload now, while the worker prepares the rest."""
        if self.forkserver is not None:
            self.forkserver.start(host)
            record = self.forkserver.record()
            if record is not None:
                register(record)

    def launch(self) -> None:
        log = open_log(self.log_path)
        try:
            os.write(log, f"--- isolate: starting {self.name} on port {self.port} ---\n".encode())
        finally:
            os.close(log)
        self.proc.start()

    def exit_code(self) -> int | None:
        return shell_exit_code(self._proc.returncode) if self._proc else None

    def stop(self, sig: int, timeout: float) -> int | None:
        return shell_exit_code(self._proc.stop(sig, timeout)) if self._proc else None

    def kill(self) -> int | None:
        return shell_exit_code(self._proc.kill()) if self._proc else None

    def signal(self, sig: int) -> None:
        if self._proc is not None:
            self._proc.send_signal(sig)

    def wait_exit(self, timeout: float) -> int | None:
        return shell_exit_code(self._proc.wait(timeout)) if self._proc else None

    @property
    def is_running(self) -> bool:
        return self._proc is not None and self._proc.running

    def logs(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def record(self) -> ProcessRecord | None:
        if self._proc is None:
            return None
        return ProcessRecord(
            name=f"service-{self.name}", pid=self._proc.pid, start_ticks=self._proc.start_ticks
        )

    def close(self) -> None:
        """Stop the fork server (the service's process group is stopped already)."""
        if self.forkserver is not None:
            self.forkserver.close()
