"""Test durations: the estimates a run starts from (and :class:`ExpectedDurations`, what
they become as tests finish), and pytest-split's ``.test_durations``.

History is a mapping of test id (pytest's node id) to seconds, the sum of a test's setup,
call and teardown as its reports give them, as pytest-split measures. isolate keeps it in
pytest's cache and, on request, writes it where pytest-split reads it.
"""

from __future__ import annotations

import json
import logging
import os
import statistics
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path

__all__ = ["ExpectedDurations", "estimates", "merge", "read_split_file", "scaled_cpu", "strip_group", "write_split_file"]

log = logging.getLogger(__name__)


def estimates(collection: Sequence[str], history: Mapping[str, float]) -> list[float | None]:
    """The recorded duration of each test of ``collection``, ``None`` for one never seen."""
    result: list[float | None] = []
    for nodeid in collection:
        value = history.get(nodeid)
        result.append(float(value) if isinstance(value, int | float) and value >= 0 else None)
    return result


class ExpectedDurations:
    """What each test of a run is expected to take, and how that changes as tests finish.

    A test's duration, once known (from history, or measured in this run), is its
    estimate. A test never seen is expected to take the median of its group's known
    durations (a group is what the caller says, its file: a file's tests take about as long
    as each other), else the median of all the known estimates, or 1 s if none is known
    (and then the median of this run's finished tests). The medians move at 1, 2, 4, 8...
    samples, so that a caller re-ordering by them does so only then.
    """

    def __init__(self, known: Sequence[float | None] = (), groups: Sequence[Hashable] = ()) -> None:
        values = [max(e, 0.0) for e in known if e is not None]
        self._default = statistics.median(values) if values else 1.0
        self._observed: list[float] | None = None if values else []  # learning the default
        self._value = [None if e is None else max(e, 0.0) for e in known]
        ids: dict[Hashable, int] = {}
        self._group = [ids.setdefault(key, len(ids)) for key in groups[: len(known)]]
        self._group += [-1] * (len(known) - len(self._group))  # -1: in no group
        self._members: list[list[int]] = [[] for _ in ids]
        self._samples: list[list[float]] = [[] for _ in ids]
        for i, (group, value) in enumerate(zip(self._group, self._value, strict=True)):
            if group >= 0:
                self._members[group].append(i)
                if value is not None:
                    self._samples[group].append(value)
        self._median = [statistics.median(samples) if samples else None for samples in self._samples]

    def __call__(self, index: int) -> float:
        value = self._value[index]
        if value is not None:
            return value
        group = self._group[index]
        median = self._median[group] if group >= 0 else None
        return self._default if median is None else median

    def known(self, index: int) -> bool:
        """Whether test ``index`` has a duration of its own (history, or it ran)."""
        return self._value[index] is not None

    def learn(self, index: int, duration: float) -> tuple[bool, Sequence[int]]:
        """Test ``index`` took ``duration``. What moved: whether the default did (then every
        test never seen may have), and the tests whose group's median did."""
        duration = max(duration, 0.0)
        seen, self._value[index] = self._value[index] is not None, duration
        observed = self._observed
        everything = observed is not None and _sampled(observed, duration)
        if everything and observed is not None:
            self._default = statistics.median(observed)
        group = self._group[index]
        if group < 0 or seen or not _sampled(self._samples[group], duration):
            return everything, ()
        self._median[group] = statistics.median(self._samples[group])
        return everything, self._members[group]


def _sampled(samples: list[float], value: float) -> bool:
    """Add ``value``; whether the median is due again (at 1, 2, 4, 8... samples)."""
    samples.append(value)
    return len(samples) & (len(samples) - 1) == 0


def merge(history: Mapping[str, float], measured: Mapping[str, float]) -> dict[str, float]:
    """``history`` with this run's ``measured`` durations in place of the old ones (tests
    that did not run this time keep theirs)."""
    merged = {k: float(v) for k, v in history.items() if isinstance(v, int | float)}
    merged.update(measured)
    return merged


def scaled_cpu(cpu: float, duration: float, waited: float) -> float:
    """A test's CPU time as it would be with a CPU free for it: ``cpu * duration /
    (duration - waited)``, its share of the time it could run (not waiting for a CPU) times
    its duration. Over the whole test, not phase by phase: a fixture's short computing
    setup that waited for a CPU on a busy machine is all CPU within its phase, and scaled
    on its own it would make a test that then sleeps look as if it computed throughout."""
    could_run = max(duration - waited, cpu)
    return cpu * duration / could_run if could_run > 0 else cpu


def strip_group(nodeid: str) -> str:
    """A node id without the ``@group`` suffix that ``--dist loadgroup`` adds (xdist's rule:
    an ``@`` after the last ``]``)."""
    at = nodeid.rfind("@")
    return nodeid[:at] if at > nodeid.rfind("]") else nodeid


def read_split_file(path: Path) -> dict[str, float]:
    """A ``.test_durations`` file: pytest-split's JSON object (or its older list of
    ``[nodeid, seconds]`` pairs); empty if missing or unreadable."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        log.warning("isolate: ignoring unreadable durations file %s: %s", path, exc)
        return {}
    pairs = data.items() if isinstance(data, dict) else data if isinstance(data, list) else []
    result = {}
    for pair in pairs:
        if len(pair) == 2 and isinstance(pair[0], str) and isinstance(pair[1], int | float):
            result[pair[0]] = float(pair[1])
    return result


def write_split_file(path: Path, measured: Mapping[str, float]) -> dict[str, float]:
    """Merge ``measured`` into the ``.test_durations`` file at ``path`` (pytest-split's
    format: one JSON object, test id -> seconds, keys sorted). Returns what was written."""
    durations = merge(read_split_file(path), measured)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(durations, sort_keys=True, indent=4) + "\n")
    tmp.replace(path)
    return durations
