"""A fault in effect (a worker cut off from PostgreSQL or Redis), undone on request,
at the end of a ``with`` block, or by the plugin after the test, whatever happens."""

from __future__ import annotations

from collections.abc import Callable
from types import TracebackType

__all__ = ["Fault"]


class Fault:
    """Returned by ``cut()``: ``restore()`` it, or use it as a context manager::

        with isolate_database.cut():
            ...  # the worker's role cannot log in here
        # restored here, even if the block raised
    """

    def __init__(self, what: str, restore: Callable[[], None]) -> None:
        self.what = what
        self._restore = restore

    def restore(self) -> None:
        """Undo the fault (idempotent)."""
        self._restore()

    def __enter__(self) -> Fault:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.restore()

    def __repr__(self) -> str:
        return f"<Fault {self.what}>"
