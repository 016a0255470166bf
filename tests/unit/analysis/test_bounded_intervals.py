"""Intervals over trials stay inside the possible range; two trials are marked uninformative;
an NP above 1.05 is flagged."""

from __future__ import annotations

import pytest

from multitenant.analysis import stats
from multitenant.analysis.sweep_report import cell, notes, sweep_dict
from tests.unit.analysis.sweep_builders import job, sweep_dir
from tests.unit.analysis.test_sweep import SLO, point, sweep_of


def test_t_quantile_is_scipys_and_the_hand_written_cdf_is_gone() -> None:
    assert stats.t_quantile(1) == pytest.approx(12.706204736174698, rel=1e-12)
    assert not hasattr(stats, "t_cdf_two_sided")


def test_estimate_clips_to_the_bounds() -> None:
    # 0.9 ± 12.706 · 0.0707 / √2 = 0.9 ± 0.635: the high end clipped at 1.
    e = stats.estimate([0.85, 0.95], bounds=(0.0, 1.0))
    assert e.ci_high == 1.0 and e.ci_low == pytest.approx(0.9 - 0.635310, abs=1e-5)
    low = stats.estimate([1.0, 3.0], bounds=(0.0, None))
    assert low.ci_low == 0.0 and low.ci_high == pytest.approx(2.0 + 12.7062047, rel=1e-6)


def test_two_trial_attainment_and_throughput_intervals_stay_in_range(tmp_path) -> None:
    sweep = sweep_dir(tmp_path)
    # b attains 100 % and 60 %: mean 80 %, a raw t interval 80 ± 254 %; a emits 10 and 40 tok/s.
    job(sweep, "job0", ["split=70/30"], {"a": (1, 0), "b": (3, 0)}, trial=0)
    job(sweep, "job1", ["split=70/30"], {"a": (7, 0), "b": (3, 4)}, trial=1)
    job(sweep, "job2", ["split=50/50"], {"a": (1, 0), "b": (3, 0)}, trial=0)
    result = sweep_of(sweep, slo=SLO)
    p = point(result, split="70/30")
    att = p.get("b", "slo_attainment")
    assert (att.ci_low, att.ci_high) == (0.0, 1.0)
    tput = p.get("a", "throughput_tok_s")
    assert tput.ci_low == 0.0 and tput.mean == 25.0
    for e in p.estimates.values():
        assert e.ci_low is None or e.ci_low >= 0.0
    data = sweep_dict(result)
    note = {pt["label"]: pt["note"] for pt in data["points"]}
    assert "uninformative" in note["split=70/30"]
    assert any("uninformative" in line for line in notes(result))
    assert cell(att, percent=True, compact=True).endswith("²")
    assert "[0.0,100.0]" in cell(att, percent=True, compact=True)


def test_an_np_above_1_05_is_flagged(tmp_path) -> None:
    from multitenant.analysis.baselines import apply_baselines
    from multitenant.analysis.discover import find_run_dirs
    from multitenant.analysis.load import load_runs
    from multitenant.analysis.metrics import compute_run
    from tests.unit.analysis.sweep_builders import solo

    sweep = sweep_dir(tmp_path)
    # Co-located a emits 5 (3 + 1) = 20 tok/s; its solo (n_tok 2) 15 tok/s: NP 1.33.
    job(sweep, "job0", ["split=70/30"], {"a": (3, 0), "b": (3, 0)})
    solo_a, solo_b = solo(tmp_path, "a", 2), solo(tmp_path, "b", 3)
    co, sa, sb = (compute_run(r) for r in load_runs([*find_run_dirs(sweep), solo_a, solo_b], parallel=False))
    apply_baselines(co, {"a": sa, "b": sb})
    assert co.tenants["a"].np == pytest.approx(20 / 15)
    assert any("NP 1.33 > 1.05: co-located faster than solo: noise, or a baseline that does not match" in w
               for w in co.warnings), co.warnings  # fmt: skip
    assert not any("tenant b: NP" in w for w in co.warnings)
