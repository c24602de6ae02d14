"""The tests each node of a run holds, for :class:`~isolate._dist.planner.Planner`: pure.

The planner asks, for every test it hands out, how much expected work each node still
holds (its queue's estimates summed) and how much of it is CPU-heavy. Summed afresh at each
question, that is a walk over every queue per test handed out: with thousands of short
tests on 16 workers the controller spent more CPU on it than a test took. So the sums are
kept as the queues change, and re-counted for the tests whose estimates moved.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable, Iterator, Sequence
from typing import Generic, TypeVar

__all__ = ["Queues"]

N = TypeVar("N", bound=Hashable)


class Queues(Generic[N]):
    """Each node's tests, in the order it runs them, with the expected seconds of each
    queue and of its heavy tests. Read a queue with ``queues[node]``; change it only
    through the methods here."""

    def __init__(self, estimate: Callable[[int], float], heavy: Callable[[int], bool]) -> None:
        self._estimate = estimate
        self._heavy = heavy
        self._lists: dict[N, list[int]] = {}
        self._work: dict[N, float] = {}
        self._heavy_work: dict[N, float] = {}
        self._heavy_count: dict[N, int] = {}
        self._held: dict[int, tuple[N, float]] = {}  # each held test: its node, the estimate counted

    # -- reading ----------------------------------------------------------------------

    def __getitem__(self, node: N) -> Sequence[int]:
        return self._lists[node]

    def __contains__(self, node: object) -> bool:
        return node in self._lists

    def __iter__(self) -> Iterator[N]:
        return iter(self._lists)

    def values(self) -> Iterable[Sequence[int]]:
        return self._lists.values()

    def items(self) -> Iterable[tuple[N, Sequence[int]]]:
        return self._lists.items()

    def work(self, node: N) -> float:
        """Expected seconds of everything ``node`` holds."""
        return max(self._work[node], 0.0)

    def total(self) -> tuple[float, float]:
        """Expected seconds of every node's tests, and of the heavy ones among them."""
        return max(sum(self._work.values()), 0.0), max(sum(self._heavy_work.values()), 0.0)

    def holds_heavy(self, node: N) -> bool:
        return self._heavy_count[node] > 0

    # -- changing -----------------------------------------------------------------------

    def add(self, node: N) -> None:
        self._lists[node] = []
        self._work[node] = self._heavy_work[node] = 0.0
        self._heavy_count[node] = 0

    def append(self, node: N, index: int) -> None:
        self._lists[node].append(index)
        self._count(node, index, 1)

    def extend(self, node: N, indices: Iterable[int]) -> None:
        for index in indices:
            self.append(node, index)

    def remove(self, node: N, index: int) -> None:
        self._lists[node].remove(index)
        self._count(node, index, -1)

    def pop(self, node: N) -> list[int]:
        """Forget ``node``; the tests it held."""
        queue = self._lists.pop(node)
        for index in queue:
            del self._held[index]
        del self._work[node], self._heavy_work[node], self._heavy_count[node]
        return queue

    def refresh(self, indices: Iterable[int] | None = None) -> None:
        """These tests' estimates changed (all of them: ``None``): count them anew."""
        for index in list(self._held) if indices is None else indices:
            if index in self._held:
                node = self._held[index][0]
                self._count(node, index, -1)
                self._count(node, index, 1)

    def _count(self, node: N, index: int, sign: int) -> None:
        if sign > 0:
            value = self._estimate(index)
            self._held[index] = (node, value)
        else:
            value = self._held.pop(index)[1]
        self._work[node] += sign * value
        if self._heavy(index):
            self._heavy_work[node] += sign * value
            self._heavy_count[node] += sign
        if not self._lists[node]:  # no drift left behind in an empty queue
            self._work[node] = self._heavy_work[node] = 0.0
