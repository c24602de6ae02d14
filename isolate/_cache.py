"""Cache entries on a shared machine: made once, shared while in use, removed only when
no live process holds them, and the template cache kept under a size bound.

Each entry ``<dir>/<name>`` has a lock file ``<dir>/<name>.lock``: ``flock``-ed
exclusively while the entry is made, shared while a process reads it (a template being
copied) or may still use it (binaries its servers exec, an image its containers run: held
for the process's life). ``python -m isolate cleanup --caches`` and the size bound remove an
entry only under its exclusive lock, taken without waiting, so never one in use. The lock
file's modification time is the entry's last use (least recently used goes first).

An entry held for a process's life is made under a second lock, ``<name>.lock.make``, by a
process that already holds the entry (:func:`hold_or_make`): an entry that vanished while
others held it (``docker rmi``, ``rm -rf`` from outside) is made again at once, never after
a wait for every holder to end.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import re
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

from ._errors import ConfigError
from ._fs import same_file

__all__ = [
    "dir_size",
    "entries",
    "entry_lock",
    "evict",
    "format_size",
    "hold_entry",
    "hold_or_make",
    "parse_size",
    "release_entry",
    "remove_unused",
    "touch",
]

logger = logging.getLogger(__name__)



def _locked(directory: Callable[[], Path], name: str, mode: int) -> int | None:
    """An fd of ``directory()/name`` (made if missing, no symlink followed) with an
    ``flock`` in ``mode``; ``None`` if ``LOCK_NB`` and someone holds it. A cache dir that
    vanished (``cleanup --caches``) is made again, and a lock file its remover unlinked
    while we waited is not a lock."""
    for _ in range(10):
        try:
            fd = os.open(directory() / name, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        except FileNotFoundError:
            continue  # the directory went between its making and this open
        try:
            fcntl.flock(fd, mode)
        except BlockingIOError:
            os.close(fd)
            return None
        if same_file(fd, directory() / name):
            return fd
        os.close(fd)
    raise ConfigError(f"cannot lock {name} in {directory()}: it keeps vanishing",
                      hint="do not run `python -m isolate cleanup --caches` in a loop")  # fmt: skip


@contextlib.contextmanager
def entry_lock(directory: Callable[[], Path], name: str, *, shared: bool) -> Iterator[None]:
    """Hold the lock ``name`` of a cache entry for a ``with`` block: exclusive while the
    entry is made, shared while a process reads it (a copy of a template)."""
    fd = _locked(directory, name, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
    assert fd is not None
    try:
        yield
    finally:
        os.close(fd)


#: Shared locks this process holds for its whole life, by lock path (see :func:`hold_entry`).
_HELD: dict[str, int] = {}


def hold_entry(directory: Callable[[], Path], name: str) -> None:
    """Hold the shared lock ``name`` until this process ends (or :func:`release_entry`):
    the entry is in use as long as what this process started may use it (binaries a
    server execs, an image its containers run). A lock file removed under it (its dir
    removed by hand) is no lock: the file there now is locked instead."""
    key = str(directory() / name)
    held = _HELD.get(key)
    if held is not None:
        if same_file(held, Path(key)):
            return
        os.close(_HELD.pop(key))
    fd = _locked(directory, name, fcntl.LOCK_SH)
    assert fd is not None
    _HELD[key] = fd


def hold_or_make(directory: Callable[[], Path], name: str, present: Callable[[], bool],
                 make: Callable[[], None]) -> None:  # fmt: skip
    """Hold the entry whose lock is ``name`` for this process's life (:func:`hold_entry`),
    made by ``make()`` first if ``present()`` says it is missing: once for every process
    (the first to take ``<name>.make`` makes it, the others find it made), and while this
    process holds the entry, so a clean-up cannot remove it between its making and its use."""
    hold_entry(directory, name)
    if present():
        return
    with entry_lock(directory, f"{name}.make", shared=False):
        if not present():  # another process made it while we waited
            make()


def release_entry(directory: Callable[[], Path], name: str) -> None:
    """Drop a lock :func:`hold_entry` took (to make the entry again, exclusively)."""
    fd = _HELD.pop(str(directory() / name), None)
    if fd is not None:
        os.close(fd)


def remove_unused(directory: Path, name: str, *paths: Path, dry_run: bool = False,
                  remove: Callable[[], None] | None = None) -> bool:  # fmt: skip
    """Remove ``paths`` (and call ``remove()``: what is not a file, an image) and the lock
    file ``name`` if no process holds the lock, all under the lock, so no process takes the
    entry meanwhile; whether they were (or, with ``dry_run``, would be) removed."""
    try:
        fd = _locked(lambda: directory, name, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except ConfigError:  # the directory itself is gone: nothing left to remove
        return True
    if fd is None:
        return False
    try:
        if not dry_run:
            for path in paths:
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    with contextlib.suppress(FileNotFoundError):
                        path.unlink()
            if remove is not None:
                remove()
            for lock in (f"{name}.make", name):  # no maker: a maker holds the entry
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(directory / lock)  # still locked: nobody takes the old file for a lock
    finally:
        os.close(fd)
    return True



def touch(directory: Path, name: str) -> None:
    """Record a use of the entry whose lock file is ``name`` (for least-recently-used)."""
    with contextlib.suppress(OSError):
        os.utime(directory / name)


def dir_size(path: Path) -> int:
    """Bytes ``path`` takes (blocks in use, which is what tmpfs takes from memory)."""
    total = 0
    for root, _, files in os.walk(path):
        for name in (".", *files):
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(root, name)).st_blocks * 512
    return total


def entries(directory: Path) -> list[Path]:
    """The entries of a cache dir: its directories, but those still being made
    (``<name>.tmp-<pid>``, renamed into place when done); none if the dir is gone (another
    clean-up removes it once it is empty)."""
    try:
        found = list(directory.iterdir())
    except FileNotFoundError:
        return []
    return [p for p in found if p.is_dir() and ".tmp-" not in p.name]


def evict(directory: Path, limit: int, keep: str = "") -> list[str]:
    """Remove the least recently used entries of ``directory`` (never ``keep``, never one
    in use) until what is left takes at most ``limit`` bytes (0: no bound); what went."""
    if limit <= 0:
        return []
    found = entries(directory)

    def last_use(entry: Path) -> float:
        try:
            return (directory / f"{entry.name}.lock").stat().st_mtime
        except OSError:
            return 0.0

    sizes = {entry: dir_size(entry) for entry in found}
    total, gone = sum(sizes.values()), []
    for entry in sorted(found, key=last_use):
        if total <= limit:
            break
        if entry.name != keep and remove_unused(directory, f"{entry.name}.lock", entry):
            total -= sizes[entry]
            gone.append(entry.name)
    if gone:
        logger.info("isolate: the cache %s was over %s; removed %s (least recently used)",
                    directory, format_size(limit), ", ".join(gone))  # fmt: skip
    return gone


_UNITS = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_size(raw: str) -> int:
    """``512MB``, ``2G``, ``1.5GiB``, ``0`` (no bound) as bytes (units are powers of 1024)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?\s*", raw.lower())
    if not match:
        raise ValueError(f"must be a size like 512MB or 2GB (0: no bound), got {raw!r}")
    return int(float(match.group(1)) * _UNITS[match.group(2)])


def format_size(size: int) -> str:
    for unit, scale in (("GB", 1 << 30), ("MB", 1 << 20), ("KB", 1 << 10)):
        if size >= scale:
            return f"{size / scale:.1f} {unit}"
    return f"{size} B"
