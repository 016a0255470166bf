"""Stage 3 of ``mt-analyze`` (``--export``): one run's tenants in other tools' formats, one file
per tenant (docs/exports.md gives the mapping field by field).

``br``: an llm-d Benchmark Report v0.2.1 (``br/<run label>__<tenant>.yaml``). The scenario's
stack holds the tenant's engine (``inference_engine``: backend, model, accelerator) and its GPU
share (a ``generic`` component, the schema's place for settings it has no fields for: mode,
SM % = active_thread_pct, pinned memory limit, priority, share_applied); ``scenario.load`` the
workload, with the co-located tenants in ``concurrent_with``; ``results.request_performance``
the request counts, throughput and latency statistics (ms, ms/token); the co-location figures
(NP and its definition, % of solo, slowdowns, STP, ANTT, fairness, Jain, the solo baseline's
run id) go under ``results.observability.multitenant_colocation``: v0.2.1 forbids unknown keys
everywhere except there (``Observability`` allows ad-hoc metric keys), in ``generic``
components and in the ``native``/``profiling`` blocks.

``vllm-bench``: the result JSON of ``vllm bench serve --save-result`` with its field names
(``vllm-bench/<run label>__<tenant>.json``), filled only where our definitions give the same
quantity; our throughput counts only the run's window.

Both are written with this module's own code from the schema (the ``llmd-benchmark-report``
package validates them in the tests; it is not needed at run time). Values are those of
summary.json (``summary.run_record``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np

from multitenant.analysis.metrics import RunMetrics
from multitenant.analysis.requests import latency_sample
from multitenant.analysis.summary import clean, run_record
from multitenant.schema import TenantSummary

EXPORT_FORMATS = ("br", "vllm-bench")
SHARE_FIELDS = ("active_thread_pct", "pinned_mem_limit", "priority")  # config.schema.ShareConfig
BR_VERSION = "0.2.1"
# The extension block's key under results.observability (ad-hoc keys are allowed there).
COLOCATION_KEY = "multitenant_colocation"
# Our extension key in a vllm-bench file (readers of vLLM's format ignore unknown keys).
VLLM_EXTENSION_KEY = "multitenant"
# (vLLM metric name, our latency metric) and our statistics -> vLLM's key prefix.
VLLM_METRICS = (("ttft", "ttft"), ("tpot", "tpot"), ("itl", "itl"), ("e2el", "e2e"))
VLLM_STATS = (("mean", "mean"), ("median", "p50"), ("std", "std"))
VLLM_PERCENTILES = (("p90", "p90"), ("p95", "p95"), ("p99", "p99"), ("p99.9", "p99.9"))
# Our statistics -> the Benchmark Report's ``Statistics`` keys.
BR_STATS = (("mean", "mean"), ("std", "stddev"), ("p50", "p50"), ("p90", "p90"), ("p95", "p95"),
            ("p99", "p99"), ("p99.9", "p99p9"))  # fmt: skip
# Backend -> the package whose version is the engine's (manifest ``packages``).
BACKEND_PACKAGE = {"vllm": "vllm", "hf": "transformers"}


def _hash(data: Any) -> str:
    return hashlib.md5(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()


def _sample_lengths(rm: RunMetrics, name: str) -> tuple[np.ndarray, np.ndarray]:
    """n_in and n_out of the tenant's latency sample (completed requests sent in the window)."""
    tm = rm.tenants[name]
    if tm.table is None:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    cols = tm.table.columns
    sample = latency_sample(cols["sent_ns"], cols["status"], rm.window_ns)
    return np.asarray(cols["n_in"])[sample], np.asarray(cols["n_out"])[sample]


def _others(rm: RunMetrics, name: str) -> list[str]:
    return [n for n in rm.tenants if n != name]


# ---------------------------------------------------------------------------------------------
# vllm bench serve


def vllm_bench_result(rm: RunMetrics, name: str) -> dict[str, Any]:
    """The tenant as a ``vllm bench serve`` result (docs/exports.md); null where undefined."""
    ts = run_record(rm).tenants[name]
    run = rm.run
    cfg = run.tenant_config(name)
    arrival = cfg.workload.arrival if cfg is not None else None
    closed = arrival is not None and not arrival.open_loop
    window_s = rm.window_s
    n_in, _ = _sample_lengths(rm, name)
    out: dict[str, Any] = {
        "date": _vllm_date(run.manifest.started_wall),
        "backend": run.tenant_manifest(name).backend or (cfg.backend if cfg else None),
        "model_id": run.tenant_manifest(name).model or (cfg.model if cfg else None),
        "num_prompts": ts.requests,
        "request_rate": arrival.rate if arrival is not None and not closed else None,
        "burstiness": arrival.burstiness if arrival is not None else None,
        "max_concurrency": arrival.concurrency if arrival is not None and closed else None,
        "duration": window_s,
        "completed": ts.completed,
        "failed": ts.errors,
        "total_input_tokens": int(n_in.sum()) if n_in.size and bool((n_in >= 0).all()) else None,
    }
    if ts.task != "forward":
        out["total_output_tokens"] = ts.output_tokens
        out["output_throughput"] = ts.throughput_tok_s
    out["request_throughput"] = ts.completed / window_s if window_s else None
    for vname, ours in VLLM_METRICS:
        stats = getattr(ts, f"{ours}_ms")
        for prefix, key in VLLM_STATS:
            out[f"{prefix}_{vname}_ms"] = stats.get(key)
        for prefix, key in VLLM_PERCENTILES:
            out[f"{prefix}_{vname}_ms"] = stats.get(key)
    out[VLLM_EXTENSION_KEY] = {
        "run_id": run.run_id,
        "tenant": name,
        "mode": run.mode,
        "window_ns": list(rm.window_ns) if rm.window_ns is not None else None,
        "throughput_unit": ts.throughput_unit,
        "note": "duration is the run's window; output_throughput counts tokens emitted in it (docs/exports.md)",
    }
    return clean(out)


def _vllm_date(wall: str | None) -> str | None:
    """``started_wall`` (ISO 8601) in vLLM's ``%Y%m%d-%H%M%S`` form."""
    if not wall:
        return None
    try:
        return datetime.fromisoformat(wall).strftime("%Y%m%d-%H%M%S")
    except ValueError:
        return None


# ---------------------------------------------------------------------------------------------
# llm-d Benchmark Report v0.2.1


def _statistics(stats: Mapping[str, float | None], units: str) -> dict[str, Any] | None:
    """A ``Statistics`` block from our latency statistics; None without a mean (no sample)."""
    if stats.get("mean") is None:
        return None
    block: dict[str, Any] = {"units": units}
    for ours, theirs in BR_STATS:
        if stats.get(ours) is not None:
            block[theirs] = stats[ours]
    return block


def _length_stats(values: np.ndarray) -> dict[str, Any] | None:
    if not values.size or bool((values < 0).any()):
        return None  # not logged for some request
    v = values.astype(np.float64)
    return {"units": "count", "mean": float(v.mean()), "min": int(values.min()),
            "p50": float(np.percentile(v, 50)), "max": int(values.max())}  # fmt: skip


def _seq_len(length: int | None, range_ratio: float | None) -> dict[str, Any] | None:
    if length is None:
        return None
    from multitenant.workload import length_bounds

    lo, hi = length_bounds(int(length), float(range_ratio or 0.0))
    if lo == hi:
        return {"distribution": "fixed", "value": int(length)}
    return {"distribution": "uniform", "value": int(length), "min": lo, "max": hi}


def _stack(rm: RunMetrics, name: str, ts: TenantSummary) -> list[dict[str, Any]]:
    run = rm.run
    rec = run.tenant_manifest(name)
    typed = run.tenant_config(name)
    cfg = dataclasses.asdict(typed) if typed is not None else {}
    backend = rec.backend or (typed.backend if typed else None) or "unknown"
    packages = run.manifest.packages or {}
    engine_version = packages.get(BACKEND_PACKAGE.get(backend, backend)) or (rec.engine or {}).get(
        "server_version"
    )
    own_version = packages.get("multitenant") or "unknown"
    on_gpu = run.mode != "cpu" and run.gpu_name is not None
    backend_options = run.backend_options(name)
    share = rec.share.given() or (typed.share.given() if typed else {})
    share_fields = {
        "mode": run.mode,
        **{key: share.get(key) for key in SHARE_FIELDS},
        "share_applied": rec.share_applied,
        "effective_sms": rec.effective_sms,
        "gpu_sm_count": run.manifest.gpu.sm_count if run.manifest.gpu is not None else None,
        "co_tenants": _others(rm, name),
    }
    return [
        {
            "metadata": {
                "schema_version": "0.0.1",
                "label": name,
                "cfg_id": _hash(cfg),
                "description": f"tenant {name} of run {run.run_id} ({backend} backend)",
            },  # fmt: skip
            "standardized": {
                "kind": "inference_engine",
                "tool": backend,
                "tool_version": str(engine_version or "unknown"),
                "role": "replica",
                "replicas": 1,
                "model": {"name": str(rec.model or (typed.model if typed else None) or "unknown")},
                "accelerator": {
                    "model": run.gpu_name if on_gpu else "cpu",
                    "count": 1 if on_gpu else 0,
                    "parallelism": {"tp": 1, "dp": 1, "pp": 1, "ep": 1},
                },
            },
            "native": {"args": backend_options, "config": clean(cfg) or None},
        },
        {
            "metadata": {
                "schema_version": "0.0.1",
                "label": f"{name}-share",
                "cfg_id": _hash(share_fields),
                "description": f"GPU share of tenant {name} (multitenant mode {run.mode})",
            },  # fmt: skip
            "standardized": {
                "kind": "generic",
                "tool": "multitenant",
                "tool_version": own_version,
                **share_fields,
            },
            "native": {"config": share or None},
        },
    ]


def _load(rm: RunMetrics, name: str, label: str) -> dict[str, Any] | None:
    run = rm.run
    cfg = run.tenant_config(name)
    if cfg is None:
        return None
    workload = dataclasses.asdict(cfg.workload)
    dataset, arrival = cfg.workload.dataset, cfg.workload.arrival
    input_len = _seq_len(dataset.input_len, dataset.range_ratio)
    if input_len is None:
        return None
    standardized: dict[str, Any] = {
        "tool": "multitenant",
        "tool_version": (run.manifest.packages or {}).get("multitenant") or "unknown",
        "source": "random" if dataset.kind == "random" else "sampled",
        "input_seq_len": input_len,
        "output_seq_len": _seq_len(dataset.output_len, dataset.range_ratio),
    }
    if not arrival.open_loop and arrival.concurrency:
        standardized["concurrency"] = int(arrival.concurrency)
    elif arrival.rate:
        standardized["rate_qps"] = float(arrival.rate)
    metadata: dict[str, Any] = {
        "schema_version": "0.0.1",
        "cfg_id": _hash(workload),
        "description": f"{arrival.kind} arrivals, {dataset.kind} dataset",
        "treatment": name,
        "treatment_group": label,
    }
    if _others(rm, name):
        metadata["concurrent_with"] = _others(rm, name)
    return {"metadata": metadata, "standardized": standardized, "native": {"config": clean(workload)}}


def _colocation(rm: RunMetrics, name: str, ts: TenantSummary) -> dict[str, Any]:
    agg = run_record(rm).aggregate
    tm = rm.tenants[name]
    return {
        "np": ts.np,
        "np_definition": ts.np_definition,
        "pct_of_solo": None if ts.np is None else 100.0 * ts.np,
        "solo_throughput": ts.solo_throughput,
        "throughput": ts.throughput_tok_s,
        "throughput_unit": ts.throughput_unit,
        "solo_e2e_mean_ms": ts.solo_e2e_mean_ms,
        "colocated_e2e_mean_ms": ts.colocated_e2e_mean_ms,
        "slowdown": ts.slowdown,
        "stp": agg.stp,
        "antt": agg.antt,
        "fairness": agg.fairness,
        "jain": agg.jain,
        "gpu_throughput_tok_s": agg.gpu_throughput_tok_s,
        "baseline_run_id": tm.baseline_run_id,
        "baseline_run_dir": ts.baseline_run_dir,
        "baseline_trials": ts.baseline_trials,
        "run_id": rm.run.run_id,
        "co_tenants": _others(rm, name),
        "window_s": rm.window_s,
        "slo_attainment": ts.slo_attainment,
        "goodput_req_s": ts.goodput_req_s,
        "cancelled": ts.cancelled,
        "definitions": "docs/analysis.md and docs/exports.md of multitenant",
    }


def benchmark_report(rm: RunMetrics, name: str, label: str) -> dict[str, Any]:
    """The tenant as an llm-d Benchmark Report v0.2.1, as plain data (docs/exports.md)."""
    ts = run_record(rm).tenants[name]
    run = rm.run
    m = run.manifest
    time: dict[str, Any] = {"start": m.started_wall, "end": m.ended_wall}
    if m.started_ns is not None and m.ended_ns is not None:
        time["duration"] = f"PT{(m.ended_ns - m.started_ns) / 1e9:.9g}S"
    n_in, n_out = _sample_lengths(rm, name)
    requests: dict[str, Any] = {
        "total": ts.requests,
        "failures": ts.errors,
        "incomplete": ts.cancelled + ts.incomplete,
    }
    if (in_stats := _length_stats(n_in)) is not None:
        requests["input_length"] = in_stats
    if (out_stats := _length_stats(n_out)) is not None and ts.task != "forward":
        requests["output_length"] = out_stats
    latency = {
        "time_to_first_token": _statistics(ts.ttft_ms, "ms"),
        "time_per_output_token": _statistics(ts.tpot_ms, "ms/token"),
        "inter_token_latency": _statistics(ts.itl_ms, "ms/token"),
        "request_latency": _statistics(ts.e2e_ms, "ms"),
    }
    throughput: dict[str, Any] = {}
    if ts.task != "forward" and ts.throughput_tok_s is not None:
        throughput["output_token_rate"] = {"units": "tokens/s", "mean": ts.throughput_tok_s}
    if rm.window_s:
        throughput["request_rate"] = {"units": "queries/s", "mean": ts.completed / rm.window_s}
    aggregate: dict[str, Any] = {"requests": requests}
    if latency := {k: v for k, v in latency.items() if v is not None}:
        aggregate["latency"] = latency
    if throughput:
        aggregate["throughput"] = throughput
    scenario: dict[str, Any] = {"stack": _stack(rm, name, ts)}
    if (load := _load(rm, name, label)) is not None:
        scenario["load"] = load
    report = {
        "version": BR_VERSION,
        "run": {
            "uid": _hash([run.run_id, str(run.run_dir.resolve()), name]),
            "eid": run.run_id,
            "time": {k: v for k, v in time.items() if v is not None},
            "description": f"multitenant run {run.run_id}, tenant {name}"
            + (
                f", co-located with {', '.join(_others(rm, name))} (mode {run.mode})"
                if _others(rm, name)
                else ""
            ),
            "keywords": ["multitenant", str(run.mode), name],
        },
        "scenario": scenario,
        "results": {
            "request_performance": {"aggregate": aggregate},
            "observability": {COLOCATION_KEY: _colocation(rm, name, ts)},
        },
    }
    return _drop_none(clean(report))


# Blocks kept as they are, nulls included: the tenant's own config and our extension block.
_VERBATIM = ("config", COLOCATION_KEY)


def _drop_none(value: Any) -> Any:
    """Nulls left out of mappings (the schema's optional fields are absent, not null), except
    inside the _VERBATIM blocks and the ``generic`` share component."""
    if isinstance(value, dict):
        if value.get("kind") == "generic":  # our share component: its unset settings stay, as null
            return value
        return {k: v if k in _VERBATIM else _drop_none(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_drop_none(v) for v in value]
    return value


# ---------------------------------------------------------------------------------------------
# Files


def write_exports(
    rms: Sequence[RunMetrics], labels: Mapping[Path, str], out: Path, formats: Sequence[str]
) -> list[Path]:
    """``out/br/<label>__<tenant>.yaml`` and/or ``out/vllm-bench/<label>__<tenant>.json`` for
    every tenant of every run (``labels``: the run labels by run folder, as cli.run_labels)."""
    import sys

    import yaml

    written: list[Path] = []
    for fmt in dict.fromkeys(formats):
        folder = out / fmt
        folder.mkdir(parents=True, exist_ok=True)
        for rm in rms:
            label = labels[rm.run.run_dir]
            for name in rm.tenants:
                stem = f"{label}__{name}"
                if fmt == "br":
                    path = folder / f"{stem}.yaml"
                    text = yaml.safe_dump(
                        benchmark_report(rm, name, label), sort_keys=False, allow_unicode=True
                    )
                    path.write_text(text, encoding="utf-8")
                else:
                    path = folder / f"{stem}.json"
                    path.write_text(
                        json.dumps(vllm_bench_result(rm, name), indent=2) + "\n", encoding="utf-8"
                    )
                written.append(path)
    if written:
        print(
            f"mt-analyze: exported {len(written)} file(s) to {out}/ ({', '.join(dict.fromkeys(formats))})",
            file=sys.stderr,
        )
    return written
