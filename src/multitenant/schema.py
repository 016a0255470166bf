"""The run <-> analysis contract: event kinds, statuses, the manifest, the control messages
between the orchestrator and its tenants, and the schema versions.

The run side writes these types (``run/``), the analysis reads them (``analysis/``); both import
this module and nothing else of each other. It imports nothing of the package, so analysis stays
free of torch and vLLM. docs/INTERFACES.md describes the fields.

Statuses are named constants of their JSON text (``RunStatus.OK == "ok"``): plain strings, so
numpy columns, f-strings and files written by older versions need no conversion.
"""

from __future__ import annotations

import dataclasses
import json
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Final, TypeVar

# Version of the event log (``run_start.schema``) and of manifest.json (``schema_version``).
EVENT_SCHEMA_VERSION = 1
MANIFEST_SCHEMA_VERSION = 1
# Version of mt-analyze's summary.json (``schema_version`` at its top).
SUMMARY_SCHEMA_VERSION = 1

# Event kinds of schema v1, in the order a request normally produces them.
EV_RUN_START = "run_start"
EV_READY = "ready"
EV_WINDOW = "window"
EV_SCHED = "sched"
EV_SENT = "sent"
EV_TOK = "tok"
EV_DONE = "done"
EV_ITER = "iter"
EV_RUN_END = "run_end"
EVENT_KINDS = (EV_RUN_START, EV_READY, EV_WINDOW, EV_SCHED, EV_SENT, EV_TOK, EV_DONE, EV_ITER, EV_RUN_END)


class RequestStatus:
    """``done.status``: how one request ended."""

    OK: Final = "ok"
    ERROR: Final = "error"
    CANCELLED: Final = "cancelled"
    ALL: Final = (OK, ERROR, CANCELLED)


class TenantStatus:
    """``run_end.status`` and the ``finished`` message: how a tenant process ended."""

    OK: Final = "ok"
    ERROR: Final = "error"
    INTERRUPTED: Final = "interrupted"
    ALL: Final = (OK, ERROR, INTERRUPTED)


class RunStatus:
    """``manifest.json`` ``status``: how a run ended (``running`` while it runs, or when mt-run
    was killed before it could say)."""

    RUNNING: Final = "running"
    OK: Final = "ok"
    FAILED: Final = "failed"
    INTERRUPTED: Final = "interrupted"
    ALL: Final = (RUNNING, OK, FAILED, INTERRUPTED)


# Optional `done` fields a serving engine adds (vLLM): its own per-request timestamps, integer
# ns of the engine core's CLOCK_MONOTONIC, the same host clock as `t`. With `sent` and the first
# `tok` they split TTFT into front-end delay, engine queueing and prefill (docs/analysis.md).
DONE_ENGINE_QUEUED = "engine_queued_ns"  # the engine core put the request in its waiting queue
DONE_ENGINE_SCHEDULED = "engine_scheduled_ns"  # first scheduled (its prefill starts)
DONE_ENGINE_FIRST_TOKEN = "engine_first_tok_ns"  # the engine core produced its first token
DONE_ENGINE_LAST_TOKEN = "engine_last_tok_ns"  # ... and its last
DONE_ENGINE_FIELDS = (DONE_ENGINE_QUEUED, DONE_ENGINE_SCHEDULED, DONE_ENGINE_FIRST_TOKEN, DONE_ENGINE_LAST_TOKEN)
# Optional `done` fields of the `openai` backend: the server's own token count (`usage`) and a
# one-line warning when it disagrees with the tokens counted in the stream.
DONE_USAGE_TOKENS = "usage_tokens"
DONE_WARNING = "warning"


# ---------------------------------------------------------------------------------------------
# Plain data <-> dataclasses

T = TypeVar("T")


def from_dict(cls: type[T], data: Any) -> T:
    """An instance of the dataclass ``cls`` from plain JSON/YAML data: keys it does not know are
    ignored (a newer writer), keys it lacks take their defaults (an older writer); fields typed as
    a dataclass, ``X | None``, ``list[X]`` or ``dict[str, X]`` of one are converted too."""
    if not isinstance(data, dict):
        raise TypeError(f"{cls.__name__}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        if f.name in data:
            kwargs[f.name] = _convert(hints[f.name], data[f.name])
    return cls(**kwargs)


def _convert(hint: Any, value: Any) -> Any:
    """``value`` as the field type ``hint`` needs it (dataclasses built, the rest as it is)."""
    if value is None:
        return None
    if dataclasses.is_dataclass(hint) and isinstance(hint, type):
        return from_dict(hint, value)
    args = typing.get_args(hint)
    inner = args[-1] if typing.get_origin(hint) in (dict, list) and args else None
    if isinstance(inner, type) and dataclasses.is_dataclass(inner):
        if isinstance(value, dict):
            return {str(k): from_dict(inner, v) for k, v in value.items()}
        return [from_dict(inner, v) for v in value]
    for arg in args:  # X | None
        if dataclasses.is_dataclass(arg) and isinstance(arg, type) and isinstance(value, dict):
            return from_dict(arg, value)
    return value


def to_dict(obj: Any) -> dict[str, Any]:
    """Plain JSON data of a dataclass (enums as their text)."""
    return json.loads(json.dumps(dataclasses.asdict(obj)))


# ---------------------------------------------------------------------------------------------
# manifest.json


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
    share: dict[str, Any] = field(default_factory=dict)
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


# ---------------------------------------------------------------------------------------------
# Control messages (JSON lines over the tenant's two pipes)


@dataclass
class Counts:
    """A tenant's counts over its measured phase (``progress``, ``finished``, ``run_end``)."""

    requests: int = 0
    tokens: int = 0
    errors: int = 0
    cancelled: int = 0


@dataclass
class ReadyMsg:
    """Tenant -> orchestrator: loaded and warmed up (then it waits for the window)."""

    kind: ClassVar[str] = "ready"
    load_s: float
    warmup_s: float
    pid: int
    child_pids: list[int] = field(default_factory=list)
    engine: dict[str, Any] = field(default_factory=dict)
    device: str | None = None
    device_name: str | None = None
    sms: int | None = None
    total_memory_bytes: int | None = None
    probe_error: str | None = None
    # From the orchestrator's spawn (or fork) to the start of loading: interpreter, imports,
    # engine construction. None when the tenant was started by hand.
    import_s: float | None = None


@dataclass
class ProgressMsg:
    """Tenant -> orchestrator, every 0.5 s of its measured phase: counts so far at ``t``."""

    kind: ClassVar[str] = "progress"
    t: int
    counts: Counts = field(default_factory=Counts)


@dataclass
class ErrorMsg:
    """Tenant -> orchestrator: the tenant failed; ``error`` is the cause on one line."""

    kind: ClassVar[str] = "error"
    error: str


@dataclass
class FinishedMsg:
    """Tenant -> orchestrator, last: how it ended and its counts over the measured phase."""

    kind: ClassVar[str] = "finished"
    status: str  # TenantStatus
    counts: Counts = field(default_factory=Counts)


@dataclass
class WindowCmd:
    """Orchestrator -> tenant: your measured phase is [t0, t1] (t1 None: stop on your count)."""

    kind: ClassVar[str] = "window"
    t0: int
    t1: int | None = None


@dataclass
class StopCmd:
    """Orchestrator -> tenant: stop now (cancel what is in flight, write run_end, exit)."""

    kind: ClassVar[str] = "stop"


TENANT_MESSAGES: dict[str, type] = {m.kind: m for m in (ReadyMsg, ProgressMsg, ErrorMsg, FinishedMsg)}
COMMANDS: dict[str, type] = {m.kind: m for m in (WindowCmd, StopCmd)}
MESSAGE_KEY = "msg"  # tenant -> orchestrator lines: {"msg": kind, ...fields}
COMMAND_KEY = "cmd"  # orchestrator -> tenant lines: {"cmd": kind, ...fields}

Message = ReadyMsg | ProgressMsg | ErrorMsg | FinishedMsg
Command = WindowCmd | StopCmd


def encode(message: Message | Command) -> str:
    """One JSON line (no newline) of a control message or command."""
    key = COMMAND_KEY if isinstance(message, (WindowCmd, StopCmd)) else MESSAGE_KEY
    return json.dumps({key: message.kind, **dataclasses.asdict(message)})


def decode_message(line: bytes | str) -> Message:
    """A tenant's message from one JSON line; ValueError for an unknown kind."""
    data = json.loads(line)
    cls = TENANT_MESSAGES.get(data.pop(MESSAGE_KEY, None))
    if cls is None:
        raise ValueError(f"unknown tenant message {line!r}")
    msg: Message = from_dict(cls, data)
    return msg


def decode_command(line: bytes | str) -> Command:
    """An orchestrator command from one JSON line; ValueError for an unknown kind."""
    data = json.loads(line)
    cls = COMMANDS.get(data.pop(COMMAND_KEY, None))
    if cls is None:
        raise ValueError(f"unknown command {line!r}")
    cmd: Command = from_dict(cls, data)
    return cmd


# ---------------------------------------------------------------------------------------------
# summary.json (mt-analyze)


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
    window_cut: dict[str, Any] | None = None


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
