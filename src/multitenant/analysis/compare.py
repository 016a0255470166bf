"""``mt-analyze RUN --compare FILE``: another benchmark's result file beside one tenant's figures.

FILE is a ``vllm bench serve`` result JSON (``--save-result``; also what ``--export
vllm-bench`` writes) or AIPerf's ``profile_export_aiperf.json``. Both are read into vLLM's field
names (``export.vllm_bench_result`` gives ours in the same names); every field both sides have
is printed with ours, theirs and (ours - theirs) / theirs in %. AIPerf's metrics are objects
``{"unit": "ms", "avg": .., "p50": .., "p99": .., "std": ..}``: ``time_to_first_token`` ->
TTFT, ``inter_token_latency`` -> TPOT (AIPerf computes it per request as (latency - TTFT) /
(output tokens - 1), which is vLLM's TPOT), ``request_latency`` -> E2E,
``output_token_throughput``, ``request_throughput``, ``request_count`` (completed: AIPerf counts
the requests that succeeded), ``error_request_count``, ``total_isl``, ``total_osl``,
``benchmark_duration`` (each its ``avg``). docs/exports.md says which of ours each is compared with.

A file that cannot be read or is neither format is an ``AnalysisError`` (exit 2, one line).
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from multitenant.analysis.columns import AnalysisError
from multitenant.analysis.export import (
    VLLM_EXTENSION_KEY,
    VLLM_METRICS,
    VLLM_PERCENTILES,
    VLLM_STATS,
    vllm_bench_result,
)
from multitenant.analysis.metrics import RunMetrics

# The fields compared, in the order printed (vLLM's names).
COUNT_FIELDS = ("completed", "failed", "duration", "total_input_tokens", "total_output_tokens",
                "request_throughput", "output_throughput")  # fmt: skip
LATENCY_FIELDS = tuple(
    f"{prefix}_{vname}_ms" for vname, _ in VLLM_METRICS for prefix, _ in (*VLLM_STATS, *VLLM_PERCENTILES)
)
FIELDS = COUNT_FIELDS + LATENCY_FIELDS

# AIPerf metric tag -> vLLM's metric name (latencies) and AIPerf statistic -> vLLM's prefix.
AIPERF_LATENCY = {"time_to_first_token": "ttft", "inter_token_latency": "tpot", "request_latency": "e2el"}
AIPERF_STATS = {"avg": "mean", "p50": "median", "std": "std", "p90": "p90", "p95": "p95", "p99": "p99"}
AIPERF_SCALARS = {
    "request_count": "completed",
    "error_request_count": "failed",
    "benchmark_duration": "duration",
    "total_isl": "total_input_tokens",
    "total_osl": "total_output_tokens",
    "request_throughput": "request_throughput",
    "output_token_throughput": "output_throughput",
}  # fmt: skip
_TO_MS = {"ns": 1e-6, "us": 1e-3, "µs": 1e-3, "ms": 1.0, "s": 1e3, "sec": 1e3, "seconds": 1e3}
_TO_S = {"ms": 1e-3, "s": 1.0, "sec": 1.0, "seconds": 1.0}


@dataclass
class Reference:
    """A result file read into vLLM's field names."""

    path: Path
    kind: str  # "vllm-bench" or "aiperf"
    fields: dict[str, float]
    tenant: str | None = None  # the tenant our own vllm-bench export names


@dataclass
class Row:
    field: str
    theirs: float
    ours: float | None
    diff_pct: float | None


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def read_reference(path: str | Path) -> Reference:
    """The file's figures in vLLM's names; AnalysisError for an unreadable or unknown file."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise AnalysisError(f"--compare {path}: cannot be read ({e.strerror})") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise AnalysisError(f"--compare {path}: not JSON ({str(e).splitlines()[0]})") from None
    if (
        isinstance(data, dict)
        and "completed" in data
        and any(f"mean_{m}_ms" in data for m, _ in VLLM_METRICS)
    ):
        fields = {k: v for k in FIELDS if (v := _number(data.get(k))) is not None}
        ext = data.get(VLLM_EXTENSION_KEY)
        tenant = ext.get("tenant") if isinstance(ext, dict) and isinstance(ext.get("tenant"), str) else None
        return Reference(path, "vllm-bench", fields, tenant)
    if isinstance(data, dict):
        records = data.get("records")
        metrics: dict[str, Any] = records if isinstance(records, dict) else data
        if isinstance(metrics.get("time_to_first_token"), dict) or isinstance(
            metrics.get("request_throughput"), dict
        ):
            return Reference(path, "aiperf", _aiperf_fields(metrics))
    raise AnalysisError(
        f"--compare {path}: neither a vllm bench serve result (completed, mean_ttft_ms, ...) nor an AIPerf "
        "profile_export_aiperf.json (time_to_first_token: {unit, avg, ...})"
    )


def _aiperf_fields(metrics: dict[str, Any]) -> dict[str, float]:
    fields: dict[str, float] = {}
    for tag, vname in AIPERF_LATENCY.items():
        block = metrics.get(tag)
        if not isinstance(block, dict):
            continue
        scale = _TO_MS.get(str(block.get("unit", "ms")).lower())
        if scale is None:
            continue  # a unit we do not know: better absent than wrong
        for stat, prefix in AIPERF_STATS.items():
            if (v := _number(block.get(stat))) is not None:
                fields[f"{prefix}_{vname}_ms"] = v * scale
    for tag, vname in AIPERF_SCALARS.items():
        block = metrics.get(tag)
        if not isinstance(block, dict) or (value := _number(block.get("avg"))) is None:
            continue
        if vname == "duration":
            scale = _TO_S.get(str(block.get("unit", "sec")).lower())
            if scale is None:
                continue
            value *= scale
        fields[vname] = value
    return fields


def choose_tenant(rm: RunMetrics, wanted: str | None, reference: Reference) -> str:
    """``--compare-tenant``, else the tenant our export names, else the run's only tenant."""
    names = list(rm.tenants)
    if wanted is not None:
        if wanted not in rm.tenants:
            raise AnalysisError(f"--compare-tenant {wanted}: the run has tenants {', '.join(names)}")
        return wanted
    if reference.tenant in rm.tenants:
        return str(reference.tenant)
    if len(names) == 1:
        return names[0]
    raise AnalysisError(f"--compare: the run has tenants {', '.join(names)}; name one with --compare-tenant")


def compare_rows(rm: RunMetrics, name: str, reference: Reference) -> list[Row]:
    """One row per field the file has, in FIELDS order; diff_pct None where ours is missing or
    theirs is 0 (0 % when both are 0)."""
    ours = vllm_bench_result(rm, name)
    rows = []
    for key in FIELDS:
        if key not in reference.fields:
            continue
        theirs = reference.fields[key]
        mine = _number(ours.get(key))
        if mine is None:
            diff = None
        elif theirs == 0:
            diff = 0.0 if mine == 0 else None
        else:
            diff = (mine - theirs) / abs(theirs) * 100.0
        rows.append(Row(key, theirs, mine, diff))
    return rows


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.6g}"


def print_compare(rms: Sequence[RunMetrics], path: str, tenant: str | None) -> list[Row]:
    """``--compare``: read FILE, pick the tenant, print the table to stdout; returns the rows."""
    reference = read_reference(path)
    if len(rms) != 1:
        raise AnalysisError(f"--compare takes one run; got {len(rms)}")
    rm = rms[0]
    name = choose_tenant(rm, tenant, reference)
    rows = compare_rows(rm, name, reference)
    print(
        f"{reference.kind} {reference.path}  vs  tenant {name} of {rm.run.run_id} (window {_fmt(rm.window_s)} s)"
    )
    print(f"{'field':<24} {'theirs':>14} {'ours':>14} {'diff %':>9}")
    for row in rows:
        diff = "-" if row.diff_pct is None else f"{row.diff_pct:+.1f}"
        print(f"{row.field:<24} {_fmt(row.theirs):>14} {_fmt(row.ours):>14} {diff:>9}")
    if not rows:
        print("(no field in common)")
    sys.stdout.flush()
    return rows
