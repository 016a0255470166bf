"""The per-request table of one tenant: first and last token, token counts, the per-request
metrics and the inter-token gaps, and the latency sample every statistic and plot uses.

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
and the three engine times).

The latency sample (``latency_sample``): completed (``done.status == "ok"``) requests whose
``sent`` lies in the run's window, both ends inclusive.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from multitenant.analysis.columns import NO_TIME, TenantLog
from multitenant.analysis.names import NS_PER_MS, TTFT_SPLIT
from multitenant.schema import RequestStatus


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


def in_range(t: np.ndarray, lo: int | None, hi: int | None) -> np.ndarray:
    """lo <= t <= hi (an end that is None is open), ignoring NO_TIME entries."""
    mask = t != NO_TIME
    if lo is not None:
        mask &= t >= lo
    if hi is not None:
        mask &= t <= hi
    return mask


def latency_sample(sent_ns: np.ndarray, status: np.ndarray, window_ns: tuple[int, int] | None) -> np.ndarray:
    """Which requests the latency statistics use: completed ok and sent inside the run's window
    (inclusive at both ends); none without a window."""
    if window_ns is None:
        return np.zeros(sent_ns.size, bool)
    return in_range(sent_ns, window_ns[0], window_ns[1]) & (status == RequestStatus.OK)
