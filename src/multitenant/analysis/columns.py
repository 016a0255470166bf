"""The columns one run's logs become: a tenant's ``events.jsonl`` (``TenantLog``) and the
run's ``telemetry.jsonl`` (``Telemetry``), and the error every reading stage raises.

Times stay integer nanoseconds (int64) end to end: CLOCK_MONOTONIC values exceed 2**53 after
about 104 days of uptime, so float64 would lose nanoseconds.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

# Sentinel for "this timestamp / count was never logged". CLOCK_MONOTONIC is never negative.
NO_TIME = -1

# Telemetry keys that hold one number per sample (INTERFACES.md, "telemetry.jsonl").
TELEMETRY_SCALARS = (
    "gpu_util_pct",
    "mem_util_pct",
    "mem_used_bytes",
    "power_w",
    "sm_clock_mhz",
    "mem_clock_mhz",
    "temp_c",
    # GPU activity (percent; run/telemetry.py): NVML GPM on Hopper+, else sm_active_pct and
    # dram_bw_pct repeat the utilization rates and the other two are absent.
    "sm_active_pct",
    "sm_occupancy_pct",
    "dram_bw_pct",
    "tensor_active_pct",
)
# Telemetry keys that hold {tenant name: number}; flattened to "<key>/<tenant>" columns.
TELEMETRY_PER_TENANT = ("tenant_cpu_pct", "tenant_gpu_mem_bytes")


class AnalysisError(Exception):
    """Input that cannot be analysed: one line naming the problem and the fix (exit code 2)."""


@dataclass
class TenantLog:
    """One tenant's ``events.jsonl`` as columns.

    Requests: ``req_*`` arrays are aligned, one entry per request id, sorted by id; a time never
    logged is ``NO_TIME``, a count never logged is -1, a missing status is ``""``.
    Tokens: ``tok_*`` arrays are aligned, one entry per (emission instant, request) pair, in
    file order; ``tok_n`` is the number of tokens that request got at ``tok_t_ns``, ``tok_row``
    the request's index in the ``req_*`` arrays.
    Iterations (``task: forward``): ``iter_*`` arrays, one entry per ``iter`` event.
    Optional ``done`` fields (``multitenant.schema``): ``req_engine_*_ns`` are a serving engine's
    own timestamps (vLLM; same clock as ``t``), NO_TIME when not logged; ``req_usage_tokens``
    is the server's token count (openai), -1 when not logged; ``req_warning`` its one-line
    warning, None when there is none.
    """

    name: str
    events_path: Path | None
    run_start: dict[str, Any] | None = None
    ready: dict[str, Any] | None = None
    window_seen: bool = False
    window_t0_ns: int | None = None
    window_t1_ns: int | None = None
    run_end: dict[str, Any] | None = None
    req_rid: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    req_sched_ns: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    req_sent_ns: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    req_done_ns: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    req_n_in: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    req_n_out_target: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    req_n_out: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    req_status: np.ndarray = field(default_factory=lambda: np.zeros(0, object))
    req_error: np.ndarray = field(default_factory=lambda: np.zeros(0, object))
    req_engine_queued_ns: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    req_engine_scheduled_ns: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    req_engine_first_tok_ns: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    req_engine_last_tok_ns: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    req_usage_tokens: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    req_warning: np.ndarray = field(default_factory=lambda: np.zeros(0, object))
    tok_t_ns: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    tok_rid: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    tok_n: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    tok_row: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # index into req_*
    iter_t_ns: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    iter_batch: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    iter_dur_ns: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    lines_read: int = 0
    bytes_read: int = 0
    warnings: list[str] = field(default_factory=list)

    @property
    def n_requests(self) -> int:
        return int(self.req_rid.size)

    # Compact pickling for the parse workers: token times run-length encoded (a line's requests
    # share its t), ids, counts and rows as int32 when they fit. Unpickling restores the very
    # same arrays; it only makes the trip from a worker process cheaper.
    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        t = state.pop("tok_t_ns")
        starts = np.flatnonzero(np.diff(t, prepend=t[:1] - 1)) if t.size else np.zeros(0, np.int64)
        state["_tok_t_runs"] = (t[starts], np.diff(np.append(starts, t.size)))
        for key in ("tok_rid", "tok_n", "tok_row"):
            arr = state[key]
            if arr.size and int(arr.min()) >= -(2**31) and int(arr.max()) < 2**31:
                state[key] = arr.astype(np.int32)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        values, counts = state.pop("_tok_t_runs")
        state["tok_t_ns"] = np.repeat(values, counts)
        for key in ("tok_rid", "tok_n", "tok_row"):
            state[key] = state[key].astype(np.int64, copy=False)
        self.__dict__.update(state)


@dataclass
class Telemetry:
    """``telemetry.jsonl`` as columns: ``t_ns`` (int64) and float64 columns (NaN = not sampled).

    Per-tenant values are flattened to ``"tenant_cpu_pct/<name>"`` and
    ``"tenant_gpu_mem_bytes/<name>"``.
    """

    t_ns: np.ndarray
    columns: dict[str, np.ndarray]
    warnings: list[str] = field(default_factory=list)

    def has(self, key: str) -> bool:
        col = self.columns.get(key)
        return col is not None and bool(np.isfinite(col).any())
