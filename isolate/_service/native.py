"""The service under test as a native process group (``<name>-test-<worker>``)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from .._errors import ConfigError
from .._process import ManagedProcess
from .._run.registry import ProcessRecord
from .spec import ServiceSpec, render

__all__ = ["ProcessLauncher", "shell_exit_code"]


def shell_exit_code(code: int | None) -> int | None:
    """A process's exit status as a shell (and Docker) reports it: killed by signal N
    is 128+N (137 after SIGKILL), not Python's -N."""
    return 128 - code if code is not None and code < 0 else code


class ProcessLauncher:
    """Runs ``spec.command`` in its own session, output appended to ``log_path``, in
    ``spec.cwd`` (relative paths and the default are the pytest rootdir)."""

    def __init__(self, spec: ServiceSpec, instance_name: str, log_path: Path, rootdir: Path) -> None:
        if not spec.command:
            raise ConfigError(
                f"service {spec.name!r} has no command",
                hint="set ServiceSpec(command=[...]) to run it natively",
            )
        self.spec = spec
        self.name = instance_name
        self.log_path = log_path
        #: ``spec.cwd``, relative to the rootdir; the rootdir by default.
        self.cwd = rootdir / spec.cwd if spec.cwd is not None else rootdir
        self.port: object = None
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
        env = dict(os.environ) if self.spec.inherit_env else {}
        env.update({k: render(v, values) for k, v in self.spec.env.items()})
        env["ISOLATE_INSTANCE_NAME"] = self.name
        self.port = values["port"]
        self._proc = ManagedProcess(
            [render(arg, values) for arg in self.spec.command],
            log_path=self.log_path, env=env, cwd=self.cwd,
        )  # fmt: skip

    def launch(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "a") as log:
            log.write(f"--- isolate: starting {self.name} on port {self.port} ---\n")
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
        """Nothing to release: the process group is stopped already."""
