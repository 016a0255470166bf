"""``manifest.json``: what ran, where, how it ended, and what a solo baseline must match.

Written by ``run/manifest.py`` (and updated by the orchestrator as the run goes), read by
``analysis/load.py``; docs/INTERFACES.md lists the fields.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from multitenant.config.schema import ShareConfig
from multitenant.schema.core import MANIFEST_SCHEMA_VERSION, RunStatus, from_dict, to_dict


@dataclass
class HostInfo:
    """The machine the run ran on, read at the start (``run.host.host_fingerprint``). Every field
    but the first four is optional: null where the host does not say (a container, a sandbox)."""

    hostname: str | None = None
    platform: str | None = None
    python: str | None = None
    cpu_count: int | None = None  # logical CPUs (os.cpu_count)
    cpu_model: str | None = None  # /proc/cpuinfo "model name"
    logical_cores: int | None = None
    physical_cores: int | None = None
    cpu_freq_mhz: dict[str, float] | None = None  # {"min", "max", "current"} (psutil.cpu_freq)
    load_avg_1m: float | None = None  # at the start
    load_avg_5m: float | None = None
    load_avg_15m: float | None = None
    # "none" | a hypervisor / sandbox name ("kvm", "gvisor", "vmware", ...) | "vm" (the CPU's
    # hypervisor flag without a name) | null (nothing could be read)
    virtualization: str | None = None
    virtualization_evidence: list[str] = field(default_factory=list)  # what the hint was read from
    kernel: str | None = None  # uname release
    total_memory_bytes: int | None = None


@dataclass
class HostActivity:
    """What the machine did over the measured window (the run side reads it at the window's end:
    ``run.telemetry.TelemetrySampler.window_activity``).

    ``steal_pct``/``iowait_pct``: percent of all CPU time (every CPU) the hypervisor stole / the
    CPUs sat idle waiting for I/O (/proc/stat); ``tenant_cpu_s``: user+system CPU seconds of
    each tenant's whole process tree; clocks: the GPU's SM and memory clock range seen in the
    telemetry samples of the window; ``gpu_activity_source``: where ``sm_active_pct`` & co. came
    from ("gpm" | "utilization" | null).
    """

    window_s: float | None = None
    steal_pct: float | None = None
    iowait_pct: float | None = None
    tenant_cpu_s: dict[str, float] = field(default_factory=dict)
    gpu_activity_source: str | None = None
    sm_clock_mhz_min: int | None = None
    sm_clock_mhz_max: int | None = None
    mem_clock_mhz_min: int | None = None
    mem_clock_mhz_max: int | None = None


@dataclass
class GpuInfo:
    """The GPU the run used, read from NVML at the start (never changed by the harness).
    ``sm_count`` may come from a tenant that saw the whole GPU (``sm_count_source`` says so):
    NVML has no SM-count query on some GPUs (H100)."""

    index: int | None = None
    name: str | None = None
    uuid: str | None = None
    sm_count: int | None = None
    memory_total_bytes: int | None = None
    driver_version: str | None = None
    cuda_driver_version: str | None = None
    compute_mode: str | None = None
    mig_mode: str | None = None
    persistence_mode: str | None = None
    sm_count_source: str | None = None
    power_limit_w: float | None = None  # the enforced power limit (nvmlDeviceGetEnforcedPowerLimit)


@dataclass
class MpsStop:
    clean: bool = True
    actions: list[str] = field(default_factory=list)
    left_pids: list[int] = field(default_factory=list)


@dataclass
class MpsRecord:
    """The MPS control daemon of a run (modes mps, mps_external)."""


    pipe_dir: str | None = None
    log_dir: str | None = None
    control_pid: int | None = None
    server_pids: list[int] = field(default_factory=list)
    external: bool = False
    stop: MpsStop | None = None


@dataclass
class Window:
    """The run's measured window as announced: ``t1_ns`` None while any tenant stops on a count."""

    t0_ns: int | None = None
    t1_ns: int | None = None


@dataclass
class TenantRecord:
    """One tenant in the manifest: its spec, share, process and what it reported when ready.

    ``identity``: what a solo baseline of this tenant must match (``config`` computes it from the
    spec and the backend's declared ``identity`` options); analysis compares these.
    """

    pid: int | None = None
    backend: str | None = None
    model: str | None = None
    task: str | None = None
    execution: str | None = None
    dtype: str | None = None
    max_batch: int | None = None
    device: str | None = None
    cpu_threads: int | None = None  # mode=cpu only
    share: ShareConfig = field(default_factory=ShareConfig)  # as validated (pinned limit as "<dev>=<size>")
    share_applied: bool = False
    effective_sms: int | None = None
    mps_attached: bool | None = None
    exit_code: int | None = None
    # How the process started: "spawn" (a fresh interpreter) or "fork" (from the tenant zygote;
    # a tenant whose environment the zygote cannot give is spawned even under tenant_start=fork).
    start: str | None = None
    import_s: float | None = None  # spawn or fork to the start of loading (ReadyMsg.import_s)
    load_s: float | None = None
    warmup_s: float | None = None
    child_pids: list[int] | None = None  # the tenant's descendants at ready (engine core, server)
    mps_client_pids: list[int] | None = None  # which of the tenant and those are MPS clients
    engine: dict[str, Any] | None = None  # the backend's engine_info()
    identity: dict[str, Any] | None = None


@dataclass
class Manifest:
    """``manifest.json``: what ran, where, how it ended, and the window."""

    schema_version: int = MANIFEST_SCHEMA_VERSION
    run_id: str = ""
    name: str = ""
    status: str = RunStatus.RUNNING
    reason: str | None = None
    host: HostInfo = field(default_factory=HostInfo)
    gpu: GpuInfo | None = None
    packages: dict[str, str | None] = field(default_factory=dict)
    mode: str | None = None
    mps: MpsRecord | None = None
    tenants: dict[str, TenantRecord] = field(default_factory=dict)
    window: Window = field(default_factory=Window)
    started_wall: str | None = None
    ended_wall: str | None = None
    started_ns: int | None = None
    ended_ns: int | None = None
    argv: list[str] = field(default_factory=list)
    overrides: list[str] = field(default_factory=list)
    cache_dir: str | None = None
    trial: int | None = None
    tenant_start: str | None = None  # the run's config: fork (the tenant zygote) | spawn
    zygote_preload_s: float | None = None  # what this run's preload in the zygote took (fork)
    # What the host and GPU did over the measured window (written when the window ends).
    activity: HostActivity | None = None

    @classmethod
    def from_json(cls, data: Any) -> Manifest:
        return from_dict(cls, data)

    def to_json(self) -> dict[str, Any]:
        return to_dict(self)


# ---------------------------------------------------------------------------------------------
# Solo baselines


# The parts of a workload that change per-token performance: the lengths of prompts and outputs
# (dataset) and how requests arrive (arrival). How long a tenant runs (duration_s), how many
# requests it sends (num_requests), its warm-up (warmup_requests) and a staggered start
# (start_delay_s) change how much is measured and when, not how fast; the seeds change which
# prompts and which arrival instants are drawn, not their lengths or rate. A demo's solo at
# duration_s 10 is the baseline of the same tenant shortened to 4 s.
WORKLOAD_IDENTITY: dict[str, tuple[str, ...]] = {
    "dataset": ("kind", "input_len", "output_len", "range_ratio", "path"),
    "arrival": ("kind", "concurrency", "rate", "burstiness"),
}


def workload_identity(workload: Mapping[str, Any] | None) -> dict[str, dict[str, Any]]:
    """The WORKLOAD_IDENTITY fields of a workload block (a field not written is None). Idempotent,
    so an identity recorded with a whole workload (older manifests) reduces to the same."""
    workload = workload or {}
    return {
        part: {key: (workload.get(part) or {}).get(key) for key in keys} for part, keys in WORKLOAD_IDENTITY.items()
    }


def baseline_identity(tenant: Mapping[str, Any], mode: str | None, options: Mapping[str, Any]) -> dict[str, Any]:
    """What must be equal for a solo run to be this tenant's baseline (with the same GPU name,
    which the analysis compares beside it).

    ``tenant``: the tenant's config block as plain data (config.resolved.yaml); ``options``: the
    options of its backend that change per-token performance and are set (``Backend.identity``).
    model, backend, execution mode, dtype, task, batch limit, the workload's WORKLOAD_IDENTITY
    fields (``workload_identity``), on the CPU the tenant's ``cpu_threads``, and the backend's
    options under ``options`` when it has any set. The run side records it per tenant in the
    manifest (``TenantRecord.identity``).
    """
    identity: dict[str, Any] = {
        "model": tenant.get("model"),
        "backend": tenant.get("backend"),
        "execution": tenant.get("execution"),
        "dtype": tenant.get("dtype"),
        "task": tenant.get("task"),
        "max_batch": tenant.get("max_batch"),
        "workload": workload_identity(tenant.get("workload")),
    }
    if mode == "cpu":
        # On the CPU the thread count is part of the tenant's performance.
        identity["cpu_threads"] = tenant.get("cpu_threads")
    if options:
        identity["options"] = dict(options)
    return identity


def comparable_identity(identity: Mapping[str, Any]) -> dict[str, Any]:
    """A recorded baseline identity with its workload reduced by ``workload_identity`` (a manifest
    written before the reduction recorded the whole workload)."""
    out = dict(identity)
    if isinstance(out.get("workload"), Mapping):
        out["workload"] = workload_identity(out["workload"])
    return out
