"""A latency check: it measures, so it must not share the machine with other tests.

``@pytest.mark.serial`` (isolate) runs it while no other test of the run runs, in the
same ``pytest -n N`` run: on a 2-core machine, four workers busy with other tests would
make any latency bound meaningless.
"""

from __future__ import annotations

import statistics
import time

import pytest
from _support import new_event

WRITES = 30
P95_BOUND_S = 0.25


@pytest.mark.serial
def test_write_acknowledged_quickly_p95(api, cid):
    api.post("/events", json=new_event(cid))  # warm the connection pools
    durations = []
    for _ in range(WRITES):
        started = time.perf_counter()
        assert api.post("/events", json=new_event(cid)).status_code == 201
        durations.append(time.perf_counter() - started)
    p95 = statistics.quantiles(durations, n=20)[-1]
    assert p95 < P95_BOUND_S, f"p95 {p95 * 1000:.0f} ms over {WRITES} writes"
