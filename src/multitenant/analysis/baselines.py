"""Solo baselines and interference: which solo run is a tenant's baseline, and NP, slowdowns,
STP, ANTT, fairness and Jain's index from it.

A solo run is a tenant's baseline when its one tenant has the same baseline identity
(``schema.baseline_identity``: model, backend, execution, dtype, task, batch limit, workload
lengths and arrival (``schema.WORKLOAD_IDENTITY``),
CPU threads on the CPU, the backend options that change per-token performance) and it ran on a
GPU of the same name. A run records each tenant's identity in its manifest; for a run that does
not (older folders) it is derived from config.resolved.yaml the same way (``tenant_spec``).

Interference:
  NP_i = throughput co-located / throughput solo      closed-loop tenant (``np_definition`` "throughput")
  NP_i = mean E2E solo / mean E2E co-located           open-loop tenant (poisson, gamma, constant: "e2e")
  slowdown = co-located percentile / solo one;
  STP = sum NP_i; ANTT = mean(1 / NP_i); fairness = min NP / max NP; Jain = (sum x)^2 / (n sum x^2).
  An open-loop tenant that keeps up emits exactly its offered load, so its throughput ratio stays
  near 1 whatever the interference; the time the same work takes alone over the time it takes
  shared is what moves. Its means are those of the latency statistics (completed requests sent in
  each run's window); when either run has no such request, its NP is null, with a warning.
  The aggregate figures are null unless every tenant of the run has an NP.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from multitenant.analysis.load import RunData
from multitenant.analysis.metrics import RunMetrics, TenantMetrics
from multitenant.analysis.names import NP_E2E, NP_SUSPECT, NP_THROUGHPUT, SLOWDOWN_KEYS
from multitenant.schema import RunStatus, baseline_identity, comparable_identity

# Arrival processes whose schedule does not wait for the engine (config.ARRIVALS less "closed").
OPEN_LOOP_ARRIVALS = ("poisson", "gamma", "constant")
# The ``openai`` options that change what the server does (the rest only say how to reach it,
# or how long to wait: port, api_key_env, health_path, health_timeout_s, request_timeout_s,
# vocab_size).
OPENAI_SPEC_KEYS = ("url", "launch", "endpoint", "model_name", "ignore_eos", "extra_body")


def _set(block: Any, keys: tuple[str, ...] | None = None) -> dict[str, Any]:
    """The options of a backend block that are set: a key that is null, or ``{}`` (engine_args,
    extra_body), means the default, the same as a key not written."""
    if not isinstance(block, Mapping):
        return {}
    items = block.items() if keys is None else ((k, block.get(k)) for k in keys)
    return {str(k): v for k, v in items if v is not None and v != {}}


def identity_options(backend: str, block: Mapping[str, Any] | None) -> dict[str, Any]:
    """The options of a tenant's backend block (config.resolved.yaml) that belong to its
    identity, for runs written before the manifest recorded it: a ``vllm`` tenant's whole block
    (engine arguments), an ``openai`` tenant's OPENAI_SPEC_KEYS; nothing for other backends
    (``hf``), so run folders written before these blocks existed still match."""
    if backend == "vllm":
        return _set(block)
    if backend == "openai":
        return _set(block, OPENAI_SPEC_KEYS)
    return {}


def derived_identity(run: RunData, name: str) -> dict[str, Any] | None:
    """The tenant's baseline identity derived from config.resolved.yaml (None without one)."""
    block = run.written.get(name)
    if block is None:
        return None
    return baseline_identity(block, run.mode, identity_options(str(block.get("backend")), run.backend_options(name)))


def _recorded(run: RunData, name: str) -> dict[str, Any] | None:
    recorded = run.tenant_manifest(name).identity
    return None if recorded is None else comparable_identity(recorded)


def tenant_spec(run: RunData, name: str) -> dict[str, Any] | None:
    """The tenant's baseline identity: the one its manifest record carries (its workload reduced
    by ``schema.workload_identity``), else derived from config.resolved.yaml; None when the run
    has neither."""
    recorded = _recorded(run, name)
    return recorded if recorded is not None else derived_identity(run, name)


def _identities(
    run: RunData, name: str, solo: RunData, solo_name: str
) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """The two tenants' identities to compare: the recorded ones when both manifests carry one,
    else both derived from their configs."""
    mine, theirs = _recorded(run, name), _recorded(solo, solo_name)
    if mine is None or theirs is None:
        mine, theirs = derived_identity(run, name), derived_identity(solo, solo_name)
    return mine, theirs


def same_identity(run: RunData, name: str, solo: RunData, solo_name: str) -> bool:
    """Whether the two tenants have the same baseline identity (False when either has none)."""
    mine, theirs = _identities(run, name, solo, solo_name)
    return mine is not None and mine == theirs


def _flat(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, Mapping) and value:
        out: dict[str, Any] = {}
        for k, v in value.items():
            out.update(_flat(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: value}


def identity_differences(mine: dict[str, Any] | None, theirs: dict[str, Any] | None) -> list[str]:
    """The identity fields that differ, as ``workload.dataset.input_len 32 vs 64`` (mine first)."""
    a, b = _flat(mine or {}), _flat(theirs or {})
    return [f"{k} {a.get(k)} vs {b.get(k)}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def nearest_solo(run: RunData, name: str, candidates: list[RunData]) -> str | None:
    """For a tenant without a baseline: the solo candidate with the fewest differing identity
    fields (the GPU name counts as one; ties: the earlier candidate) and those fields, as
    ``nearest solo <dir>: workload.dataset.input_len 32 vs 64``; None without a candidate."""
    best: tuple[int, RunData, list[str]] | None = None
    for cand in candidates:
        if cand.run_dir.resolve() == run.run_dir.resolve() or not is_solo_candidate(cand):
            continue
        (solo_name,) = cand.tenants
        diffs = identity_differences(*_identities(run, name, cand, solo_name))
        if cand.gpu_name != run.gpu_name:
            diffs.append(f"gpu {run.gpu_name} vs {cand.gpu_name}")
        if best is None or len(diffs) < best[0]:
            best = (len(diffs), cand, diffs)
    if best is None:
        return None
    return f"nearest solo {best[1].run_dir}: {'; '.join(best[2]) or 'no field differs'}"


def describe_spec(spec: dict[str, Any] | None, gpu: str | None) -> str:
    """One line naming a baseline identity, backend options (those set) included, for "run it
    alone" hints."""
    if spec is None:
        return "unknown spec (no config.resolved.yaml)"
    text = (
        f"{spec.get('backend')} {spec.get('model')} {spec.get('execution')} {spec.get('dtype')} {spec.get('task')} "
        f"max_batch={spec.get('max_batch')}"
    )
    if "cpu_threads" in spec:
        text += f" cpu_threads={spec['cpu_threads']}"
    options = spec.get("options")
    if isinstance(options, dict):
        shown = [f"{k}={v!r}" if isinstance(v, str) else f"{k}={v}" for k, v in options.items() if v not in (None, {})]
        text += f" {spec.get('backend')}({', '.join(shown)})"
    return f"{text} on {gpu or 'no GPU'}"


def is_solo_candidate(run: RunData) -> bool:
    """A finished run with exactly one tenant."""
    return len(run.tenants) == 1 and run.status == RunStatus.OK


def sm_cap(run: RunData, name: str) -> int | None:
    """The tenant's applied MPS SM cap when below 100 %, else None (it had every SM)."""
    record = run.tenant_manifest(name)
    pct = record.share.active_thread_pct if record.share_applied else None
    return int(pct) if isinstance(pct, (int, float)) and pct < 100 else None


def choose_baseline(run: RunData, name: str, candidates: list[RunData]) -> RunData | None:
    """The solo run for tenant ``name`` of ``run``: same baseline identity, same GPU name (null
    matches null).

    ``candidates`` are in order of preference (the CLI lists ``--baseline`` runs first, newest
    first within each group); the first that matches wins.
    """
    if tenant_spec(run, name) is None:
        return None
    for cand in candidates:
        if cand.run_dir.resolve() == run.run_dir.resolve() or not is_solo_candidate(cand):
            continue
        (solo_name,) = cand.tenants
        # A solo under a cap (a point of a solo share sweep, what --predict reads) is the
        # baseline of a tenant under the same cap only: NP must not divide by a 25 % solo.
        capped = sm_cap(cand, solo_name)
        if capped is not None and capped != sm_cap(run, name):
            continue
        if same_identity(run, name, cand, solo_name) and cand.gpu_name == run.gpu_name:
            return cand
    return None


def baseline_trials(chosen: RunData, run: RunData, name: str, candidates: list[RunData]) -> list[RunData]:
    """``chosen`` and the other trials of it: matching solo runs in the same sweep folder of a
    solo sweep with ``trials`` > 1. Their mean is the baseline, so NP divides by the solo
    tenant's mean over trials, not by whichever trial ran last. Solo runs elsewhere (an older
    run beside it) are never pooled: the newest match stays the rule there."""
    if chosen.config is None or chosen.config.trials <= 1:
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
    cfg = run.tenant_config(name)
    return NP_E2E if cfg is not None and cfg.workload.arrival.kind in OPEN_LOOP_ARRIVALS else NP_THROUGHPUT


def newest_first(runs: list[RunData]) -> list[RunData]:
    """Sort by the manifest's ``started_wall`` (ISO 8601 sorts as text), newest first."""
    return sorted(runs, key=lambda r: str(r.manifest.started_wall or ""), reverse=True)


def apply_baselines(
    rm: RunMetrics,
    solos: dict[str, RunMetrics | list[RunMetrics] | None],
    nearest: Mapping[str, str | None] | None = None,
) -> None:
    """Fill NP, slowdowns and the aggregate interference figures from matched solo runs.
    ``nearest[name]`` (``nearest_solo``) goes into the "no solo baseline" message of a tenant
    without a match.

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
            near = (nearest or {}).get(name)
            rm.missing_baselines.append(
                f"no solo baseline for tenant {name} ({describe_spec(tenant_spec(rm.run, name), rm.run.gpu_name)}); "
                + (f"{near}; " if near else "")
                + "run it alone with the same settings and pass the run with --baseline"
            )
            continue
        pool = solo if isinstance(solo, list) else [solo]
        solo_tms = [next(iter(s.tenants.values())) for s in pool]
        tm.baseline_run_dir = str(pool[0].run.run_dir)
        tm.baseline_run_id = pool[0].run.run_id
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
        if tm.np is not None and tm.np > NP_SUSPECT:
            rm.warnings.append(
                f"tenant {name}: NP {tm.np:.2f} > {NP_SUSPECT:.2f}: co-located faster than solo: "
                "noise, or a baseline that does not match"
            )
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
