"""The run's fork servers (one preload per run, see :mod:`isolate._service.forkserver`):
what one is started from, starting one, and remembering them for the next run.

A run's fork server is started by the first worker that asks for its service, and its
preload (the app's imports, ~0.2 s of CPU for the example) then holds up that worker's
first service start. So the run remembers what its fork servers were started from (a
:class:`HubRecipe` each, in this user's own cache dir: a recipe names a program to run,
and a file anyone else could write is not one to take it from), and the next run's
controller starts them again while xdist starts the workers (``--isolate-prestart``). A
worker asking for a service with the same recipe and environment finds its fork server
started, its preload done or under way; any other asks for one of its own, as before.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import socket
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from .._cache import entry_lock
from .._fs import open_log, own_dir
from .._process import RunAs, as_user
from .._run.liveness import process_start_ticks
from .._run.registry import ProcessRecord
from .._run.rundir import RunDir, write_json

__all__ = ["HubRecipe", "hub_env", "launch_preloader", "mark_used", "memory_path", "prestart", "recall", "remember", "start_hub"]

#: The fork server's program: run by path with the service's interpreter (it imports
#: nothing of isolate).
PROGRAM = Path(__file__).with_name("_preloader.py")
#: Run fork servers started by this process: kept referenced (they outlive its handles).
_HUBS: list[subprocess.Popen[bytes]] = []
#: Variables that differ from one process of a run to the next: xdist's ids, pytest's
#: current test, and the terminal size a worker's readline exports.
_PER_PROCESS = ("LINES", "COLUMNS", "PYTEST_CURRENT_TEST")
#: A run remembers at most this many fork servers for the next one,
_REMEMBERED = 8
#: for at most this many projects (rootdirs), the most recent.
_PROJECTS = 16


def hub_env(env: Mapping[str, str]) -> dict[str, str]:
    """What a run's fork server imports with: a worker's environment without what differs
    from one process of the run to the next."""
    return {k: v for k, v in env.items() if not k.startswith("PYTEST_XDIST_") and k not in _PER_PROCESS}


@dataclass(frozen=True)
class HubRecipe:
    """What a fork server is started from: the service's interpreter, the modules it
    preloads, ``sys.path[0]`` of its program, its working directory, its user (``None``:
    ours) and whether it inherits the run's environment (``ServiceSpec.inherit_env``)."""

    python: str
    preload: tuple[str, ...]
    path0: str
    cwd: str
    user: tuple[int, int] | None
    inherit_env: bool = True

    def key(self, env: Mapping[str, str]) -> str:
        """The run's fork server for this recipe and a worker's environment ``env``."""
        fields = [self.python, list(self.preload), self.path0, self.cwd, self.user, sorted(hub_env(env).items())]
        return hashlib.sha256(json.dumps(fields).encode()).hexdigest()[:16]

    def to_json(self) -> dict[str, object]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: object) -> HubRecipe | None:
        """The recipe ``data`` describes, or ``None`` if it is not one."""
        if not isinstance(data, dict):
            return None
        try:
            user = data["user"]
            recipe = cls(python=data["python"], preload=tuple(data["preload"]), path0=data["path0"], cwd=data["cwd"],
                         user=None if user is None else (int(user[0]), int(user[1])),
                         inherit_env=data.get("inherit_env", True) is True)  # fmt: skip
        except (KeyError, TypeError, ValueError, IndexError):
            return None
        texts = (recipe.python, recipe.path0, recipe.cwd, *recipe.preload)
        return recipe if all(isinstance(text, str) for text in texts) else None


def launch_preloader(recipe: HubRecipe, config: Mapping[str, object], fd: int, log: int, env: Mapping[str, str],
                     run_as: RunAs | None) -> subprocess.Popen[bytes]:  # fmt: skip
    """Run the fork server's program for ``recipe`` on ``config`` (the preload added),
    passing it ``fd``, its output on ``log``."""
    config = {"preload": list(recipe.preload), "path0": recipe.path0, **config}
    return subprocess.Popen(
        [recipe.python, str(PROGRAM), json.dumps(config)],
        stdin=subprocess.DEVNULL, stdout=log, stderr=log, pass_fds=(fd,),
        env=env, cwd=recipe.cwd, start_new_session=True, **as_user(run_as),
    )  # fmt: skip


def start_hub(directory: Path, recipe: HubRecipe, key: str, env: Mapping[str, str],
              run_as: RunAs | None) -> tuple[dict[str, object], ProcessRecord]:  # fmt: skip
    """Start the run's fork server for ``recipe`` (call it in ``run.shared``: once per
    run). It listens on a socket in the run dir ``directory``, which only this user
    reaches, and answers only this uid. Its state (with the recipe, which the run
    remembers) and the record the run's reaper stops it by."""
    path = directory / f"forkserver-{key}.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as listener:
        listener.bind(str(path))
        listener.listen(64)
        log = open_log(directory / f"forkserver-{key}.log")
        try:
            config = {"hub_fd": listener.fileno(), "clients": [os.getuid()]}
            proc = launch_preloader(recipe, config, listener.fileno(), log, hub_env(env), run_as)
        finally:
            os.close(log)
    _HUBS.append(proc)
    # It holds nothing to shut down cleanly: the run's end kills it at once.
    record = ProcessRecord(name=f"forkserver-{key}", pid=proc.pid, start_ticks=process_start_ticks(proc.pid),
                           stop_signal=signal.SIGKILL, scope="run")  # fmt: skip
    return {"socket": str(path), "pid": proc.pid, "recipe": recipe.to_json()}, record


def mark_used(directory: Path, key: str) -> None:
    """Note in the run dir ``directory`` that a worker's services fork from the run's fork
    server ``key`` (what :func:`remember` remembers)."""
    with contextlib.suppress(FileExistsError):
        os.close(os.open(directory / f"forkserver-{key}.used", os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600))


def remember(run: RunDir, memory: Path, project: Path) -> None:
    """Write down what the run's fork servers that served a worker (their states in
    ``run``) were started from, for the next run of ``project`` (its rootdir), in
    ``memory`` (this user's cache): none if none did. It holds the last :data:`_PROJECTS` projects."""
    recipes: list[dict[str, object]] = []
    for state_file in sorted(run.path.glob("forkserver-*.json")):
        if not (run.path / f"{state_file.stem}.used").exists():
            continue  # started ahead from an older recipe, and no worker asked for it
        state = run.state(state_file.stem)
        recipe = HubRecipe.from_json(state.get("recipe") if state is not None else None)
        if recipe is not None and len(recipes) < _REMEMBERED:
            recipes.append(recipe.to_json())
    # Under the file's cache lock: runs of other projects may end now too (and
    # ``cleanup --caches`` removes it, with its lock, under that lock).
    with entry_lock(lambda: memory.parent, f"{memory.name}.lock", shared=False):
        known = _read(memory)
        projects = {k: v for k, v in known.items() if k != str(project)}
        if recipes:
            projects[str(project)] = recipes  # the most recent last
        elif len(projects) == len(known):
            return  # nothing to forget
        write_json(memory, dict(list(projects.items())[-_PROJECTS:]))


def recall(memory: Path, project: Path) -> list[HubRecipe]:
    """What :func:`remember` wrote for ``project`` in ``memory``."""
    listed = _read(memory).get(str(project))
    recipes = [HubRecipe.from_json(item) for item in listed[:_REMEMBERED]] if isinstance(listed, list) else []
    return [recipe for recipe in recipes if recipe is not None]


def _read(memory: Path) -> dict[str, object]:
    """``memory``'s projects, if this user wrote it: a file of another user's, one others
    may write, a link or junk is nothing (a recipe names a program to run)."""
    try:
        fd = os.open(memory, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return {}
    with os.fdopen(fd) as file:
        st = os.fstat(file.fileno())
        if st.st_uid != os.geteuid() or st.st_mode & 0o022:
            return {}
        try:
            data = json.load(file)
        except ValueError:
            return {}
    return data if isinstance(data, dict) else {}


def memory_path(base: Path) -> Path:
    """Where runs remember their fork servers: this user's cache dir under the base dir
    ``base`` (made if need be, and checked to be ours)."""
    return own_dir(base / f"isolate-cache-{os.geteuid()}", 0o711) / "forkservers.json"


def prestart(run: RunDir, recipes: Sequence[HubRecipe], env: Mapping[str, str], run_as: RunAs | None) -> None:
    """Start the run's fork servers for ``recipes`` (what the last run started, from
    :func:`recall`) unless a worker has, with the environment ``env`` a worker's services
    inherit. A recipe whose user is neither us nor ``run_as`` (the user isolate demotes
    to), or whose interpreter or directory is gone, is left to the workers."""
    for recipe in recipes:
        if recipe.user is not None and (run_as is None or recipe.user != (run_as.uid, run_as.gid)):
            continue
        if not (os.path.isfile(recipe.python) and os.path.isdir(recipe.cwd)):
            continue
        user = run_as if recipe.user is not None else None
        inherited = env if recipe.inherit_env else {}
        key = recipe.key(inherited)

        def start(recipe: HubRecipe = recipe, key: str = key, inherited: Mapping[str, str] = inherited,
                  user: RunAs | None = user) -> dict[str, object]:  # fmt: skip
            state, record = start_hub(run.path, recipe, key, inherited, user)
            run.registry.register(record)
            return state

        run.shared(f"forkserver-{key}", start)
