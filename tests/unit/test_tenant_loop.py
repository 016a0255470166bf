"""The tenant's request loop against a scripted engine: event order and bookkeeping.

The engines here are test doubles of the backend protocol (deterministic step timing, no
model); the real hf, vllm and openai engines run the same loop in tests/integration.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from multitenant.backends.base import Completion, Emission, EngineFailed, Iteration, Progress
from multitenant.config.schema import ArrivalConfig, DatasetConfig
from multitenant.events import EventWriter
from multitenant.run.tenant import RequestLoop, TenantStopped
from multitenant.workload import RequestSource, RequestSpec
from tests.event_checks import check_request_invariants, read_events


class ScriptedEngine:
    """Static batching like the hf engine: each poll is one step that gives one token to every
    unfinished request of the running batch; a new batch starts only when the last is over."""

    vocab_size = 100

    def __init__(self, step_s: float = 0.001, task: str = "generate", max_batch: int = 4,
                 fail_rids: frozenset[int] = frozenset()) -> None:
        self.step_s = step_s
        self.task = task
        self.max_batch = max_batch
        self.fail_rids = fail_rids
        self.batches: list[int] = []
        self.waiting: list[RequestSpec] = []
        self.batch: list[list[Any]] = []  # [request, tokens left]
        self.cancelled: list[int] = []

    def submit(self, request: RequestSpec) -> None:
        self.waiting.append(request)

    def poll(self, timeout_s: float) -> Progress:
        if not self.batch and self.waiting:
            take, self.waiting = self.waiting[: self.max_batch], self.waiting[self.max_batch :]
            self.batch = [[r, r.n_out] for r in take]
            self.batches.append(len(take))
        if not self.batch:
            time.sleep(timeout_s)
            return Progress(time.monotonic_ns())
        t_start = time.monotonic_ns()
        time.sleep(self.step_s)
        t = time.monotonic_ns()
        if self.task == "forward":
            batch, self.batch = self.batch, []
            return Progress(t, [Iteration(t, len(batch), t - t_start)] + [Completion(t, r.rid, "ok") for r, _ in batch])
        events: list[Any] = []
        live = [e for e in self.batch if e[1] > 0]
        failing = [e for e in live if e[0].rid in self.fail_rids]
        for e in failing:
            events.append(Completion(t, e[0].rid, "error", error="rejected by the engine"))
            e[1] = 0
        live = [e for e in live if e[1] > 0]
        if live:
            events.insert(0, Emission(t, [e[0].rid for e in live], [1] * len(live)))
            for e in live:
                e[1] -= 1
                if e[1] == 0:
                    events.append(Completion(t, e[0].rid, "ok"))
        if all(e[1] == 0 for e in self.batch):
            self.batch = []
        return Progress(t, events)

    def cancel(self, rids: list[int]) -> None:
        self.cancelled.extend(rids)
        self.waiting = [r for r in self.waiting if r.rid not in rids]
        self.batch = [e for e in self.batch if e[0].rid not in rids]


class ThreadedEngine:
    """Continuous batching with its own receiving thread, like the vllm and openai backends:
    every request gets a token every ``step_s``; events are stamped in that thread under the
    lock that ``poll`` drains with (the protocol's ordering contract)."""

    vocab_size = 100

    def __init__(self, step_s: float = 0.002, fail_after_s: float | None = None) -> None:
        self.step_s = step_s
        self.fail_at = None if fail_after_s is None else time.monotonic() + fail_after_s
        self.cond = threading.Condition()
        self.events: list[Any] = []
        self.live: dict[int, int] = {}
        self.closed = False
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.closed:
            time.sleep(self.step_s)
            with self.cond:
                for rid in list(self.live):
                    t = time.monotonic_ns()
                    self.events.append(Emission(t, [rid], [1]))
                    self.live[rid] -= 1
                    if self.live[rid] == 0:
                        del self.live[rid]
                        self.events.append(Completion(t, rid, "ok", fields={"engine_first_tok_ns": t}))
                self.cond.notify()

    def submit(self, request: RequestSpec) -> None:
        with self.cond:
            self.live[request.rid] = request.n_out

    def poll(self, timeout_s: float) -> Progress:
        if self.fail_at is not None and time.monotonic() > self.fail_at:
            raise EngineFailed("server `fake` exited with code 1 mid-run")
        with self.cond:
            if not self.events:
                self.cond.wait(timeout_s)
            now = time.monotonic_ns()
            events, self.events = self.events, []
        return Progress(now, events)

    def cancel(self, rids: list[int]) -> None:
        with self.cond:
            for rid in rids:
                self.live.pop(rid, None)

    def close(self) -> None:
        self.closed = True


def run_loop(tmp_path: Path, arrival: dict[str, Any], task: str = "generate", max_batch: int = 4,
             duration_s: float | None = None, n: int | None = None, stop_after_s: float | None = None,
             eng: Any = None) -> tuple[list[dict[str, Any]], RequestLoop, Any]:
    ds = DatasetConfig(kind="random", input_len=8, output_len=5, range_ratio=0.5, seed=0)
    eng = eng if eng is not None else ScriptedEngine(task=task, max_batch=max_batch)
    stop = threading.Event()
    w = EventWriter(tmp_path / "events.jsonl", background_flush=False)
    loop = RequestLoop(eng, w, RequestSource(ds, eng.vocab_size), task, stop, None)
    if stop_after_s is not None:
        threading.Timer(stop_after_s, stop.set).start()
    t0 = time.monotonic_ns() + 20_000_000
    end = t0 + int(duration_s * 1e9) if duration_s else None
    try:
        loop.serve(ArrivalConfig(**arrival), t0, end, n)
    finally:
        w.close()
        if hasattr(eng, "close"):
            eng.close()
    return read_events(tmp_path / "events.jsonl"), loop, eng


def test_closed_loop_count(tmp_path: Path) -> None:
    events, loop, eng = run_loop(tmp_path, {"kind": "closed", "concurrency": 4}, n=10)
    per = check_request_invariants(events)
    assert len(per) == 10 and all(r["done"]["status"] == "ok" for r in per.values())
    assert loop.counts.requests == 10
    assert loop.counts.tokens == sum(r["tok"] for r in per.values())
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
    assert loop.counts.requests == 40


def test_duration_cancels_in_flight(tmp_path: Path) -> None:
    events, loop, _ = run_loop(tmp_path, {"kind": "closed", "concurrency": 8}, duration_s=0.15)
    per = check_request_invariants(events)
    statuses = Counter(r["done"]["status"] for r in per.values())
    assert statuses["cancelled"] >= 1 and statuses["ok"] >= 1
    assert loop.counts.cancelled == statuses["cancelled"]


def test_stop_cancels_in_flight_and_raises(tmp_path: Path) -> None:
    with pytest.raises(TenantStopped):
        run_loop(tmp_path, {"kind": "closed", "concurrency": 4}, n=100000, stop_after_s=0.2)
    per = check_request_invariants(read_events(tmp_path / "events.jsonl"))
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


def test_a_failed_request_is_logged_and_the_tenant_keeps_serving(tmp_path: Path) -> None:
    eng = ScriptedEngine(fail_rids=frozenset({1, 3}))
    events, loop, _ = run_loop(tmp_path, {"kind": "closed", "concurrency": 2}, n=8, eng=eng)
    per = check_request_invariants(events)
    errors = {rid: r["done"] for rid, r in per.items() if r["done"]["status"] == "error"}
    assert sorted(errors) == [1, 3] and all(d["error"] == "rejected by the engine" for d in errors.values())
    assert len(per) == 8 and loop.counts.requests == 6 and loop.counts.errors == 2


def test_events_of_a_threaded_engine_stay_in_time_order(tmp_path: Path) -> None:
    events, loop, _ = run_loop(tmp_path, {"kind": "poisson", "rate": 300.0, "seed": 4}, n=60, eng=ThreadedEngine())
    per = check_request_invariants(events)  # asserts t never decreases in the file
    assert len(per) == 60 and loop.counts.requests == 60
    # Engine fields of a completion reach the done event.
    assert all("engine_first_tok_ns" in r["done"] for r in per.values())


def test_open_loop_sched_lines_precede_later_events(tmp_path: Path) -> None:
    events, _, _ = run_loop(tmp_path, {"kind": "constant", "rate": 500.0}, n=30, eng=ThreadedEngine(step_s=0.005))
    per = check_request_invariants(events)
    gaps = sorted(r["sched"]["t"] for r in per.values())
    assert {b - a for a, b in zip(gaps, gaps[1:], strict=False)} <= {1_999_999, 2_000_000, 2_000_001}
    # A request is sent no earlier than it was due and soon after (the poll waits until the next arrival).
    lateness_ms = [(r["sent"]["t"] - r["sched"]["t"]) / 1e6 for r in per.values()]
    assert min(lateness_ms) >= 0 and sorted(lateness_ms)[len(lateness_ms) // 2] < 5, lateness_ms


def test_an_engine_failure_ends_in_flight_requests_as_errors_and_raises(tmp_path: Path) -> None:
    with pytest.raises(EngineFailed, match="exited with code 1"):
        run_loop(tmp_path, {"kind": "closed", "concurrency": 3}, duration_s=5, eng=ThreadedEngine(fail_after_s=0.1))
    per = check_request_invariants(read_events(tmp_path / "events.jsonl"))
    failed = [r["done"] for r in per.values() if r["done"]["status"] == "error"]
    assert len(failed) == 3 and all(d["error"].startswith("engine failed: server `fake`") for d in failed)


def test_duration_end_cancels_through_the_engine(tmp_path: Path) -> None:
    events, loop, eng = run_loop(tmp_path, {"kind": "closed", "concurrency": 4}, duration_s=0.1, eng=ThreadedEngine(step_s=0.05))
    per = check_request_invariants(events)
    cancelled = sorted(rid for rid, r in per.items() if r["done"]["status"] == "cancelled")
    assert cancelled and not eng.live, "the engine was told to stop the cancelled requests"
