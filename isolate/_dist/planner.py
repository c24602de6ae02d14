"""The duration-aware planner behind ``--isolate-dist=duration``: pure (no pytest, no xdist).

Tests are indices into the run's collection; nodes are any hashable keys (the xdist adapter
in :mod:`isolate.plugin._scheduler` passes its ``WorkerController`` objects). Every call
returns the :data:`Action` list the adapter carries out, in order.

How it decides:

* **Longest first.** The parallel tests wait in a pool ordered by their expected duration,
  longest first (ties in collection order, so with no history it is the collection order).
  The test at the head of the pool goes to the node expected to be free first, until every
  node holds the test it runs, the next one, and more only while it would otherwise run out
  within :data:`HORIZON` seconds: nothing waits behind a long test that runs long.
* **Nodes join as they collect.** A node starts as soon as it has collected. While others
  are still collecting (see :meth:`expect`), a node holds only the two tests it needs to
  run one, and the second of them is the shortest of its kind in the pool if the first is
  at least as long as any of that kind left there, and only if each node still to come
  finds a test left; so a node that joins late still finds the longest tests in the pool,
  not tied to an early node behind another long one.
* **Stealing by expected time.** When the pool is empty and a node is about to run out, it
  takes tests from the end of the queue of the node with the most expected work left, as
  long as each move shortens the longer of the two. A worker runs test *i* only once it
  holds test *i + 1* (xdist's protocol), so the first two of a queue stay put; any test
  after them may move, the last ones included. One request per victim is in flight; the
  worker gives back all the requested tests or none.
* **Durations as tests finish.** A finished test's measured duration replaces its estimate;
  a test never seen takes its file's median (see
  :class:`~isolate._dist.durations.ExpectedDurations`), and the pool is re-ordered as it moves.
* **CPU-heavy tests spread out.** With the CPU time each test kept its worker busy in
  earlier runs, a test that did so for at least :data:`HEAVY` of its duration is *heavy*.
  It keeps about :data:`HEAVY_CORES` cores busy: its worker's, and as much again in the
  service and the database answering it. If more heavy tests ran at once than the cores
  can feed (the *slots*: cores / :data:`HEAVY_CORES`, at least one), they would slow each
  other down while the tests that mostly wait (timeouts, restarts, sleeps) left the CPU
  idle. So with more nodes than slots the two kinds run side by side, each longest first:
  heavy tests on as many nodes as their share of the expected work left asks for (rounded
  down, at least one, at most the slots), light tests on the others, so that both run out
  together and the CPU is about as busy all along. With no CPU history, or slots for every
  node, it is longest first.
* **Serial tests last and alone.** Tests marked serial are held back. When nothing parallel
  is left to hand out or steal, idle nodes are shut down except the last one (the
  *keeper*); once every other node has begun its last test (see :meth:`Planner.started`),
  or has none left, the keeper gets the serial tests, one after another. The keeper's own
  last parallel test, which it could start only once it held the next, then runs beside
  the others' last tests instead of after them, and the run's serial gate
  (:mod:`isolate._run.serial`) holds the first serial test until those end. Serial tests
  are never stolen.
* **Crashes.** A removed node's first test is the one it crashed in (reported, not run
  again, as xdist's ``load`` does); the rest go back to the pool, or to the serial tests.
"""

from __future__ import annotations

import bisect
import itertools
import math
import time
from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

from .durations import ExpectedDurations
from .queues import Queues

__all__ = ["HEAVY", "HEAVY_CORES", "HORIZON", "RUNNING", "Action", "Planner", "Send", "Shutdown", "Steal"]

N = TypeVar("N", bound=Hashable)

#: A worker needs two tests in hand to run the first: xdist starts test i once it holds i + 1.
RUNNING = 2
#: A node is given more while it would run out of tests to start within this many seconds,
#: so that it never waits for the controller's next message.
HORIZON = 0.5
#: The most tests one node holds (many tiny tests).
MAX_QUEUE = 64
#: A test whose worker was busy on the CPU for at least this share of its duration is heavy:
#: that is only the client's part of a request (the example's waiting tests stay under 6%,
#: 266 of its 277 short ones are over 10%; docs/design.md).
HEAVY = 0.1
#: The cores a heavy test keeps busy: its worker's, and about as much again in the service
#: and the database that answer it.
HEAVY_CORES = 2


@dataclass(frozen=True)
class Send(Generic[N]):
    """Give ``node`` these tests, to run after what it holds."""

    node: N
    indices: tuple[int, ...]


@dataclass(frozen=True)
class Steal(Generic[N]):
    """Ask ``node`` to give back these queued tests (all of them, or none)."""

    node: N
    indices: tuple[int, ...]


@dataclass(frozen=True)
class Shutdown(Generic[N]):
    """``node`` gets nothing more: it runs what it holds and ends."""

    node: N


Action = Send[N] | Steal[N] | Shutdown[N]


class Planner(Generic[N]):
    """Which test runs where, for one run. Feed it the events; carry out what it returns."""

    def __init__(
        self, clock: Callable[[], float] = time.monotonic, horizon: float = HORIZON, cores: float = math.inf
    ) -> None:
        self._clock = clock
        self._horizon = horizon
        self._slots = max(1, math.floor(cores / HEAVY_CORES)) if cores < math.inf else math.inf
        self._queues: Queues[N] = Queues(self.estimate, lambda index: self._heavy[index])
        self._since: dict[N, float] = {}  # when the head of a node's queue became its head
        self._closing: set[N] = set()
        self._stealing: dict[N, tuple[int, ...]] = {}  # victim -> the tests asked back
        self._keeper: N | None = None
        self._expected = ExpectedDurations()
        self._serial: list[bool] = []
        self._rank: list[tuple[float, int]] = []
        self._heavy: list[bool] = []
        # Parallel tests not handed out, light and heavy, each with the longest at the end,
        # and the seconds each pool is expected to take.
        self._pools: tuple[list[int], list[int]] = ([], [])
        self._pooled_work = [0.0, 0.0]
        self._held: list[int] = []  # serial tests not handed out, in collection order
        self._started: set[int] = set()  # tests a node has begun (and not given back)
        self._loaded = False
        self._coming = 0  # nodes still to join (collecting): no node holds more than it runs

    # -- the events -------------------------------------------------------------------

    def add_node(self, node: N) -> list[Action[N]]:
        """A node that has collected the run's tests."""
        assert node not in self._queues, node
        self._queues.add(node)
        self._since[node] = self._clock()
        return self.balance()

    def expect(self, count: int) -> None:
        """``count`` more nodes are still collecting (takes effect at the next event). Until
        they join, each node holds only the tests it needs to run (no :data:`HORIZON`), so
        that the longest tests wait in the pool for them instead of in the queues of the
        nodes that came first."""
        self._coming = max(count, 0)

    def load(
        self,
        estimates: Sequence[float | None],
        serial: Iterable[int] = (),
        cpu: Sequence[float | None] = (),
        groups: Sequence[Hashable] = (),
    ) -> list[Action[N]]:
        """The collection: an estimate per test (``None``: never seen), the serial ones, the
        CPU seconds each test's worker spent on it when it last ran (``None``: unknown), and
        a group per test (its file), from which a test never seen is estimated
        (:class:`~isolate._dist.durations.ExpectedDurations`)."""
        self._expected = ExpectedDurations(estimates, groups)
        self._rank = [(self.estimate(i), -i) for i in range(len(estimates))]
        held = set(serial)
        self._serial = [i in held for i in range(len(estimates))]
        self._heavy = [
            i not in held and estimate is not None and spent is not None and spent >= HEAVY * estimate > 0
            for i, (estimate, spent) in enumerate(itertools.zip_longest(estimates, cpu[: len(estimates)]))
        ]
        for i in sorted((i for i in range(len(estimates)) if i not in held), key=self._rank.__getitem__):
            self._pools[self._heavy[i]].append(i)
            self._pooled_work[self._heavy[i]] += self.estimate(i)
        self._held = sorted(held)
        self._loaded = True
        return self.balance()

    def complete(self, node: N, index: int, duration: float) -> list[Action[N]]:
        """``node`` finished test ``index`` in ``duration`` seconds."""
        self._queues.remove(node, index)
        self._since[node] = self._clock()
        self._learn(index, duration)
        return self.balance()

    def started(self, index: int) -> list[Action[N]]:
        """A node began test ``index`` (xdist tells the controller as each test starts).
        Only the serial phase waits for it: the keeper gets the serial tests once every
        other node's last test has begun, so a serial test never runs before one of them."""
        self._started.add(index)
        return self.balance() if self._held else []

    def unscheduled(self, node: N, indices: Sequence[int]) -> list[Action[N]]:
        """``node`` answered a steal: it gave back ``indices`` (possibly none)."""
        self._stealing.pop(node, None)
        for index in indices:
            if node in self._queues and index in self._queues[node]:  # a node gone gave them back then
                self._queues.remove(node, index)
                self._release(index)
        return self.balance()

    def requeue(self, index: int) -> list[Action[N]]:
        """Run ``index`` again (xdist's ``mark_test_pending``)."""
        self._release(index)
        return self.balance()

    def close(self, node: N) -> None:
        """``node`` was told to shut down by someone else (xdist ending the session)."""
        if node in self._queues:
            self._closing.add(node)

    def remove_node(self, node: N) -> tuple[int | None, list[Action[N]]]:
        """``node`` is gone. Returns the test it crashed in (``None`` if it had none left)
        and the actions that hand its other tests to the remaining nodes."""
        queue = self._queues.pop(node)
        self._since.pop(node, None)
        self._closing.discard(node)
        self._stealing.pop(node, None)
        if self._keeper == node:
            self._keeper = None
        for index in queue[1:]:
            self._release(index)
        return (queue[0] if queue else None), self.balance()

    # -- what the adapter asks -----------------------------------------------------------

    @property
    def nodes(self) -> list[N]:
        return list(self._queues)

    def pending(self, node: N) -> list[int]:
        """The tests ``node`` holds, in the order it runs them."""
        return list(self._queues[node])

    def estimate(self, index: int) -> float:
        """What test ``index`` is expected to take (its measured duration once it ran)."""
        return self._expected(index)

    @property
    def has_pending(self) -> bool:
        """Tests wait to be handed out or to run."""
        return bool(self._pooled or self._held or any(self._queues.values()))

    @property
    def finished(self) -> bool:
        """Nothing left to hand out: each node runs out what it holds once told to stop."""
        return (
            self._loaded
            and not self._pooled
            and not self._held
            and not self._stealing
            and all(len(queue) < RUNNING for queue in self._queues.values())
        )

    def remaining(self, node: N) -> float:
        """Expected seconds until ``node`` has run everything it holds."""
        queue = self._queues[node]
        if not queue:
            return 0.0
        # A test past its estimate was misjudged: expect it to run about half as long again.
        elapsed = self._clock() - self._since[node]
        first = self.estimate(queue[0])
        return max(first - elapsed, elapsed / 2) + max(self._queues.work(node) - first, 0.0)

    # -- the decisions --------------------------------------------------------------------

    def balance(self) -> list[Action[N]]:
        """Hand out, steal or shut down, as the state now asks."""
        if not self._loaded:
            return []
        actions: list[Action[N]] = self._hand_out()
        if self._pooled:
            return actions  # every node is busy enough
        for thief in sorted(self._idle(), key=self.remaining):
            steal = self._steal_for(thief)
            if steal is not None:
                self._stealing[steal.node] = steal.indices
                actions.append(steal)
        if self._stealing:
            return actions  # nothing ends while tests may come back
        if self._held:
            return actions + self._serial_phase()
        for node in self._idle():
            actions.append(self._shutdown(node))
        return actions

    @property
    def _pooled(self) -> bool:
        return bool(self._pools[0] or self._pools[1])

    def _live(self) -> list[N]:
        return [node for node in self._queues if node not in self._closing]

    def _idle(self) -> list[N]:
        return [node for node in self._live() if len(self._queues[node]) < RUNNING]

    def _wants(self, node: N) -> bool:
        queue = self._queues[node]
        if self._coming and queue:
            # A second test only if each node still to come finds one left: a node that
            # takes it also runs it (xdist's protocol), so a small suite would run on one.
            return len(queue) < RUNNING and len(self._pools[0]) + len(self._pools[1]) > self._coming
        if len(queue) < RUNNING:
            return True
        # More only if it would stall within the horizon: it stalls once all but its last
        # test has run. On a test of a second or more that is at its end (:meth:`remaining`).
        return len(queue) < MAX_QUEUE and self.remaining(node) - self.estimate(queue[-1]) < self._horizon

    def _hand_out(self) -> list[Action[N]]:
        sent: dict[N, list[int]] = {}
        while self._pooled:
            hungry = [node for node in self._live() if self._wants(node)]
            if not hungry:
                break
            node = min(hungry, key=self.remaining)
            index = self._shortest(node) if self._needs_filler(node) else self._next_for(node)
            self._push(node, index)
            sent.setdefault(node, []).append(index)
        return [Send(node, tuple(indices)) for node, indices in sent.items()]

    def _next_for(self, node: N) -> int:
        """The pooled test ``node`` takes next (see "CPU-heavy tests spread out")."""
        light, heavy = self._pools
        live = self._live()
        nodes = len(live) + self._coming  # those still collecting count: they come soon
        if not heavy or not light:
            kind = bool(heavy)
        elif self._slots >= nodes:  # the CPU feeds heavy tests on every node: longest first
            kind = self._rank[heavy[-1]] > self._rank[light[-1]]
        else:
            # Heavy tests on as many nodes as their share of the expected work left asks
            # for, rounded down, at least one, at most the slots. A node whose kind runs out
            # takes the other, so both run out about together.
            held, heavy_held = self._queues.total()
            heavy_left = heavy_held + self._pooled_work[True]
            total = held + self._pooled_work[False] + self._pooled_work[True]
            wanted = min(self._slots, max(1, math.floor(nodes * heavy_left / max(total, 1e-9))))
            others = sum(1 for other in live if other != node and self._queues.holds_heavy(other))
            kind = others < wanted
        return self._take(kind, -1)

    def _needs_filler(self, node: N) -> bool:
        """While nodes are still coming, a node that holds a test at least as long as any of
        its kind in the pool gets the shortest of that kind after it (xdist starts a test
        once the node holds the next): a second long test tied to an early node would wait
        for the first."""
        queue = self._queues[node]
        if not self._coming or len(queue) != 1:
            return False
        pool = self._pools[self._heavy[queue[0]]]
        return bool(pool) and self.estimate(queue[0]) >= self.estimate(pool[-1])

    def _shortest(self, node: N) -> int:
        """The shortest pooled test of the kind ``node`` holds (so it runs one kind)."""
        return self._take(self._heavy[self._queues[node][0]], 0)

    def _take(self, kind: bool, position: int) -> int:
        index = self._pools[kind].pop(position)
        self._pooled_work[kind] = max(self._pooled_work[kind] - self.estimate(index), 0.0)
        return index

    def _push(self, node: N, index: int) -> None:
        queue = self._queues[node]
        if not queue:
            self._since[node] = self._clock()
        self._queues.append(node, index)

    def _steal_for(self, thief: N) -> Steal[N] | None:
        """The tests that moving from the busiest node to ``thief`` shortens the longer of
        the two queues with, taken from the victim's end."""
        have = self.remaining(thief)
        victims = [
            node for node in self._live()
            if node != thief and node not in self._stealing and len(self._queues[node]) > RUNNING
        ]  # fmt: skip
        for victim in sorted(victims, key=self.remaining, reverse=True):
            left = self.remaining(victim)
            take: list[int] = []
            for index in reversed(self._queues[victim][RUNNING:]):
                cost = self.estimate(index)
                if self._serial[index] or have + cost >= left:
                    break
                take.append(index)
                have, left = have + cost, left - cost
            if take:
                return Steal(victim, tuple(reversed(take)))
        return None

    def _serial_phase(self) -> list[Action[N]]:
        """Shut down idle nodes but one (the keeper); once every other node has begun its
        last test or holds none, the keeper gets the serial tests."""
        actions: list[Action[N]] = []
        live = self._live()
        # The keeper stays; among the others, the one expected free first is kept last.
        idle = sorted(self._idle(), key=lambda node: (node == self._keeper, -self.remaining(node)))
        for node in idle:
            if len(live) > 1:
                actions.append(self._shutdown(node))
                live.remove(node)
        if len(live) != 1 or len(self._queues[live[0]]) >= RUNNING:
            return actions
        keeper = self._keeper = live[0]
        if any(
            len(queue) > 1 or (queue and queue[0] not in self._started)
            for node, queue in self._queues.items() if node != keeper
        ):  # fmt: skip
            return actions  # a test of another node has yet to begin
        held, self._held = self._held, []
        self._queues.extend(keeper, held)
        actions.append(Send(keeper, tuple(held)))
        return actions

    def _shutdown(self, node: N) -> Shutdown[N]:
        self._closing.add(node)
        return Shutdown(node)

    def _release(self, index: int) -> None:
        """Back to the pool (or to the held serial tests), in its place."""
        self._started.discard(index)
        if self._serial[index]:
            bisect.insort(self._held, index)
        else:
            bisect.insort(self._pools[self._heavy[index]], index, key=self._rank.__getitem__)
            self._pooled_work[self._heavy[index]] += self.estimate(index)

    def _learn(self, index: int, duration: float) -> None:
        everything, moved = self._expected.learn(index, duration)
        if everything:
            self._reorder()
            self._queues.refresh()
        elif moved:
            self._rerank(moved)
            self._queues.refresh(moved)

    def _rerank(self, members: Iterable[int]) -> None:
        """The estimates of these tests changed: their places in the pools follow (ranks
        are unique and each pool is sorted by them, so bisecting finds a pooled test)."""
        rank = self._rank.__getitem__
        for i in members:
            new = (self.estimate(i), -i)
            if self._expected.known(i) or new == self._rank[i]:
                continue
            kind = self._heavy[i]
            pool = self._pools[kind]
            at = bisect.bisect_left(pool, self._rank[i], key=rank)
            pooled = at < len(pool) and pool[at] == i
            if pooled:
                del pool[at]
                self._pooled_work[kind] += new[0] - self._rank[i][0]
            self._rank[i] = new
            if pooled:
                bisect.insort(pool, i, key=rank)

    def _reorder(self) -> None:
        """The default estimate changed: every test never seen may move."""
        for i in range(len(self._rank)):
            if not self._expected.known(i):
                self._rank[i] = (self.estimate(i), -i)
        for kind, pool in enumerate(self._pools):
            pool.sort(key=self._rank.__getitem__)
            self._pooled_work[kind] = sum(self.estimate(i) for i in pool)
