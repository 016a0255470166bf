"""A split oracle: co-located throughput, NP and latency predicted from solo runs only
(docs/prediction.md states the model, its constants and where it must fail).

Inputs per tenant (``SoloProfile``): the tenant alone under MPS at several SM shares s (percent
``active_thread_pct``), each with its throughput T(s) (tok/s), mean SM activity A(s) and DRAM
bandwidth B(s) (fractions of the whole GPU's SMs / of peak bandwidth, NVML GPM), and a
whole-GPU reference run (the time-sliced solo, else the largest share) with T_ref, the fraction of
time a kernel ran U (NVML utilization; A when absent), its TTFT/TPOT p50 and its per-request
latencies (ms) for SLO attainment.

The model (every number a fraction unless named):

1. Alone at share s: T(s), A(s), B(s) interpolated linearly between the measured shares, T made
   non-decreasing in s (a running maximum); below the smallest share T scales in proportion to s
   (T(s) = T(s_min) s / s_min), A and B are held; above the largest all three are held.
2. MPS with caps s_i: a tenant's memory-bound fraction m_i = min(1, B_i / A_i) (0 without
   counters). Memory: sigma_mem = max(1, sum_i B_i / DRAM_SATURATION). SMs: only when
   sum_i s_i > 100, sigma_sm = max(1, sum_i A_i); else 1 (each tenant has its SMs).
   A step stretches by k_i = (1 - m_i) sigma_sm + m_i sigma_mem, so T_i' = T_i(s_i) / k_i.
3. Time-slicing: NP_i = min(1, 1 / sum_j U_j) (1 - TIMESLICE_OVERHEAD), T_i' = NP_i T_ref,i.
4. NP_i = T_i' / T_ref,i; STP = sum NP_i; ANTT = mean 1 / NP_i; fairness = min NP / max NP;
   closed loop at a fixed batch: TTFT and TPOT p50 = the reference's / NP_i (Little's law), and
   SLO attainment = the share of the reference's judged requests whose latencies / NP_i meet
   every bound (a latency the request lacks meets it, as in ``metrics``).

Nothing here is fitted to co-located runs.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from fractions import Fraction

import numpy as np

# Device constants, uncalibrated (docs/prediction.md says where each would be calibrated).
# The fraction of nominal peak DRAM bandwidth the tenants can reach together before the memory
# system is saturated (GPM's dram_bw is against the nominal peak).
DRAM_SATURATION = 1.0
# Throughput lost to time-slicing's context switches while two or more tenants take turns.
TIMESLICE_OVERHEAD = 0.02
# The grid: pairs (and N tenants) split 100 % in steps of GRID_STEP, each at least GRID_STEP.
GRID_STEP = 10
TIMESLICE = "timeslice"  # the label of the time-sliced configuration


@dataclass(frozen=True)
class SoloPoint:
    """One solo measurement: share (percent, None: no MPS cap), throughput (tok/s), SM activity,
    DRAM bandwidth and kernel-time fraction (0..1, None: not recorded)."""

    share: float | None
    throughput: float
    sm_active: float | None = None
    dram_bw: float | None = None
    busy: float | None = None


@dataclass
class SoloProfile:
    """A tenant spec measured alone: MPS ``points`` (any order) and the whole-GPU ``reference``.
    ``latency_p50_ms``: the reference's TTFT/TPOT p50; ``requests_ms``: its judged requests'
    latencies per metric (ms, NaN where a request has none) for SLO attainment; ``req_s``: its
    completed requests per second (goodput = req_s NP attainment)."""

    name: str
    points: list[SoloPoint]
    reference: SoloPoint
    latency_p50_ms: dict[str, float | None] = field(default_factory=dict)
    requests_ms: dict[str, np.ndarray] = field(default_factory=dict)
    req_s: float | None = None


@dataclass
class TenantPrediction:
    name: str
    share: float | None
    throughput: float
    np: float
    stretch: float  # the step stretch k (MPS) or 1 / NP share of turns (time-slicing)
    ttft_p50_ms: float | None = None
    tpot_p50_ms: float | None = None
    slo_attainment: Fraction | None = None
    goodput_req_s: float | None = None


@dataclass
class Prediction:
    """One configuration: ``label`` "70/30", "100/100" or TIMESLICE."""

    label: str
    tenants: list[TenantPrediction]

    @property
    def nps(self) -> np.ndarray:
        return np.asarray([t.np for t in self.tenants], dtype=np.float64)

    @property
    def throughput(self) -> float:
        return float(sum(t.throughput for t in self.tenants))

    @property
    def stp(self) -> float:
        return float(self.nps.sum())

    @property
    def antt(self) -> float | None:
        nps = self.nps
        return float(np.mean(1.0 / nps)) if bool(np.all(nps > 0)) else None

    @property
    def fairness(self) -> float | None:
        nps = self.nps
        return float(nps.min() / nps.max()) if nps.max() > 0 else None

    @property
    def jain(self) -> float | None:
        nps = self.nps
        square = float((nps**2).sum())
        return float(nps.sum() ** 2 / (nps.size * square)) if square > 0 else None

    @property
    def goodput_req_s(self) -> float | None:
        values = [t.goodput_req_s for t in self.tenants]
        return None if any(v is None for v in values) else float(sum(v or 0.0 for v in values))


def interpolate(profile: SoloProfile, share: float) -> SoloPoint:
    """T(s), A(s), B(s) at ``share`` (module docstring, 1)."""
    pts = sorted((p for p in profile.points if p.share is not None), key=lambda p: p.share or 0.0)
    if not pts:
        return profile.reference
    shares = np.asarray([p.share for p in pts], dtype=np.float64)
    tput = np.maximum.accumulate(np.asarray([p.throughput for p in pts], dtype=np.float64))
    # Below the smallest share: in proportion to the share; else between the measured ones.
    t = float(tput[0] * share / shares[0]) if share < shares[0] else float(np.interp(share, shares, tput))

    def column(values: list[float | None]) -> float | None:
        known = [(s, v) for s, v in zip(shares, values, strict=True) if v is not None]
        if not known:
            return None
        return float(np.interp(share, [s for s, _ in known], [v for _, v in known]))

    return SoloPoint(share, t, column([p.sm_active for p in pts]), column([p.dram_bw for p in pts]),
                     column([p.busy for p in pts]))  # fmt: skip


def memory_fraction(point: SoloPoint) -> float:
    """m = min(1, B / A): the part of a step bound by DRAM (0 without counters or activity)."""
    if point.dram_bw is None or point.sm_active is None:
        return 0.0
    if point.sm_active <= 0:
        return 1.0 if point.dram_bw > 0 else 0.0
    return min(1.0, point.dram_bw / point.sm_active)


def mps_stretch(points: Sequence[SoloPoint], caps: Sequence[float]) -> list[float]:
    """Each tenant's step stretch k_i under MPS caps (module docstring, 2)."""
    bw = sum(p.dram_bw or 0.0 for p in points)
    sigma_mem = max(1.0, bw / DRAM_SATURATION)
    sigma_sm = max(1.0, sum(p.sm_active or 0.0 for p in points)) if sum(caps) > 100 else 1.0
    out = []
    for p in points:
        m = memory_fraction(p)
        out.append((1.0 - m) * sigma_sm + m * sigma_mem)
    return out


def timeslice_np(busy: Sequence[float]) -> list[float]:
    """NP_i = min(1, 1 / sum U) (1 - TIMESLICE_OVERHEAD) (module docstring, 3); alone: 1."""
    if len(busy) < 2:
        return [1.0] * len(busy)
    total = sum(busy)
    share = 1.0 if total <= 1.0 else 1.0 / total
    return [share * (1.0 - TIMESLICE_OVERHEAD)] * len(busy)


def attainment(profile: SoloProfile, np_value: float, slo: dict[str, float]) -> Fraction | None:
    """The reference's judged requests whose latencies / NP meet every bound of ``slo`` (ms)."""
    if not profile.requests_ms or np_value <= 0:
        return None
    n = len(next(iter(profile.requests_ms.values())))
    if n == 0:
        return None
    good = np.ones(n, dtype=bool)
    for metric, bound in slo.items():
        values = profile.requests_ms.get(metric)
        if values is None:
            return None
        scaled = values / np_value
        good &= np.isnan(scaled) | (scaled <= bound)
    return Fraction(int(good.sum()), n)


def _tenant(profile: SoloProfile, share: float | None, tput: float, stretch: float,
            slo: dict[str, float] | None) -> TenantPrediction:  # fmt: skip
    npv = tput / profile.reference.throughput if profile.reference.throughput > 0 else 0.0

    def scaled(metric: str) -> float | None:
        v = profile.latency_p50_ms.get(metric)
        return None if v is None or npv <= 0 else v / npv

    att = attainment(profile, npv, slo) if slo else None
    good = None
    if profile.req_s is not None:
        good = profile.req_s * npv * (float(att) if att is not None else 1.0)
    return TenantPrediction(profile.name, share, tput, npv, stretch, scaled("ttft"), scaled("tpot"),
                            att, good if slo else None)  # fmt: skip


def predict_mps(profiles: Sequence[SoloProfile], caps: Sequence[float], slo: dict[str, float] | None = None) -> Prediction:
    """The tenants co-located under MPS with ``caps`` (percent, in the tenants' order)."""
    alone = [interpolate(p, c) for p, c in zip(profiles, caps, strict=True)]
    stretch = mps_stretch(alone, caps)
    tenants = [
        _tenant(p, c, a.throughput / k, k, slo) for p, c, a, k in zip(profiles, caps, alone, stretch, strict=True)
    ]
    return Prediction(split_label(caps), tenants)


def predict_timeslice(profiles: Sequence[SoloProfile], slo: dict[str, float] | None = None) -> Prediction:
    """The tenants time-sliced on the whole GPU (module docstring, 3)."""
    busy = [_busy(p.reference) for p in profiles]
    nps = timeslice_np(busy)
    tenants = [
        _tenant(p, None, n * p.reference.throughput, 1.0 / n if n > 0 else math.inf, slo)
        for p, n in zip(profiles, nps, strict=True)
    ]
    return Prediction(TIMESLICE, tenants)


def _busy(point: SoloPoint) -> float:
    """U: kernel-time fraction, else SM activity, else 1 (assume the tenant keeps the GPU busy)."""
    for value in (point.busy, point.sm_active):
        if value is not None:
            return value
    return 1.0


def split_label(caps: Sequence[float]) -> str:
    return "/".join(f"{c:g}" for c in caps)


def grid(n: int, step: int = GRID_STEP) -> list[tuple[int, ...]]:
    """Every split of 100 % over ``n`` tenants in steps of ``step`` (each >= step), first
    tenant's share descending (90/10 ... 10/90), then 100/100/...: the MPS configurations."""
    parts = range(step, 101 - step * (n - 1), step)
    splits = [c for c in itertools.product(parts, repeat=n) if sum(c) == 100]
    splits.sort(reverse=True)
    return [*splits, tuple([100] * n)]


def predict_grid(profiles: Sequence[SoloProfile], slo: dict[str, float] | None = None) -> list[Prediction]:
    """Every grid split under MPS, then time-slicing."""
    out = [predict_mps(profiles, caps, slo) for caps in grid(len(profiles))]
    return [*out, predict_timeslice(profiles, slo)]
