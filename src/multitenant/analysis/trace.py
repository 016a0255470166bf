"""Stage 3c of ``mt-analyze --trace``: one run -> ``trace.json`` in Chrome's Trace Event Format.

Open it in https://ui.perfetto.dev (or chrome://tracing); docs/trace.md says how.

Layout:
  * one process per tenant ("tenant <name>"), sorted in config order; inside it, one thread
    track per concurrency lane ("requests 0", "requests 1", ...): each request is a complete
    slice ("X") from ``sent`` to ``done`` (or its last token when it has no ``done``), placed on
    the lowest lane free at its ``sent`` so slices on a track never overlap (Perfetto requires
    slices of one track to nest). Its args hold rid, status, n_out, TTFT/TPOT/e2e in ms.
  * token instants ("i", thread scope) on the request's lane, one per emission instant.
  * forward tenants: one slice per ``iter`` (batch, dur_ns) on an "iterations" thread.
  * a "GPU" process with counters ("C") for every telemetry column, and per-tenant CPU counters.
  * global instants for the window's start and end.

Timestamps are microseconds (the format's unit) since the earliest event of the run, with
nanosecond precision kept as three decimals; ``otherData.t0_ns`` is that origin on
CLOCK_MONOTONIC so a slice can be mapped back to the event logs.
"""

from __future__ import annotations

import heapq
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from multitenant.analysis.columns import NO_TIME
from multitenant.analysis.metrics import RunMetrics

GPU_PID = 1


def _us(t_ns: int, origin: int) -> float:
    return round((t_ns - origin) / 1000.0, 3)


def _origin(rm: RunMetrics) -> int:
    firsts: list[int] = []
    for log in rm.run.tenants.values():
        for arr in (log.req_sched_ns, log.req_sent_ns, log.tok_t_ns, log.iter_t_ns):
            valid = arr[arr != NO_TIME]
            if valid.size:
                firsts.append(int(valid.min()))
    tel = rm.run.telemetry
    if tel is not None and tel.t_ns.size:
        firsts.append(int(tel.t_ns.min()))
    return min(firsts) if firsts else 0


def _lanes(starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """Greedy interval colouring: lane of each [start, end], lowest free lane first."""
    lanes = np.zeros(starts.size, np.int64)
    free: list[int] = []  # lanes whose last slice has ended
    busy: list[tuple[int, int]] = []  # (end, lane)
    n_lanes = 0
    for i in np.argsort(starts, kind="stable"):
        while busy and busy[0][0] <= starts[i]:
            heapq.heappush(free, heapq.heappop(busy)[1])
        if free:
            lane = heapq.heappop(free)
        else:
            lane = n_lanes
            n_lanes += 1
        lanes[i] = lane
        heapq.heappush(busy, (int(ends[i]), lane))
    return lanes


def _num(value: float) -> float | None:
    return None if value != value else round(float(value), 6)  # NaN -> null


def build_trace(rm: RunMetrics) -> dict[str, Any]:
    """The trace as a dict (``{"traceEvents": [...], ...}``)."""
    origin = _origin(rm)
    events: list[dict[str, Any]] = []
    meta = events.append
    meta({"ph": "M", "name": "process_name", "pid": GPU_PID, "tid": 0, "args": {"name": "GPU"}})
    meta({"ph": "M", "name": "process_sort_index", "pid": GPU_PID, "tid": 0, "args": {"sort_index": 0}})
    for index, (name, log) in enumerate(rm.run.tenants.items()):
        pid = index + 2
        tm = rm.tenants[name]
        meta({"ph": "M", "name": "process_name", "pid": pid, "tid": 0, "args": {"name": f"tenant {name}"}})
        meta({"ph": "M", "name": "process_sort_index", "pid": pid, "tid": 0, "args": {"sort_index": index + 1}})
        table = tm.table
        if table is not None and len(table):
            cols = table.columns
            sent = cols["sent_ns"]
            end = np.where(cols["done_ns"] != NO_TIME, cols["done_ns"], cols["last_tok_ns"])
            has = (sent != NO_TIME) & (end != NO_TIME)
            rows = np.flatnonzero(has)
            starts, stops = sent[rows], np.maximum(end[rows], sent[rows])
            lanes = _lanes(starts, stops)
            lane_of_row = np.full(len(table), -1, np.int64)
            lane_of_row[rows] = lanes
            for lane in range(int(lanes.max()) + 1 if lanes.size else 0):
                meta({"ph": "M", "name": "thread_name", "pid": pid, "tid": lane + 1, "args": {"name": f"requests {lane}"}})
            for k, row in enumerate(rows):
                events.append(
                    {
                        "ph": "X",
                        "name": f"req {int(cols['rid'][row])}",
                        "cat": "request",
                        "pid": pid,
                        "tid": int(lanes[k]) + 1,
                        "ts": _us(int(starts[k]), origin),
                        "dur": round((int(stops[k]) - int(starts[k])) / 1000.0, 3),
                        "args": {
                            "rid": int(cols["rid"][row]),
                            "status": str(cols["status"][row]) or "unfinished",
                            "n_out": int(cols["n_out"][row]),
                            "measured": bool(cols["measured"][row]) if "measured" in cols else None,
                            "ttft_ms": _num(cols["ttft_ms"][row]),
                            "tpot_ms": _num(cols["tpot_ms"][row]),
                            "e2e_ms": _num(cols["e2e_ms"][row]),
                            "error": cols["error"][row],
                        },
                    }
                )
            if log.tok_rid.size:
                tok_lane = lane_of_row[log.tok_row]
                for t, rid, n, lane in zip(
                    log.tok_t_ns.tolist(), log.tok_rid.tolist(), log.tok_n.tolist(), tok_lane.tolist(), strict=True
                ):
                    if lane < 0:
                        continue  # a token of a request never sent: no slice to put it on
                    events.append(
                        {"ph": "i", "s": "t", "name": "tok", "cat": "token", "pid": pid, "tid": lane + 1,
                         "ts": _us(t, origin), "args": {"rid": rid, "n": n}}
                    )
        if log.iter_t_ns.size:
            tid = 10_000
            meta({"ph": "M", "name": "thread_name", "pid": pid, "tid": tid, "args": {"name": "iterations"}})
            for t, batch, dur in zip(log.iter_t_ns.tolist(), log.iter_batch.tolist(), log.iter_dur_ns.tolist(), strict=True):
                # iter.t is taken when the iteration ends; dur_ns reaches back to its start.
                events.append(
                    {"ph": "X", "name": f"iter batch={batch}", "cat": "iter", "pid": pid, "tid": tid,
                     "ts": _us(t - dur, origin), "dur": round(dur / 1000.0, 3), "args": {"batch": batch}}
                )
    tel = rm.run.telemetry
    if tel is not None and tel.t_ns.size:
        pids = {name: i + 2 for i, name in enumerate(rm.run.tenants)}
        for key, values in tel.columns.items():
            if not tel.has(key):
                continue
            pid, name = GPU_PID, key
            if "/" in key:
                metric, tenant = key.split("/", 1)
                pid, name = pids.get(tenant, GPU_PID), f"{metric} {tenant}"
            for t, v in zip(tel.t_ns.tolist(), values.tolist(), strict=True):
                if v == v:
                    events.append({"ph": "C", "name": name, "pid": pid, "tid": 0, "ts": _us(t, origin), "args": {"value": v}})
    if rm.window_ns is not None:
        for label, t in (("window start", rm.window_ns[0]), ("window end", rm.window_ns[1])):
            events.append({"ph": "i", "s": "g", "name": label, "cat": "window", "pid": GPU_PID, "tid": 0, "ts": _us(t, origin)})
    return {
        "traceEvents": events,
        "displayTimeUnit": "ms",
        "otherData": {"run_id": rm.run.run_id, "run_dir": str(rm.run.run_dir), "t0_ns": origin, "clock": "CLOCK_MONOTONIC"},
    }


def write_trace(rm: RunMetrics, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(orjson.dumps(build_trace(rm)))
    return path
