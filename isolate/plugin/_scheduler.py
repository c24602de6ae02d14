"""xdist's side of ``--isolate-dist=duration``: :class:`DurationScheduling` follows xdist's
scheduler protocol (``xdist.scheduler.protocol.Scheduling``, the contract ``load`` keeps)
and carries out what the pure :class:`~isolate._dist.planner.Planner` decides."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import pytest
from xdist.remote import Producer
from xdist.report import report_collection_diff
from xdist.workermanage import WorkerController, parse_tx_spec_config

from .._dist.durations import estimates
from .._dist.planner import Action, Planner, Send, Shutdown, Steal
from .._run.slots import usable_cores

__all__ = ["DurationScheduling"]


class DurationScheduling:
    """Longest first from recorded durations, work stealing by expected time, serial tests
    last and alone (see :mod:`isolate._dist.planner`).

    Like ``load``: every node collects, the collections must be the same, each test runs
    once, and a crashed node's tests go to the others (its current one is reported as the
    crash). Unlike ``load``, a node starts on its tests as soon as it has collected, not once
    every node has: the first collection is the run's, and each later one joins if it is
    the same. A node that collected something else is reported as a collection error and
    the run ends, as ``load`` ends it. ``history`` maps test ids to seconds;
    ``serial_ids`` names the serial tests once a node has collected (each worker records
    them); ``cpu`` maps test ids to the CPU seconds their worker spent on them, and the
    machine's cores bound how many CPU-heavy tests run at once.
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
        self.collection: list[str] | None = None
        self._index: dict[str, int] = {}  # the collection's test ids, to their indices
        self.planner: Planner[WorkerController] = Planner(cores=usable_cores())
        self._waiting: list[WorkerController] = []  # added, their collection not yet in
        self._first: WorkerController | None = None  # whose collection is the run's
        self._collected = 0  # collections in, the initial nodes' and their replacements'
        self._all_in = False  # every initial node collected: xdist shows the status line now
        self._aborted = False  # collections differ: the run ends
        self._history = history
        self._serial_ids = serial_ids
        self._cpu = cpu or {}

    @property
    def nodes(self) -> list[WorkerController]:
        return self._waiting + self.planner.nodes

    @property
    def collection_is_completed(self) -> bool:
        """A node collected: xdist may call :meth:`schedule` (each later node joins as it
        collects)."""
        return self.collection is not None

    @property
    def tests_finished(self) -> bool:
        if self._aborted:
            return True
        return self._collected >= self.numnodes and self.planner.finished

    @property
    def has_pending(self) -> bool:
        # xdist asks this only to show its "N workers [M items]" line when it is False at a
        # collection: as with ``load``, that is once every initial node has collected.
        return self.planner.has_pending and not self._all_in

    def add_node(self, node: WorkerController) -> None:
        assert node not in self.nodes
        self._waiting.append(node)

    def add_node_collection(self, node: WorkerController, collection: Sequence[str]) -> None:
        assert node in self._waiting
        self._collected += 1
        self._all_in = self._collected == self.numnodes
        if self.collection is None:
            self.collection, self._first = list(collection), node
            for i, nodeid in enumerate(self.collection):
                self._index.setdefault(nodeid, i)  # a duplicated id: its first, as list.index
            serial = self._serial_ids()
            indices = [i for i, nodeid in enumerate(self.collection) if nodeid in serial]
            files = [nodeid.partition("::")[0] for nodeid in self.collection]
            self._do(self.planner.load(
                estimates(self.collection, self._history), indices, estimates(self.collection, self._cpu), files
            ))  # fmt: skip
        elif list(collection) != self.collection:
            self._abort(node, collection)
        if self._aborted:
            return
        self._waiting.remove(node)
        self.planner.expect(self.numnodes - self._collected)
        self._do(self.planner.add_node(node))

    def schedule(self) -> None:
        self._all_in = False
        if not self._aborted:
            self._do(self.planner.balance())

    def mark_test_complete(self, node: WorkerController, item_index: int, duration: float = 0) -> None:
        self._sync()
        self._do(self.planner.complete(node, item_index, duration))

    def mark_test_pending(self, item: str) -> None:
        assert self.collection is not None
        self._sync()
        self._do(self.planner.requeue(self._index[item]))

    def mark_test_started(self, nodeid: str) -> None:
        """A worker began ``nodeid`` (the controller's ``pytest_runtest_logstart``; not part
        of xdist's protocol): the serial tests wait for it (:meth:`Planner.started`)."""
        index = self._index.get(nodeid)
        if index is not None and not self._aborted:
            self._sync()
            self._do(self.planner.started(index))

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

    def _abort(self, node: WorkerController, collection: Sequence[str]) -> None:
        """As xdist's ``load``: a node that collected other tests is a collection error, and
        the run ends (the nodes run out what they hold)."""
        assert self.collection is not None and self._first is not None
        msg = report_collection_diff(self.collection, list(collection), self._first.gateway.id, node.gateway.id)
        self.log(msg)
        self.log("**Different tests collected, aborting run**")
        report: Any = pytest.CollectReport(nodeid=node.gateway.id, outcome="failed", longrepr=msg, result=[])
        self.config.hook.pytest_collectreport(report=report)
        self._aborted = True
