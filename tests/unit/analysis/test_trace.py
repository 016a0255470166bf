"""trace.json: Chrome Trace Event Format that Perfetto can lay out (no overlapping slices)."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import orjson

from multitenant.analysis.load import load_run
from multitenant.analysis.metrics import compute_run
from multitenant.analysis.trace import _lanes, write_trace
from tests.unit.analysis.builders import RunBuilder

HAND = Path(__file__).resolve().parents[2] / "data" / "analysis" / "hand"


def test_hand_pair_trace(tmp_path: Path) -> None:
    rm = compute_run(load_run(HAND / "pair"))
    data = orjson.loads(write_trace(rm, tmp_path / "trace.json").read_bytes())
    events = data["traceEvents"]
    names = {e["pid"]: e["args"]["name"] for e in events if e["ph"] == "M" and e["name"] == "process_name"}
    assert names == {1: "GPU", 2: "tenant alpha", 3: "tenant beta"}
    slices = [e for e in events if e["ph"] == "X" and e["cat"] == "request"]
    # Every request that was sent: alpha rids 0-6, beta rids 0-5.
    assert sum(e["pid"] == 2 for e in slices) == 7 and sum(e["pid"] == 3 for e in slices) == 6
    # The origin is the earliest event (alpha's warm-up sched at 100 ms), so alpha rid 1 (sent at
    # 1000 ms, done at 1100 ms) starts at 900 ms = 900000 us and lasts 100000 us.
    rid1 = next(e for e in slices if e["pid"] == 2 and e["args"]["rid"] == 1)
    assert (rid1["ts"], rid1["dur"]) == (900000.0, 100000.0)
    assert rid1["args"]["ttft_ms"] == 10.0 and rid1["args"]["status"] == "ok"
    rid3 = next(e for e in slices if e["pid"] == 2 and e["args"]["rid"] == 3)
    assert rid3["args"]["status"] == "error" and rid3["args"]["ttft_ms"] is None
    # Token instants: one per (emission, request): alpha 2 + 4 + 3 + 2 + 1 = 12, beta 1+3+5+1+2+3 = 15.
    toks = [e for e in events if e["ph"] == "i" and e["cat"] == "token"]
    assert sum(e["pid"] == 2 for e in toks) == 12 and sum(e["pid"] == 3 for e in toks) == 15
    counters = {e["name"] for e in events if e["ph"] == "C"}
    assert {"gpu_util_pct", "power_w", "sm_clock_mhz", "tenant_cpu_pct alpha"} <= counters
    window = [e for e in events if e.get("cat") == "window"]
    assert [e["ts"] for e in window] == [900000.0, 2900000.0]
    assert data["otherData"]["t0_ns"] == 10_000_000_100_000_001


def test_slices_on_one_track_never_overlap(tmp_path: Path) -> None:
    rb = RunBuilder(tmp_path)
    a = rb.tenant("a").start(0).window(1000, None)
    # Five overlapping requests (concurrency up to 3) and one that starts as another ends.
    a.request(1, 1000, 1000, [1100, 1400])
    a.request(2, 1050, 1050, [1200, 1300])
    a.request(3, 1060, 1060, [1500])
    a.request(4, 1300, 1300, [1350])  # starts exactly when rid 2 ends: may reuse its lane
    a.request(5, 1410, 1410, [1600])
    rm = compute_run(load_run(rb.write()))
    events = orjson.loads(write_trace(rm, tmp_path / "t.json").read_bytes())["traceEvents"]
    by_track = defaultdict(list)
    for e in events:
        if e["ph"] == "X":
            by_track[(e["pid"], e["tid"])].append((e["ts"], e["ts"] + e["dur"]))
    assert len(by_track) == 3  # three lanes suffice
    for spans in by_track.values():
        spans.sort()
        assert all(prev[1] <= nxt[0] for prev, nxt in zip(spans, spans[1:], strict=False))


def test_lanes_are_minimal() -> None:
    import numpy as np

    starts = np.array([0, 1, 2, 10, 11])
    ends = np.array([5, 3, 12, 15, 13])
    lanes = _lanes(starts, ends)
    assert list(lanes) == [0, 1, 2, 0, 1]
