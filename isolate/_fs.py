"""Files and directories on a shared machine: trust only what this user made.

``/tmp`` and ``/dev/shm`` are world-writable: another local user can plant a directory,
a file or a symlink under any name isolate uses. Everything isolate keeps there is
either created by this user (and checked to still be its own, without following a
symlink) or refused.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from ._errors import ConfigError

__all__ = ["chown_tree", "owned_by_me", "own_dir"]


def owned_by_me(path: Path) -> bool:
    """``path`` is not a symlink, belongs to this user and nobody else may write it."""
    try:
        st = path.lstat()
    except OSError:
        return False
    return not stat.S_ISLNK(st.st_mode) and st.st_uid == os.geteuid() and not st.st_mode & 0o022


def chown_tree(path: Path, uid: int, gid: int) -> None:
    """Give ``path`` and everything below it to ``uid``/``gid`` (symlinks themselves,
    never what they point at)."""
    for entry in [path, *path.rglob("*")]:
        os.lchown(entry, uid, gid)


def own_dir(path: Path, mode: int = 0o700) -> Path:
    """Create ``path`` with ``mode``, or check that the existing one is this user's own
    directory that nobody else can write; :class:`ConfigError` if it is not."""
    try:
        path.mkdir(mode=mode, parents=True)
        os.chmod(path, mode)  # not subject to the umask; we made it, it is no symlink
    except FileExistsError:
        pass
    if not (owned_by_me(path) and path.is_dir()):
        raise ConfigError(
            f"{path} exists but is not a directory of this user's that only it can write",
            hint="remove it (another user or an old run made it), or point "
            "--isolate-base-dir / TMPDIR somewhere private",
            path=path,
        )
    return path
