"""Statistics: a latency sample's mean, population std and percentiles, and a metric's mean
and Student-t confidence interval over a sweep point's trials.

Latency statistics: mean, population std (ddof 0) and percentiles p50, p90, p95, p99, p99.9 by
linear interpolation between order statistics (numpy's default ``method="linear"``), all in ms;
null when there is no sample.

Estimates over trials. For n values x_1..x_n of one metric (trials where it is defined):
  mean = Σ x_i / n,  s = sqrt(Σ (x_i - mean)² / (n - 1)),
  95 % CI = mean ± t_{0.975, n-1} · s / sqrt(n)        (Student t; ``t_quantile``, scipy)
clipped to the metric's possible range (``names.METRIC_BOUNDS``: a proportion to [0, 1], every
other headline metric at 0). With n = 1 there is no interval (``ci_low`` = ``ci_high`` = None);
with n = 0 no mean either. With n = 2 the factor is t_{0.975,1} = 12.7: the interval is
uninformative (``UNINFORMATIVE_BELOW``), which the sweep outputs say.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction

import numpy as np

from multitenant.analysis.names import PERCENTILES, STAT_KEYS

CONFIDENCE = 0.95
# Fewer trials than this give an interval too wide to read (t_{0.975,1} = 12.7): the sweep
# outputs mark such points.
UNINFORMATIVE_BELOW = 3


def latency_stats(values_ms: np.ndarray) -> dict[str, float | None]:
    """Mean, population std and percentiles (numpy linear interpolation) of ``values_ms``."""
    if values_ms.size == 0:
        return dict.fromkeys(STAT_KEYS)
    pct = np.percentile(values_ms, [q for _, q in PERCENTILES])
    out: dict[str, float | None] = {"mean": float(np.mean(values_ms)), "std": float(np.std(values_ms))}
    for (key, _), value in zip(PERCENTILES, pct, strict=True):
        out[key] = float(value)
    return out



def t_quantile(df: int, confidence: float = CONFIDENCE) -> float:
    """t_{(1+confidence)/2, df}: the half-width factor of a two-sided ``confidence`` interval
    (``scipy.stats.t.ppf``; 12.7062 for df 1, 4.3027 for df 2, 1.96 as df grows)."""
    # scipy is imported here, not at the top: mt-analyze's start-up should not pay for it.
    from scipy import stats as scipy_stats

    return float(scipy_stats.t.ppf((1.0 + confidence) / 2.0, df))


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


def estimate(
    values: Sequence[float | None],
    confidence: float = CONFIDENCE,
    bounds: tuple[float | None, float | None] = (None, None),
) -> Estimate:
    """Mean and Student-t interval (module docstring) of the defined, finite ``values``, the
    interval clipped to ``bounds`` (low, high; None: unbounded) of the metric's possible range."""
    x = np.asarray([v for v in values if v is not None and math.isfinite(v)], dtype=np.float64)
    n = int(x.size)
    if n == 0:
        return Estimate(0, None, None, None, None)
    mean = float(x.mean())
    if n == 1:
        return Estimate(1, mean, None, None, None)
    std = float(x.std(ddof=1))
    half = t_quantile(n - 1, confidence) * std / math.sqrt(n)
    low, high = mean - half, mean + half
    # A proportion outside [0, 1] or a throughput below 0 is no possible value: the symmetric
    # t interval of few trials overshoots; the clipped interval says what the data allows.
    if bounds[0] is not None:
        low = max(low, bounds[0])
    if bounds[1] is not None:
        high = min(high, bounds[1])
    return Estimate(n, mean, std, low, high)


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
