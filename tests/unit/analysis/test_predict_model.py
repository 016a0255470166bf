"""The split oracle's model on solo data whose answer is known by hand (analysis/predict.py)."""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest

from multitenant.analysis.predict import (
    TIMESLICE,
    TIMESLICE_OVERHEAD,
    SoloPoint,
    SoloProfile,
    grid,
    interpolate,
    memory_fraction,
    predict_grid,
    predict_mps,
    predict_timeslice,
)


def proportional(name: str = "p") -> SoloProfile:
    """Throughput exactly proportional to the share (40 tok/s per %), no DRAM traffic."""
    pts = [SoloPoint(s, 40.0 * s, sm_active=s / 100, dram_bw=0.0) for s in (25, 50, 100)]
    return SoloProfile(name, pts, reference=pts[-1], latency_p50_ms={"ttft": 20.0, "tpot": 2.0})


def bandwidth_bound(name: str) -> SoloProfile:
    """Each uses 0.6 of peak DRAM bandwidth alone, at any share from 25 % (and 0.6 of the SMs)."""
    pts = [SoloPoint(s, 1000.0, sm_active=0.6, dram_bw=0.6) for s in (25, 50, 100)]
    return SoloProfile(name, pts, reference=pts[-1])


def test_interpolation_between_below_and_above_the_measured_shares() -> None:
    p = SoloProfile("x", [SoloPoint(25, 3000.0, 0.2, 0.1), SoloPoint(50, 3900.0, 0.4, 0.3), SoloPoint(100, 4300.0, 0.5, 0.35)],
                    reference=SoloPoint(None, 4300.0))  # fmt: skip
    assert interpolate(p, 70).throughput == pytest.approx(3900 + 400 * 20 / 50)
    assert interpolate(p, 70).dram_bw == pytest.approx(0.3 + 0.05 * 20 / 50)
    assert interpolate(p, 10).throughput == pytest.approx(3000 * 10 / 25)  # proportional below
    assert interpolate(p, 10).sm_active == pytest.approx(0.2)  # held
    # Monotone: a noisy dip at 50 % does not make T(50) < T(25).
    dip = SoloProfile("d", [SoloPoint(25, 3000.0), SoloPoint(50, 2900.0), SoloPoint(100, 4000.0)], SoloPoint(None, 4000.0))
    assert interpolate(dip, 50).throughput == 3000.0


def test_proportional_tenant_without_bandwidth_keeps_its_share() -> None:
    pred = predict_mps([proportional("a"), proportional("b")], (50, 50))
    for t in pred.tenants:
        assert t.np == pytest.approx(2000.0 / 4000.0)  # T(50) / T(100)
        assert t.stretch == 1.0
        assert t.ttft_p50_ms == pytest.approx(40.0) and t.tpot_p50_ms == pytest.approx(4.0)  # / NP
    assert pred.stp == pytest.approx(1.0) and pred.fairness == pytest.approx(1.0) and pred.antt == pytest.approx(2.0)
    seventy = predict_mps([proportional("a"), proportional("b")], (70, 30))
    assert [t.np for t in seventy.tenants] == [pytest.approx(0.7), pytest.approx(0.3)]


def test_two_bandwidth_bound_tenants_stretch_by_the_sum_of_their_demands() -> None:
    assert memory_fraction(SoloPoint(50, 1.0, 0.6, 0.6)) == 1.0
    pred = predict_mps([bandwidth_bound("a"), bandwidth_bound("b")], (50, 50))
    for t in pred.tenants:
        assert t.stretch == pytest.approx(1.2)
        assert t.throughput == pytest.approx(1000 / 1.2)
        assert t.np == pytest.approx(1 / 1.2)


def test_sm_contention_only_when_caps_overcommit() -> None:
    # Compute-bound (no DRAM), 0.8 of the SMs active each: 50/50 no contention; 100/100: 1.6.
    pts = [SoloPoint(s, 10.0 * s, sm_active=min(0.8, s / 100), dram_bw=0.0) for s in (25, 50, 100)]
    prof = SoloProfile("c", pts, reference=pts[-1])
    assert predict_mps([prof, prof], (50, 50)).tenants[0].stretch == 1.0
    assert predict_mps([prof, prof], (100, 100)).tenants[0].stretch == pytest.approx(1.6)


def test_timeslicing_two_half_busy_tenants() -> None:
    half = SoloPoint(None, 1000.0, sm_active=0.5, busy=0.5)
    pred = predict_timeslice([SoloProfile("a", [], half), SoloProfile("b", [], half)])
    assert pred.label == TIMESLICE
    assert [t.np for t in pred.tenants] == [pytest.approx(1 - TIMESLICE_OVERHEAD)] * 2
    assert pred.stp == pytest.approx(2 * (1 - TIMESLICE_OVERHEAD))
    busy = SoloPoint(None, 1000.0, busy=1.0)
    both = predict_timeslice([SoloProfile("a", [], busy), SoloProfile("b", [], busy)])
    assert both.tenants[0].np == pytest.approx(0.5 * (1 - TIMESLICE_OVERHEAD))


def test_slo_attainment_scales_each_request_by_one_over_np() -> None:
    prof = proportional()
    prof.requests_ms = {"ttft": np.array([10.0, 20.0, 30.0, np.nan]), "tpot": np.array([1.0, 1.0, 1.0, 1.0])}
    prof.req_s = 10.0
    pred = predict_mps([prof, proportional("b")], (50, 50), slo={"ttft": 45.0})
    t = pred.tenants[0]  # NP 0.5: TTFTs 20, 40, 60, none -> 3 of 4 meet 45 ms
    assert t.slo_attainment == Fraction(3, 4)
    assert t.goodput_req_s == pytest.approx(10.0 * 0.5 * 0.75)


def test_grid_of_a_pair_and_of_three() -> None:
    pair = grid(2)
    assert pair[0] == (90, 10) and pair[8] == (10, 90) and pair[-1] == (100, 100) and len(pair) == 10
    three = grid(3)
    assert len(three) == 36 + 1 and all(sum(c) == 100 for c in three[:-1])
    labels = [p.label for p in predict_grid([proportional("a"), proportional("b")])]
    assert labels[:2] == ["90/10", "80/20"] and labels[-2:] == ["100/100", TIMESLICE]


def test_three_tenants_share_the_memory_system() -> None:
    # Three bandwidth-bound tenants at 0.6 of peak each: every split stretched by 1.8.
    profs = [bandwidth_bound(n) for n in "abc"]
    pred = predict_mps(profs, (40, 30, 30))
    assert [t.stretch for t in pred.tenants] == [pytest.approx(1.8)] * 3
    assert pred.stp == pytest.approx(3 / 1.8)
    assert len(predict_grid(profs)) == 36 + 2  # the splits, 100/100/100 and time-slicing
