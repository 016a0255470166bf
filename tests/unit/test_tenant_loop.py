"""The tenant's request loop against a scripted engine: event order and bookkeeping.

The engine here is a test double (deterministic step timing, no model); the real HF engine
runs the same loop in tests/integration/test_pair_tiny.py.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from multitenant.events import EventWriter, read_events
from multitenant.tenant import RequestLoop, TenantStopped
from multitenant.workload import RequestSource
from tests.event_checks import check_request_invariants


class ScriptedEngine:
    """Static batching like HFEngine: each step gives one token to every unfinished request."""

    vocab_size = 100

    def __init__(self, step_s: float = 0.001) -> None:
        self.step_s = step_s
        self.batches: list[int] = []
        self.forwards: list[int] = []

    def start_batch(self, prompts: list[list[int]], n_out: list[int]) -> None:
        self.batches.append(len(prompts))
        self.left = list(n_out)

    def step(self) -> list[int]:
        time.sleep(self.step_s)
        idx = [i for i, n in enumerate(self.left) if n > 0]
        for i in idx:
            self.left[i] -= 1
        return idx

    def forward_batch(self, prompts: list[list[int]]) -> None:
        time.sleep(self.step_s)
        self.forwards.append(len(prompts))


def run_loop(tmp_path: Path, arrival: dict[str, Any], task: str = "generate", max_batch: int = 4,
             duration_s: float | None = None, n: int | None = None, stop_after_s: float | None = None) -> tuple[list[dict[str, Any]], RequestLoop, ScriptedEngine]:
    ds = {"kind": "random", "input_len": 8, "output_len": 5, "range_ratio": 0.5, "seed": 0}
    eng = ScriptedEngine()
    stop = threading.Event()
    w = EventWriter(tmp_path / "events.jsonl", background_flush=False)
    loop = RequestLoop(eng, w, RequestSource(ds, eng.vocab_size), task, max_batch, stop, None)
    if stop_after_s is not None:
        threading.Timer(stop_after_s, stop.set).start()
    t0 = time.monotonic_ns() + 20_000_000
    end = t0 + int(duration_s * 1e9) if duration_s else None
    with contextlib.suppress(TenantStopped):
        loop.serve(arrival, t0, end, n)
    w.close()
    return read_events(tmp_path / "events.jsonl"), loop, eng


def test_closed_loop_count(tmp_path: Path) -> None:
    events, loop, eng = run_loop(tmp_path, {"kind": "closed", "concurrency": 4}, n=10)
    per = check_request_invariants(events)
    assert len(per) == 10 and all(r["done"]["status"] == "ok" for r in per.values())
    assert loop.counts["requests"] == 10
    assert loop.counts["tokens"] == sum(r["tok"] for r in per.values())
    assert max(eng.batches) <= 4
    # Closed loop: sched == sent (issued the moment a slot frees).
    assert all(r["sched"]["t"] == r["sent"]["t"] for r in per.values())


def test_open_loop_keeps_intended_times_and_order(tmp_path: Path) -> None:
    events, loop, _ = run_loop(tmp_path, {"kind": "constant", "rate": 400.0}, n=40)
    per = check_request_invariants(events)
    scheds = sorted(r["sched"]["t"] for r in per.values())
    gaps = {b - a for a, b in zip(scheds, scheds[1:], strict=False)}
    # 1/400 s = 2.5 ms exactly, whatever the loop was doing when they came due.
    assert gaps <= {2_500_000, 2_499_999, 2_500_001}
    assert loop.counts["requests"] == 40


def test_duration_cancels_in_flight(tmp_path: Path) -> None:
    events, loop, _ = run_loop(tmp_path, {"kind": "closed", "concurrency": 8}, duration_s=0.15)
    per = check_request_invariants(events)
    statuses = Counter(r["done"]["status"] for r in per.values())
    assert statuses["cancelled"] >= 1 and statuses["ok"] >= 1
    assert loop.counts["cancelled"] == statuses["cancelled"]


def test_stop_cancels_and_raises(tmp_path: Path) -> None:
    events, loop, _ = run_loop(tmp_path, {"kind": "closed", "concurrency": 4}, n=100000, stop_after_s=0.2)
    per = check_request_invariants(events)
    assert any(r["done"]["status"] == "cancelled" for r in per.values())


def test_forward_task_logs_iterations(tmp_path: Path) -> None:
    events, loop, eng = run_loop(tmp_path, {"kind": "closed", "concurrency": 6}, task="forward", max_batch=3, n=12)
    check_request_invariants(events)
    iters = [e for e in events if e["ev"] == "iter"]
    assert [e["i"] for e in iters] == list(range(len(iters)))
    assert sum(e["batch"] for e in iters) == 12 and all(e["batch"] <= 3 for e in iters)
    assert all(e["dur_ns"] > 0 for e in iters)
    assert not any(e["ev"] == "tok" for e in events)


@pytest.mark.parametrize("kind", ["poisson", "gamma"])
def test_open_loop_with_duration(tmp_path: Path, kind: str) -> None:
    events, _, _ = run_loop(tmp_path, {"kind": kind, "rate": 200.0, "burstiness": 0.5, "seed": 2}, duration_s=0.3)
    per = check_request_invariants(events)
    assert 20 < len(per) < 120
