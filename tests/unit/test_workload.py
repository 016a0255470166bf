"""Workload schedules and datasets."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import numpy as np
import pytest

from multitenant.config.schema import ArrivalConfig, DatasetConfig
from multitenant.workload import (
    NS_PER_S,
    RequestSource,
    arrival_gaps_s,
    length_bounds,
    load_jsonl_prompts,
    max_lengths,
    open_loop_schedule,
)


def test_poisson_mean_rate_and_exponential_gaps() -> None:
    gaps = arrival_gaps_s(ArrivalConfig(**{"kind": "poisson", "rate": 50.0, "seed": 7}))
    sample = [next(gaps) for _ in range(20000)]
    mean = statistics.fmean(sample)
    # Mean gap 1/50 s; the standard error over 20k exponential samples is 0.7%: allow 3%.
    assert mean == pytest.approx(1 / 50, rel=0.03)
    # Exponential: coefficient of variation 1.
    assert statistics.pstdev(sample) / mean == pytest.approx(1.0, rel=0.05)


def test_gamma_burstiness_sets_the_coefficient_of_variation() -> None:
    for k in (0.25, 4.0):
        gaps = arrival_gaps_s(ArrivalConfig(**{"kind": "gamma", "rate": 10.0, "burstiness": k, "seed": 1}))
        sample = [next(gaps) for _ in range(20000)]
        mean = statistics.fmean(sample)
        assert mean == pytest.approx(0.1, rel=0.05)
        assert statistics.pstdev(sample) / mean == pytest.approx(k**-0.5, rel=0.07)


def test_constant_schedule_is_exact_and_absolute() -> None:
    start = 123_000_000_000
    times = open_loop_schedule(ArrivalConfig(**{"kind": "constant", "rate": 3.0}), start, 301, None)
    assert times[0] == start
    # 300 gaps of 1/3 s: exactly 100 s later, no rounding drift.
    assert times[-1] == start + 100 * NS_PER_S
    assert all(b > a for a, b in zip(times, times[1:], strict=False))


def test_schedule_stops_at_end_time_and_is_monotone() -> None:
    start, end = 10 * NS_PER_S, 70 * NS_PER_S
    times = open_loop_schedule(ArrivalConfig(**{"kind": "poisson", "rate": 20.0, "seed": 3}), start, None, end)
    assert all(start <= t < end for t in times)
    assert all(b >= a for a, b in zip(times, times[1:], strict=False))
    # 60 s at 20 req/s: 1200 expected, Poisson sd ~35.
    assert 1080 < len(times) < 1320


def test_schedule_is_reproducible() -> None:
    arr = ArrivalConfig(kind="gamma", rate=5.0, burstiness=0.5, seed=11)
    assert open_loop_schedule(arr, 0, 100, None) == open_loop_schedule(arr, 0, 100, None)


def test_schedule_needs_a_bound() -> None:
    with pytest.raises(ValueError):
        open_loop_schedule(ArrivalConfig(**{"kind": "poisson", "rate": 1.0}), 0, None, None)


def test_random_lengths_within_bounds() -> None:
    ds = DatasetConfig(**{"kind": "random", "input_len": 100, "output_len": 20, "range_ratio": 0.5, "seed": 0})
    src = RequestSource(ds, vocab_size=1000)
    reqs = [src.next() for _ in range(500)]
    assert [r.rid for r in reqs] == list(range(500))
    assert all(50 <= r.n_in <= 150 and 10 <= r.n_out <= 30 for r in reqs)
    assert min(r.n_in for r in reqs) < 60 and max(r.n_in for r in reqs) > 140
    assert all(0 <= i < 1000 for r in reqs for i in r.prompt_ids)
    assert max_lengths(ds) == (150, 30)
    again = RequestSource(ds, vocab_size=1000)
    assert [again.next().prompt_ids.tolist() for _ in range(5)] == [r.prompt_ids.tolist() for r in reqs[:5]]
    assert all(r.prompt_ids.dtype == np.int64 for r in reqs)


def test_prefetch_does_not_change_the_requests() -> None:
    """Block boundaries (prefetch sizes) never change which requests a seed gives."""
    ds = DatasetConfig(**{"kind": "random", "input_len": 64, "output_len": 8, "range_ratio": 0.5, "seed": 3})
    plain = RequestSource(ds, vocab_size=500)
    ahead = RequestSource(ds, vocab_size=500)
    ahead.prefetch(1000)
    a = [plain.next() for _ in range(700)]
    b = [ahead.next() for _ in range(700)]
    assert [(r.rid, r.n_out, r.prompt_ids.tolist()) for r in a] == [(r.rid, r.n_out, r.prompt_ids.tolist()) for r in b]


def test_prefetch_builds_the_requests_ahead() -> None:
    src = RequestSource(DatasetConfig(**{"kind": "random", "input_len": 16, "output_len": 4, "range_ratio": 0.0, "seed": 0}), 50)
    src.prefetch(600)
    assert len(src._ready) >= 600


def test_fixed_lengths() -> None:
    assert length_bounds(512, 0.0) == (512, 512)
    src = RequestSource(DatasetConfig(**{"kind": "random", "input_len": 8, "output_len": 4, "range_ratio": 0.0, "seed": 0}), 50)
    assert {(r.n_in, r.n_out) for r in (src.next() for _ in range(20))} == {(8, 4)}


def test_jsonl_dataset(tmp_path: Path) -> None:
    p = tmp_path / "d.jsonl"
    p.write_text(json.dumps({"prompt_ids": [1, 2, 3]}) + "\n\n" + json.dumps({"prompt_ids": [4], "output_len": 7}) + "\n")
    src = RequestSource(DatasetConfig(**{"kind": "jsonl", "path": str(p), "output_len": 5, "seed": 0}), vocab_size=10)
    got = [src.next() for _ in range(3)]
    assert [(r.prompt_ids.tolist(), r.n_out) for r in got] == [([1, 2, 3], 5), ([4], 7), ([1, 2, 3], 5)]
    assert max_lengths(src.dataset, load_jsonl_prompts(p, 5, 10)) == (3, 7)


@pytest.mark.parametrize(
    "line,match",
    [("not json", "not JSON"), ('{"prompt": "hello"}', "prompt_ids"), ('{"prompt_ids": [99]}', r"\[0, 10\)")],
)
def test_jsonl_errors_name_the_line(tmp_path: Path, line: str, match: str) -> None:
    p = tmp_path / "d.jsonl"
    p.write_text(line + "\n")
    with pytest.raises(ValueError, match=match) as ei:
        load_jsonl_prompts(p, 5, 10)
    assert ":1:" in str(ei.value)
