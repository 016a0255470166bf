"""The names every stage shares: metric names, their order in summary.json and sweep.json, the
sweeps' headline metrics, the NP definitions and the time units. Defined here once."""

from __future__ import annotations

NS_PER_MS = 1e6
NS_PER_S = 1e9

# Percentiles of a latency sample, by key; STAT_KEYS are the keys of one metric's statistics.
PERCENTILES: tuple[tuple[str, float], ...] = (("p50", 50.0), ("p90", 90.0), ("p95", 95.0), ("p99", 99.0), ("p99.9", 99.9))
STAT_KEYS = ("mean", "std") + tuple(k for k, _ in PERCENTILES)
# Latency metrics in the order summary.json lists them; per request each is a ``<name>_ms``
# column of the request table (``itl`` excepted: its gaps are pooled).
LATENCY_METRICS = ("ttft", "ttft_sched", "queue", "tpot", "itl", "e2e")
# The metrics an SLO may bound (``--slo ttft=200ms,tpot=50ms,e2e=10s``).
SLO_METRICS = ("ttft", "tpot", "e2e")
# Slowdown keys of summary.json: (key, latency metric, statistic).
SLOWDOWN_KEYS = (("ttft_p50", "ttft", "p50"), ("ttft_p99", "ttft", "p99"), ("tpot_p50", "tpot", "p50"), ("tpot_p99", "tpot", "p99"))
# TTFT split components (``requests``), in the order they happen; per request each is a
# ``ttft_<name>_ms`` column; summary.json's ``ttft_split`` gives SPLIT_STAT_KEYS of each.
TTFT_SPLIT = ("frontend_in", "engine_queue", "prefill", "frontend_out")
SPLIT_STAT_KEYS = ("mean", "p50", "p99")

# What ended the run's window (``window_cut``): the ending tenant's phase end (its window t1),
# or its last measured token (a forward tenant: its last completed request) before that.
WINDOW_END_PHASE = "phase_end"
WINDOW_END_LAST_TOKEN = "last_token"
WINDOW_END_LAST_REQUEST = "last_request"

# How a tenant's NP is defined (``baselines``); summary.json's ``np_definition``.
NP_THROUGHPUT = "throughput"
NP_E2E = "e2e"

# Sweeps' headline metrics: per tenant (names follow summary.json: ``ttft_ms.p50`` ->
# ``ttft_p50_ms``) and for the run, whose ``tenant`` is RUN_LEVEL.
RUN_LEVEL = "*"
TENANT_METRICS = (
    "throughput_tok_s", "ttft_p50_ms", "ttft_p99_ms", "tpot_p50_ms", "tpot_p99_ms", "e2e_p50_ms", "e2e_p99_ms",
    "np", "slo_attainment", "goodput_req_s",
)  # fmt: skip
# The latency metrics whose p50 and p99 are headline metrics (TENANT_METRICS above).
HEADLINE_LATENCY = ("ttft", "tpot", "e2e")
RUN_METRICS = ("gpu_throughput_tok_s", "stp", "antt", "fairness", "jain", "goodput_req_s")
# The possible range of each headline metric: intervals over trials are clipped to it. SLO
# attainment, fairness (min/max NP) and Jain's index are proportions; every other one (throughput,
# latencies, NP, STP, ANTT, goodput) is a ratio or a time, never negative.
PROPORTIONS = ("slo_attainment", "fairness", "jain")
NON_NEGATIVE: tuple[float | None, float | None] = (0.0, None)
METRIC_BOUNDS: dict[str, tuple[float | None, float | None]] = {
    **{m: NON_NEGATIVE for m in (*TENANT_METRICS, *RUN_METRICS)},
    **{m: (0.0, 1.0) for m in PROPORTIONS},
}
# An NP above this says co-located ran faster than solo: noise, or a baseline that does not match.
NP_SUSPECT = 1.05
# A sweep's objective (``--objective``) and the run-level metric it ranks by.
OBJECTIVE_METRIC = {"throughput": "gpu_throughput_tok_s", "goodput": "goodput_req_s"}
OBJECTIVES = tuple(OBJECTIVE_METRIC)
