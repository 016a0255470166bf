"""Stage 3c of ``mt-analyze``: metrics -> the files other tools read: summary.json (typed by
``schema.Summary``) and requests.csv.

summary.json: per run ``run_dir``, ``run_id``, ``status``, ``mode``, ``window_ns``, ``tenants``,
``aggregate``, ``name``, ``gpu``, ``window_s``, ``slo_ms``, ``warnings``, ``missing_baselines``,
``hardware``, ``solo_hardware`` and ``comparability`` (``hardware``);
per tenant its counts (requests = completed + errors + cancelled + incomplete), throughput,
latency statistics, SLO figures, NP with its definition and the means an ``e2e`` NP divides,
slowdowns, its baseline and ``ttft_split`` (``schema.TenantSummary``). Numbers are plain JSON
numbers (full float precision), undefined ones null, never NaN.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from multitenant.analysis.columns import NO_TIME
from multitenant.analysis.metrics import RunMetrics, TenantMetrics
from multitenant.analysis.names import LATENCY_METRICS, TTFT_SPLIT
from multitenant.schema import AggregateSummary, RunSummary, Summary, TenantSummary

# ---------------------------------------------------------------------------------------------
# summary.json


def clean(value: Any) -> Any:
    """NaN/inf -> None (JSON has neither), numpy scalars -> Python numbers."""
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, dict):
        return {k: clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [clean(v) for v in value]
    return value


def tenant_summary(tm: TenantMetrics) -> TenantSummary:
    return TenantSummary(
        requests=tm.requests,
        errors=tm.errors,
        output_tokens=tm.output_tokens,
        throughput_tok_s=tm.throughput,
        **{f"{metric}_ms": tm.latency[metric] for metric in LATENCY_METRICS},
        slo_attainment=tm.slo_attainment,
        goodput_req_s=tm.goodput_req_s,
        np=tm.np,
        slowdown=tm.slowdown,
        task=tm.task,
        throughput_unit=tm.throughput_unit,
        completed=tm.completed,
        cancelled=tm.cancelled,
        incomplete=tm.incomplete,
        solo_throughput=tm.solo_throughput,
        np_definition=tm.np_definition,
        solo_e2e_mean_ms=tm.solo_e2e_mean_ms,
        colocated_e2e_mean_ms=tm.colocated_e2e_mean_ms,
        baseline_run_dir=tm.baseline_run_dir,
        baseline_trials=tm.baseline_trials,
        ttft_split=tm.ttft_split,
    )


def run_record(rm: RunMetrics) -> RunSummary:
    run = rm.run
    return RunSummary(
        run_dir=str(run.run_dir),
        run_id=run.run_id,
        status=run.status,
        mode=run.mode,
        window_ns=list(rm.window_ns) if rm.window_ns is not None else None,
        tenants={name: tenant_summary(tm) for name, tm in rm.tenants.items()},
        aggregate=AggregateSummary(
            gpu_throughput_tok_s=rm.gpu_throughput_tok_s,
            gpu_throughput_naive_tok_s=rm.gpu_throughput_naive_tok_s,
            stp=rm.stp,
            antt=rm.antt,
            fairness=rm.fairness,
            jain=rm.jain,
        ),
        name=run.name,
        gpu=run.gpu_name,
        window_s=rm.window_s,
        slo_ms=rm.slo,
        missing_baselines=rm.missing_baselines,
        warnings=rm.warnings,
        window_cut=rm.window_cut,
        hardware=rm.hardware,
        solo_hardware=rm.solo_hardware,
        comparability=rm.comparability,
    )


def run_summary(rm: RunMetrics) -> dict[str, Any]:
    """One run of summary.json as plain JSON data."""
    return clean(dataclasses.asdict(run_record(rm)))


def summary(rms: Sequence[RunMetrics]) -> dict[str, Any]:
    """summary.json as plain JSON data."""
    return clean(dataclasses.asdict(Summary(runs=[run_record(rm) for rm in rms])))


def write_summary_json(rms: Sequence[RunMetrics], path: Path) -> Path:
    path.write_bytes(orjson.dumps(summary(rms), option=orjson.OPT_INDENT_2) + b"\n")
    return path


# ---------------------------------------------------------------------------------------------
# requests.csv

CSV_COLUMNS = (
    "rid", "status", "error", "measured", "in_window", "n_in", "n_out_target", "n_out", "n_tok", "n_emissions",
    "sched_ns", "sent_ns", "first_tok_ns", "last_tok_ns", "done_ns",
    "ttft_ms", "ttft_sched_ms", "queue_ms", "tpot_ms", "e2e_ms", "itl_mean_ms", "itl_max_ms", "slo_ok",
    "engine_queued_ns", "engine_scheduled_ns", "engine_first_tok_ns", "engine_last_tok_ns",
    *(f"ttft_{name}_ms" for name in TTFT_SPLIT), "usage_tokens", "warning",
)  # fmt: skip
_INT_COLUMNS = ("n_in", "n_out_target", "n_out", "usage_tokens")  # -1 = not logged


def write_requests_csv(rms: Sequence[RunMetrics], path: Path) -> Path:
    """One row per request of every tenant of every run (warm-up ones too, ``measured`` false).
    Times never logged and metrics that do not apply are empty cells."""
    import pandas as pd

    frames = []
    for rm in rms:
        for name, tm in rm.tenants.items():
            if tm.table is None or not len(tm.table):
                continue
            cols = tm.table.columns
            data: dict[str, Any] = {"run_id": rm.run.run_id, "tenant": name}
            for key in CSV_COLUMNS:
                if key not in cols:
                    data[key] = pd.array([pd.NA] * len(tm.table), dtype="boolean")
                elif key == "slo_ok":
                    data[key] = pd.array([pd.NA if v is None else bool(v) for v in cols[key]], dtype="boolean")
                elif key.endswith("_ns") or key in _INT_COLUMNS:
                    values = cols[key]
                    data[key] = pd.array(values, dtype="Int64")
                    data[key][values == (NO_TIME if key.endswith("_ns") else -1)] = pd.NA
                else:
                    data[key] = cols[key]
            frames.append(pd.DataFrame(data))
    columns = ["run_id", "tenant", *CSV_COLUMNS]
    frame = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=columns)
    frame = frame[columns]
    frame["status"] = frame["status"].replace("", "unfinished")
    frame.to_csv(path, index=False, float_format="%.6f")
    return path
