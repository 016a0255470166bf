"""Stage 2 of ``mt-analyze``: columns -> the metrics of DESIGN.md ("Metric definitions").

Per request (all times int64 ns on CLOCK_MONOTONIC, results in milliseconds):
  ttft = t(first tok) - t(sent)          ttft_sched = t(first tok) - t(sched)
  queue = t(sent) - t(sched)             e2e = t(last tok) - t(sent)  (forward tenants: t(done) - t(sent))
  tpot = (t(last tok) - t(first tok)) / (n_out - 1), only when n_out > 1
  itl  = every gap between consecutive token emissions of one request (pooled over requests)
where n_out is the request's ``done.n_out`` (the tokens it received), or the sum of its ``tok``
counts when it has no ``done`` event.

TTFT split, for requests whose ``done`` carries a serving engine's own timestamps (vLLM's
``engine_*_ns``, the same CLOCK_MONOTONIC as ``t``; ``multitenant.schema``):
  ttft_frontend_in  = engine_queued - t(sent)            input processing, hop to the engine core
  ttft_engine_queue = engine_scheduled - engine_queued   waiting in the engine's scheduler
  ttft_prefill      = engine_first_tok - engine_scheduled   prefill, including the step it ran in
  ttft_frontend_out = t(first tok) - engine_first_tok    output processing and delivery back
They sum to ttft exactly (in ns). A request has all four or none (it needs sent, a first tok
and the three engine times). Negative components are reported as they are; one below
-SPLIT_NEGATIVE_TOLERANCE_MS adds a run warning.

Windows:
  * A tenant's measured phase starts at its ``window.t0``; its requests are *measured* when their
    ``sent`` (``sched`` if never sent) lies in [t0, t1] (t1 = +inf when null).
  * A tenant's end = min(window.t1 if not null, its last ``tok`` of a measured request); forward
    tenants have no ``tok``, so their last ``done`` of a measured request stands in for it.
  * The run's window = [max of the tenants' starts, min of their ends], **inclusive at both ends**:
    a token emitted exactly at the window's start or end counts.
  * Throughput = tokens (``tok`` counts) with start <= t <= end, divided by (end - start) in
    seconds. Forward tenants: sequences (``iter.batch``) with start <= t <= end, in seq/s.
  * Latency statistics use completed (``done.status == "ok"``) requests whose ``sent`` lies in
    the run's window. Request counts (requests, errors, cancelled, incomplete) use every request
    whose ``sent`` (``sched`` if never sent) lies in the run's window.

Statistics: mean, population std (ddof 0) and percentiles p50, p90, p95, p99, p99.9 by linear
interpolation between order statistics (numpy's default ``method="linear"``), all in ms; null
when there is no sample.

Interference (needs a solo baseline of the same tenant spec, backend options included, on a GPU
of the same name; ``tenant_spec``):
  NP_i = throughput co-located / throughput solo      closed-loop tenant (``np_definition`` "throughput")
  NP_i = mean E2E solo / mean E2E co-located           open-loop tenant (poisson, gamma, constant: "e2e")
  slowdown = co-located percentile / solo one;
  STP = sum NP_i; ANTT = mean(1 / NP_i); fairness = min NP / max NP; Jain = (sum x)^2 / (n sum x^2).
  An open-loop tenant that keeps up emits exactly its offered load, so its throughput ratio stays
  near 1 whatever the interference; the time the same work takes alone over the time it takes
  shared is what moves. Its means are those of the latency statistics (completed requests sent in
  each run's window); when either run has no such request, its NP is null, with a warning.
  The aggregate figures are null unless every tenant of the run has an NP.

SLO attainment = good / (requests in window that completed ok, failed or never finished);
cancelled requests (cut off by the end of a measured phase) are left out, failures count as
misses. A request is good when it completed ok and meets every given bound. A generate
request without any token (``ok`` with n_out 0, or no ``tok`` event) meets no bound: it has no
TTFT, TPOT or E2E and delivered nothing. Otherwise a bound on a metric the request does not
have (tpot of a one-token request: it has no gap between tokens to be slow in; ttft of a forward
request) does not count against it. Goodput = good requests / window length in seconds.

Empty logs: a tenant whose log holds no request event (no sched, sent, done or tok; no iter for
forward) has no throughput (None, with a warning), not 0; the run's aggregate token throughput
is None when no generate tenant has one. ``tok`` events of a request id with no sched, sent or
done (a damaged log) still count in throughput, with a warning from ``load``.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from multitenant.analysis.load import NO_TIME, RunData, TenantLog
from multitenant.schema import RUN_OK, STATUS_CANCELLED, STATUS_ERROR, STATUS_OK

PERCENTILES: tuple[tuple[str, float], ...] = (("p50", 50.0), ("p90", 90.0), ("p95", 95.0), ("p99", 99.0), ("p99.9", 99.9))
STAT_KEYS = ("mean", "std") + tuple(k for k, _ in PERCENTILES)
# Latency metrics in the order summary.json lists them.
LATENCY_METRICS = ("ttft", "ttft_sched", "queue", "tpot", "itl", "e2e")
SLO_METRICS = ("ttft", "tpot", "e2e")
SLOWDOWN_KEYS = (("ttft_p50", "ttft", "p50"), ("ttft_p99", "ttft", "p99"), ("tpot_p50", "tpot", "p50"), ("tpot_p99", "tpot", "p99"))
# TTFT split components (module docstring), in the order they happen; per request each is a
# ``ttft_<name>_ms`` column; summary.json's ``ttft_split`` gives SPLIT_STAT_KEYS of each.
TTFT_SPLIT = ("frontend_in", "engine_queue", "prefill", "frontend_out")
SPLIT_STAT_KEYS = ("mean", "p50", "p99")
SPLIT_NEGATIVE_TOLERANCE_MS = 1.0  # clocks of one host's processes agree far better than this
NS_PER_MS = 1e6
NS_PER_S = 1e9
# How a tenant's NP is defined (module docstring, "Interference"); summary.json's ``np_definition``.
NP_THROUGHPUT = "throughput"
NP_E2E = "e2e"
# Arrival processes whose schedule does not wait for the engine (config.ARRIVALS less "closed").
OPEN_LOOP_ARRIVALS = ("poisson", "gamma", "constant")


class SloError(ValueError):
    """An SLO string that cannot be parsed (exit code 2)."""


_UNIT_NS = {"ns": 1.0, "us": 1e3, "µs": 1e3, "ms": 1e6, "s": 1e9}
_SLO_ITEM = re.compile(r"^\s*(\w+)\s*=\s*([0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)\s*(ns|us|µs|ms|s)?\s*$", re.IGNORECASE)


def parse_slo(text: str) -> dict[str, float]:
    """``"ttft=200ms,tpot=50ms,e2e=10s"`` -> {"ttft": 200.0, "tpot": 50.0, "e2e": 10000.0} (ms)."""
    bounds: dict[str, float] = {}
    for item in text.split(","):
        if not item.strip():
            continue
        m = _SLO_ITEM.match(item)
        if not m:
            raise SloError(f"SLO item {item.strip()!r} is not name=value<unit>; write it like ttft=200ms,tpot=50ms,e2e=10s")
        name, value, unit = m.group(1).lower(), float(m.group(2)), m.group(3)
        if name not in SLO_METRICS:
            raise SloError(f"SLO metric {name!r} is unknown; use {', '.join(SLO_METRICS)} (e.g. ttft=200ms)")
        if unit is None:
            raise SloError(f"SLO {item.strip()!r} has no unit; write it like {name}={m.group(2)}ms")
        if name in bounds:
            raise SloError(f"SLO metric {name!r} is given twice; give each bound once")
        if not value > 0:
            raise SloError(f"SLO {item.strip()!r} must be positive; write it like {name}=200ms")
        bounds[name] = value * _UNIT_NS[unit.lower()] / NS_PER_MS
    if not bounds:
        raise SloError(f"SLO {text!r} names no bound; write it like ttft=200ms,tpot=50ms,e2e=10s")
    return bounds


def latency_stats(values_ms: np.ndarray) -> dict[str, float | None]:
    """Mean, population std and percentiles (numpy linear interpolation) of ``values_ms``."""
    if values_ms.size == 0:
        return dict.fromkeys(STAT_KEYS)
    pct = np.percentile(values_ms, [q for _, q in PERCENTILES])
    out: dict[str, float | None] = {"mean": float(np.mean(values_ms)), "std": float(np.std(values_ms))}
    for (key, _), value in zip(PERCENTILES, pct, strict=True):
        out[key] = float(value)
    return out


# ---------------------------------------------------------------------------------------------
# Per request


@dataclass
class RequestTable:
    """One row per request of one tenant (aligned numpy arrays).

    ``*_ns`` are int64 with NO_TIME where never logged; ``*_ms`` are float64 with NaN where the
    metric is undefined. ``measured``: sent inside the tenant's own phase; ``in_window``: sent
    (sched when never sent) inside the run's window.
    """

    columns: dict[str, np.ndarray]
    itl_ns: np.ndarray  # every gap, pooled, in row order
    itl_row: np.ndarray  # row of each gap

    def __len__(self) -> int:
        return int(self.columns["rid"].size)


def request_table(log: TenantLog, task: str) -> RequestTable:
    """First/last token, token counts, per-request metrics and ITL gaps of every request."""
    n_rows = log.req_rid.size
    first = np.full(n_rows, NO_TIME, np.int64)
    last = np.full(n_rows, NO_TIME, np.int64)
    n_tok = np.zeros(n_rows, np.int64)
    n_emit = np.zeros(n_rows, np.int64)
    itl_max = np.full(n_rows, np.nan)
    itl_ns = np.zeros(0, np.int64)
    itl_row = np.zeros(0, np.int64)
    if log.tok_rid.size:
        row = log.tok_row
        t = log.tok_t_ns
        # Group each request's emissions together, in time order. Files are written in t order,
        # so when rows are also non-decreasing (one request or batch after another) nothing
        # needs sorting; otherwise a stable sort by row keeps time order within a request;
        # only an out-of-order file needs the (row, t) sort.
        t_sorted = t.size < 2 or bool(np.all(t[1:] >= t[:-1]))
        if t_sorted and bool(np.all(row[1:] >= row[:-1])):
            r, n = row, log.tok_n
        else:
            order = np.argsort(row, kind="stable") if t_sorted else np.lexsort((t, row))
            r, t, n = row[order], t[order], log.tok_n[order]
        new = np.empty(r.size, bool)
        new[0] = True
        np.not_equal(r[1:], r[:-1], out=new[1:])
        starts = np.flatnonzero(new)
        ends = np.append(starts[1:], r.size) - 1
        rows = r[starts]
        first[rows] = t[starts]
        last[rows] = t[ends]
        n_tok[rows] = np.add.reduceat(n, starts)
        n_emit[rows] = ends - starts + 1
        gaps = np.diff(t)
        same = ~new[1:]
        itl_ns = gaps[same]
        itl_row = r[1:][same]
        if itl_ns.size:
            # Max gap per request: blank out the gaps between requests, then reduce per segment.
            masked = np.where(same, gaps, -1)
            multi = starts[(ends - starts) >= 1]
            itl_max[r[multi]] = np.maximum.reduceat(masked, multi) / NS_PER_MS

    sched, sent, done = log.req_sched_ns, log.req_sent_ns, log.req_done_ns
    n_out = np.where(log.req_n_out >= 0, log.req_n_out, n_tok)
    has_first = first != NO_TIME
    has_sent = sent != NO_TIME
    has_sched = sched != NO_TIME
    ttft = _diff_ms(first, sent, has_first & has_sent)
    ttft_sched = _diff_ms(first, sched, has_first & has_sched)
    queue = _diff_ms(sent, sched, has_sent & has_sched)
    if task == "forward":
        e2e = _diff_ms(done, sent, (done != NO_TIME) & has_sent)
    else:
        e2e = _diff_ms(last, sent, has_first & has_sent)
    tpot = np.full(n_rows, np.nan)
    ok_tpot = has_first & (n_out > 1)
    tpot[ok_tpot] = (last[ok_tpot] - first[ok_tpot]) / (n_out[ok_tpot] - 1) / NS_PER_MS
    itl_mean = np.full(n_rows, np.nan)
    multi_emit = n_emit > 1
    itl_mean[multi_emit] = (last[multi_emit] - first[multi_emit]) / (n_emit[multi_emit] - 1) / NS_PER_MS
    split = ttft_split_ms(log, first)
    columns = {
        "rid": log.req_rid,
        "status": log.req_status,
        "error": log.req_error,
        "n_in": log.req_n_in,
        "n_out_target": log.req_n_out_target,
        "n_out": n_out,
        "n_tok": n_tok,
        "n_emissions": n_emit,
        "sched_ns": sched,
        "sent_ns": sent,
        "first_tok_ns": first,
        "last_tok_ns": last,
        "done_ns": done,
        "ttft_ms": ttft,
        "ttft_sched_ms": ttft_sched,
        "queue_ms": queue,
        "tpot_ms": tpot,
        "e2e_ms": e2e,
        "itl_mean_ms": itl_mean,
        "itl_max_ms": itl_max,
        **{f"ttft_{name}_ms": values for name, values in split.items()},
        "engine_queued_ns": log.req_engine_queued_ns,
        "engine_scheduled_ns": log.req_engine_scheduled_ns,
        "engine_first_tok_ns": log.req_engine_first_tok_ns,
        "engine_last_tok_ns": log.req_engine_last_tok_ns,
        "usage_tokens": log.req_usage_tokens,
        "warning": log.req_warning,
    }
    return RequestTable(columns=columns, itl_ns=itl_ns, itl_row=itl_row)


def ttft_split_ms(log: TenantLog, first_tok_ns: np.ndarray) -> dict[str, np.ndarray]:
    """TTFT's four components per request, ms (module docstring); NaN for a request without
    sent, a first tok or any of the three engine times."""
    sent = log.req_sent_ns
    queued, scheduled, engine_first = log.req_engine_queued_ns, log.req_engine_scheduled_ns, log.req_engine_first_tok_ns
    has = (sent != NO_TIME) & (first_tok_ns != NO_TIME) & (queued != NO_TIME) & (scheduled != NO_TIME)
    has &= engine_first != NO_TIME
    points = (sent, queued, scheduled, engine_first, first_tok_ns)
    return {name: _diff_ms(points[i + 1], points[i], has) for i, name in enumerate(TTFT_SPLIT)}


def _diff_ms(a: np.ndarray, b: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """(a - b) in ms where ``mask``, NaN elsewhere; the subtraction is exact in int64."""
    out = np.full(a.size, np.nan)
    out[mask] = (a[mask] - b[mask]) / NS_PER_MS
    return out


# ---------------------------------------------------------------------------------------------
# Per tenant and per run


@dataclass
class TenantMetrics:
    """Everything summary.json holds for one tenant, plus the request table for the plots."""

    name: str
    task: str
    throughput_unit: str  # "tok/s" (generate) or "seq/s" (forward)
    phase_ns: tuple[int | None, int | None]  # the tenant's own [start, end]
    requests: int = 0
    completed: int = 0
    errors: int = 0
    cancelled: int = 0
    incomplete: int = 0
    output_tokens: int = 0
    throughput: float | None = None
    latency: dict[str, dict[str, float | None]] = field(default_factory=dict)
    # {"n": requests, <component>: {mean, p50, p99}} over the latency sample; None when no
    # request of the tenant has engine timestamps.
    ttft_split: dict[str, Any] | None = None
    slo_attainment: float | None = None
    goodput_req_s: float | None = None
    np: float | None = None
    np_definition: str | None = None  # NP_THROUGHPUT or NP_E2E; None in a run without interference figures
    solo_throughput: float | None = None
    # The two means an NP_E2E tenant's NP divides (ms); None for NP_THROUGHPUT tenants.
    solo_e2e_mean_ms: float | None = None
    colocated_e2e_mean_ms: float | None = None
    slowdown: dict[str, float | None] | None = None
    baseline_run_dir: str | None = None
    baseline_trials: int | None = None  # solo runs pooled into the baseline (trials of one solo sweep)
    table: RequestTable | None = None


@dataclass
class RunMetrics:
    run: RunData
    window_ns: tuple[int, int] | None
    tenants: dict[str, TenantMetrics]
    gpu_throughput_tok_s: float | None = None
    gpu_throughput_naive_tok_s: float | None = None
    stp: float | None = None
    antt: float | None = None
    fairness: float | None = None
    jain: float | None = None
    slo: dict[str, float] | None = None
    missing_baselines: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def window_s(self) -> float | None:
        if self.window_ns is None:
            return None
        return (self.window_ns[1] - self.window_ns[0]) / NS_PER_S


def _tenant_phase(run: RunData, log: TenantLog, warnings: list[str]) -> tuple[int | None, int | None]:
    """The tenant's measured phase [t0, t1] as announced (t1 None = open); see module docstring."""
    if log.window_seen and log.window_t0_ns is not None:
        return log.window_t0_ns, log.window_t1_ns
    window = run.manifest.get("window") or {}
    t0, t1 = window.get("t0_ns"), window.get("t1_ns")
    if log.events_path is not None:
        if t0 is not None:
            warnings.append(f"tenant {log.name}: no window event; the manifest's window is used instead")
        else:
            warnings.append(f"tenant {log.name}: no window event and none in the manifest; it has no measured phase")
    return (None if t0 is None else int(t0)), (None if t1 is None else int(t1))


def _ref_ns(log: TenantLog) -> np.ndarray:
    """When a request entered the system: its ``sent``, or its ``sched`` when never sent."""
    return np.where(log.req_sent_ns != NO_TIME, log.req_sent_ns, log.req_sched_ns)


def _in_range(t: np.ndarray, lo: int | None, hi: int | None) -> np.ndarray:
    """lo <= t <= hi (an end that is None is open), ignoring NO_TIME entries."""
    mask = t != NO_TIME
    if lo is not None:
        mask &= t >= lo
    if hi is not None:
        mask &= t <= hi
    return mask


def status_warning(run: RunData) -> str | None:
    """The warning a run whose manifest status is not ok opens with (None for an ok run)."""
    if run.status == RUN_OK:
        return None
    reason = run.manifest.get("reason")
    return f"run status is {run.status!r}" + (f" ({reason})" if reason else "") + "; its numbers may be incomplete"


def _has_request_events(log: TenantLog, task: str) -> bool:
    """Whether the log holds any request event (sched, sent, done, tok; iter for forward)."""
    return bool(log.n_requests or log.tok_t_ns.size or (task == "forward" and log.iter_t_ns.size))


def compute_run(run: RunData, slo: dict[str, float] | None = None) -> RunMetrics:
    """All per-tenant and aggregate metrics of one run, except the baseline-dependent ones."""
    warnings = list(run.warnings)
    if (opening := status_warning(run)) is not None:
        warnings.insert(0, opening)
    tasks = {name: run.tenant_task(name) for name in run.tenants}
    tables = {name: request_table(log, tasks[name]) for name, log in run.tenants.items()}

    # Each tenant's phase, measured requests and end (module docstring, "Windows").
    phases: dict[str, tuple[int | None, int | None]] = {}
    measured: dict[str, np.ndarray] = {}
    starts: list[int] = []
    ends: list[int] = []
    for name, log in run.tenants.items():
        t0, t1 = _tenant_phase(run, log, warnings)
        meas = _in_range(_ref_ns(log), t0, t1) if t0 is not None else np.zeros(log.n_requests, bool)
        measured[name] = meas
        cols = tables[name].columns
        if tasks[name] == "forward":
            last = log.req_done_ns[meas & (log.req_done_ns != NO_TIME)]
        else:
            last = cols["last_tok_ns"][meas & (cols["last_tok_ns"] != NO_TIME)]
        candidates = [t for t in (t1, int(last.max()) if last.size else None) if t is not None]
        end = min(candidates) if candidates else None
        phases[name] = (t0, end)
        if t0 is None:
            continue
        starts.append(t0)
        if end is None:
            warnings.append(f"tenant {name}: no window end and no measured token; it does not bound the window")
        else:
            ends.append(end)

    window: tuple[int, int] | None = None
    if starts and ends:
        w0, w1 = max(starts), min(ends)
        if w1 > w0:
            window = (w0, w1)
        else:
            warnings.append("the tenants' measured phases do not overlap: no window, so no throughput")
    elif run.tenants:
        warnings.append("no tenant has a measured phase: no window, so no throughput")

    tenants: dict[str, TenantMetrics] = {}
    total_window_tokens = 0
    any_token_throughput = False
    naive_tokens = 0
    naive_first_sent: list[int] = []
    naive_last_tok: list[int] = []
    for name, log in run.tenants.items():
        task = tasks[name]
        table = tables[name]
        cols = table.columns
        tm = TenantMetrics(
            name=name, task=task, throughput_unit="seq/s" if task == "forward" else "tok/s", phase_ns=phases[name]
        )
        tm.table = table
        lo, hi = window if window is not None else (None, None)
        ref_in = _in_range(_ref_ns(log), lo, hi) if window is not None else np.zeros(log.n_requests, bool)
        sent_in = _in_range(log.req_sent_ns, lo, hi) if window is not None else np.zeros(log.n_requests, bool)
        cols["measured"] = measured[name]
        cols["in_window"] = ref_in
        status = log.req_status
        is_ok = status == STATUS_OK
        is_cancelled = status == STATUS_CANCELLED
        is_open = status == ""
        is_error = ~(is_ok | is_cancelled | is_open)
        unknown = set(status[is_error & (status != STATUS_ERROR)].tolist())
        if unknown:
            warnings.append(f"tenant {name}: done.status {sorted(unknown)} counted as errors")
        tm.requests = int(ref_in.sum())
        tm.completed = int((ref_in & is_ok).sum())
        tm.errors = int((ref_in & is_error).sum())
        tm.cancelled = int((ref_in & is_cancelled).sum())
        tm.incomplete = int((ref_in & is_open).sum())
        disagree = int(((log.req_n_out >= 0) & (cols["n_tok"] != log.req_n_out) & is_ok & (task != "forward")).sum())
        if disagree:
            warnings.append(
                f"tenant {name}: {disagree} request(s) whose done.n_out differs from their tok counts; TPOT uses n_out"
            )

        # Latency samples: completed requests sent inside the window.
        sample = sent_in & is_ok
        for metric in LATENCY_METRICS:
            if metric == "itl":
                values = table.itl_ns[sample[table.itl_row]] / NS_PER_MS if table.itl_ns.size else np.zeros(0)
            else:
                values = cols[f"{metric}_ms"][sample]
                values = values[~np.isnan(values)]
            tm.latency[metric] = latency_stats(values)
        tm.ttft_split = _split_summary(cols, sample)
        warnings.extend(_split_warnings(name, cols))
        warnings.extend(_done_warnings(name, cols))

        # Throughput inside the window (inclusive at both ends); none for a log without requests.
        has_events = _has_request_events(log, task)
        if not has_events and log.events_path is not None:
            empty = "is empty" if log.lines_read == 0 else "has no request events"
            warnings.append(f"tenant {name}: its event log {empty}; it has no throughput")
        if window is not None and has_events:
            window_s = (window[1] - window[0]) / NS_PER_S
            if task == "forward":
                in_w = (log.iter_t_ns >= window[0]) & (log.iter_t_ns <= window[1])
                tm.throughput = float(log.iter_batch[in_w].sum()) / window_s
            else:
                in_w = (log.tok_t_ns >= window[0]) & (log.tok_t_ns <= window[1])
                tm.output_tokens = int(log.tok_n[in_w].sum())
                tm.throughput = tm.output_tokens / window_s
                total_window_tokens += tm.output_tokens
                any_token_throughput = True

        # Seed study's figure: measured requests' tokens over first measured send .. last token.
        if task != "forward" and measured[name].any():
            if log.tok_rid.size:
                naive_tokens += int(log.tok_n[measured[name][log.tok_row]].sum())
            sent_m = log.req_sent_ns[measured[name] & (log.req_sent_ns != NO_TIME)]
            last_m = cols["last_tok_ns"][measured[name] & (cols["last_tok_ns"] != NO_TIME)]
            if sent_m.size:
                naive_first_sent.append(int(sent_m.min()))
            if last_m.size:
                naive_last_tok.append(int(last_m.max()))

        if slo is not None and window is not None:
            judged = ref_in & ~is_cancelled
            good = sent_in & is_ok
            if task != "forward":
                # No token at all: no TTFT, TPOT or E2E, and nothing delivered: it meets no bound.
                good &= cols["first_tok_ns"] != NO_TIME
            for metric, bound in slo.items():
                values = cols[f"{metric}_ms"]
                good &= np.isnan(values) | (values <= bound)
            n_judged = int(judged.sum())
            n_good = int((good & judged).sum())
            # True/False for judged requests, None for those the SLO does not judge.
            slo_ok = np.full(log.n_requests, None, dtype=object)
            slo_ok[judged] = good[judged]
            cols["slo_ok"] = slo_ok
            tm.slo_attainment = n_good / n_judged if n_judged else None
            tm.goodput_req_s = n_good / ((window[1] - window[0]) / NS_PER_S)
        tenants[name] = tm

    rm = RunMetrics(run=run, window_ns=window, tenants=tenants, slo=slo, warnings=warnings)
    if window is not None and any_token_throughput:
        rm.gpu_throughput_tok_s = total_window_tokens / ((window[1] - window[0]) / NS_PER_S)
    if naive_first_sent and naive_last_tok:
        span_ns = max(naive_last_tok) - min(naive_first_sent)
        if span_ns > 0:
            rm.gpu_throughput_naive_tok_s = naive_tokens / (span_ns / NS_PER_S)
    return rm


def _split_summary(cols: dict[str, np.ndarray], sample: np.ndarray) -> dict[str, Any] | None:
    """``ttft_split`` of one tenant: n and SPLIT_STAT_KEYS of each component over ``sample``."""
    has = ~np.isnan(cols[f"ttft_{TTFT_SPLIT[0]}_ms"])
    if not has.any():
        return None
    rows = sample & has
    out: dict[str, Any] = {"n": int(rows.sum())}
    for name in TTFT_SPLIT:
        stats = latency_stats(cols[f"ttft_{name}_ms"][rows])
        out[f"{name}_ms"] = {key: stats[key] for key in SPLIT_STAT_KEYS}
    return out


def _split_warnings(tenant: str, cols: dict[str, np.ndarray]) -> list[str]:
    """One warning when any request's TTFT component is below -SPLIT_NEGATIVE_TOLERANCE_MS."""
    split = np.column_stack([cols[f"ttft_{name}_ms"] for name in TTFT_SPLIT])
    negative = split < -SPLIT_NEGATIVE_TOLERANCE_MS  # NaN compares False
    if not negative.any():
        return []
    row, component = np.unravel_index(int(np.nanargmin(np.where(negative, split, np.nan))), split.shape)
    return [
        f"tenant {tenant}: {int(negative.any(axis=1).sum())} request(s) with a TTFT component below "
        f"-{SPLIT_NEGATIVE_TOLERANCE_MS:g} ms (most negative: ttft_{TTFT_SPLIT[component]} "
        f"{split[row, component]:.3f} ms, rid {int(cols['rid'][row])}); the engine timestamps are not "
        "on the tenant's clock or the log is damaged: the split is reported as logged"
    ]


def _done_warnings(tenant: str, cols: dict[str, np.ndarray]) -> list[str]:
    """One line per tenant counting its requests whose ``done`` carried a ``warning`` (openai)."""
    texts = cols["warning"]
    rows = np.flatnonzero(np.fromiter((text is not None for text in texts), bool, texts.size))
    if not rows.size:
        return []
    first = rows[0]
    return [
        f"tenant {tenant}: {rows.size} request(s): server usage disagreed with the streamed token count "
        f"(first: rid {int(cols['rid'][first])}: {texts[first]})"
    ]


# ---------------------------------------------------------------------------------------------
# Solo baselines and interference


# The ``openai`` options that change what the server does (the rest only say how to reach it,
# or how long to wait: port, api_key_env, health_path, health_timeout_s, request_timeout_s,
# vocab_size).
OPENAI_SPEC_KEYS = ("url", "launch", "endpoint", "model_name", "ignore_eos", "extra_body")


def tenant_spec(run: RunData, name: str) -> dict[str, Any] | None:
    """What must be equal for a solo run to be this tenant's baseline (None without a config).

    model, backend, execution mode, dtype, task, batch limit and workload, and on the CPU the
    tenant's ``cpu_threads``; the workload's
    ``start_delay_s`` is left out (a staggered start changes when a tenant runs, not what).
    Backend options: a ``vllm`` tenant adds its whole ``vllm`` block (engine arguments; a key
    set to null, or ``engine_args: {}``, means the engine's default, the same as a key not
    written); an ``openai`` tenant the OPENAI_SPEC_KEYS of its ``openai`` block. An ``hf``
    tenant adds nothing, so run folders written before these blocks existed still match.
    """
    cfg = run.tenant_config(name)
    if cfg is None:
        return None
    workload = dict(cfg.get("workload") or {})
    workload.pop("start_delay_s", None)
    spec: dict[str, Any] = {
        "model": cfg.get("model"),
        "backend": cfg.get("backend"),
        "execution": cfg.get("execution"),
        "dtype": cfg.get("dtype"),
        "task": cfg.get("task"),
        "max_batch": cfg.get("max_batch"),
        "workload": workload,
    }
    if run.mode == "cpu":
        # On the CPU the thread count is part of the tenant's performance: a solo run with more
        # threads than a pair tenant is no baseline of it (older runs, without the field, derived
        # it from the number of tenants, so they match nothing that has it).
        spec["cpu_threads"] = cfg.get("cpu_threads")
    if spec["backend"] == "vllm":
        block = cfg.get("vllm") or {}
        # Unset options (null, or engine_args {}) are the engine's defaults: the same as absent.
        spec["vllm"] = {str(k): v for k, v in block.items() if v not in (None, {})} if isinstance(block, dict) else block
    elif spec["backend"] == "openai":
        block = cfg.get("openai") or {}
        block = block if isinstance(block, dict) else {}
        spec["openai"] = {key: block.get(key) for key in OPENAI_SPEC_KEYS}
    return spec


def describe_spec(spec: dict[str, Any] | None, gpu: str | None) -> str:
    """One line naming the spec, backend options (those set) included, for "run it alone" hints."""
    if spec is None:
        return "unknown spec (no config.resolved.yaml)"
    text = (
        f"{spec['backend']} {spec['model']} {spec['execution']} {spec['dtype']} {spec['task']} "
        f"max_batch={spec['max_batch']}"
    )
    if "cpu_threads" in spec:
        text += f" cpu_threads={spec['cpu_threads']}"
    for block in ("vllm", "openai"):
        options = spec.get(block)
        if isinstance(options, dict):
            shown = [f"{k}={v!r}" if isinstance(v, str) else f"{k}={v}" for k, v in options.items() if v not in (None, {})]
            text += f" {block}({', '.join(shown)})"
    return f"{text} on {gpu or 'no GPU'}"


def is_solo_candidate(run: RunData) -> bool:
    """A finished run with exactly one tenant."""
    return len(run.tenants) == 1 and run.status == RUN_OK


def choose_baseline(run: RunData, name: str, candidates: list[RunData]) -> RunData | None:
    """The solo run for tenant ``name`` of ``run``: same spec, same GPU name (null matches null).

    ``candidates`` are in order of preference (the CLI lists ``--baseline`` runs first, newest
    first within each group); the first that matches wins.
    """
    spec = tenant_spec(run, name)
    if spec is None:
        return None
    for cand in candidates:
        if cand.run_dir.resolve() == run.run_dir.resolve() or not is_solo_candidate(cand):
            continue
        (solo_name,) = cand.tenants
        if tenant_spec(cand, solo_name) == spec and cand.gpu_name == run.gpu_name:
            return cand
    return None


def baseline_trials(chosen: RunData, run: RunData, name: str, candidates: list[RunData]) -> list[RunData]:
    """``chosen`` and the other trials of it: matching solo runs in the same sweep folder of a
    solo sweep with ``trials`` > 1. Their mean is the baseline, so NP divides by the solo
    tenant's mean over trials, not by whichever trial ran last. Solo runs elsewhere (an older
    run beside it) are never pooled: the newest match stays the rule there."""
    if int((chosen.config or {}).get("trials") or 1) <= 1:
        return [chosen]
    folder = chosen.run_dir.resolve().parent
    pool = [chosen]
    for cand in candidates:
        if cand is chosen or cand.run_dir.resolve().parent != folder:
            continue
        if choose_baseline(run, name, [cand]) is cand:
            pool.append(cand)
    return pool


def _pooled_mean(values: list[float | None]) -> float | None:
    """Mean over the solo trials that have the value (None when none has it)."""
    have = [v for v in values if v is not None and not math.isnan(v)]
    return float(np.mean(have)) if have else None


def np_definition(run: RunData, name: str) -> str:
    """NP_E2E for a tenant whose ``workload.arrival.kind`` is open loop (OPEN_LOOP_ARRIVALS),
    NP_THROUGHPUT otherwise (closed loop, or no config to tell)."""
    cfg = run.tenant_config(name) or {}
    arrival = (cfg.get("workload") or {}).get("arrival") or {}
    return NP_E2E if isinstance(arrival, dict) and arrival.get("kind") in OPEN_LOOP_ARRIVALS else NP_THROUGHPUT


def newest_first(runs: list[RunData]) -> list[RunData]:
    """Sort by the manifest's ``started_wall`` (ISO 8601 sorts as text), newest first."""
    return sorted(runs, key=lambda r: str(r.manifest.get("started_wall") or ""), reverse=True)


def apply_baselines(rm: RunMetrics, solos: dict[str, RunMetrics | list[RunMetrics] | None]) -> None:
    """Fill NP, slowdowns and the aggregate interference figures from matched solo runs.

    ``solos[name]`` is the solo run's metrics for tenant ``name``, or the trials of one solo
    sweep (``baseline_trials``): then each solo figure is the mean over those trials (solo
    throughput, mean E2E, every latency percentile a slowdown divides by). None when no match.
    Single-tenant runs get no interference figures (there is nothing to interfere with).
    """
    if len(rm.tenants) < 2:
        return
    if rm.run.config is None:
        rm.missing_baselines.append(
            "no solo baseline can be matched: the run has no config.resolved.yaml to compare tenant specs with"
        )
        return
    for name, tm in rm.tenants.items():
        tm.np_definition = np_definition(rm.run, name)
        solo = solos.get(name)
        if solo is None:
            rm.missing_baselines.append(
                f"no solo baseline for tenant {name} ({describe_spec(tenant_spec(rm.run, name), rm.run.gpu_name)}); "
                "run it alone with the same settings and pass the run with --baseline"
            )
            continue
        pool = solo if isinstance(solo, list) else [solo]
        solo_tms = [next(iter(s.tenants.values())) for s in pool]
        tm.baseline_run_dir = str(pool[0].run.run_dir)
        tm.baseline_trials = len(pool)
        tm.solo_throughput = _pooled_mean([t.throughput for t in solo_tms])
        if tm.np_definition == NP_E2E:
            tm.solo_e2e_mean_ms = _pooled_mean([t.latency["e2e"]["mean"] for t in solo_tms])
            tm.colocated_e2e_mean_ms = tm.latency["e2e"]["mean"]
            tm.np = _ratio(tm.solo_e2e_mean_ms, tm.colocated_e2e_mean_ms)
            if tm.np is None:
                rm.warnings.append(_e2e_np_warning(name, tm))
        else:
            tm.np = _ratio(tm.throughput, tm.solo_throughput)
        tm.slowdown = {
            key: _ratio(tm.latency[metric][stat], _pooled_mean([t.latency[metric][stat] for t in solo_tms]))
            for key, metric, stat in SLOWDOWN_KEYS
        }
    nps = [tm.np for tm in rm.tenants.values()]
    if any(x is None for x in nps):
        return
    values = np.asarray(nps, dtype=np.float64)
    rm.stp = float(values.sum())
    rm.antt = float(np.mean(1.0 / values)) if bool(np.all(values > 0)) else None
    rm.fairness = float(values.min() / values.max()) if values.max() > 0 else None
    square_sum = float(np.sum(values**2))
    rm.jain = float(values.sum() ** 2 / (values.size * square_sum)) if square_sum > 0 else None


def _e2e_np_warning(name: str, tm: TenantMetrics) -> str:
    """Why an open-loop tenant's NP (mean solo E2E / mean co-located E2E) is null."""
    missing = [run for run, mean in (("solo", tm.solo_e2e_mean_ms), ("co-located", tm.colocated_e2e_mean_ms)) if mean is None]
    if missing:
        have = "runs have no completed request in their windows" if len(missing) > 1 else "run has no completed request in its window"
        why = f"the {' and the '.join(missing)} {have}"
    else:
        why = f"its mean co-located E2E is {tm.colocated_e2e_mean_ms} ms"
    return (
        f"tenant {name}: open-loop NP (mean solo E2E / mean co-located E2E) is null: {why}; "
        "STP, ANTT, fairness and Jain are null too"
    )


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0 or math.isnan(a) or math.isnan(b):
        return None
    return a / b
