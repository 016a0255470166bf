"""``summary.json``: what ``mt-analyze`` writes per run and tenant (``analysis/summary.py``),
versioned by ``SUMMARY_SCHEMA_VERSION``, read back by tools and tests through ``Summary``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from multitenant.schema.core import SUMMARY_SCHEMA_VERSION, RunStatus, from_dict


@dataclass
class TenantSummary:
    """One tenant of one run in summary.json. Latencies (``<metric>_ms``) are statistics in ms:
    mean, std, p50, p90, p95, p99, p99.9, each null without a sample. ``requests`` = completed +
    errors + cancelled + incomplete. ``np_definition``: ``throughput`` or, for an open-loop
    tenant, ``e2e`` (NP = solo_e2e_mean_ms / colocated_e2e_mean_ms). ``ttft_split``: null unless
    the tenant logged a serving engine's timestamps."""

    requests: int = 0
    errors: int = 0
    output_tokens: int = 0
    throughput_tok_s: float | None = None
    ttft_ms: dict[str, float | None] = field(default_factory=dict)
    ttft_sched_ms: dict[str, float | None] = field(default_factory=dict)
    queue_ms: dict[str, float | None] = field(default_factory=dict)
    tpot_ms: dict[str, float | None] = field(default_factory=dict)
    itl_ms: dict[str, float | None] = field(default_factory=dict)
    e2e_ms: dict[str, float | None] = field(default_factory=dict)
    slo_attainment: float | None = None
    goodput_req_s: float | None = None
    np: float | None = None
    slowdown: dict[str, float | None] | None = None
    task: str = "generate"
    throughput_unit: str = "tok/s"
    completed: int = 0
    cancelled: int = 0
    incomplete: int = 0
    solo_throughput: float | None = None
    np_definition: str | None = None
    solo_e2e_mean_ms: float | None = None
    colocated_e2e_mean_ms: float | None = None
    baseline_run_dir: str | None = None
    baseline_trials: int | None = None
    ttft_split: dict[str, Any] | None = None


@dataclass
class AggregateSummary:
    """A run's aggregate figures: summed throughput in the window and the naive one (all measured
    tokens / (latest last token - earliest measured send)), and the interference figures."""

    gpu_throughput_tok_s: float | None = None
    gpu_throughput_naive_tok_s: float | None = None
    stp: float | None = None
    antt: float | None = None
    fairness: float | None = None
    jain: float | None = None


@dataclass
class HardwareSummary:
    """What the hardware did over one run's window (``analysis.hardware``). GPU activity: the
    mean over the telemetry samples inside the window, in percent (``activity_source`` "gpm":
    NVML GPM, share of SMs busy / resident warps / DRAM bandwidth of peak / tensor-core time;
    "utilization": sm_active and dram_bw repeat NVML's coarse utilization rates; null: not
    recorded). ``tenant_cpu_pct``: mean CPU % of each tenant's whole process tree (100 = one
    core); ``tenant_cpu_s``: its CPU seconds over the window (manifest ``activity``);
    ``steal_pct``/``iowait_pct``: percent of all CPU time; clocks: [min, max] MHz. ``note``: a
    sentence for a reader (e.g. room for a co-tenant), or null."""

    window_s: float | None = None
    activity_source: str | None = None
    sm_active_pct: float | None = None
    sm_occupancy_pct: float | None = None
    dram_bw_pct: float | None = None
    tensor_active_pct: float | None = None
    samples: int = 0
    tenant_cpu_pct: dict[str, float | None] = field(default_factory=dict)
    tenant_cpu_s: dict[str, float] = field(default_factory=dict)
    steal_pct: float | None = None
    iowait_pct: float | None = None
    sm_clock_mhz: list[int] | None = None
    mem_clock_mhz: list[int] | None = None
    note: str | None = None


@dataclass
class WindowCut:
    """How a run's window was cut (analysis/window_cut.py): the tenant whose phase start is the
    window's start and the one whose end is its end, why it ended there (``end_reason``: its
    phase end, its last token, or, for an encoder, its last completed request), offsets in
    seconds from the earliest phase start (t0), and ``text``, the one sentence the reports show."""

    window_s: float
    start_tenant: str
    start_s: float
    all_start_together: bool
    end_tenant: str
    end_reason: str
    end_s: float
    end_tenant_phase_s: float | None
    text: str = ""


@dataclass
class RunSummary:
    """One run in summary.json."""

    run_dir: str = ""
    run_id: str = ""
    status: str = RunStatus.OK
    mode: str | None = None
    window_ns: list[int] | None = None
    tenants: dict[str, TenantSummary] = field(default_factory=dict)
    aggregate: AggregateSummary = field(default_factory=AggregateSummary)
    name: str = ""
    gpu: str | None = None
    window_s: float | None = None
    slo_ms: dict[str, float] | None = None
    missing_baselines: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    # Which tenant set the window's start and end, and why (analysis/window_cut.py).
    window_cut: WindowCut | None = None
    # What the hardware did (analysis/hardware.py): this run, and each tenant's solo baseline.
    hardware: HardwareSummary | None = None
    solo_hardware: dict[str, HardwareSummary] = field(default_factory=dict)
    # One line per fingerprint difference against a baseline or another sweep point.
    comparability: list[str] = field(default_factory=list)


@dataclass
class Summary:
    """``summary.json``: every analysed run. ``schema`` is the file's version as first written
    (kept for the tools that read it); ``schema_version`` is SUMMARY_SCHEMA_VERSION."""

    schema_version: int = SUMMARY_SCHEMA_VERSION
    schema: int = 1
    runs: list[RunSummary] = field(default_factory=list)

    @classmethod
    def from_json(cls, data: Any) -> Summary:
        return from_dict(cls, data)
