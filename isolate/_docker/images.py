"""Images: the servers' (present or pulled) and the service's (built from its context).

An image isolate makes (a service's, a seeded PostgreSQL) is held by every process that may
run it, for its life, so ``cleanup --caches`` leaves it: a shared ``flock`` on the image's
build lock in this user's ``$TMPDIR/isolate-build-locks-<uid>/`` (which also makes the
image once for every worker), and one on its hold in ``/tmp/isolate-image-holds/``, which
every user and every ``TMPDIR`` on the machine sees: the engine's images are the machine's,
so a clean-up from another user's shell or another CI shard must see the hold too.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import re
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, NoReturn

from .._cache import hold_or_make, release_entry, remove_unused
from .._errors import ConfigError, DockerUnavailableError, ImageNotFoundError, tail_text
from .._fs import machine_dir, open_lock_file, own_dir, owned_by_me, same_file
from .._retry import poll_until
from .._run.notices import NOTICE
from .engine import is_docker_error, reason

__all__ = [
    "BUILD_LABEL", "build_image", "build_locks", "context_digest", "ensure_image", "hold_image",
    "release_image", "remove_built_images", "volume_mounts",
]

#: On every image isolate makes (service images, seeded PostgreSQL): what ``cleanup --caches`` removes.
BUILD_LABEL = "isolate.build_context"

logger = logging.getLogger(__name__)


def ensure_image(client: Any, image: str, *, hint: str) -> Any:
    """The local image ``image``, pulled if missing; :class:`ImageNotFoundError` if neither."""
    try:
        return client.images.get(image)
    except Exception as exc:
        if not is_docker_error(exc, "ImageNotFound", "NotFound"):
            raise DockerUnavailableError(
                f"docker could not inspect image {image!r}: {reason(exc)}"
            ) from None
    from docker.utils import parse_repository_tag

    repository, tag = parse_repository_tag(image)
    started = time.monotonic()
    try:
        if tag is not None and tag.startswith("sha256:"):
            pulled = client.images.pull(f"{repository}@{tag}")
        else:
            pulled = client.images.pull(repository, tag=tag or "latest")
    except Exception as exc:
        raise ImageNotFoundError(
            f"image {image!r} is not present locally and could not be pulled: {reason(exc)}",
            hint=hint, image=image, pull_seconds=f"{time.monotonic() - started:.1f}",
        ) from None  # fmt: skip
    logger.info("pulled %s in %.1fs", image, time.monotonic() - started)
    return pulled


def _dockerignore(context: Path) -> list[str]:
    """The patterns of ``context/.dockerignore``, read as the Docker SDK's build does."""
    try:
        lines = (context / ".dockerignore").read_text().splitlines()
    except OSError:
        return []
    return [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]


def context_digest(
    context: Path, dockerfile: Path | None = None, build_args: Mapping[str, str] | None = None
) -> str:
    """Hash of what a build of ``context`` sends: each file's path, mode and content, and
    (when given) the Dockerfile's place and content, which may lie outside the context,
    and the build arguments.

    The file list is the Docker SDK's own (``.dockerignore`` semantics, ``!`` lines
    included), so an edit to any file the image can see changes the digest.
    """
    from docker.utils.build import exclude_paths

    inside = _inside(context, dockerfile)
    digest = hashlib.sha256()
    # The SDK sends a Dockerfile from outside under a name of its own: no "!Dockerfile".
    for rel in sorted(exclude_paths(str(context), _dockerignore(context), dockerfile=inside or ".dockerfile")):
        path = context / rel
        if path.is_file() and not path.is_symlink():
            digest.update(f"{rel}\0{path.stat().st_mode & 0o111}\0".encode())
            digest.update(path.read_bytes())
            digest.update(b"\0")
    if dockerfile is not None and inside != "Dockerfile":  # the default one is hashed above
        digest.update(f"dockerfile\0{inside or 'outside'}\0".encode() + dockerfile.read_bytes() + b"\0")
    for name, value in sorted((build_args or {}).items()):
        digest.update(f"arg\0{name}\0{value}\0".encode())
    return digest.hexdigest()[:12]


def _inside(context: Path, dockerfile: Path | None) -> str | None:
    """``dockerfile``'s path in ``context`` (``Dockerfile`` by default), ``None`` if outside."""
    if dockerfile is None:
        return "Dockerfile"
    try:
        return dockerfile.resolve().relative_to(context.resolve()).as_posix()
    except ValueError:
        return None


def build_image(
    client: Any, name: str, context: Path, dockerfile: Path | None = None,
    build_args: Mapping[str, str] | None = None,
) -> str:  # fmt: skip
    """Build ``context`` (with ``dockerfile``, default ``context/Dockerfile``, and
    ``build_args``) as ``isolate-build/<name>:<digest>``, reused if present."""
    if not context.is_dir():
        raise ConfigError(
            f"build context {context} is not a directory",
            hint="point ServiceSpec.build_context at the directory the image is built from "
            "(relative paths are relative to the pytest rootdir)",
        )
    if not (dockerfile or context / "Dockerfile").is_file():
        raise ConfigError(
            f"build context {context} has no Dockerfile" if dockerfile is None
            else f"Dockerfile {dockerfile} does not exist",
            hint="point ServiceSpec.build_context at a directory with a Dockerfile, or name "
            "one with ServiceSpec.dockerfile (relative to the build context, or absolute)",
        )  # fmt: skip
    repo = re.sub(r"[^a-z0-9._-]+", "-", name.lower()).strip("._-") or "service"
    tag = f"isolate-build/{repo}:{context_digest(context, dockerfile, build_args)}"
    # In use for the life of this worker (its containers run the image): a shared lock,
    # so `cleanup --caches` leaves the image (and the lock) alone; built, if missing,
    # once for every worker and run.
    hold_image(client, tag, lambda: _build(client, context, tag, dockerfile, build_args))
    return tag


def build_locks() -> Path:
    """This user's build locks (made again if a clean-up removed them)."""
    return own_dir(Path(tempfile.gettempdir()) / f"isolate-build-locks-{os.geteuid()}")


#: The machine's holds of the images isolate made (see the module's docstring).
IMAGE_HOLDS = "isolate-image-holds"
#: How long a hold waits for an exclusive lock on it to go (a clean-up removing the
#: image holds it for that removal) before it goes on with this user's lock alone.
HOLD_WAIT = 10.0
#: Machine-wide holds this process keeps for its life, by path.
_MACHINE_HELD: dict[str, int] = {}


def hold_image(client: Any, tag: str, make: Callable[[], None]) -> None:
    """Hold ``tag`` for this process's life (``cleanup --caches`` leaves it, whoever runs
    it), made by ``make()`` once for every worker and run if it is missing."""
    _hold_machine_wide(tag)  # first: a clean-up that removed it meanwhile is seen below
    hold_or_make(build_locks, _lock_name(tag), lambda: _present(client, tag), make)


def release_image(tag: str) -> None:
    """Drop this process's holds of ``tag`` (the next clean-up may remove the image)."""
    release_entry(build_locks, _lock_name(tag))
    directory = machine_dir(IMAGE_HOLDS)
    fd = _MACHINE_HELD.pop(str(directory / _lock_name(tag)), None) if directory else None
    if fd is not None:
        os.close(fd)


def _hold_machine_wide(tag: str) -> None:
    """A shared lock on ``tag``'s hold in the machine's dir, kept for this process's life.
    Someone else's file there is as good a lock as ours (``flock`` needs no write access);
    where the dir or the file cannot be trusted or opened, or an exclusive lock on it stays
    longer than :data:`HOLD_WAIT` (no clean-up takes that long: someone holds it on purpose),
    the hold is this user's lock alone, and the run says so."""
    directory = machine_dir(IMAGE_HOLDS, untrusted="images are held for this user's clean-ups only")
    if directory is None:
        return
    path = directory / _lock_name(tag)
    held = _MACHINE_HELD.get(str(path))
    if held is not None and same_file(held, path):
        return
    if held is not None:
        os.close(_MACHINE_HELD.pop(str(path)))

    def take() -> bool:
        fd = open_lock_file(path)
        if fd is None:
            raise PermissionError(path)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        if not same_file(fd, path):  # its remover unlinked it after our open: no lock
            os.close(fd)
            return False
        _MACHINE_HELD[str(path)] = fd
        return True

    try:
        if poll_until(take, HOLD_WAIT, maximum=0.05):
            return
        why = f"someone has held {path} exclusively for {HOLD_WAIT:g}s"
    except PermissionError:
        why = f"{path} is another user's, and no lock file isolate can open"
    logger.warning("isolate: image %s is held for this user's clean-ups only: %s", tag, why, extra=NOTICE)


@contextlib.contextmanager
def _machine_unheld(directory: Path | None, name: str, *, dry_run: bool) -> Iterator[bool]:
    """For a ``with`` block: whether no process on the machine holds the image whose hold
    is ``name`` in ``directory`` (an exclusive lock on the hold, made if missing and kept
    for the block, so none takes it meanwhile; its file unlinked, still locked, at the end
    unless ``dry_run``, which makes nothing). Where the machine's dir cannot be trusted
    (``None``), this user's build locks alone say (true here)."""
    if directory is None:
        yield True
        return
    path = directory / name
    try:
        fd = open_lock_file(path, create=not dry_run)
    except FileNotFoundError:  # dry run: no hold, so nobody holds it
        yield True
        return
    if fd is None:  # another user's file we cannot open: keep the image rather than guess
        yield False
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        free = same_file(fd, path)  # unlinked by another clean-up: it removed the image
        yield free
        if free and not dry_run:
            with contextlib.suppress(OSError):  # another user's file stays for them
                os.unlink(path)
    finally:
        os.close(fd)


def _lock_name(tag: str) -> str:
    return f"{tag.replace('/', '_').replace(':', '_')}.lock"


def _present(client: Any, tag: str) -> bool:
    try:
        client.images.get(tag)
    except Exception:
        return False
    return True


#: What the engine says when an image a build took a cached layer from was removed
#: meanwhile (``isolate cleanup --caches`` in another shell, ``docker image prune``).
_CACHE_GONE = re.compile(r"unknown parent image|failed to get digest|no such image: sha256|layer does not exist", re.I)
#: Builds of one image: a build whose cached layers were removed meanwhile goes again.
_BUILD_ATTEMPTS = 3


def _build(client: Any, context: Path, tag: str, dockerfile: Path | None = None,
           build_args: Mapping[str, str] | None = None) -> None:  # fmt: skip
    started = time.monotonic()
    for attempt in range(1, _BUILD_ATTEMPTS + 1):
        try:
            client.images.build(
                path=str(context), tag=tag, rm=True, forcerm=True, pull=False,
                network_mode="host", labels={BUILD_LABEL: str(context)},
                dockerfile=str(dockerfile) if dockerfile else None, buildargs=dict(build_args or {}),
            )  # fmt: skip
            break
        except Exception as exc:
            if attempt < _BUILD_ATTEMPTS and _CACHE_GONE.search(reason(exc)):
                logger.info("building %s again: a layer it took from the cache was removed (%s)", tag, reason(exc))
                continue
            _build_failed(exc, context, tag)
    logger.info("built %s in %.1fs", tag, time.monotonic() - started)


def _build_failed(exc: Exception, context: Path, tag: str) -> NoReturn:
    """The build's error, with the tail of its log."""
    build_log = getattr(exc, "build_log", None) or []
    text = "".join(
        str(chunk.get("stream") or chunk.get("error") or "")
        for chunk in build_log
        if isinstance(chunk, dict)
    )
    raise ImageNotFoundError(
        f"building image {tag} from {context} failed: {reason(exc)}",
        log_tail=tail_text(text, 20) or None,
        hint="fix the Dockerfile (base images must exist locally or be pullable), "
        "or set ServiceSpec.image to an image that exists",
        context=context,
    ) from None


def _containers_from(client: Any, image_id: str) -> list[str]:
    """The names of the containers made from the image (running or not, anyone's); on
    an error, a placeholder: keep the image rather than guess."""
    try:
        return [c.name for c in client.containers.list(all=True, filters={"ancestor": image_id})]
    except Exception as exc:
        return [f"(unknown: the engine could not list them: {reason(exc)})"]


def volume_mounts(image: Any, labels: Mapping[str, str]) -> list[Any]:
    """Labelled anonymous volumes for the image's ``VOLUME``s (instead of unlabelled ones)."""
    from docker.types import Mount

    volumes = (image.attrs.get("Config") or {}).get("Volumes") or {}
    return [
        Mount(target=target, source=None, type="volume", labels=dict(labels))
        for target in sorted(volumes)
    ]


def remove_built_images(dry_run: bool = False) -> tuple[list[str], list[str]]:
    """Remove the images isolate made (service images ``isolate-build/*``, seeded
    PostgreSQL images ``isolate-pgseed:*``) that no live run holds (whatever its user or
    ``TMPDIR``: see the module's docstring) and no container was made from (a run whose
    hold this clean-up could not see: the machine's dir planted by someone else, an older
    isolate); (removed, kept: each with why)."""
    from .engine import engine

    client = engine()
    removed, kept = [], []
    locks, holds = build_locks(), machine_dir(IMAGE_HOLDS)
    for image in client.images.list(filters={"label": BUILD_LABEL}):
        users = _containers_from(client, image.id)
        for tag in image.tags or [image.id]:
            def untag(tag: str = tag) -> None:  # under the lock: no worker takes it meanwhile
                with contextlib.suppress(Exception):
                    client.images.remove(tag, force=True)

            with _machine_unheld(holds, _lock_name(tag), dry_run=dry_run or bool(users)) as unheld:
                if unheld and not users and remove_unused(locks, _lock_name(tag), dry_run=dry_run, remove=untag):
                    removed.append(f"image {tag}")
                elif unheld and users and remove_unused(locks, _lock_name(tag), dry_run=True):  # no lock held
                    kept.append(f"image {tag} (container {users[0]} was made from it)")
                else:
                    kept.append(f"image {tag} (a live run uses it)")
    for path in sorted(locks.glob("*.lock")):  # what crashed builds left
        remove_unused(locks, path.name, dry_run=dry_run)
    for path in sorted(holds.glob("*.lock")) if holds is not None and not dry_run else ():
        if owned_by_me(path):  # holds of images gone (removed by hand): unlinked if unheld
            with _machine_unheld(holds, path.name, dry_run=False):
                pass
    return removed, kept
