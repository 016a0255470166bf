"""Sweeps by hand: the Student-t interval, grouping of trials (trial excluded), failed jobs,
feasibility and the best point, the closest point, rate limits, merged folders and the
measured share of wall time. Throughput and attainment of every job are set by
``sweep_builders`` (throughput 5 (n_tok + 1) tok/s, attainment (10 - slow) / 10 at ttft=50ms)."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import pytest

from multitenant.analysis.discover import find_run_dirs
from multitenant.analysis.load import load_runs
from multitenant.analysis.metrics import compute_run, parse_slo
from multitenant.analysis.names import RUN_LEVEL
from multitenant.analysis.stats import estimate, t_quantile
from multitenant.analysis.sweep import Sweep, build_sweep
from multitenant.analysis.sweep_report import csv_rows, sweep_dict
from tests.unit.analysis.sweep_builders import S, job, sweep_dir

T_975_2 = 4.302652729749464  # t_{0.975, 2}, from a table (4.3027)
SLO = "ttft=50ms"


def sweep_of(*paths: Path, slo: str | None = None, target: float = 0.9, objective: str = "throughput") -> Sweep:
    run_dirs = [d for p in paths for d in find_run_dirs(p)]
    bounds = parse_slo(slo) if slo else None
    rms = [compute_run(run, bounds) for run in load_runs(run_dirs, parallel=False)]
    return build_sweep(rms, target=target, objective=objective)


def point(sweep: Sweep, **values: str):
    """The point whose axes (by short name: ``split``, ``rate``) have these values."""
    for p in sweep.points:
        named = {k.rsplit(".", 1)[-1]: v for k, v in zip(sweep.axes, p.values, strict=True)}
        if all(named.get(k) == v for k, v in values.items()):
            return p
    raise AssertionError(f"no point {values} in {[p.values for p in sweep.points]}")


# --- the interval --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("df", "table"), [(1, 12.7062), (2, 4.3027), (4, 2.7764), (9, 2.2622), (29, 2.0452), (30, 2.0423), (120, 1.9799)]
)
def test_t_quantile_matches_the_table(df: int, table: float) -> None:
    assert t_quantile(df) == pytest.approx(table, abs=5e-5), f"t_0.975,{df} = {t_quantile(df)}, table {table}"


def test_t_quantile_tends_to_the_normal_quantile() -> None:
    assert t_quantile(100_000) == pytest.approx(1.959964, abs=1e-4)


def test_interval_of_20_25_30_is_mean_plus_minus_t_s_over_root_n() -> None:
    # mean 25, s = 5 (deviations -5, 0, 5: 50 / 2 = 25), half-width t_{0.975,2} * 5 / sqrt(3) = 12.4207
    e = estimate([20.0, 25.0, 30.0])
    half = T_975_2 * 5 / math.sqrt(3)
    assert (e.n, e.mean, e.std) == (3, 25.0, 5.0)
    assert e.ci_low == pytest.approx(25 - half, rel=1e-12) and e.ci_high == pytest.approx(25 + half, rel=1e-12)
    assert half == pytest.approx(12.4207, abs=1e-4)


def test_one_value_has_a_mean_and_no_interval_and_undefined_values_are_skipped() -> None:
    assert estimate([7.0, None, float("nan")]) == estimate([7.0])
    e = estimate([7.0])
    assert (e.n, e.mean, e.std, e.ci_low, e.ci_high) == (1, 7.0, None, None, None)
    assert estimate([None]).mean is None and estimate([]).n == 0


# --- grouping ------------------------------------------------------------------------------


def test_trials_group_by_the_varying_overrides_with_trial_left_out(tmp_path: Path) -> None:
    sweep = sweep_dir(tmp_path)
    common = ["tenants.a.workload.duration_s=2", "trials=3"]
    n_toks = {"70/30": (3, 4, 5), "50/50": (1, 1, 1)}  # a: 20, 25, 30 tok/s at 70/30; 10 at 50/50
    i = 0
    for trial in range(3):  # interleaved, as mt-run orders them
        for split, ns in n_toks.items():
            job(sweep, f"job{i}", [f"split={split}", *common], {"a": (ns[trial], 0), "b": (1, 0)}, trial=trial, trials=3)
            i += 1
    result = sweep_of(sweep)
    assert result.axes == ["split"], "trial, trials and the overrides every job shares are no axis"
    assert [p.values for p in result.points] == [("50/50",), ("70/30",)], "ordered by the first share"
    p = point(result, split="70/30")
    assert p.n_trials == 3 and sorted(sr.trial for sr in p.runs) == [0, 1, 2]
    thr = p.get("a", "throughput_tok_s")
    half = T_975_2 * 5 / math.sqrt(3)
    assert (thr.n, thr.mean) == (3, 25.0) and thr.ci_high == pytest.approx(25 + half, rel=1e-9), thr
    agg = p.get(RUN_LEVEL, "gpu_throughput_tok_s")  # a + b = 30, 35, 40
    assert agg.mean == pytest.approx(35.0) and agg.ci_low == pytest.approx(35 - half, rel=1e-9), agg
    same = point(result, split="50/50").get("a", "throughput_tok_s")
    assert (same.mean, same.std, same.ci_low, same.ci_high) == (10.0, 0.0, 10.0, 10.0)


def test_csv_rows_hold_the_axes_tenant_metric_and_interval(tmp_path: Path) -> None:
    sweep = sweep_dir(tmp_path)
    for i, (split, n) in enumerate((("70/30", 3), ("70/30", 5), ("50/50", 1))):
        job(sweep, f"job{i}", [f"split={split}"], {"a": (n, 0), "b": (1, 0)}, trial=i // 2)
    header, rows = csv_rows(sweep_of(sweep))
    assert header == ["split", "tenant", "metric", "n_trials", "mean", "std", "ci_low", "ci_high", "note"]
    by = {(r[0], r[1], r[2]): r for r in rows}
    # 70/30: a at 20 and 30 tok/s: mean 25, s = 7.0711, half = t_{0.975,1} * s / sqrt(2) = 12.7062 * 5 = 63.53;
    # the low end, 25 - 63.53, is below any throughput: clipped at 0.
    r = by[("70/30", "a", "throughput_tok_s")]
    assert r[3:6] == [2, 25.0, pytest.approx(math.sqrt(50))] and r[6] == 0.0, r
    assert r[7] == pytest.approx(25 + 63.531, abs=1e-3) and "uninformative" in r[8], r
    single = by[("50/50", "a", "throughput_tok_s")]
    assert single[3:] == [1, 10.0, None, None, None, "1 trial: no confidence interval"], "one trial: a mean, no interval"
    assert ("50/50", RUN_LEVEL, "gpu_throughput_tok_s") in by
    assert ("50/50", "a", "np") not in by, "no run has an NP (no baselines): no NP rows"


def test_a_single_trial_point_says_it_has_no_interval(tmp_path: Path) -> None:
    sweep = sweep_dir(tmp_path)
    job(sweep, "job0", ["split=70/30"], {"a": (3, 0)})
    job(sweep, "job1", ["split=50/50"], {"a": (3, 0)})
    data = sweep_dict(sweep_of(sweep))
    assert [p["note"] for p in data["points"]] == ["1 trial: no confidence interval"] * 2
    assert data["points"][0]["metrics"]["a"]["throughput_tok_s"]["ci_low"] is None


def test_failed_and_interrupted_jobs_stay_out_of_the_means_with_a_warning(tmp_path: Path) -> None:
    sweep = sweep_dir(tmp_path)
    job(sweep, "job0", ["split=70/30"], {"a": (3, 0)}, trial=0)
    job(sweep, "job1", ["split=70/30"], {"a": (9, 0)}, trial=1, status="failed", reason="tenant a died")
    job(sweep, "job2", ["split=70/30"], {"a": (9, 0)}, trial=2, status="interrupted")
    job(sweep, "job3", ["split=50/50"], {"a": (1, 0)}, trial=0)
    result = sweep_of(sweep)
    p = point(result, split="70/30")
    assert p.n_trials == 1 and len(p.excluded) == 2
    assert p.get("a", "throughput_tok_s").mean == 20.0, "only job0 (20 tok/s) counts"
    (warning,) = [w for w in result.warnings if "left out of the sweep means" in w]
    assert "job1 (failed: tenant a died)" in warning and "job2 (interrupted)" in warning, warning


def test_runs_of_different_experiments_do_not_pool(tmp_path: Path) -> None:
    job(tmp_path, "x", [], {"a": (3, 0)}, name="pair_x")
    job(tmp_path, "y", [], {"a": (5, 0)}, name="pair_y")
    result = sweep_of(tmp_path)
    assert result.axes == ["experiment"] and [p.n_trials for p in result.points] == [1, 1]


# --- best point under an SLO ---------------------------------------------------------------


def three_points(root: Path) -> Path:
    """P 90/10: a 100 %, b 80 % (infeasible at 0.9), agg 5·(9+1) + 5·(9+1) = 100 tok/s.
    P 70/30: a 90 %, b 90 %, agg 5·6 + 5·6 = 60 tok/s, goodput 9/2 + 9/2 = 9 req/s.
    P 50/50: a 100 %, b 100 %, agg 5·4 + 5·4 = 40 tok/s, goodput 10 req/s. Two trials each, equal."""
    sweep = sweep_dir(root)
    spec = {"90/10": {"a": (9, 0), "b": (9, 2)}, "70/30": {"a": (5, 1), "b": (5, 1)}, "50/50": {"a": (3, 0), "b": (3, 0)}}
    i = 0
    for trial in range(2):
        for split, tenants in spec.items():
            job(sweep, f"job{i}", [f"split={split}"], tenants, trial=trial)
            i += 1
    return sweep


def test_best_point_is_the_feasible_one_with_the_highest_aggregate_throughput(tmp_path: Path) -> None:
    result = sweep_of(three_points(tmp_path), slo=SLO)
    assert [(p.values[0], p.feasible) for p in result.points] == [("50/50", True), ("70/30", True), ("90/10", False)]
    assert result.best is not None and result.best.point.values == ("70/30",), "90/10 has more tok/s but b misses"
    assert result.best.objective.mean == 60.0 and result.best.min_attainment == pytest.approx(0.9)
    assert result.closest is None


def test_a_higher_target_or_the_goodput_objective_picks_50_50(tmp_path: Path) -> None:
    sweep = three_points(tmp_path)
    strict = sweep_of(sweep, slo=SLO, target=0.95)
    assert strict.best is not None and strict.best.point.values == ("50/50",)
    goodput = sweep_of(sweep, slo=SLO, objective="goodput")
    assert goodput.best is not None and goodput.best.point.values == ("50/50",)
    assert goodput.best.objective.mean == pytest.approx(10.0), "10 + 10 good requests in 2 s"


def test_no_feasible_point_names_the_one_with_the_highest_lowest_tenant_attainment(tmp_path: Path) -> None:
    sweep = sweep_dir(tmp_path)
    # 90/10: min(a 100 %, b 60 %) = 60 %; 70/30: min(a 70 %, b 80 %) = 70 %: the closest at target 0.9.
    job(sweep, "job0", ["split=90/10"], {"a": (3, 0), "b": (3, 4)})
    job(sweep, "job1", ["split=70/30"], {"a": (3, 3), "b": (3, 2)})
    result = sweep_of(sweep, slo=SLO)
    assert result.best is None and not any(p.feasible for p in result.points)
    assert result.closest is not None and result.closest.point.values == ("70/30",)
    assert (result.closest.worst_tenant, result.closest.min_attainment) == ("a", pytest.approx(0.7))


# --- rate sweeps ---------------------------------------------------------------------------


def test_highest_rate_meeting_the_target_stops_at_the_first_miss(tmp_path: Path) -> None:
    sweep = sweep_dir(tmp_path)
    key = "tenants.b.workload.arrival.rate"
    # b: 100 %, 90 %, 70 %, 90 % at 2, 4, 6, 8 req/s; a meets it everywhere.
    for i, (rate, slow) in enumerate(((2, 0), (4, 1), (6, 3), (8, 1))):
        job(sweep, f"job{i}", [f"{key}={rate}"], {"a": (3, 0), "b": (3, slow)})
    result = sweep_of(sweep, slo=SLO)
    limits = {r.tenant: r for r in result.rate_limits}
    assert limits["b"].rates == [2.0, 4.0, 6.0, 8.0]
    assert [e.mean for e in limits["b"].attainment] == pytest.approx([1.0, 0.9, 0.7, 0.9])
    assert limits["b"].max_rate == 4.0, "6 req/s misses; 8 meets again but the curve already broke"
    assert limits["a"].max_rate == 8.0


def test_rate_limits_are_per_value_of_the_other_axes(tmp_path: Path) -> None:
    sweep = sweep_dir(tmp_path)
    key = "tenants.b.workload.arrival.rate"
    for i, (split, rate, slow) in enumerate((("70/30", 2, 0), ("70/30", 4, 0), ("50/50", 2, 0), ("50/50", 4, 5))):
        job(sweep, f"job{i}", [f"split={split}", f"{key}={rate}"], {"b": (3, slow)})
    limits = {r.fixed["split"]: r.max_rate for r in sweep_of(sweep, slo=SLO).rate_limits}
    assert limits == {"50/50": 2.0, "70/30": 4.0}


# --- merged sweeps and the wall-time share -------------------------------------------------


def test_merged_folders_pool_trials_and_time_each_folder_on_its_own_clock(tmp_path: Path) -> None:
    # node1: job0 [0, 5] s, job1 [6, 10] s: windows 2 + 2 s over 10 s = 0.4.
    # node2 (another host, another monotonic clock): [1000, 1003] s, [1004, 1008] s: 4 / 8 = 0.5.
    base2 = 1000 * S
    folders = []
    for node, times in (("node1", ((0, 5), (6, 10))), ("node2", ((base2 // S, 1003), (1004, 1008)))):
        sweep = sweep_dir(tmp_path / node)
        folders.append(sweep)
        for i, (split, (t0, t1)) in enumerate(zip(("70/30", "50/50"), times, strict=True)):
            job(sweep, f"job{i}", [f"split={split}"], {"a": (3 if node == "node1" else 5, 0)}, trial=0, host=node,
                started_ns=t0 * S, ended_ns=t1 * S, load_s={"a": 1.0 if node == "node1" else 3.0})  # fmt: skip
    result = sweep_of(*folders)
    p = point(result, split="70/30")
    assert p.n_trials == 2 and p.get("a", "throughput_tok_s").mean == 25.0, "20 (node1) and 30 (node2) pool"
    shares = {f.folder.parent.name: (f.clock, f.wall_s, f.share) for f in result.cost.folders}
    assert shares == {"node1": ("monotonic", 10.0, 0.4), "node2": ("monotonic", 8.0, 0.5)}
    assert result.cost.share == pytest.approx(8 / 18), "pooled: Σ windows / Σ folder wall times"
    assert result.cost.load_s == {"a": 2.0} and result.cost.warmup_s == {"a": pytest.approx(0.1)}


def test_a_folder_whose_jobs_ran_on_several_hosts_is_timed_by_wall_clock(tmp_path: Path) -> None:
    sweep = sweep_dir(tmp_path)
    job(sweep, "job0", ["split=70/30"], {"a": (3, 0)}, host="n1", started_ns=5 * S, ended_ns=9 * S,
        started_wall="2026-11-22T10:00:00+00:00", ended_wall="2026-11-22T10:00:04+00:00")  # fmt: skip
    job(sweep, "job1", ["split=50/50"], {"a": (3, 0)}, host="n2", started_ns=1 * S, ended_ns=2 * S,
        started_wall="2026-11-22T10:00:02+00:00", ended_wall="2026-11-22T10:00:10+00:00")  # fmt: skip
    (cost,) = sweep_of(sweep).cost.folders
    assert (cost.clock, cost.hosts, cost.wall_s, cost.share) == ("wall", ["n1", "n2"], 10.0, 0.4)


def test_a_failed_job_costs_wall_time_but_adds_no_window(tmp_path: Path) -> None:
    sweep = sweep_dir(tmp_path)
    job(sweep, "job0", ["split=70/30"], {"a": (3, 0)}, started_ns=0, ended_ns=4 * S)
    job(sweep, "job1", ["split=50/50"], {"a": (3, 0)}, started_ns=4 * S, ended_ns=None, status="failed")
    (cost,) = sweep_of(sweep).cost.folders
    # job1 recorded no end: its start bounds the wall time (4 s); only job0's 2 s window counts.
    assert (cost.window_s, cost.wall_s, cost.share) == (2.0, 4.0, 0.5)


def test_the_same_run_copied_into_two_folders_counts_once(tmp_path: Path) -> None:
    sweep = sweep_dir(tmp_path / "node1")
    job(sweep, "job0", ["split=70/30"], {"a": (3, 0)}, trial=0)
    job(sweep, "job1", ["split=50/50"], {"a": (3, 0)}, trial=0, started_ns=2 * S)
    shutil.copytree(sweep, tmp_path / "copy" / sweep.name)
    result = sweep_of(sweep, tmp_path / "copy")
    assert [p.n_trials for p in result.points] == [1, 1]
    assert sum("are the same run" in w for w in result.warnings) == 2, result.warnings


# --- a mean exactly at the target ----------------------------------------


def test_a_mean_exactly_at_the_target_is_feasible_and_stored_exactly(tmp_path: Path) -> None:
    sweep = sweep_dir(tmp_path)
    # 90/10: b attains 100, 100, 80, 80 % over four trials: exactly 90 %, though numpy's mean of
    # the floats is 0.8999999999999999. 70/30 meets the target with fewer tokens.
    for trial, slow in enumerate((0, 0, 2, 2)):
        job(sweep, f"job{trial}", ["split=90/10"], {"a": (5, 0), "b": (3, slow)}, trial=trial)
        job(sweep, f"job{4 + trial}", ["split=70/30"], {"a": (3, 0), "b": (3, 0)}, trial=trial)
    result = sweep_of(sweep, slo=SLO)
    at_target = point(result, split="90/10")
    assert at_target.get("b", "slo_attainment").mean == 0.9
    assert at_target.feasible is True
    assert result.best is not None and result.best.point.values == ("90/10",)


def test_a_rate_whose_mean_attainment_equals_the_target_is_sustained(tmp_path: Path) -> None:
    sweep = sweep_dir(tmp_path)
    key = "tenants.b.workload.arrival.rate"
    for trial, slow in enumerate((0, 0, 2, 2)):
        job(sweep, f"job{trial}", [f"{key}=2"], {"b": (3, 0)}, trial=trial)
        job(sweep, f"job{4 + trial}", [f"{key}=4"], {"b": (3, slow)}, trial=trial)
    limits = {r.tenant: r.max_rate for r in sweep_of(sweep, slo=SLO).rate_limits}
    assert limits == {"b": 4.0}
