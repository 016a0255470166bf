"""``mt-analyze --predict SOLO_DIRS...``: solo runs -> ``predict.SoloProfile`` per tenant spec ->
the predicted grid and best split; with a measured sweep, predicted vs measured per point.

Profiles. The solo runs (one tenant each) are grouped by baseline identity (the tenant spec less
its share, ``baselines.same_identity``). In a group, a run under an MPS mode whose share was
applied (``share_applied``) is a point at its ``active_thread_pct`` (100 when unset); any other
(time-sliced) run is a whole-GPU reference. Trials at one share are averaged. The reference is
the mean of the time-sliced solos, else the largest share. Per run: throughput (tok/s, in the
window), SM activity and DRAM bandwidth (``hardware``: mean %, / 100), kernel-time fraction
(mean ``gpu_util_pct`` / 100); from the reference: TTFT/TPOT p50, the completed requests'
latencies (the latency sample of ``metrics``) for SLO attainment and their rate (req/s).

Which tenants: with a measured sweep, its tenants in order, each matched to the group of its
identity; else the groups in the order first seen, a single group standing for a pair of two
copies (``<name>`` and ``<name>#2``).

Best split: the sweep's rule (``sweep.judge`` and ``sweep.rank``) on the predicted values: feasible
when every tenant's predicted attainment >= the target, best by predicted aggregate throughput
(or goodput); without an SLO the highest predicted aggregate throughput.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from multitenant.analysis import hardware
from multitenant.analysis.baselines import same_identity
from multitenant.analysis.columns import AnalysisError
from multitenant.analysis.discover import find_run_dirs
from multitenant.analysis.metrics import RunMetrics, compute_run
from multitenant.analysis.names import OBJECTIVE_METRIC, RUN_LEVEL, SLO_METRICS
from multitenant.analysis.predict import (
    TIMESLICE,
    Prediction,
    SoloPoint,
    SoloProfile,
    predict_grid,
    predict_mps,
    predict_timeslice,
)
from multitenant.analysis.requests import latency_sample
from multitenant.analysis.stats import Estimate
from multitenant.analysis.sweep import Choice, Point, Sweep, judge, rank
from multitenant.config.schema import MPS_MODES

MIN_SHARES = 3  # fewer measured shares than this: the interpolation is mostly guesswork
# Predicted values written beside the measured ones (sweep.csv ``predicted``): (tenant metric,
# TenantPrediction attribute) and (run metric, Prediction property).
TENANT_FIELDS = (("throughput_tok_s", "throughput"), ("np", "np"), ("ttft_p50_ms", "ttft_p50_ms"),
                 ("tpot_p50_ms", "tpot_p50_ms"), ("slo_attainment", "slo_attainment"),
                 ("goodput_req_s", "goodput_req_s"))  # fmt: skip
RUN_FIELDS = (("gpu_throughput_tok_s", "throughput"), ("stp", "stp"), ("antt", "antt"), ("fairness", "fairness"),
              ("jain", "jain"), ("goodput_req_s", "goodput_req_s"))  # fmt: skip


@dataclass
class Oracle:
    profiles: list[SoloProfile]
    groups: list[list[RunMetrics]]  # the solo runs behind each profile
    predictions: list[Prediction]
    slo: dict[str, float] | None
    target: float
    objective: str
    best: Prediction | None = None
    closest: Prediction | None = None
    warnings: list[str] = field(default_factory=list)


def load_solos(solo_dirs: Sequence[str | Path], slo: dict[str, float] | None) -> list[RunMetrics]:
    from multitenant.analysis.load import load_runs

    dirs = [d for path in solo_dirs for d in find_run_dirs(path)]
    rms = [compute_run(run, slo) for run in load_runs(dirs)]
    solos = [rm for rm in rms if len(rm.tenants) == 1]
    if not solos:
        raise AnalysisError("--predict: no solo run (one tenant) among " + ", ".join(map(str, solo_dirs)))
    return solos


def group_solos(solos: Sequence[RunMetrics]) -> list[list[RunMetrics]]:
    """Solo runs by baseline identity, in the order first seen."""
    groups: list[list[RunMetrics]] = []
    for rm in solos:
        name = next(iter(rm.tenants))
        for g in groups:
            if same_identity(rm.run, name, g[0].run, next(iter(g[0].tenants))):
                g.append(rm)
                break
        else:
            groups.append([rm])
    return groups


def _fraction(value: float | None) -> float | None:
    return None if value is None else value / 100.0


def solo_point(rm: RunMetrics, share: float | None) -> SoloPoint:
    hw = hardware.hardware_summary(rm)
    tm = next(iter(rm.tenants.values()))
    busy = hardware.window_mean(rm, "gpu_util_pct")
    return SoloPoint(share, tm.throughput or 0.0, _fraction(hw.sm_active_pct if hw else None),
                     _fraction(hw.dram_bw_pct if hw else None), _fraction(busy))  # fmt: skip


def _mean_point(points: Sequence[SoloPoint]) -> SoloPoint:
    def mean(values: list[float | None]) -> float | None:
        known = [v for v in values if v is not None]
        return float(np.mean(known)) if known else None

    return SoloPoint(points[0].share, float(np.mean([p.throughput for p in points])),
                     mean([p.sm_active for p in points]), mean([p.dram_bw for p in points]),
                     mean([p.busy for p in points]))  # fmt: skip


def run_share(rm: RunMetrics, name: str) -> float | None:
    """The tenant's MPS share (percent) when the run applied one; None for a time-sliced run."""
    if rm.run.mode not in MPS_MODES:
        return None
    record = rm.run.manifest.tenants.get(name)
    if record is None or not record.share_applied:
        return None
    pct = record.share.active_thread_pct
    return 100.0 if pct is None else float(pct)


def build_profile(name: str, runs: Sequence[RunMetrics], warnings: list[str]) -> SoloProfile:
    by_share: dict[float, list[SoloPoint]] = {}
    whole: list[tuple[RunMetrics, SoloPoint]] = []
    for rm in runs:
        share = run_share(rm, next(iter(rm.tenants)))
        point = solo_point(rm, share)
        if share is None:
            whole.append((rm, point))
        else:
            by_share.setdefault(share, []).append(point)
    points = [_mean_point(by_share[s]) for s in sorted(by_share)]
    if len(points) < MIN_SHARES:
        warnings.append(f"{name}: solo runs at {len(points)} MPS share(s), fewer than {MIN_SHARES}: the model interpolates little")
    if any(p.dram_bw is None for p in points):
        warnings.append(f"{name}: solo runs without DRAM bandwidth counters: memory contention not modelled")
    if whole:
        reference = _mean_point([p for _, p in whole])
        ref_rm = whole[0][0]
    elif points:
        reference = points[-1]
        ref_rm = next(rm for rm in runs if run_share(rm, next(iter(rm.tenants))) == reference.share)
    else:
        raise AnalysisError(f"--predict: tenant {name} has no usable solo run")
    tm = next(iter(ref_rm.tenants.values()))
    profile = SoloProfile(name, points, reference,
                          latency_p50_ms={m: (tm.latency.get(m) or {}).get("p50") for m in ("ttft", "tpot")})  # fmt: skip
    if tm.table is not None:
        cols = tm.table.columns
        keep = latency_sample(cols["sent_ns"], cols["status"], ref_rm.window_ns)
        profile.requests_ms = {m: np.asarray(cols[f"{m}_ms"][keep], dtype=np.float64) for m in SLO_METRICS if f"{m}_ms" in cols}
        if ref_rm.window_s:
            profile.req_s = int(keep.sum()) / ref_rm.window_s
    return profile


def tenant_profiles(
    groups: list[list[RunMetrics]], tenants: Sequence[tuple[str, Any, str]] | None, warnings: list[str]
) -> tuple[list[SoloProfile], list[list[RunMetrics]]]:
    """One profile per tenant: ``tenants`` = (name, RunData, name in it) of a measured sweep,
    each matched by identity; else one per group (a lone group: a pair of two copies)."""
    if tenants is None:
        names = [next(iter(g[0].tenants)) for g in groups]
        if len(groups) == 1:
            return [build_profile(names[0], groups[0], warnings), build_profile(names[0] + "#2", groups[0], warnings)], groups * 2
        return [build_profile(n, g, warnings) for n, g in zip(names, groups, strict=True)], groups
    profiles, used = [], []
    for name, run, in_run in tenants:
        match = next((g for g in groups if same_identity(run, in_run, g[0].run, next(iter(g[0].tenants)))), None)
        if match is None:
            raise AnalysisError(f"--predict: no solo run matches tenant {name} of the sweep (same spec, any share)")
        profiles.append(build_profile(name, match, warnings))
        used.append(match)
    return profiles, used


def as_point(pred: Prediction, objective: str) -> Point:
    """A predicted configuration as a sweep point of one trial (for ``sweep.judge``)."""
    point = Point((pred.label,), tenants=[t.name for t in pred.tenants])
    for t in pred.tenants:
        point.attainment[t.name] = t.slo_attainment
        value = None if t.slo_attainment is None else float(t.slo_attainment)
        point.estimates[(t.name, "slo_attainment")] = Estimate(1, value, None, None, None)
    metric = OBJECTIVE_METRIC[objective]
    value = pred.throughput if metric == "gpu_throughput_tok_s" else pred.goodput_req_s
    point.estimates[(RUN_LEVEL, metric)] = Estimate(1, value, None, None, None)
    return point


def choose(oracle: Oracle) -> None:
    """The best (or closest) predicted configuration: the sweep's rule (module docstring)."""
    if oracle.slo is None:
        oracle.best = max(oracle.predictions, key=lambda p: p.throughput)
        return
    choices: list[Choice] = [judge(as_point(p, oracle.objective), oracle.target, oracle.objective) for p in oracle.predictions]
    best, closest = rank(choices)
    by_label = {p.label: p for p in oracle.predictions}
    oracle.best = by_label[best.point.values[0] or ""] if best else None
    oracle.closest = by_label[closest.point.values[0] or ""] if closest else None


def build(
    solo_dirs: Sequence[str | Path], slo: dict[str, float] | None, target: float, objective: str,
    tenants: Sequence[tuple[str, Any, str]] | None = None,
) -> Oracle:  # fmt: skip
    warnings: list[str] = []
    groups = group_solos(load_solos(solo_dirs, slo))
    profiles, used = tenant_profiles(groups, tenants, warnings)
    oracle = Oracle(profiles, used, predict_grid(profiles, slo), slo, target, objective, warnings=warnings)
    choose(oracle)
    return oracle


def for_runs(solo_dirs: Sequence[str | Path] | None, rms: Sequence[RunMetrics], slo: dict[str, float] | None,
             target: float, objective: str) -> Oracle | None:  # fmt: skip
    """The oracle for the measured runs' tenants (the first run that has each), or None without --predict."""
    if not solo_dirs:
        return None
    tenants: list[tuple[str, Any, str]] = []
    for rm in rms:
        for name in rm.tenants:
            if name not in [t for t, _, _ in tenants]:
                tenants.append((name, rm.run, name))
    return build(solo_dirs, slo, target, objective, tenants)


def configuration(point: Point) -> tuple[float, ...] | str | None:
    """The point's MPS caps (percent, in the sweep's tenant order) or TIMESLICE, from its first run."""
    runs = point.runs + point.excluded
    if not runs:
        return None
    rm = runs[0].rm
    if rm.run.mode not in MPS_MODES:
        return TIMESLICE
    caps = []
    for name in rm.tenants:
        pct = rm.run.tenant_manifest(name).share.active_thread_pct
        caps.append(100.0 if pct is None else float(pct))
    return tuple(caps)


def predict_for(oracle: Oracle, config: tuple[float, ...] | str) -> Prediction:
    if config == TIMESLICE or isinstance(config, str):
        return predict_timeslice(oracle.profiles, oracle.slo)
    return predict_mps(oracle.profiles, config, oracle.slo)


def attach(sweep: Sweep, oracle: Oracle) -> None:
    """Predicted values on every sweep point whose configuration is known (``Point.predicted``)."""
    names = [p.name for p in oracle.profiles]
    for point in sweep.points:
        config = configuration(point)
        if config is None or (not isinstance(config, str) and len(config) != len(names)):
            continue
        pred = predict_for(oracle, config)
        for t in pred.tenants:
            for metric, attr in TENANT_FIELDS:
                value = getattr(t, attr)
                point.predicted[(t.name, metric)] = None if value is None else float(value)
        for metric, attr in RUN_FIELDS:
            value = getattr(pred, attr)
            point.predicted[(RUN_LEVEL, metric)] = None if value is None else float(value)
