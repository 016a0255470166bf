"""Statistics: a latency sample's mean, population std and percentiles, and a metric's mean
and Student-t confidence interval over a sweep point's trials.

Latency statistics: mean, population std (ddof 0) and percentiles p50, p90, p95, p99, p99.9 by
linear interpolation between order statistics (numpy's default ``method="linear"``), all in ms;
null when there is no sample.

Estimates over trials. For n values x_1..x_n of one metric (trials where it is defined):
  mean = Σ x_i / n,  s = sqrt(Σ (x_i - mean)² / (n - 1)),
  95 % CI = mean ± t_{0.975, n-1} · s / sqrt(n)        (Student t; ``t_quantile``)
With n = 1 there is no interval (``ci_low`` = ``ci_high`` = None); with n = 0 no mean either.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction

import numpy as np

from multitenant.analysis.names import PERCENTILES, STAT_KEYS

CONFIDENCE = 0.95


def latency_stats(values_ms: np.ndarray) -> dict[str, float | None]:
    """Mean, population std and percentiles (numpy linear interpolation) of ``values_ms``."""
    if values_ms.size == 0:
        return dict.fromkeys(STAT_KEYS)
    pct = np.percentile(values_ms, [q for _, q in PERCENTILES])
    out: dict[str, float | None] = {"mean": float(np.mean(values_ms)), "std": float(np.std(values_ms))}
    for (key, _), value in zip(PERCENTILES, pct, strict=True):
        out[key] = float(value)
    return out



def t_cdf_two_sided(t: float, df: int) -> float:
    """P(|T| <= t) for Student's t with integer ``df`` >= 1, exactly (Abramowitz & Stegun 26.7.3-4).

    With θ = atan(t / sqrt(df)), c = cos θ, s = sin θ:
      df odd:  (2/π) (θ + s c (1 + (2/3) c² + (2·4)/(3·5) c⁴ + ... + (2·4···(df-3))/(3·5···(df-2)) c^(df-3)))
      df even: s (1 + (1/2) c² + (1·3)/(2·4) c⁴ + ... + (1·3···(df-3))/(2·4···(df-2)) c^(df-2))
    (the bracketed series is empty for df = 1 and is 1 for df = 2, 3).
    """
    if df < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {df}")
    theta = math.atan(abs(t) / math.sqrt(df))
    c2, s = math.cos(theta) ** 2, math.sin(theta)
    if df % 2 == 1:
        if df == 1:
            return 2.0 * theta / math.pi
        term, total = 1.0, 1.0
        for k in range(2, df - 1, 2):  # factors k/(k+1) for k = 2, 4, ..., df-3
            term *= k / (k + 1) * c2
            total += term
        return 2.0 / math.pi * (theta + s * math.cos(theta) * total)
    term, total = 1.0, 1.0
    for k in range(1, df - 2, 2):  # factors k/(k+1) for k = 1, 3, ..., df-3
        term *= k / (k + 1) * c2
        total += term
    return s * total


def t_quantile(df: int, confidence: float = CONFIDENCE) -> float:
    """t_{(1+confidence)/2, df}: the half-width factor of a two-sided ``confidence`` interval.

    Solved from ``t_cdf_two_sided`` by bisection to double precision (t_{0.975,1} = 12.7062,
    t_{0.975,2} = 4.3027, t_{0.975,30} = 2.0423, t_{0.975,∞} = 1.9600). No scipy needed.
    """
    lo, hi = 0.0, 1.0
    while t_cdf_two_sided(hi, df) < confidence:
        hi *= 2.0
    for _ in range(200):
        mid = (lo + hi) / 2.0
        if mid in (lo, hi):
            break
        if t_cdf_two_sided(mid, df) < confidence:
            lo = mid
        else:
            hi = mid
    return hi


@dataclass(frozen=True)
class Estimate:
    """One metric at one point over its trials: n values, mean, sample std (ddof 1), 95 % CI."""

    n: int
    mean: float | None
    std: float | None
    ci_low: float | None
    ci_high: float | None

    @property
    def half_width(self) -> float | None:
        return None if self.ci_low is None or self.ci_high is None else (self.ci_high - self.ci_low) / 2.0


def estimate(values: Sequence[float | None], confidence: float = CONFIDENCE) -> Estimate:
    """Mean and Student-t interval (module docstring) of the defined, finite ``values``."""
    x = np.asarray([v for v in values if v is not None and math.isfinite(v)], dtype=np.float64)
    n = int(x.size)
    if n == 0:
        return Estimate(0, None, None, None, None)
    mean = float(x.mean())
    if n == 1:
        return Estimate(1, mean, None, None, None)
    std = float(x.std(ddof=1))
    half = t_quantile(n - 1, confidence) * std / math.sqrt(n)
    return Estimate(n, mean, std, mean - half, mean + half)


def mean_fraction(values: Sequence[Fraction | None]) -> Fraction | None:
    """The exact mean of the defined ``values`` (None when none is): SLO attainments are ratios of
    counts, and their mean in floating point can land one ulp below a target it equals
    ((17/20 + 19/20) / 2 = 0.8999999999999999)."""
    known = [v for v in values if v is not None]
    return sum(known, Fraction(0)) / len(known) if known else None


def at_least(value: Fraction | None, target: float) -> bool:
    """``value >= target``, exactly, with ``target`` read as the decimal it was written as
    (``repr``: 0.9 is 9/10, not the binary double just above it); None never meets it."""
    return value is not None and value >= Fraction(repr(target))
