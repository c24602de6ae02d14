"""``--isolate-collect-slots`` in pytest: the controller tells its workers how many may
collect at once, each worker takes its turn around its conftests and collection (see
:mod:`isolate._run.slots`)."""

from __future__ import annotations

from pathlib import Path

import pytest

from .._config import Settings
from .._controller import WORKERINPUT_KEYS
from .._run.rundir import RunDir
from .._run.slots import CollectSlot, slot_count, usable_cores
from ._env import early_workerinput, share_with_workers, worker_count

__all__ = ["release_slot", "share_slots", "take_slot"]

_SLOT_KEY = pytest.StashKey[CollectSlot]()
_FACT = "collect_slots"


def share_slots(config: pytest.Config, settings: Settings, facts: dict[str, str], zygote: int | None) -> None:
    """In an xdist controller, before its workers start: the run's facts for them, with
    how many of them collect at once (none said: all)."""
    slots = slot_count(settings.collect_slots, worker_count(config), usable_cores())
    share_with_workers({**facts, _FACT: str(slots)} if slots else facts, zygote)


def take_slot(config: pytest.Config) -> None:
    """In an xdist worker, before its initial conftests: wait for its turn to collect, if
    its controller set slots."""
    facts = early_workerinput() or {}
    slots = str(facts.get(_FACT, ""))
    if not slots.isdigit() or int(slots) == 0:
        return
    run_id, _, base = (str(facts[key]) for key in WORKERINPUT_KEYS)
    slot = CollectSlot.take(RunDir(Path(base), run_id).path, str(facts["workerid"]), int(slots))
    if slot is not None:
        config.stash[_SLOT_KEY] = slot


def release_slot(config: pytest.Config) -> float | None:
    """Hand this worker's turn on, once it has collected (or ends); how long it waited
    for it, the first time."""
    slot = config.stash.get(_SLOT_KEY, None)
    if slot is None:
        return None
    del config.stash[_SLOT_KEY]
    slot.release()
    return slot.waited
