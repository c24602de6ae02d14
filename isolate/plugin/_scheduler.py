"""xdist's side of ``--isolate-dist=duration``: :class:`DurationScheduling` follows xdist's
scheduler protocol (``xdist.scheduler.protocol.Scheduling``, the contract ``load`` keeps)
and carries out what the pure :class:`~isolate._dist.planner.Planner` decides."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import pytest
from xdist.remote import Producer
from xdist.report import report_collection_diff
from xdist.workermanage import WorkerController, parse_tx_spec_config

from .._dist.durations import estimates
from .._dist.planner import Action, Planner, Send, Shutdown, Steal

__all__ = ["DurationScheduling"]


def _cores() -> int:
    """The CPUs this process may run on (its affinity, where the platform has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


class DurationScheduling:
    """Longest first from recorded durations, work stealing by expected time, serial tests
    last and alone (see :mod:`isolate._dist.planner`).

    Like ``load``: every node collects, the collections must be the same, each test runs
    once, and a crashed node's tests go to the others (its current one is reported as the
    crash). ``history`` maps test ids to seconds; ``serial_ids`` names the serial tests
    once the collection is complete (the workers record them); ``cpu`` maps test ids to the
    CPU seconds their worker spent on them, and the machine's cores bound how many
    CPU-heavy tests run at once.
    """

    def __init__(
        self,
        config: pytest.Config,
        log: Producer | None,
        history: Mapping[str, float],
        serial_ids: Callable[[], set[str]],
        cpu: Mapping[str, float] | None = None,
    ) -> None:
        self.numnodes = len(parse_tx_spec_config(config))
        self.config = config
        self.log = Producer("durationsched") if log is None else log.durationsched
        self.node2collection: dict[WorkerController, list[str]] = {}
        self.collection: list[str] | None = None
        self.planner: Planner[WorkerController] = Planner(cores=_cores())
        self._waiting: list[WorkerController] = []  # added, their collection not yet in
        self._history = history
        self._serial_ids = serial_ids
        self._cpu = cpu or {}

    @property
    def nodes(self) -> list[WorkerController]:
        return self._waiting + self.planner.nodes

    @property
    def collection_is_completed(self) -> bool:
        return len(self.node2collection) >= self.numnodes

    @property
    def tests_finished(self) -> bool:
        return self.collection_is_completed and self.collection is not None and self.planner.finished

    @property
    def has_pending(self) -> bool:
        return self.planner.has_pending

    def add_node(self, node: WorkerController) -> None:
        assert node not in self.nodes
        self._waiting.append(node)

    def add_node_collection(self, node: WorkerController, collection: Sequence[str]) -> None:
        assert node in self._waiting
        if self.collection_is_completed:
            # A node added later (replacing a crashed one): it joins if it collected the same.
            assert self.collection is not None
            if list(collection) != self.collection:
                other = next(iter(self.node2collection))
                self.log(report_collection_diff(self.collection, collection, other.gateway.id, node.gateway.id))
                return
            self._waiting.remove(node)
            self._do(self.planner.add_node(node))
            return
        self.node2collection[node] = list(collection)

    def schedule(self) -> None:
        assert self.collection_is_completed
        if self.collection is not None:
            self._do(self.planner.balance())
            return
        if not self._same_collections():
            self.log("**Different tests collected, aborting run**")
            return
        self.collection = next(iter(self.node2collection.values()))
        for node in list(self._waiting):
            if node in self.node2collection:
                self._waiting.remove(node)
                self._do(self.planner.add_node(node))
        serial = self._serial_ids()
        indices = [i for i, nodeid in enumerate(self.collection) if nodeid in serial]
        self._do(self.planner.load(
            estimates(self.collection, self._history), indices, estimates(self.collection, self._cpu)
        ))  # fmt: skip

    def mark_test_complete(self, node: WorkerController, item_index: int, duration: float = 0) -> None:
        self._sync()
        self._do(self.planner.complete(node, item_index, duration))

    def mark_test_pending(self, item: str) -> None:
        assert self.collection is not None
        self._sync()
        self._do(self.planner.requeue(self.collection.index(item)))

    def remove_pending_tests_from_node(self, node: WorkerController, indices: Sequence[int]) -> None:
        self._sync()
        self._do(self.planner.unscheduled(node, indices))

    def remove_node(self, node: WorkerController) -> str | None:
        if node in self._waiting:
            self._waiting.remove(node)
            return None
        self._sync()
        crashed, actions = self.planner.remove_node(node)
        self._do(actions)
        if crashed is None:
            return None
        assert self.collection is not None
        return self.collection[crashed]

    def _sync(self) -> None:
        """Nodes xdist told to shut down (the session ending) get nothing more."""
        for node in self.planner.nodes:
            if node.shutting_down:
                self.planner.close(node)

    def _do(self, actions: list[Action[WorkerController]]) -> None:
        for action in actions:
            try:
                if isinstance(action, Send):
                    action.node.send_runtest_some(list(action.indices))
                elif isinstance(action, Steal):
                    action.node.send_steal(list(action.indices))
                elif isinstance(action, Shutdown):
                    action.node.shutdown()
            except OSError:
                # The worker just died; xdist has yet to tell us (its errordown event is
                # queued). What we sent it stays in its queue in the planner, which hands
                # it on when the node is removed, as for any crash.
                self.log("worker gone before", action)

    def _same_collections(self) -> bool:
        """As xdist's ``load``: every node collected the same tests, else a collection error."""
        (first, col), *rest = self.node2collection.items()
        same = True
        for node, collection in rest:
            msg = report_collection_diff(col, collection, first.gateway.id, node.gateway.id)
            if msg:
                same = False
                self.log(msg)
                report: Any = pytest.CollectReport(nodeid=node.gateway.id, outcome="failed", longrepr=msg, result=[])
                self.config.hook.pytest_collectreport(report=report)
        return same
