"""Sweeps: runs grouped into points, means and 95 % confidence intervals over trials, the best
point under an SLO, rate limits and the measured share of wall time.

Grouping. A run's command-line overrides (manifest ``overrides``, else its
``.hydra/overrides.yaml``) as ``{key: value}``, with Hydra's own keys and the ``trial`` /
``trials`` keys left out (leading ``+``/``~`` stripped from keys). The sweep's **axes** are the
keys whose value differs between the runs (a key some runs lack differs); overrides equal in
every run are no axis. Runs with the same values on every axis are one **point**; its runs are
its trials, wherever they came from (several sweep folders pool). When the runs belong to
different experiments (manifest ``name``), ``experiment`` is an axis too, so unrelated runs never
pool. Runs whose status is not ``ok`` stay out of every mean, with a warning naming them; the
same run found twice (equal host, ``started_ns`` and folder name: a copied folder) counts once.

Estimates: each point's mean and 95 % Student-t interval over its trials (``stats.estimate``) of
the headline metrics (``names.TENANT_METRICS``, ``RUN_METRICS``), each run's own figures.

Best point. With an SLO and target q: a point is feasible when every tenant's mean SLO attainment
is >= q, compared exactly (``stats.at_least`` on the mean of the trials' good/judged fractions;
a tenant without an attainment makes it infeasible); the best point is the feasible one
with the highest mean aggregate throughput (objective ``throughput``) or mean aggregate goodput
(``goodput``); ties go to the higher lowest-tenant attainment, then to the earlier point. With no
feasible point, the closest is the one with the highest lowest-tenant mean attainment (ties: the
higher objective).

Rate sweeps. For an axis ``tenants.<t>.workload.arrival.rate`` (values numbers, req/s), for each
combination of the other axes and each tenant: attainment against rate, and the highest swept rate
up to which the tenant meets q at every swept rate (None when it misses at the lowest).
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

import numpy as np

from multitenant.analysis.metrics import RunMetrics, TenantMetrics
from multitenant.analysis.names import (
    HEADLINE_LATENCY,
    METRIC_BOUNDS,
    OBJECTIVE_METRIC,
    OBJECTIVES,
    RUN_LEVEL,
    RUN_METRICS,
    TENANT_METRICS,
)
from multitenant.analysis.stats import Estimate, at_least, estimate, mean_fraction
from multitenant.analysis.sweep_cost import Cost, sweep_cost
from multitenant.schema import RunStatus

TRIAL_KEYS = ("trial", "trials")
EXPERIMENT_AXIS = "experiment"
_RATE_KEY = re.compile(r"^tenants\.([^.]+)\.workload\.arrival\.rate$")
_SHARE_KEY = re.compile(r"^tenants\.([^.]+)\.share\.active_thread_pct$")
_NUMBER = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")
_SPLIT = re.compile(r"^\d+(\.\d+)?(/\d+(\.\d+)?)+$")


# ---------------------------------------------------------------------------------------------
# Runs -> overrides, trial, headline values


def overrides_dict(items: Sequence[object]) -> dict[str, str]:
    """``["split=70/30", "+x=1"]`` -> ``{"split": "70/30", "x": "1"}``; Hydra's keys left out."""
    out: dict[str, str] = {}
    for item in items:
        text = str(item)
        if "=" not in text:
            continue
        key, value = text.split("=", 1)
        key = key.lstrip("+~").strip()
        if key.startswith(("hydra.", "hydra/")) or key == "hydra":
            continue
        out[key] = value.strip()
    return out


def run_overrides(rm: RunMetrics) -> dict[str, str]:
    """The run's overrides (manifest ``overrides``, else ``.hydra/overrides.yaml``), trial keys included."""
    items: list[object] = list(rm.run.manifest.overrides or [])
    if not items:
        path = rm.run.run_dir / ".hydra" / "overrides.yaml"
        items = []
        if path.is_file():
            import yaml

            loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
            items = loaded if isinstance(loaded, list) else []
    return overrides_dict(items)


def run_trial(rm: RunMetrics, overrides: dict[str, str]) -> int | None:
    """The run's trial index: ``trial`` of config.resolved.yaml, else its ``trial=K`` override."""
    for value in (rm.run.config.trial if rm.run.config else None, overrides.get("trial")):
        try:
            if value is not None:
                return int(value)
        except (TypeError, ValueError):
            continue
    return None


def headline(rm: RunMetrics) -> dict[tuple[str, str], float | None]:
    """The run's headline figures by (tenant or RUN_LEVEL, metric)."""
    out: dict[tuple[str, str], float | None] = {}
    goodputs: list[float | None] = []
    for name, tm in rm.tenants.items():
        values: dict[str, float | None] = {
            "throughput_tok_s": tm.throughput,
            "np": tm.np,
            "slo_attainment": tm.slo_attainment,
            "goodput_req_s": tm.goodput_req_s,
        }
        for metric in HEADLINE_LATENCY:
            stats = tm.latency.get(metric) or {}
            values[f"{metric}_p50_ms"] = stats.get("p50")
            values[f"{metric}_p99_ms"] = stats.get("p99")
        out.update({(name, m): values[m] for m in TENANT_METRICS})
        goodputs.append(tm.goodput_req_s)
    aggregate_goodput = (
        None if not goodputs or any(g is None for g in goodputs) else float(sum(g or 0.0 for g in goodputs))
    )
    run_values: dict[str, float | None] = {
        "gpu_throughput_tok_s": rm.gpu_throughput_tok_s,
        "stp": rm.stp,
        "antt": rm.antt,
        "fairness": rm.fairness,
        "jain": rm.jain,
        "goodput_req_s": aggregate_goodput,
    }
    out.update({(RUN_LEVEL, m): run_values[m] for m in RUN_METRICS})
    return out


# ---------------------------------------------------------------------------------------------
# Axis values


def is_rate_key(key: str) -> bool:
    """An open-loop arrival rate axis: ``tenants.<t>.workload.arrival.rate``."""
    return _RATE_KEY.match(key) is not None


def is_split_key(key: str) -> bool:
    """An MPS share axis: ``split`` (``70/30``) or ``tenants.<t>.share.active_thread_pct``."""
    return key == "split" or _SHARE_KEY.match(key) is not None


def axis_number(value: str | None) -> float | None:
    """A value as a number for ordering and plotting: ``4`` -> 4.0, a split ``70/30`` -> 70.0 (its
    first tenant's share); None for anything else."""
    if value is None:
        return None
    text = value.strip().strip("'\"")
    if _NUMBER.match(text):
        return float(text)
    if _SPLIT.match(text):
        return float(text.split("/", 1)[0])
    return None


def value_order(value: str | None) -> tuple[int, float, str]:
    """Sort key of an axis value: numbers (and splits) by number, others by text, unset last."""
    if value is None:
        return (2, 0.0, "")
    number = axis_number(value)
    return (0, number, value) if number is not None else (1, 0.0, value)


def short_key(key: str) -> str:
    """An axis name for labels: its last part, after the tenant's name for a tenant's key
    (``tenants.b.workload.arrival.rate`` -> ``b.rate``)."""
    parts = key.split(".")
    if parts[0] == "tenants" and len(parts) > 2:
        return f"{parts[1]}.{parts[-1]}"
    return parts[-1]


# ---------------------------------------------------------------------------------------------
# The sweep


@dataclass
class SweepRun:
    """One run of the sweep: its metrics, label, overrides and trial; ``excluded`` says why it
    stays out of the means (None: it counts)."""

    rm: RunMetrics
    label: str
    overrides: dict[str, str]
    trial: int | None
    excluded: str | None = None


@dataclass
class Point:
    """One sweep point: its value on every axis, the trials that count and the estimates."""

    values: tuple[str | None, ...]
    runs: list[SweepRun] = field(default_factory=list)
    excluded: list[SweepRun] = field(default_factory=list)
    tenants: list[str] = field(default_factory=list)
    estimates: dict[tuple[str, str], Estimate] = field(default_factory=dict)
    feasible: bool | None = None  # None without an SLO
    pareto: bool | None = None  # None unless every tenant has an NP at this point (and >= 2 tenants)
    # Each tenant's mean SLO attainment over the trials, exactly (feasibility compares this).
    attainment: dict[str, Fraction | None] = field(default_factory=dict)
    predicted: dict[tuple[str, str], float | None] = field(default_factory=dict)  # --predict (``oracle``)

    @property
    def n_trials(self) -> int:
        return len(self.runs)

    def get(self, tenant: str, metric: str) -> Estimate:
        return self.estimates.get((tenant, metric)) or Estimate(0, None, None, None, None)

    def label(self, axes: Sequence[str]) -> str:
        """``split=70/30, b.rate=4`` (``default`` for an axis this point does not set)."""
        if not axes:
            return "all runs"
        return ", ".join(
            f"{short_key(k)}={'default' if v is None else v}" for k, v in zip(axes, self.values, strict=True)
        )


@dataclass
class Choice:
    """A point judged against the SLO target: feasibility, objective, lowest-tenant attainment."""

    point: Point
    feasible: bool
    objective: Estimate
    min_attainment: float | None  # min over tenants of the mean attainment
    worst_tenant: str | None
    # Every tenant's CI lower bound >= target too (None when some tenant has no interval).
    holds_at_ci_low: bool | None


@dataclass
class RateLimit:
    """One tenant's SLO attainment against one rate axis, the other axes held at ``fixed``."""

    key: str
    tenant: str
    fixed: dict[str, str | None]
    rates: list[float]
    attainment: list[Estimate]
    max_rate: float | None  # highest swept rate up to which every swept rate meets the target


@dataclass
class Sweep:
    axes: list[str]
    points: list[Point]
    tenants: list[str]
    rows: list[tuple[str, str]]  # (tenant or RUN_LEVEL, metric) with a value in some run
    runs: list[SweepRun]
    cost: Cost
    slo: dict[str, float] | None = None
    target: float = 0.9
    objective: str = "throughput"
    choices: list[Choice] = field(default_factory=list)
    best: Choice | None = None
    closest: Choice | None = None
    rate_limits: list[RateLimit] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def split_axes(self) -> list[str]:
        return [k for k in self.axes if is_split_key(k)]

    @property
    def rate_axes(self) -> list[str]:
        return [k for k in self.axes if is_rate_key(k)]


def is_sweep(rms: Sequence[RunMetrics]) -> bool:
    """Whether the analysis gets a sweep summary: several runs, or a job of a Hydra multirun."""
    return len(rms) > 1 or any((rm.run.run_dir.parent / "multirun.yaml").is_file() for rm in rms)


def build_sweep(
    rms: Sequence[RunMetrics],
    labels: dict[Path, str] | None = None,
    target: float = 0.9,
    objective: str = "throughput",
) -> Sweep:
    """Group ``rms`` into points and compute every estimate, the best point (when the runs were
    analysed with an SLO), rate limits and the wall-time share."""
    if objective not in OBJECTIVES:
        raise ValueError(f"objective {objective!r} is unknown; use one of {', '.join(OBJECTIVES)}")
    labels = labels or {}
    warnings: list[str] = []
    runs: list[SweepRun] = []
    seen: dict[tuple[str, int, str], SweepRun] = {}
    for rm in rms:
        overrides = run_overrides(rm)
        sr = SweepRun(
            rm, labels.get(rm.run.run_dir, rm.run.run_dir.name), overrides, run_trial(rm, overrides)
        )
        host = str(rm.run.manifest.host.hostname or "")
        started = rm.run.manifest.started_ns
        if isinstance(started, int):
            twin = seen.get((host, started, rm.run.run_dir.name))
            if twin is not None:
                warnings.append(
                    f"{sr.label} and {twin.label} are the same run (host {host or '?'}, same start time): counted once"
                )
                continue
            seen[(host, started, rm.run.run_dir.name)] = sr
        if rm.run.status != RunStatus.OK:
            reason = rm.run.manifest.reason
            sr.excluded = rm.run.status + (f": {reason}" if reason else "")
        runs.append(sr)

    keyed = [{k: v for k, v in sr.overrides.items() if k not in TRIAL_KEYS} for sr in runs]
    if len({sr.rm.run.name for sr in runs}) > 1:
        for sr, keys in zip(runs, keyed, strict=True):
            keys[EXPERIMENT_AXIS] = sr.rm.run.name
    all_keys = sorted({k for keys in keyed for k in keys})
    axes = [k for k in all_keys if len({keys.get(k) for keys in keyed}) > 1]
    if EXPERIMENT_AXIS in axes:
        axes = [EXPERIMENT_AXIS] + [k for k in axes if k != EXPERIMENT_AXIS]

    points_by: dict[tuple[str | None, ...], Point] = {}
    for sr, keys in zip(runs, keyed, strict=True):
        values = tuple(keys.get(k) for k in axes)
        point = points_by.setdefault(values, Point(values))
        (point.excluded if sr.excluded is not None else point.runs).append(sr)
    points = sorted(points_by.values(), key=lambda p: tuple(value_order(v) for v in p.values))

    excluded = [sr for sr in runs if sr.excluded is not None]
    if excluded:
        warnings.append(
            f"{len(excluded)} run(s) left out of the sweep means: "
            + "; ".join(f"{sr.label} ({sr.excluded})" for sr in excluded)
        )

    tenants: list[str] = []
    values_by_run = {id(sr): headline(sr.rm) for sr in runs if sr.excluded is None}
    for sr in runs:
        for name in sr.rm.tenants:
            if name not in tenants:
                tenants.append(name)
    rows: list[tuple[str, str]] = []
    for tenant in [*tenants, RUN_LEVEL]:
        for metric in RUN_METRICS if tenant == RUN_LEVEL else TENANT_METRICS:
            if any(v.get((tenant, metric)) is not None for v in values_by_run.values()):
                rows.append((tenant, metric))
    for point in points:
        point.tenants = [t for t in tenants if any(t in sr.rm.tenants for sr in point.runs + point.excluded)]
        for row in rows:
            trial_values = [values_by_run[id(sr)].get(row) for sr in point.runs]
            point.estimates[row] = estimate(trial_values, bounds=METRIC_BOUNDS.get(row[1], (None, None)))
        for t in point.tenants:
            exact = mean_fraction([exact_attainment(sr.rm.tenants.get(t)) for sr in point.runs])
            point.attainment[t] = exact
            e = point.estimates.get((t, "slo_attainment"))
            if e is not None and exact is not None:
                # The stored mean is the exact one, rounded once (0.9, not 0.8999999999999999).
                point.estimates[(t, "slo_attainment")] = dataclasses.replace(e, mean=float(exact))
        if not point.runs:
            warnings.append(f"point {point.label(axes)} has no run that counts: no estimates")

    gpus = sorted({str(sr.rm.run.gpu_name) for sr in runs if sr.excluded is None})
    if len(gpus) > 1:
        warnings.append(f"runs on different GPUs pool into the same points: {', '.join(gpus)}")

    slo = next((sr.rm.slo for sr in runs if sr.rm.slo is not None), None)
    sweep = Sweep(
        axes, points, tenants, rows, runs, sweep_cost([(sr.rm, sr.excluded is None) for sr in runs]), slo=slo, target=target, objective=objective
    )
    sweep.warnings = warnings
    _pareto(sweep)
    if slo is not None:
        _choose(sweep)
        sweep.rate_limits = rate_limits(sweep)
    return sweep


def _pareto(sweep: Sweep) -> None:
    """Mark the points whose mean NPs no other point beats for every tenant at once (needs >= 2
    tenants with an NP mean): p is dominated when some q has NP_i(q) >= NP_i(p) for every i and
    > for one."""
    if len(sweep.tenants) < 2:
        return
    vectors: dict[int, np.ndarray] = {}
    for i, point in enumerate(sweep.points):
        nps = [point.get(t, "np").mean for t in sweep.tenants]
        if all(x is not None for x in nps):
            vectors[i] = np.asarray(nps, dtype=np.float64)
    for i, v in vectors.items():
        dominated = any(bool(np.all(w >= v) and np.any(w > v)) for j, w in vectors.items() if j != i)
        sweep.points[i].pareto = not dominated


def exact_attainment(tm: TenantMetrics | None) -> Fraction | None:
    """A run's SLO attainment of one tenant as the fraction good / judged."""
    if tm is None or tm.slo_attainment is None:
        return None
    if tm.slo_judged:
        return Fraction(tm.slo_good or 0, tm.slo_judged)
    return Fraction(repr(tm.slo_attainment))  # no counts (a hand-made RunMetrics): its decimal


def judge(point: Point, target: float, objective: str) -> Choice:
    """Feasibility of one point (every tenant's exact mean attainment >= target, ``stats.at_least``)
    and its objective."""
    attainments = {t: point.get(t, "slo_attainment") for t in point.tenants}
    exact = {t: point.attainment.get(t) for t in point.tenants}
    known = {t: m for t, m in exact.items() if m is not None}
    feasible = (
        bool(point.tenants) and len(known) == len(point.tenants) and all(at_least(m, target) for m in known.values())
    )
    worst = min(known, key=lambda t: known[t]) if known else None
    lows = [e.ci_low for e in attainments.values()]
    holds = (
        None if not lows or any(x is None for x in lows) else all(x is not None and x >= target for x in lows)
    )
    return Choice(
        point=point,
        feasible=feasible,
        objective=point.get(RUN_LEVEL, OBJECTIVE_METRIC[objective]),
        min_attainment=None if worst is None or len(known) < len(point.tenants) else float(known[worst]),
        worst_tenant=worst,
        holds_at_ci_low=holds,
    )


def _choose(sweep: Sweep) -> None:
    """Best feasible point by the objective, else the closest point (module docstring)."""
    sweep.choices = [judge(p, sweep.target, sweep.objective) for p in sweep.points]
    for choice in sweep.choices:
        choice.point.feasible = choice.feasible
    sweep.best, sweep.closest = rank(sweep.choices)


def rank(choices: Sequence[Choice]) -> tuple[Choice | None, Choice | None]:
    """(best, closest): the feasible choice with the highest objective (ties: higher lowest
    attainment, then the earlier), else (None, the highest lowest attainment; ties: objective)."""

    def objective(c: Choice) -> float:
        return c.objective.mean if c.objective.mean is not None else -math.inf

    def attainment(c: Choice) -> float:
        return c.min_attainment if c.min_attainment is not None else -math.inf

    feasible = [c for c in choices if c.feasible]
    if feasible:
        # max() keeps the first of equals: the earlier point wins a full tie.
        return max(feasible, key=lambda c: (objective(c), attainment(c))), None
    judged = [c for c in choices if c.min_attainment is not None]
    return None, (max(judged, key=lambda c: (attainment(c), objective(c))) if judged else None)


def rate_limits(sweep: Sweep) -> list[RateLimit]:
    """Attainment against each rate axis per tenant, and the highest rate meeting the target."""
    out: list[RateLimit] = []
    for key in sweep.rate_axes:
        k = sweep.axes.index(key)
        others = [a for a in sweep.axes if a != key]
        groups: dict[tuple[str | None, ...], list[tuple[float, Point]]] = {}
        unreadable = sorted({str(p.values[k]) for p in sweep.points if _rate(p.values[k]) is None})
        if unreadable:
            sweep.warnings.append(
                f"{key}: values {', '.join(unreadable)} are not rates (req/s numbers); left out of the rate limits"
            )
        for point in sweep.points:
            rate = _rate(point.values[k])
            if rate is None:
                continue
            fixed = tuple(v for a, v in zip(sweep.axes, point.values, strict=True) if a != key)
            groups.setdefault(fixed, []).append((rate, point))
        for fixed, members in groups.items():
            members.sort(key=lambda rp: rp[0])
            for tenant in sweep.tenants:
                rates = [r for r, _ in members]
                att = [p.get(tenant, "slo_attainment") for _, p in members]
                max_rate = None
                for rate, p in members:
                    if not at_least(p.attainment.get(tenant), sweep.target):
                        break
                    max_rate = rate
                out.append(
                    RateLimit(key, tenant, dict(zip(others, fixed, strict=True)), rates, att, max_rate)
                )
    return out


def _rate(value: str | None) -> float | None:
    text = None if value is None else value.strip().strip("'\"")
    return float(text) if text is not None and _NUMBER.match(text) else None
