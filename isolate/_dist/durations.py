"""Test durations: the estimates a run starts from, and pytest-split's ``.test_durations``.

History is a mapping of test id (pytest's node id) to seconds, the sum of a test's setup,
call and teardown as its reports give them, as pytest-split measures. isolate keeps it in
pytest's cache and, on request, writes it where pytest-split reads it.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

__all__ = ["estimates", "merge", "read_split_file", "strip_group", "write_split_file"]

log = logging.getLogger(__name__)


def estimates(collection: Sequence[str], history: Mapping[str, float]) -> list[float | None]:
    """The recorded duration of each test of ``collection``, ``None`` for one never seen."""
    result: list[float | None] = []
    for nodeid in collection:
        value = history.get(nodeid)
        result.append(float(value) if isinstance(value, int | float) and value >= 0 else None)
    return result


def merge(history: Mapping[str, float], measured: Mapping[str, float]) -> dict[str, float]:
    """``history`` with this run's ``measured`` durations in place of the old ones (tests
    that did not run this time keep theirs)."""
    merged = {k: float(v) for k, v in history.items() if isinstance(v, int | float)}
    merged.update(measured)
    return merged


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
