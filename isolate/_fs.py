"""Files and directories on a shared machine: trust only what this user made.

``/tmp`` and ``/dev/shm`` are world-writable: another local user can plant a directory,
a file or a symlink under any name isolate uses. Everything isolate keeps there is
either created by this user (and checked to still be its own, without following a
symlink) or refused.

When isolate runs as root, it gives directories to the run-as user its servers run as.
Root never works *by path* inside a tree that user owns (any process of that user could
swap a directory for a symlink to ``/etc`` in between): a tree is built while it is still
root's and unreachable (its top 0700), then handed over by file descriptor, deepest entry
first and its top last (:func:`hand_over`); a tree a server of that user wrote is taken
back the same way (:func:`take_back`); and what root reads or appends to there is opened
without following a symlink (:func:`read_beneath`, :func:`open_log`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import stat
from pathlib import Path

from ._errors import ConfigError, UnexpectedFileError
from ._run.notices import NOTICE

__all__ = [
    "MACHINE_TMP",
    "copy_tree",
    "hand_over",
    "machine_dir",
    "make_shared_dir",
    "open_lock_file",
    "open_log",
    "own_dir",
    "owned_by_me",
    "read_beneath",
    "same_file",
    "shared_dir",
    "take_back",
]

logger = logging.getLogger(__name__)

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def owned_by_me(path: Path) -> bool:
    """``path`` is not a symlink, belongs to this user and nobody else may write it."""
    try:
        st = path.lstat()
    except OSError:
        return False
    return not stat.S_ISLNK(st.st_mode) and st.st_uid == os.geteuid() and not st.st_mode & 0o022


def copy_tree(src: Path, dst: Path, owner: tuple[int, int] | None = None) -> None:
    """Copy a tree of directories and regular files this user owns (a cached cluster) to
    ``dst``, which must not exist and is made 0700; the other modes are kept, times are
    not. Anything else in ``src`` (a symlink, a FIFO, a device) is refused.

    With ``owner`` (uid, gid), every entry is given to that user on the descriptor that
    made it, a directory after everything in it and ``dst`` last: as :func:`hand_over`
    would give the finished copy, without walking it again (give what holds ``dst`` with
    ``hand_over(..., content=False)``). Below ``dst`` nothing is reached by path.

    Per file one open of each side, ``copy_file_range`` and the owner's ``fchown``: about
    a third of the CPU of :func:`shutil.copytree` and then :func:`hand_over` (which stat,
    compare and copy times and extended attributes, and open every file again)."""
    srcfd = os.open(src, _DIR_FLAGS)  # a symlinked top is refused (ELOOP)
    try:
        os.mkdir(dst, 0o700)
        dstfd = os.open(dst, _DIR_FLAGS)
        try:
            _copy_into(srcfd, dstfd, src, 0o700, owner)
        finally:
            os.close(dstfd)
    finally:
        os.close(srcfd)


def _copy_into(srcfd: int, dstfd: int, src: Path, mode: int, owner: tuple[int, int] | None) -> None:
    """Copy what the directory ``srcfd`` holds into the new, empty ``dstfd``, then give
    ``dstfd`` its ``mode`` and ``owner``."""
    with os.scandir(srcfd) as entries:
        for entry in entries:
            st = entry.stat(follow_symlinks=False)
            if stat.S_ISREG(st.st_mode):
                _copy_file(srcfd, dstfd, entry.name, st.st_mode, owner)
            elif stat.S_ISDIR(st.st_mode):
                os.mkdir(entry.name, 0o700, dir_fd=dstfd)
                subsrc = os.open(entry.name, _DIR_FLAGS, dir_fd=srcfd)
                try:
                    subdst = os.open(entry.name, _DIR_FLAGS, dir_fd=dstfd)
                    try:
                        _copy_into(subsrc, subdst, src, st.st_mode, owner)
                    finally:
                        os.close(subdst)
                finally:
                    os.close(subsrc)
            else:
                raise UnexpectedFileError(f"will not copy {src}: {entry.name!r} is {_kind(st.st_mode)}", path=src)
    os.fchmod(dstfd, stat.S_IMODE(mode))
    if owner is not None:
        os.fchown(dstfd, *owner)  # a directory after everything in it; the top last


def _copy_file(srcfd: int, dstfd: int, name: str, mode: int, owner: tuple[int, int] | None) -> None:
    fin = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=srcfd)
    try:
        fout = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=dstfd)
        try:
            now = os.fstat(fin)
            if not stat.S_ISREG(now.st_mode):  # replaced since it was listed
                raise UnexpectedFileError(f"will not copy {name!r}: it was replaced while listed")
            left = now.st_size
            while left > 0:
                done = _copy_range(fin, fout, left)
                if not done:
                    break
                left -= done
            os.fchmod(fout, stat.S_IMODE(mode))
            if owner is not None:
                os.fchown(fout, *owner)
        finally:
            os.close(fout)
    finally:
        os.close(fin)


def _copy_range(fin: int, fout: int, count: int) -> int:
    """Copy up to ``count`` bytes between the files' offsets; how many were copied."""
    try:
        return os.copy_file_range(fin, fout, count)
    except (AttributeError, OSError):  # not Linux 4.5+, or across file systems on an old kernel
        data = os.read(fin, min(count, 1 << 20))
        rest = memoryview(data)
        while rest:  # a write may take less than it is given
            rest = rest[os.write(fout, rest) :]
        return len(data)


def hand_over(path: Path, uid: int, gid: int, *, content: bool = True) -> None:
    """Give a tree this user built to ``uid``/``gid``: every entry by file descriptor
    (no symlink is followed, a directory is entered only if it is the one listed), the
    deepest first and ``path`` itself last, so the other user can enter the tree only
    once root is done with it. Anything isolate never puts in such a tree (a symlink, a
    FIFO, a socket, a device, a file with a second hard link) is refused. ``content=False``
    gives ``path`` alone, for a tree whose entries were given as they were made
    (:func:`copy_tree`)."""
    if not content:
        fd = os.open(path, _DIR_FLAGS)  # a symlinked top is refused (ELOOP)
        try:
            os.fchown(fd, uid, gid)
        finally:
            os.close(fd)
        return
    _chown_walk(path, uid, gid, "hand over")


def take_back(path: Path) -> None:
    """Make a tree that another user's server wrote this user's again (same walk and
    refusals as :func:`hand_over`), so nothing planted there is copied or trusted later."""
    _chown_walk(path, os.geteuid(), os.getegid(), "take back")


def _chown_entry(dirfd: int, name: str, uid: int, gid: int, top: Path, verb: str) -> None:
    st = os.stat(name, dir_fd=dirfd, follow_symlinks=False)
    if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
        kind = "a second hard link" if stat.S_ISREG(st.st_mode) else _kind(st.st_mode)
        raise UnexpectedFileError(f"will not {verb} {top}: {name!r} is {kind}", path=top)
    fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dirfd)
    try:
        now = os.fstat(fd)
        if (now.st_dev, now.st_ino) != (st.st_dev, st.st_ino) or not stat.S_ISREG(now.st_mode):
            raise UnexpectedFileError(f"will not {verb} {top}: {name!r} changed under it", path=top)
        os.fchown(fd, uid, gid)
    finally:
        os.close(fd)


def _kind(mode: int) -> str:
    for test, kind in ((stat.S_ISLNK, "a symlink"), (stat.S_ISFIFO, "a FIFO"),
                       (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a device"),
                       (stat.S_ISBLK, "a device"), (stat.S_ISDIR, "a directory")):  # fmt: skip
        if test(mode):
            return kind
    return "not a regular file"


def _chown_walk(top: Path, uid: int, gid: int, verb: str) -> None:
    topfd = os.open(top, _DIR_FLAGS)  # a symlinked top is refused (ELOOP)
    try:
        for _path, dirnames, filenames, dirfd in os.fwalk(".", topdown=False, dir_fd=topfd):
            for name in dirnames:  # a symlink to a directory is listed here, never entered
                st = os.stat(name, dir_fd=dirfd, follow_symlinks=False)
                if not stat.S_ISDIR(st.st_mode):
                    raise UnexpectedFileError(f"will not {verb} {top}: {name!r} is {_kind(st.st_mode)}",
                                              path=top)  # fmt: skip
            for name in filenames:
                _chown_entry(dirfd, name, uid, gid, top, verb)
            os.fchown(dirfd, uid, gid)  # a directory after everything in it; the top last
    finally:
        os.close(topfd)


def read_beneath(root: Path, relative: str, max_bytes: int = 64 * 1024) -> bytes | None:
    """The first ``max_bytes`` of the regular file ``root/relative``, every component
    below ``root`` opened without following a symlink (and a FIFO never waited on);
    ``None`` if it is missing or not a regular file. For files in a tree another user
    owns (a server's ``postmaster.pid``)."""
    parts = [p for p in relative.split("/") if p]
    fds: list[int] = []
    try:
        fds.append(os.open(root, _DIR_FLAGS))
        for part in parts[:-1]:
            fds.append(os.open(part, _DIR_FLAGS, dir_fd=fds[-1]))
        fds.append(os.open(parts[-1], os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
                           dir_fd=fds[-1]))  # fmt: skip
        if not stat.S_ISREG(os.fstat(fds[-1]).st_mode):
            return None
        return os.read(fds[-1], max_bytes)
    except OSError:
        return None
    finally:
        for fd in fds:
            with contextlib.suppress(OSError):
                os.close(fd)


def open_log(path: Path) -> int:
    """An fd appending to ``path`` (created 0600), never through a symlink, and only if
    the file is this user's own regular file. Logs live in this user's directories and
    reach a demoted process only as this open descriptor, so that process (and anyone
    sharing its user) can write them but never open them by name."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid():
        os.close(fd)
        raise ConfigError(f"log file {path} is not this user's own regular file",
                          hint="remove it; isolate makes its logs itself", path=path)  # fmt: skip
    return fd


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


#: The temp dir every process on the machine sees, whatever its ``TMPDIR``.
MACHINE_TMP = Path("/tmp")  # noqa: S108 - the machine's, by design: see machine_dir


def shared_dir(path: Path) -> bool:
    """``path`` is a directory every user can share: a real directory (no symlink) of
    root's or ours, sticky and world-writable (nobody can remove another user's files)."""
    try:
        st = path.lstat()
    except OSError:
        return False
    return (
        stat.S_ISDIR(st.st_mode) and st.st_uid in (0, os.geteuid())
        and st.st_mode & 0o1777 == 0o1777
    )  # fmt: skip


def make_shared_dir(path: Path) -> bool:
    """Make ``path`` sticky and world-writable if it is missing; whether it is (now) a
    directory every user can share (:func:`shared_dir`)."""
    with contextlib.suppress(OSError):
        path.mkdir(mode=0o1777)
        os.chmod(path, 0o1777)  # we made it: no symlink to follow
    return shared_dir(path)


#: The machine dirs this process said it cannot trust (said once each).
_UNTRUSTED: set[str] = set()


def machine_dir(name: str, *, untrusted: str = "") -> Path | None:
    """``/tmp/<name>``, made sticky and world-writable if missing: where runs of every user
    and ``TMPDIR`` on this machine meet (port leases, holds of the engine's images).
    ``None`` where there is no ``/tmp`` or the directory there is not one isolate can trust
    (another user planted it): the caller then goes on with what its own dirs give, and,
    with ``untrusted`` (what that costs), the run says so once, naming the dir and the fix."""
    path = MACHINE_TMP / name
    if MACHINE_TMP.is_dir() and make_shared_dir(path):
        return path
    if untrusted and name not in _UNTRUSTED and MACHINE_TMP.is_dir():
        _UNTRUSTED.add(name)
        logger.warning("isolate: %s: %s is not a directory isolate can trust (it must be root's or "
                       "this user's, sticky and world-writable); remove it if another user made it",
                       untrusted, path, extra=NOTICE)  # fmt: skip
    return None


def open_lock_file(path: Path, *, create: bool = True) -> int | None:
    """An fd of the lock file ``path`` in a shared dir (created 0644 if missing, unless not
    ``create``: then :class:`FileNotFoundError`), never through a symlink; ``None`` where
    another user's file cannot be opened or is no regular file (a FIFO planted there would
    block the open for ever; it is opened without waiting, and refused). ``flock`` needs no
    write access, so a regular file another user made is as good a lock as our own."""
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    for _ in range(3):
        try:
            return _regular(os.open(path, flags))
        except FileNotFoundError:
            if not create:
                raise
        except OSError:
            return None
        try:
            return os.open(path, flags | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            continue  # created by someone else in between: open theirs
        except OSError:
            return None
    return None


def same_file(fd: int, path: Path) -> bool:
    """``path`` still names the file ``fd`` is open on (nobody unlinked or swapped it
    since the open; a lock taken on a file its remover unlinked is no lock)."""
    try:
        return os.path.samestat(os.fstat(fd), os.lstat(path))
    except OSError:
        return False


def _regular(fd: int) -> int | None:
    """``fd`` if it is open on a regular file; else ``None`` (and it is closed)."""
    if stat.S_ISREG(os.fstat(fd).st_mode):
        return fd
    os.close(fd)
    return None
