"""The experiment schema: typed dataclasses for what a YAML file and the command line give.

``mt-run`` composes a config with Hydra against ``compose.experiment_schema()`` (these classes,
with one options block per backend added to the tenant: ``tenants.<t>.vllm``,
``tenants.<t>.openai``, ...), converts it once with ``OmegaConf.to_object`` and hands these
objects on; nothing below the CLI indexes a config by string. This module imports nothing of the
package: backends and analysis use its names freely.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from omegaconf import MISSING

MODES = ("mps", "mps_external", "timeslice", "cpu")
MPS_MODES = ("mps", "mps_external")  # the modes that apply a tenant's share
TASKS = ("generate", "forward")
EXECUTIONS = ("eager", "graphs")
DTYPES = ("float32", "float16", "bfloat16")
DATASETS = ("random", "jsonl")
ARRIVALS = ("closed", "poisson", "gamma", "constant")
OPEN_LOOP_ARRIVALS = ("poisson", "gamma", "constant")  # schedules that do not wait for the engine
TENANT_STARTS = ("fork", "spawn")


class ConfigError(ValueError):
    """A configuration problem, phrased as one line: what is wrong and how to fix it."""


def fail(where: str, problem: str, fix: str) -> ConfigError:
    """``ConfigError("<where>: <problem>; <fix>")``: the one-line shape every config error has."""
    return ConfigError(f"{where}: {problem}; {fix}")


@dataclass
class DatasetConfig:
    kind: str = "random"  # random | jsonl
    input_len: int = 128  # random: mean prompt length in tokens
    output_len: int = 64  # random: output length in tokens (EOS ignored)
    range_ratio: float = 0.0  # random: lengths uniform in [len*(1-r), len*(1+r)], 0 <= r < 1
    path: str | None = None  # jsonl: {"prompt_ids": [...]} or {"prompt": "..."}, optional "output_len"
    seed: int = 0


@dataclass
class ArrivalConfig:
    kind: str = "closed"  # closed | poisson | gamma | constant
    concurrency: int = 1  # closed: requests in flight (= max_batch reproduces back-to-back batches)
    rate: float | None = None  # open loop: mean requests per second
    burstiness: float = 1.0  # gamma: shape k; 1 = Poisson, < 1 burstier, > 1 smoother
    seed: int = 0

    @property
    def open_loop(self) -> bool:
        return self.kind in OPEN_LOOP_ARRIVALS


@dataclass
class WorkloadConfig:
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    arrival: ArrivalConfig = field(default_factory=ArrivalConfig)
    num_requests: int | None = None  # measured requests; stop after this many (and/or duration)
    duration_s: float | None = None  # measured phase length; in-flight requests are cancelled at its end
    warmup_requests: int = 2  # served before the ready barrier, never inside the window
    start_delay_s: float = 0.0  # staggered start: this tenant's measured phase starts t0 + delay


@dataclass
class ShareConfig:
    active_thread_pct: int | None = None  # CUDA_MPS_ACTIVE_THREAD_PERCENTAGE, 1..100
    # CUDA_MPS_PINNED_DEVICE_MEM_LIMIT, e.g. "20G"; validation writes it as "<dev>=<size>" ("0=20G")
    pinned_mem_limit: str | None = None
    priority: int | None = None  # CUDA_MPS_CLIENT_PRIORITY, 0 (normal) or 1 (below normal)

    def given(self) -> dict[str, int | str]:
        """The share values that are set, by field name."""
        values = {"active_thread_pct": self.active_thread_pct, "pinned_mem_limit": self.pinned_mem_limit,
                  "priority": self.priority}  # fmt: skip
        return {k: v for k, v in values.items() if v is not None}


@dataclass
class TenantConfig:
    """One tenant. Its backend's options block (``tenants.<t>.<backend>``) is added to this class
    by ``compose.experiment_schema`` from each backend's declaration (``backends.BACKENDS``)."""

    backend: str = "hf"  # a key of backends.BACKENDS: hf | vllm | openai
    model: str = MISSING  # synthetic:<arch> | hub id | local path
    dtype: str = "bfloat16"
    task: str = "generate"  # generate | forward (encoders: per-iteration events; hf only)
    execution: str = "eager"  # eager | graphs (hf: static KV cache + CUDA graphs; vllm: CUDA graphs), GPU only
    max_batch: int = 8  # hf: static batch; vllm: max_num_seqs; openai: not used
    device: str | None = None  # default: the experiment's device
    # mode=cpu: threads of the tenant's compute (OMP_NUM_THREADS of its process and of what it
    # starts). Part of the spec, so a solo baseline runs with the same count as a pair tenant.
    cpu_threads: int = 1
    workload: WorkloadConfig = field(default_factory=WorkloadConfig)
    share: ShareConfig = field(default_factory=ShareConfig)


@dataclass
class MpsConfig:
    pipe_dir: str | None = None  # default: a private dir under /tmp, one per GPU and run
    log_dir: str | None = None  # default: <run_dir>/mps_log
    start_timeout_s: float = 20.0
    stop_timeout_s: float = 20.0


@dataclass
class ExperimentConfig:
    name: str = MISSING
    mode: str = "cpu"  # mps | mps_external | timeslice | cpu
    device: str = "cuda:0"
    output_root: str = "experiments"
    split: str | None = None  # "70/30": active_thread_pct of the tenants, in the order they are listed
    ready_timeout_s: float = 600.0
    window_lead_s: float = 0.5  # between the ready barrier and t0, so every tenant hears t0 in time
    stop_timeout_s: float = 30.0  # after the window: how long tenants get to finish before SIGTERM
    # A tenant silent this long in its measured phase (no progress message; they come every
    # 0.5 s) is hung: killed, and the run fails naming it.
    hang_timeout_s: float = 60.0
    telemetry_interval_ms: int = 100
    progress: bool = True  # live rich display
    # Repeated trials of a sweep: `trials=N` makes mt-run sweep `trial` over 0..N-1, outermost,
    # so every trial is one pass over all points (drift spreads over the points evenly).
    trials: int = 1
    trial: int = 0  # this run's trial; analysis groups runs by their other overrides
    # Compile and graph caches (Inductor, Triton, vLLM, CUDA's JIT), kept across runs and sweep
    # jobs; default $MT_CACHE_DIR, else $XDG_CACHE_HOME/multitenant, else ~/.cache/multitenant.
    cache_dir: str | None = None
    # How tenant processes start: fork (from one pre-imported "tenant zygote" per mt-run, which
    # has torch and transformers imported already: saves their import, seconds per job) or
    # spawn (a fresh interpreter per tenant, importing everything itself). run/zygote.py says
    # what a forked tenant gets and which tenants are spawned anyway.
    tenant_start: str = "fork"
    mps: MpsConfig = field(default_factory=MpsConfig)
    tenants: dict[str, TenantConfig] = field(default_factory=dict)
