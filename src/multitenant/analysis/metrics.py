"""Stage 2 of ``mt-analyze``: columns -> the per-tenant and per-run metrics of docs/design.md
("Metric definitions"); the per-request metrics are ``requests``', the baseline-dependent ones
(NP, slowdowns, STP, ...) ``baselines``'.

Windows:
  * A tenant's measured phase starts at its ``window.t0``; its requests are *measured* when their
    ``sent`` (``sched`` if never sent) lies in [t0, t1] (t1 = +inf when null).
  * A tenant's end = min(window.t1 if not null, its last ``tok`` of a measured request); forward
    tenants have no ``tok``, so their last ``done`` of a measured request stands in for it.
  * The run's window = [max of the tenants' starts, min of their ends], **inclusive at both ends**:
    a token emitted exactly at the window's start or end counts.
  * Throughput = tokens (``tok`` counts) with start <= t <= end, divided by (end - start) in
    seconds. Forward tenants: sequences (``iter.batch``) with start <= t <= end, in seq/s.
  * Latency statistics (``stats.latency_stats``) use the latency sample: completed
    (``done.status == "ok"``) requests whose ``sent`` lies in the run's window
    (``requests.latency_sample``). Request counts (requests, errors, cancelled, incomplete) use
    every request whose ``sent`` (``sched`` if never sent) lies in the run's window.
  * The naive aggregate throughput: all tokens of measured requests / (latest last token of a
    measured request - earliest measured send), over every generate tenant.

TTFT split (``requests``): a component below -SPLIT_NEGATIVE_TOLERANCE_MS adds a run warning;
negative components are reported as they are.

SLO attainment = good / (requests in window that completed ok, failed or never finished);
cancelled requests (cut off by the end of a measured phase) are left out, failures count as
misses. A request is good when it is in the latency sample and meets every given bound. A
generate request without any token (``ok`` with n_out 0, or no ``tok`` event) meets no bound: it
has no TTFT, TPOT or E2E and delivered nothing. Otherwise a bound on a metric the request does
not have (tpot of a one-token request: it has no gap between tokens to be slow in; ttft of a
forward request) does not count against it. Goodput = good requests / window length in seconds.

Empty logs: a tenant whose log holds no request event (no sched, sent, done or tok; no iter for
forward) has no throughput (None, with a warning), not 0; the run's aggregate token throughput
is None when no generate tenant has one. ``tok`` events of a request id with no sched, sent or
done (a damaged log) still count in throughput, with a warning from ``parse``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from multitenant.analysis.columns import NO_TIME, TenantLog
from multitenant.analysis.load import RunData
from multitenant.analysis.names import (
    LATENCY_METRICS,
    NS_PER_MS,
    NS_PER_S,
    SLO_METRICS,
    SPLIT_STAT_KEYS,
    TTFT_SPLIT,
)
from multitenant.analysis.requests import RequestTable, in_range, latency_sample, request_table
from multitenant.analysis.stats import latency_stats
from multitenant.analysis.window_cut import TenantBounds, window_cut
from multitenant.schema import HardwareSummary, RequestStatus, RunStatus, WindowCut

SPLIT_NEGATIVE_TOLERANCE_MS = 1.0  # clocks of one host's processes agree far better than this


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
    # The counts behind slo_attainment (good / judged), kept so sweeps compare means exactly.
    slo_good: int | None = None
    slo_judged: int | None = None
    goodput_req_s: float | None = None
    np: float | None = None
    np_definition: str | None = None  # NP_THROUGHPUT or NP_E2E; None in a run without interference figures
    solo_throughput: float | None = None
    # The two means an NP_E2E tenant's NP divides (ms); None for NP_THROUGHPUT tenants.
    solo_e2e_mean_ms: float | None = None
    colocated_e2e_mean_ms: float | None = None
    slowdown: dict[str, float | None] | None = None
    baseline_run_dir: str | None = None
    baseline_run_id: str | None = None  # the solo run's manifest run_id (exports name it)
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
    # Which tenant set the window's start and end, and why (``window_cut``); None without a window.
    window_cut: WindowCut | None = None
    # What the hardware did over the window, each tenant's solo baseline's, and fingerprint
    # differences (``hardware.attach``); empty until then.
    hardware: HardwareSummary | None = None
    solo_hardware: dict[str, HardwareSummary] = field(default_factory=dict)
    comparability: list[str] = field(default_factory=list)

    @property
    def window_s(self) -> float | None:
        if self.window_ns is None:
            return None
        return (self.window_ns[1] - self.window_ns[0]) / NS_PER_S


def _tenant_phase(run: RunData, log: TenantLog, warnings: list[str]) -> tuple[int | None, int | None]:
    """The tenant's measured phase [t0, t1] as announced (t1 None = open); see module docstring."""
    if log.window_seen and log.window_t0_ns is not None:
        return log.window_t0_ns, log.window_t1_ns
    t0, t1 = run.manifest.window.t0_ns, run.manifest.window.t1_ns
    if log.events_path is not None:
        if t0 is not None:
            warnings.append(f"tenant {log.name}: no window event; the manifest's window is used instead")
        else:
            warnings.append(f"tenant {log.name}: no window event and none in the manifest; it has no measured phase")
    return (None if t0 is None else int(t0)), (None if t1 is None else int(t1))


def _ref_ns(log: TenantLog) -> np.ndarray:
    """When a request entered the system: its ``sent``, or its ``sched`` when never sent."""
    return np.where(log.req_sent_ns != NO_TIME, log.req_sent_ns, log.req_sched_ns)


def status_warning(run: RunData) -> str | None:
    """The warning a run whose manifest status is not ok opens with (None for an ok run)."""
    if run.status == RunStatus.OK:
        return None
    reason = run.manifest.reason
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
    bounds: list[TenantBounds] = []
    for name, log in run.tenants.items():
        t0, t1 = _tenant_phase(run, log, warnings)
        meas = in_range(_ref_ns(log), t0, t1) if t0 is not None else np.zeros(log.n_requests, bool)
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
        bounds.append(
            TenantBounds(name, t0, t1, int(last.max()) if last.size else None, tasks[name] == "forward")
        )
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
        ref_in = in_range(_ref_ns(log), lo, hi) if window is not None else np.zeros(log.n_requests, bool)
        cols["measured"] = measured[name]
        cols["in_window"] = ref_in
        status = log.req_status
        is_ok = status == RequestStatus.OK
        is_cancelled = status == RequestStatus.CANCELLED
        is_open = status == ""
        is_error = ~(is_ok | is_cancelled | is_open)
        unknown = set(status[is_error & (status != RequestStatus.ERROR)].tolist())
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

        sample = latency_sample(log.req_sent_ns, status, window)
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

        # The naive figure: all measured tokens / (latest last token - earliest measured send).
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
            good = sample.copy()
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
            tm.slo_good, tm.slo_judged = n_good, n_judged
            tm.goodput_req_s = n_good / ((window[1] - window[0]) / NS_PER_S)
        tenants[name] = tm

    rm = RunMetrics(run=run, window_ns=window, tenants=tenants, slo=slo, warnings=warnings)
    rm.window_cut = window_cut(bounds, window)
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
