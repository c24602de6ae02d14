"""--isolate-collect-slots: xdist workers take turns to import their conftests and collect,
a dead worker never blocks the others, and no worker waits for ever."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from isolate._run.slots import CollectSlot, slot_count, worker_index

#: Each worker records when it began importing its conftest and when it had collected;
#: the import takes a while, so without turns the workers' windows would overlap.
WINDOWS = """
import json, os, time
from pathlib import Path
from tenacity import Retrying, retry_if_result, stop_after_delay, wait_fixed

BEGAN = time.monotonic()
HERE, ME = Path(os.environ["WINDOWS"]), os.environ.get("PYTEST_XDIST_WORKER")
if ME:  # the import lasts until another worker has begun its own: without turns, they overlap
    (HERE / (ME + ".began")).touch()
    Retrying(stop=stop_after_delay(1), wait=wait_fixed(0.01), retry=retry_if_result(lambda others: not others),
             retry_error_callback=lambda _: None)(lambda: [p for p in HERE.glob("gw*.began") if p.stem != ME])

def pytest_collection_modifyitems(config, items):
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    if worker:
        facts = json.loads(os.environ.get("ISOLATE_RUN_FACTS") or "{}")
        Path(os.environ["WINDOWS"], worker + ".json").write_text(json.dumps(
            {"began": BEGAN, "collected": time.monotonic(), "slots": facts.get("collect_slots")}))
"""


def _windows(pytester: pytest.Pytester, *args: str) -> dict[str, dict[str, float]]:
    pytester.makeconftest(WINDOWS)
    pytester.makepyfile(test_x="\n".join(f"def test_{i}(): pass" for i in range(6)))
    result = pytester.runpytest_subprocess("-n", "3", "-p", "no:randomly", *args)
    result.assert_outcomes(passed=6)
    folder = Path(pytester.path, "windows")
    return {p.stem: json.loads(p.read_text()) for p in folder.glob("*.json")}


@pytest.fixture
def windows_dir(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> Path:
    folder = pytester.mkdir("windows")
    monkeypatch.setenv("WINDOWS", str(folder))
    return folder


# Workers forked from the zygote, new interpreters, and a run whose controller shares its
# facts before its conftests (--isolate-env).
@pytest.mark.parametrize("how", ["--isolate-fork-workers=auto", "--isolate-fork-workers=off", "--isolate-env=WHO={worker}"])
def test_with_one_slot_the_workers_collect_one_after_another(
    pytester: pytest.Pytester, windows_dir: Path, how: str
) -> None:
    seen = _windows(pytester, "--isolate-collect-slots=1", how)
    assert sorted(seen) == ["gw0", "gw1", "gw2"]
    assert {w["slots"] for w in seen.values()} == {"1"}
    spans = sorted((w["began"], w["collected"]) for w in seen.values())
    for (_, ended), (began, _) in itertools.pairwise(spans):
        assert began >= ended, spans  # one window ends before the next begins


def test_with_all_or_as_many_slots_as_workers_nobody_waits(pytester: pytest.Pytester, windows_dir: Path) -> None:
    seen = _windows(pytester, "--isolate-collect-slots=all")
    assert {w["slots"] for w in seen.values()} == {None}
    seen = _windows(pytester, "--isolate-collect-slots=3")
    assert {w["slots"] for w in seen.values()} == {None}


def test_a_bad_value_is_a_usage_error_naming_the_choices(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_x="def test_a(): pass")
    result = pytester.runpytest_subprocess("-n", "2", "--isolate-collect-slots=some")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*collect_slots*must be auto, all or a whole number greater than 0*"])


@pytest.mark.parametrize(
    ("setting", "workers", "cores", "slots"),
    [("auto", 8, 2, 2), ("auto", 2, 2, 0), ("auto", 1, 4, 0), ("all", 16, 2, 0), (3, 8, 2, 3), (8, 8, 2, 0)],
)
def test_slot_count(setting: int | str, workers: int, cores: int, slots: int) -> None:
    assert slot_count(setting, workers, cores) == slots


def test_worker_index() -> None:
    assert [worker_index(w) for w in ("gw0", "gw7", "gw12", "main")] == [0, 7, 12, 0]


HOLDER = r"""
import sys
from pathlib import Path
from isolate._run.slots import CollectSlot
slot = CollectSlot.take(Path(sys.argv[1]), sys.argv[2], 2)
print("held" if slot else "none", flush=True)
if sys.stdin.readline() == "release\n":  # else hold it until the test kills us
    slot.release()
    print("released", flush=True)
sys.stdin.read()
"""


@pytest.fixture
def holder(tmp_path: Path) -> Iterator[subprocess.Popen[str]]:
    """Another worker's process, holding slot 0 of ``tmp_path``."""
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path), "gw2"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert proc.stdout is not None and proc.stdout.readline() == "held\n"
        yield proc
    finally:
        proc.kill()
        proc.wait()


def test_a_slot_held_by_a_dead_worker_is_free(tmp_path: Path, holder: subprocess.Popen[str]) -> None:
    holder.kill()
    holder.wait()
    slot = CollectSlot.take(tmp_path, "gw4", 2, patience=120)
    assert slot is not None
    slot.release()


def test_a_slot_that_does_not_change_hands_is_given_up_after_the_patience(
    tmp_path: Path, holder: subprocess.Popen[str]
) -> None:
    began = time.monotonic()
    assert CollectSlot.take(tmp_path, "gw0", 2, patience=0.3) is None
    assert time.monotonic() - began >= 0.3
    other = CollectSlot.take(tmp_path, "gw1", 2, patience=0.3)  # slot 1: nobody holds it
    assert other is not None and other.waited < 0.3
    other.release()


def test_a_released_slot_goes_to_the_next_worker(tmp_path: Path, holder: subprocess.Popen[str]) -> None:
    assert holder.stdin is not None and holder.stdout is not None
    holder.stdin.write("release\n")  # it has collected: its turn is over, it goes on
    holder.stdin.flush()
    assert holder.stdout.readline() == "released\n"
    slot = CollectSlot.take(tmp_path, "gw0", 2, patience=120)
    assert slot is not None
    slot.release()
    slot.release()  # idempotent
    again = CollectSlot.take(tmp_path, "gw0", 2, patience=120)
    assert again is not None
    again.release()


def test_a_planted_link_in_place_of_a_slot_is_not_followed(tmp_path: Path) -> None:
    target = tmp_path / "elsewhere"
    target.write_text("not ours")
    (tmp_path / "collect.slot-0").symlink_to(target)
    assert CollectSlot.take(tmp_path, "gw0", 1, patience=0.1) is None  # collects without a turn
    assert target.read_text() == "not ours"
