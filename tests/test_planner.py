"""The duration planner, unit by unit, and against simulated xdist workers that keep xdist's
worker protocol (a worker starts test i once it holds test i + 1 or was told to stop; a steal
takes all the requested tests still in its queue, or none; the controller hears of each test
as it starts) and isolate's serial gate (a serial test starts once no other test runs, and
no test starts while one runs)."""

from __future__ import annotations

import heapq
import json
import math
import random
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from isolate._dist.durations import (
    estimates,
    merge,
    read_split_file,
    scaled_cpu,
    strip_group,
    write_split_file,
)
from isolate._dist.planner import HEAVY_CORES, Planner, Send, Shutdown, Steal

STOP = -1


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Worker:
    name: str
    torun: deque[int] = field(default_factory=deque)
    next: int | None = None
    running: int | None = None
    ran: list[tuple[int, float, float]] = field(default_factory=list)  # index, start, end
    gone: bool = False


class Sim:
    """Simulated xdist: workers, the controller's event loop, a clock that jumps."""

    def __init__(self, durations: list[float], workers: int, known: list[float | None] | None = None,
                 serial: tuple[int, ...] = (), crash: set[int] | None = None, restarts: int = 0,
                 cpu: list[float] | None = None, cores: float = math.inf,
                 arrivals: tuple[float, ...] = (), groups: list[str] | None = None,
                 report_starts: bool = True) -> None:  # fmt: skip
        self.clock = Clock()
        self.serial = set(serial)
        self.report_starts = report_starts
        self.begun: list[int] = []  # started, not yet reported to the planner
        self.planner: Planner[str] = Planner(clock=self.clock, cores=cores)
        self.durations = durations
        self.crash = crash or set()
        self.restarts = restarts
        self.workers: dict[str, Worker] = {}
        self.events: list[tuple[float, int, str]] = []  # finish time, seq, worker
        self.seq = 0
        self.crashed: list[int] = []
        self.shutting_down = False
        # Workers past the first ``workers - len(arrivals)`` join at their arrival times.
        self.coming = len(arrivals)
        self.named = workers
        self.planner.expect(self.coming)
        for n in range(workers - self.coming):
            self._add(f"gw{n}")
        self.apply(self.planner.load(durations if known is None else known, serial, cpu or (), groups or ()))
        for n, at in enumerate(arrivals, start=workers - self.coming):
            heapq.heappush(self.events, (at, -1, f"gw{n}"))

    def _add(self, name: str) -> None:
        self.workers[name] = Worker(name)
        self.apply(self.planner.add_node(name))

    def apply(self, actions: list[object]) -> None:
        for action in actions:
            assert isinstance(action, Send | Steal | Shutdown)
            worker = self.workers[action.node]
            if isinstance(action, Send):
                worker.torun.extend(action.indices)
            elif isinstance(action, Shutdown):
                worker.torun.append(STOP)
            else:
                wanted = set(action.indices)
                stolen = [i for i in worker.torun if i in wanted]
                if len(stolen) == len(wanted):
                    worker.torun = deque(i for i in worker.torun if i not in wanted)
                else:
                    stolen = []
                self.apply(self.planner.unscheduled(worker.name, stolen))
        for worker in list(self.workers.values()):
            self.advance(worker)
        while self.begun:
            self.apply(self.planner.started(self.begun.pop()))
        if self.planner.finished and not self.shutting_down:  # DSession.triggershutdown
            self.shutting_down = True
            for name in self.planner.nodes:
                self.planner.close(name)
                self.workers[name].torun.append(STOP)
                self.advance(self.workers[name])

    def advance(self, worker: Worker) -> None:
        if worker.gone or worker.running is not None:
            return
        if worker.next is None:
            if not worker.torun:
                return
            worker.next = worker.torun.popleft()
        if worker.next == STOP:
            worker.gone = True
            crashed, actions = self.planner.remove_node(worker.name)
            assert crashed is None
            self.apply(actions)
            return
        if not worker.torun:
            return  # holds one test: waits for the next or for the stop
        others = [w.running for w in self.workers.values() if w is not worker and w.running is not None]
        if any(i in self.serial for i in others) or (others and worker.next in self.serial):
            return  # the serial gate; tried again as the other tests end
        worker.running, worker.next = worker.next, worker.torun.popleft()
        if self.report_starts:
            self.begun.append(worker.running)
        end = self.clock.now + self.durations[worker.running]
        worker.ran.append((worker.running, self.clock.now, end))
        self.seq += 1
        heapq.heappush(self.events, (end, self.seq, worker.name))

    def run(self) -> float:
        while self.events:
            self.clock.now, seq, name = heapq.heappop(self.events)
            if seq == -1:  # a worker arrives
                self.coming -= 1
                self.planner.expect(self.coming)
                self._add(name)
                continue
            worker = self.workers[name]
            index, worker.running = worker.running, None
            assert index is not None
            if index in self.crash:
                self.crash.discard(index)
                worker.gone = True
                crashed, actions = self.planner.remove_node(name)
                self.crashed.append(crashed)  # type: ignore[arg-type]
                self.apply(actions)
                if self.restarts:
                    self.restarts -= 1
                    self.shutting_down = False
                    self._add(f"gw{self.named}")  # after the workers still to arrive
                    self.named += 1
                continue
            self.apply(self.planner.complete(name, index, self.durations[index]))
        assert all(w.gone for w in self.workers.values()), "a worker was never told to stop"
        return self.clock.now

    def runs(self) -> list[tuple[int, float, float]]:
        return sorted((r for w in self.workers.values() for r in w.ran), key=lambda r: r[1])

    def ran_once(self) -> list[int]:
        return sorted(index for index, _, _ in self.runs())


def test_longest_first_to_the_node_free_first() -> None:
    clock = Clock()
    planner: Planner[str] = Planner(clock=clock, horizon=0)
    planner.add_node("a")
    planner.add_node("b")
    actions = planner.load([1, 5, 3, 2, 4, 10])
    assert actions == [Send("a", (5, 2)), Send("b", (1, 4))]  # 10 and 3 on a, 5 and 4 on b
    assert planner.remaining("a") == 13 and planner.remaining("b") == 9
    clock.now = 5
    assert planner.complete("b", 1, 5.0) == [Send("b", (3,))]  # b (4 left) is free before a (8)


def test_while_nodes_still_collect_the_first_ones_hold_only_what_they_run() -> None:
    planner: Planner[str] = Planner(horizon=10)
    planner.expect(1)  # b still collects
    planner.add_node("a")
    # the longest, and the shortest to let it start (not the horizon, nor 0.5 s behind 0.6 s)
    assert planner.load([0.1, 0.2, 0.3, 0.4, 0.5, 0.6]) == [Send("a", (5, 0))]
    planner.expect(0)
    assert planner.add_node("b") == [Send("b", (4, 3, 1)), Send("a", (2,))]  # all in: longest first
    # as before: with every node in, a node fills its horizon
    planner = Planner(horizon=10)
    planner.add_node("a")
    assert planner.load([0.1, 0.2, 0.3]) == [Send("a", (2, 1, 0))]


def test_a_node_on_a_long_test_takes_nothing_more_while_it_runs() -> None:
    clock = Clock()
    planner: Planner[str] = Planner(clock=clock)  # the default horizon
    planner.expect(1)
    planner.add_node("a")
    assert planner.load([5.0, 1.0, 1.0, 1.0, 0.1, 0.1]) == [Send("a", (0, 5))]  # its filler behind
    planner.expect(0)
    # b comes: a would run out of tests to start only in 5 s, so the 1 s tests are not tied
    # to it (should the 5 s test run long, they would wait behind it): they stay pooled.
    assert planner.add_node("b") == [Send("b", (1, 2))]
    clock.now = 1.0
    assert planner.complete("b", 1, 1.0) == [Send("b", (3,))]
    clock.now = 4.6  # a test this long may run past its estimate: a still takes nothing
    assert planner.complete("b", 2, 3.6) == [Send("b", (4,))]
    assert planner.pending("a") == [0, 5]
    clock.now = 5.0  # a's test ends: its filler runs once it holds one more, or is told to stop
    assert planner.complete("a", 0, 5.0) == [Shutdown("a")]


def test_nodes_that_join_late_still_get_long_tests() -> None:
    # the four 5 s tests on four workers that join over 0.6 s: one each, not two on the first
    durations = [5.0] * 4 + [0.1] * 20
    sim = Sim(durations, workers=4, arrivals=(0.2, 0.4, 0.6))
    assert sim.run() < 5.0 + 0.6 + 0.5
    assert sim.ran_once() == list(range(24))
    assert len({worker.name for worker in sim.workers.values() for index, _, _ in worker.ran if index < 4}) == 4


@pytest.mark.parametrize("known", [[5.0, 5.0], None])
def test_a_small_suite_waits_for_the_node_still_collecting(known: list[float] | None) -> None:
    # two 5 s tests, two workers, the second 0.3 s late: one each, not both on the first
    sim = Sim([5.0, 5.0], workers=2, known=known or [None, None], arrivals=(0.3,))
    assert sim.run() == pytest.approx(5.3)
    assert [len(worker.ran) for worker in sim.workers.values()] == [1, 1]


def test_lpt_makespan_with_history() -> None:
    durations = [1.0] * 12 + [6.0, 5.0, 4.0, 3.0]
    sim = Sim(durations, workers=4)
    assert sim.run() == pytest.approx(8.0)  # 30 s of whole seconds on 4 workers: 8 is the best
    assert sim.ran_once() == list(range(16))
    first = {index for index, start, _ in sim.runs() if start == 0}
    assert first == {12, 13, 14, 15}


def test_without_history_it_steals_by_expected_time() -> None:
    # No history: every test looks alike; test 0 turns out to take 10 s. Its worker's queued
    # tests move to the others, so the run ends with test 0 and not after it.
    durations = [10.0] + [0.2] * 39
    sim = Sim(durations, workers=4, known=[None] * 40)
    makespan = sim.run()
    assert sim.ran_once() == list(range(40))
    assert makespan < 10.6
    slow_worker = next(w for w in sim.workers.values() if any(i == 0 for i, _, _ in w.ran))
    assert len(slow_worker.ran) <= 2  # its test, and the next it already held


def test_steal_balances_and_keeps_the_two_running_tests() -> None:
    clock = Clock()
    planner: Planner[str] = Planner(clock=clock, horizon=100)
    planner.add_node("a")
    planner.load([1.0] * 10)
    actions = planner.add_node("b")
    assert actions == [Steal("a", (5, 6, 7, 8, 9))]  # a keeps 5 s, b gets 5 s
    assert not planner.finished
    # a's worker had already started more than we knew: it gives nothing back; asked again
    # (a's queue is unchanged in the planner), the same request goes out.
    assert planner.unscheduled("a", []) == [Steal("a", (5, 6, 7, 8, 9))]
    assert planner.unscheduled("a", [5, 6, 7, 8, 9]) == [Send("b", (5, 6, 7, 8, 9))]
    assert planner.pending("a") == [0, 1, 2, 3, 4]


def test_nothing_is_stolen_when_it_would_not_help() -> None:
    clock = Clock()
    planner: Planner[str] = Planner(clock=clock, horizon=100)
    planner.add_node("a")
    planner.load([1.0, 1.0])
    assert planner.add_node("b") == [Shutdown("b")]  # a's two tests stay (it runs them)


def test_serial_tests_last_and_alone_on_one_worker() -> None:
    durations = [0.5] * 20 + [1.0, 1.0, 1.0]
    sim = Sim(durations, workers=4, serial=(20, 21, 22))
    sim.run()
    assert sim.ran_once() == list(range(23))
    runs = sim.runs()
    parallel_end = max(end for index, _, end in runs if index < 20)
    serial = [(start, end, name) for name, w in sim.workers.items() for index, start, end in w.ran if index >= 20]
    assert min(start for start, _, _ in serial) >= parallel_end
    assert len({name for _, _, name in serial}) == 1


@pytest.mark.parametrize("report_starts", [True, False])
def test_the_keeper_s_last_parallel_test_runs_beside_the_others_last_ones(report_starts: bool) -> None:
    # gw1 is the last one down to a test it cannot start yet (xdist starts a test once the
    # worker holds the next): the keeper. Told of gw0's last test starting, the planner
    # sends it the serial test at once, so its last test runs beside gw0's (the serial gate
    # holds the serial test until gw0's ends); without the start, only after gw0's ends.
    durations = [3.0, 2.5, 1.0, 1.0, 0.5]
    sim = Sim(durations, workers=2, serial=(4,), report_starts=report_starts)
    end = sim.run()
    assert sim.ran_once() == list(range(5))
    runs = sim.runs()
    parallel_end = max(end for index, _, end in runs if index != 4)
    (serial_start,) = (start for index, start, _ in runs if index == 4)
    assert serial_start >= parallel_end
    assert end == (4.5 if report_starts else 5.0)


@pytest.mark.parametrize("arrivals", [(0.1, 0.3), (0.1, 9.0)])
def test_serial_tests_stay_last_and_alone_when_workers_join_late(arrivals: tuple[float, ...]) -> None:
    # the last worker joins while the parallel tests run, or once everything has run
    durations = [0.5] * 12 + [1.0, 1.0]
    sim = Sim(durations, workers=3, serial=(12, 13), arrivals=arrivals)
    sim.run()
    assert sim.ran_once() == list(range(14))
    parallel_end = max(end for index, _, end in sim.runs() if index < 12)
    serial = [(start, name) for name, w in sim.workers.items() for index, start, _ in w.ran if index >= 12]
    assert min(start for start, _ in serial) >= parallel_end
    assert len({name for _, name in serial}) == 1


def test_a_crashed_worker_s_tests_go_to_the_others_and_the_crash_is_reported() -> None:
    durations = [0.3] * 40
    sim = Sim(durations, workers=4, crash={7}, restarts=1)
    sim.run()
    assert sim.crashed == [7]
    assert sim.ran_once() == list(range(40))  # 7 ran (and crashed) once; nothing twice


def test_a_crash_in_the_serial_phase_hands_the_rest_to_the_replacement() -> None:
    durations = [0.2] * 8 + [1.0, 1.0, 1.0]
    sim = Sim(durations, workers=2, serial=(8, 9, 10), crash={9}, restarts=1)
    sim.run()
    assert sim.crashed == [9]
    assert sim.ran_once() == list(range(11))
    last = sim.runs()[-1]
    assert last[0] == 10 and last[1] >= max(end for index, _, end in sim.runs() if index < 8)


@pytest.mark.parametrize("seed", range(200))
def test_random_suites_run_each_test_once_and_near_the_bound(seed: int) -> None:
    rng = random.Random(seed)
    count, workers = rng.randint(1, 60), rng.randint(1, 6)
    durations = [rng.choice([0.01, 0.1, 0.5, 2.0, 5.0]) * rng.random() for _ in range(count)]
    known: list[float | None] = [d if rng.random() < 0.7 else None for d in durations]
    serial = tuple(i for i in range(count) if rng.random() < 0.1)
    # in half of them, workers but the first join over the first second, as xdist starts them
    arrivals = tuple(sorted(rng.random() for _ in range(workers - 1))) if seed % 2 else ()
    groups = [f"f{rng.randint(0, 3)}" for _ in range(count)] if seed % 3 else None
    sim = Sim(durations, workers, known=known, serial=serial, arrivals=arrivals, groups=groups)
    makespan = sim.run()
    assert sim.ran_once() == list(range(count))
    parallel = sum(durations[i] for i in range(count) if i not in serial)
    longest = max((durations[i] for i in range(count) if i not in serial), default=0.0)
    # Graham's list-scheduling bound for the parallel part, plus one more longest test: a
    # worker holds the test after the one it runs (xdist's protocol), so a misjudged pair
    # stays together; then the serial tests one after another.
    bound = parallel / workers + 2 * longest + sum(durations[i] for i in serial) + max(arrivals, default=0.0)
    assert makespan <= bound + 1e-9


def test_unseen_tests_get_the_median_of_known_ones() -> None:
    planner: Planner[str] = Planner(clock=Clock())
    planner.load([1.0, None, 3.0, 10.0])
    assert planner.estimate(1) == 3.0
    without: Planner[str] = Planner(clock=Clock())
    without.load([None, None])
    assert without.estimate(0) == 1.0
    without.add_node("a")
    without.complete("a", 0, 0.25)
    assert without.estimate(1) == 0.25  # learnt from this run, with no history at all


def test_unseen_tests_get_the_median_of_their_file() -> None:
    planner: Planner[str] = Planner(clock=Clock())
    planner.load([1.0, None, 3.0, 10.0, None], groups=["a", "a", "b", "b", "c"])
    assert planner.estimate(1) == 1.0  # its file's known test
    assert planner.estimate(4) == 3.0  # a file with none known: the median of all
    # With no history, the first finished test of a file tells what its others take: a
    # slow file's test moves ahead of a fast one that comes first in the collection.
    clock = Clock()
    fresh: Planner[str] = Planner(clock=clock, horizon=0)
    fresh.add_node("w")
    assert fresh.load([None] * 5, groups=["fast", "slow", "fast", "fast", "slow"]) == [Send("w", (0, 1))]
    clock.now = 0.1
    assert fresh.complete("w", 0, 0.1) == [Send("w", (2,))]  # all alike so far: collection order
    clock.now = 3.1
    assert fresh.complete("w", 1, 3.0) == [Send("w", (4,))]  # 4 (slow) before 3 (fast)
    assert fresh.estimate(3) == 0.1 and fresh.estimate(4) == 3.0


def test_without_history_learning_by_file_ends_sooner_on_average() -> None:
    # suites of files whose tests take alike, in random order, no history: what a file's
    # first test took orders its others (fixed seeds: the same suites every time)
    ratios: dict[bool, list[float]] = {False: [], True: []}
    for seed in range(100):
        rng = random.Random(seed)
        files = [(f"f{k}", rng.choice([0.02, 0.1, 0.5, 2.0, 5.0])) for k in range(rng.randint(2, 8))]
        tests = [(name, base * rng.uniform(0.5, 1.5)) for name, base in files for _ in range(rng.randint(1, 20))]
        rng.shuffle(tests)
        durations, groups = [t for _, t in tests], [f for f, _ in tests]
        workers = rng.randint(2, 6)
        bound = max(sum(durations) / workers, max(durations))
        for grouped in (False, True):
            sim = Sim(durations, workers, known=[None] * len(durations), groups=groups if grouped else None)
            ratios[grouped].append(sim.run() / bound)
            assert sim.ran_once() == list(range(len(durations)))
    better = sum(g < u - 1e-9 for u, g in zip(ratios[False], ratios[True], strict=True))
    worse = sum(g > u + 1e-9 for u, g in zip(ratios[False], ratios[True], strict=True))
    assert better > 2 * worse
    assert sum(ratios[True]) < sum(ratios[False])


def test_durations_helpers(tmp_path: Path) -> None:
    assert estimates(["a", "b", "c"], {"a": 1.5, "c": -1, "z": 3}) == [1.5, None, None]
    assert merge({"a": 1.0, "b": 2.0}, {"b": 5.0}) == {"a": 1.0, "b": 5.0}
    assert strip_group("t.py::test_x@grp") == "t.py::test_x"
    assert strip_group("t.py::test_x[a@b]") == "t.py::test_x[a@b]"
    path = tmp_path / ".test_durations"
    path.write_text(json.dumps([["old.py::test_o", 4.0], ["t.py::test_a", 9.0]]))  # the old list form
    written = write_split_file(path, {"t.py::test_a": 0.5, "t.py::test_b": 1.25})
    assert written == {"old.py::test_o": 4.0, "t.py::test_a": 0.5, "t.py::test_b": 1.25}
    assert json.loads(path.read_text()) == written
    assert list(json.loads(path.read_text())) == sorted(written)
    path.write_text("{not json")
    assert read_split_file(path) == {}


def test_cpu_time_is_scaled_over_the_whole_test() -> None:
    # computing throughout, a third of a CPU: all of its duration
    assert scaled_cpu(0.1, 0.3, 0.2) == pytest.approx(0.3)
    # a setup that computed 20 ms and waited 40 ms for a CPU, then a 0.4 s wait: ~5%, not
    # the 60 ms of the setup (heavy) that scaling the setup on its own would say
    assert scaled_cpu(0.02, 0.46, 0.04) / 0.46 == pytest.approx(0.02 / 0.42)
    assert scaled_cpu(0.02, 0.42, 0.0) == 0.02  # an idle machine: as measured
    assert scaled_cpu(0.0, 0.0, 0.0) == 0.0
    assert scaled_cpu(0.05, 0.05, 0.2) == pytest.approx(0.05)  # clocks that disagree: never more than its duration


@pytest.mark.parametrize("seed", range(200))
def test_with_full_history_the_run_ends_within_grahams_bound(seed: int) -> None:
    rng = random.Random(seed)
    count, workers = rng.randint(1, 60), rng.randint(1, 6)
    durations = [rng.choice([0.01, 0.1, 0.5, 2.0, 5.0]) * rng.random() for _ in range(count)]
    sim = Sim(durations, workers)
    assert sim.run() <= sum(durations) / workers + max(durations) + 1e-9
    assert sim.ran_once() == list(range(count))


class CpuSim(Sim):
    """``Sim`` on a machine of ``cores`` CPUs: a heavy test keeps ``HEAVY_CORES`` of them busy
    (its worker, the service answering it), so while the heavy tests running need more than
    there are, they share them and each takes longer (light tests mostly wait and keep
    their pace). Time moves in small steps."""

    STEP = 0.005

    def __init__(self, durations: list[float], heavy: set[int], workers: int, cores: int, aware: bool) -> None:
        self.heavy, self.cores = heavy, cores
        self.left: dict[str, float] = {}  # worker -> work left on the test it runs
        cpu = [d if i in heavy else 0.01 * d for i, d in enumerate(durations)] if aware else None
        super().__init__(durations, workers, cpu=cpu, cores=cores)

    def advance(self, worker: Worker) -> None:
        if worker.gone or worker.running is not None:
            return
        before = len(worker.ran)
        super().advance(worker)
        if len(worker.ran) > before:  # it started a test: run it by the step, not by an event
            self.events.clear()
            assert worker.running is not None
            self.left[worker.name] = self.durations[worker.running]

    def run(self) -> float:
        while self.left:
            running_heavy = sum(1 for name in self.left if self.workers[name].running in self.heavy)
            share = min(1.0, self.cores / (HEAVY_CORES * running_heavy)) if running_heavy else 1.0
            self.clock.now += self.STEP
            for name in list(self.left):
                worker = self.workers[name]
                self.left[name] -= self.STEP * (share if worker.running in self.heavy else 1.0)
                if self.left[name] <= 1e-9:
                    del self.left[name]
                    index, worker.running = worker.running, None
                    assert index is not None
                    self.apply(self.planner.complete(name, index, self.durations[index]))
        assert all(w.gone for w in self.workers.values()), "a worker was never told to stop"
        return self.clock.now


def contended_suite() -> tuple[list[float], set[int]]:
    """The shape of an integration suite: many short tests that keep the CPU busy (requests
    to the service), a few long ones that mostly wait (restarts, timeouts)."""
    light = [5.0, 3.0, 2.0, 2.0, 2.0, 1.5, 1.5, 1.0, 1.0, 1.0, 1.0, 1.0, 0.8, 0.8, 0.8, 0.8] * 2
    heavy = [0.05] * 200
    return light + heavy, set(range(len(light), len(light) + len(heavy)))


def test_cpu_heavy_tests_run_beside_the_waiting_ones_not_all_at_the_end() -> None:
    durations, heavy = contended_suite()
    blind = CpuSim(durations, heavy, workers=4, cores=2, aware=False)
    aware = CpuSim(durations, heavy, workers=4, cores=2, aware=True)
    blind_end, aware_end = blind.run(), aware.run()
    assert blind.ran_once() == aware.ran_once() == list(range(len(durations)))
    bound = sum(durations) / 4  # no CPU is short of work if the heavy tests never pile up
    # Longest first alone ends with 200 heavy tests on 4 workers sharing 2 cores.
    assert blind_end > 1.1 * bound
    assert aware_end < 1.05 * bound < blind_end
    # Never more workers on heavy tests than the cores feed (one here), until only heavy
    # tests are left.
    last_light = max(end for index, _, end in aware.runs() if index not in heavy)
    for index, start, _ in aware.runs():
        if index in heavy and start < last_light:
            at_once = {
                name for name, w in aware.workers.items()
                for i, s, e in w.ran if i in heavy and s <= start < e
            }  # fmt: skip
            assert len(at_once) <= 1, (start, at_once)


def test_heavy_tests_get_their_share_of_the_nodes() -> None:
    planner: Planner[str] = Planner(clock=Clock(), horizon=0, cores=2)
    for name in "abcd":
        planner.add_node(name)
    durations = [4.0] * 8 + [0.5] * 8  # 32 s light, 4 s heavy: 1 node of 4
    cpu = [0.1] * 8 + [0.45] * 8
    actions = planner.load(durations, (), cpu)
    sent = {a.node: a.indices for a in actions if isinstance(a, Send)}
    assert sorted(len([i for i in held if i >= 8]) for held in sent.values()) == [0, 0, 0, 2]
    assert sorted(len([i for i in held if i < 8]) for held in sent.values()) == [0, 2, 2, 2]


def test_with_a_core_per_node_or_no_cpu_history_it_is_longest_first() -> None:
    durations = [3.0, 0.2, 2.0, 0.3, 1.0]
    cpu = [0.0, 0.2, 0.0, 0.3, 0.0]
    for cores, used in ((4, cpu), (1, [])):
        planner: Planner[str] = Planner(clock=Clock(), horizon=0, cores=cores)
        planner.add_node("a")
        planner.add_node("b")
        assert planner.load(durations, (), used) == [Send("a", (0, 3)), Send("b", (2, 4))]


@pytest.mark.parametrize("seed", range(100))
def test_random_suites_with_cpu_history_run_each_test_once(seed: int) -> None:
    rng = random.Random(seed)
    count, workers, cores = rng.randint(1, 60), rng.randint(1, 6), rng.randint(1, 4)
    durations = [rng.choice([0.01, 0.1, 0.5, 2.0]) * rng.random() for _ in range(count)]
    cpu = [d * rng.random() for d in durations]
    serial = tuple(i for i in range(count) if rng.random() < 0.1)
    arrivals = tuple(sorted(rng.random() for _ in range(workers - 1))) if seed % 2 else ()
    sim = Sim(durations, workers, serial=serial, cpu=cpu, cores=cores, crash={0} if seed % 7 == 0 else None,
              restarts=1, arrivals=arrivals)  # fmt: skip
    sim.run()
    assert sim.ran_once() == list(range(count))


def test_the_planner_s_work_per_test_does_not_grow_with_the_queues(monkeypatch: pytest.MonkeyPatch) -> None:
    # Thousands of short tests on 16 workers: each hand-out asks every node what it holds.
    # Summed afresh, that was a walk over every queue (up to 64 tests each) per test,
    # ~1,400 estimates per test here; kept as the queues change, a few per node.
    rng = random.Random(1)
    durations = [rng.uniform(0.001, 0.02) for _ in range(4000)]
    cpu = [d * rng.choice([0.0, 0.5]) for d in durations]
    asked = 0
    estimate = Planner.estimate

    def counted(self: Planner[str], index: int) -> float:
        nonlocal asked
        asked += 1
        return estimate(self, index)

    monkeypatch.setattr(Planner, "estimate", counted)
    workers = 16
    sim = Sim(durations, workers, cpu=cpu, cores=2)
    sim.run()
    assert sorted(i for w in sim.workers.values() for i, _, _ in w.ran) == list(range(4000))
    assert asked / len(durations) < 10 * workers, asked / len(durations)
