"""Checks of a composed experiment, before any process, daemon or GPU context starts.

``validate(config)`` takes the typed ``ExperimentConfig`` that ``mt-run`` converted once from
Hydra's config, completes it in place (``split`` applied, each tenant's device filled, a pinned
memory limit in CUDA's ``<dev>=<size>`` form, the cache folder resolved) and returns an
``Experiment``: the config plus what validation derived for each tenant (its backend and
options, its longest prompt and output, what a solo baseline must match). It checks what types
cannot (ranges, names, combinations) and raises ``ConfigError`` with one line that names the
field and the fix; ``mt-run`` turns it into exit code 2. Each backend checks its own options
(``Backend.validate``, ``Backend.validate_group``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import os
import re
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from multitenant.backends import BACKENDS
from multitenant.backends.base import Backend, TenantCheck
from multitenant.config.schema import (
    ARRIVALS,
    DATASETS,
    DTYPES,
    EXECUTIONS,
    MODES,
    MPS_MODES,
    TASKS,
    TENANT_STARTS,
    ConfigError,
    ExperimentConfig,
    TenantConfig,
    WorkloadConfig,
    fail,
)
from multitenant.config.units import device_index, parse_mem_bytes, parse_pinned_mem_limit, resolve_cache_dir
from multitenant.models import SYNTHETIC_PREFIX, arch_config, check_model_name, is_encoder
from multitenant.schema import baseline_identity
from multitenant.workload import load_jsonl_prompts, max_lengths

TENANT_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
# Tenants send a progress message every 0.5 s: a shorter hang_timeout_s would call healthy
# tenants hung.
HANG_TIMEOUT_MIN_S = 1.0


@dataclass(frozen=True)
class Tenant:
    """One validated tenant: its config and what validation derived from it.

    ``options``: its backend's options (an instance of ``backend.options``, or None);
    ``device_index``: its GPU (None on the CPU); ``max_input_len`` / ``max_output_len``: the
    longest prompt and output its workload can produce (token counts); ``pinned_mem_limit_bytes``:
    its MPS pinned-memory limit where the mode applies it; ``identity``: what a solo baseline
    must match (``schema.baseline_identity``)."""

    name: str
    config: TenantConfig
    backend: Backend
    options: Any
    device_index: int | None
    max_input_len: int
    max_output_len: int
    pinned_mem_limit_bytes: int | None
    identity: dict[str, Any]

    @property
    def loads_alone(self) -> bool:
        """Its engine sizes itself from the GPU's free memory while it loads (vLLM, a server)."""
        return self.backend.loads_alone(self.options)


@dataclass(frozen=True)
class Experiment:
    """A validated experiment: the completed config, its tenants in listed order, and the
    derived facts the run needs (``device_index`` of the GPU, None on the CPU; ``cache_dir``;
    ``share_pct_sum``, Σ active_thread_pct over the tenants)."""

    config: ExperimentConfig
    tenants: dict[str, Tenant]
    device_index: int | None
    cache_dir: Path
    share_pct_sum: int

    @property
    def applies_shares(self) -> bool:
        return self.config.mode in MPS_MODES

    def unapplied_shares_warning(self) -> str | None:
        """One line naming the MPS shares the config gives but its mode will not apply
        (``timeslice``, ``cpu``); None when there are none or the mode is an MPS one."""
        if self.applies_shares:
            return None
        given = [f"{name}.{key}={value}" for name, t in self.tenants.items() for key, value in t.config.share.given().items()]
        if not given:
            return None
        return (
            f"mode={self.config.mode} does not apply MPS shares; ignoring {', '.join(given)} "
            "(use mode=mps to apply them; the manifest records share_applied: false)"
        )

    @property
    def warnings(self) -> list[str]:
        """What mt-run says at the start about settings it accepts but that are likely mistakes."""
        out = [w for w in (self.unapplied_shares_warning(),) if w is not None]
        if self.share_pct_sum > 100:
            out.append(f"active_thread_pct sums to {self.share_pct_sum}% over the tenants: these are caps, not reservations")
        for name, t in self.tenants.items():
            if t.device_index is None and t.config.dtype == "float16" and t.backend.name != "openai":
                out.append(
                    f"tenants.{name}.dtype=float16 on the CPU: most CPUs have no float16 math, so it runs far slower "
                    "than float32 or bfloat16 and measures the emulation"
                )
        return out


def unknown_key_error(node: Any, schema: type, where: str = "") -> ConfigError | None:
    """The first key of ``node`` (a mapping: plain data or Hydra's DictConfig) that ``schema``
    (a config dataclass, walked into its nested dataclasses and the ``tenants`` mapping) does not
    have, with the closest known key.

    Hydra lets ``+key=value`` add keys the schema does not know, so a typo such as
    ``+tenants.a.workload.duraton_s=10`` would otherwise be stored and ignored."""
    if not isinstance(node, Mapping):
        return None
    hints = typing.get_type_hints(schema)
    known = [f.name for f in dataclasses.fields(schema)]
    for key, value in node.items():
        path = f"{where}.{key}" if where else str(key)
        if key not in known:
            close = difflib.get_close_matches(str(key), known, n=1)
            hint = f"did you mean {(where + '.' if where else '') + close[0]}?" if close else f"known keys: {', '.join(known)}"
            return fail(path, "is not a key of the config schema", hint)
        hint_t = hints[key]
        if dataclasses.is_dataclass(hint_t):
            if (err := unknown_key_error(value, typing.cast(type, hint_t), path)) is not None:
                return err
        elif key == "tenants" and isinstance(value, Mapping):
            tenant_t = typing.get_args(hint_t)[1]
            for name, tenant in value.items():
                if (err := unknown_key_error(tenant, tenant_t, f"{path}.{name}")) is not None:
                    return err
    return None


def apply_split(config: ExperimentConfig) -> None:
    """Spread ``split: "70/30"`` over the tenants' active_thread_pct, in listed order."""
    if config.split in (None, ""):
        return
    parts = str(config.split).split("/")
    names = list(config.tenants)
    if len(parts) != len(names) or not all(p.strip().isdigit() for p in parts):
        raise fail(
            "split",
            f"{config.split!r} does not give one whole percentage per tenant ({len(names)} tenants: {', '.join(names)})",
            "write it like split=70/30 with one number per tenant",
        )
    for name, pct in zip(names, parts, strict=True):
        config.tenants[name].share.active_thread_pct = int(pct)


def validate(config: ExperimentConfig) -> Experiment:
    """Check a composed experiment, complete it in place and return it with what was derived
    (module docstring). Raises ConfigError naming the first problem."""
    c = config
    if c.mode not in MODES:
        raise fail("mode", f"unknown mode {c.mode!r}", f"use one of {', '.join(MODES)}")
    _checked_device("device", c.device)  # refused even where mode=cpu replaces it
    if c.mode == "cpu":
        c.device = "cpu"
    idx = device_index(c.device)
    if c.mode != "cpu" and idx is None:
        raise fail("device", f"mode {c.mode} needs a GPU but device is cpu", "set device=cuda:0 or mode=cpu")
    if not c.tenants:
        raise fail("tenants", "no tenant is defined", "add at least one entry under tenants:")
    for key, value in (("ready_timeout_s", c.ready_timeout_s), ("stop_timeout_s", c.stop_timeout_s)):
        if not value > 0:
            raise fail(key, f"must be > 0 (got {value})", f"set {key} to a positive number of seconds")
    if not c.hang_timeout_s >= HANG_TIMEOUT_MIN_S:
        raise fail(
            "hang_timeout_s",
            f"must be >= {HANG_TIMEOUT_MIN_S:g} s (got {c.hang_timeout_s}): tenants report progress every 0.5 s",
            "use 60 (the default), more if one engine step can take longer",
        )
    if c.tenant_start not in TENANT_STARTS:
        raise fail(
            "tenant_start", f"unknown start method {c.tenant_start!r}",
            "use fork (tenants forked from one pre-imported process) or spawn (a fresh process each)",
        )  # fmt: skip
    if c.window_lead_s < 0:
        raise fail("window_lead_s", f"must be >= 0 (got {c.window_lead_s})", "set it to 0.5")
    if not c.telemetry_interval_ms >= 10:
        raise fail("telemetry_interval_ms", f"must be >= 10 (got {c.telemetry_interval_ms})", "use 100 (the default)")
    if isinstance(c.trials, bool) or not (isinstance(c.trials, int) and c.trials >= 1):
        raise fail("trials", f"must be a whole number >= 1 (got {c.trials!r})", "write it like trials=3")
    if not (isinstance(c.trial, int) and 0 <= c.trial < c.trials):
        raise fail("trial", f"{c.trial!r} is not in 0..trials-1 (trials={c.trials})", "give trials=N and let mt-run set trial")
    cache_dir = resolve_cache_dir(c.cache_dir)
    c.cache_dir = str(cache_dir)
    apply_split(c)

    tenants: dict[str, Tenant] = {}
    for name, t in c.tenants.items():
        tenants[name] = _validate_tenant(name, t, c)
    by_backend: dict[str, list[TenantCheck]] = {}
    for tenant in tenants.values():
        by_backend.setdefault(tenant.backend.name, []).append(_check(tenant, c.mode))
    if c.mode != "cpu":
        for backend_name, checks in by_backend.items():
            group_check = BACKENDS[backend_name].validate_group
            if group_check is not None:
                group_check(checks)
    share_sum = sum(t.config.share.active_thread_pct or 0 for t in tenants.values())
    return Experiment(config=c, tenants=tenants, device_index=idx, cache_dir=cache_dir, share_pct_sum=share_sum)


def _check(tenant: Tenant, mode: str) -> TenantCheck:
    return TenantCheck(f"tenants.{tenant.name}", tenant.config, tenant.options, mode, tenant.device_index)


def _validate_tenant(name: str, t: TenantConfig, c: ExperimentConfig) -> Tenant:
    w = f"tenants.{name}"
    if not TENANT_NAME_RE.match(name):
        raise fail(w, f"tenant name {name!r} is not usable as a folder name", "use letters, digits, _ . -")
    backend = BACKENDS.get(t.backend)
    if backend is None:
        raise fail(f"{w}.backend", f"unknown backend {t.backend!r}", f"use one of {', '.join(BACKENDS)}")
    if t.task not in TASKS:
        raise fail(f"{w}.task", f"unknown task {t.task!r}", f"use one of {', '.join(TASKS)}")
    if t.task not in backend.tasks:
        serving = ", ".join(n for n, b in BACKENDS.items() if t.task in b.tasks)
        raise fail(
            f"{w}.task", f"backend {t.backend} serves task={'/'.join(backend.tasks)} only", f"use backend={serving} for task={t.task}"
        )
    if t.execution not in EXECUTIONS:
        raise fail(f"{w}.execution", f"unknown execution mode {t.execution!r}", f"use one of {', '.join(EXECUTIONS)}")
    if t.dtype not in DTYPES:
        raise fail(f"{w}.dtype", f"unknown dtype {t.dtype!r}", f"use one of {', '.join(DTYPES)}")
    try:
        check_model_name(t.model)
    except ValueError as e:
        raise fail(f"{w}.model", str(e), "use synthetic:<arch>, a hub id or an existing local path") from None
    if t.task == "generate" and is_encoder(t.model):
        raise fail(f"{w}.task", f"{t.model} is an encoder and cannot generate", "use task=forward")
    if not t.max_batch >= 1:
        raise fail(f"{w}.max_batch", f"must be >= 1 (got {t.max_batch})", "set a positive batch limit")
    t.device = t.device or c.device
    tidx = _checked_device(f"{w}.device", t.device)
    if c.mode == "cpu" and tidx is not None:
        raise fail(f"{w}.device", f"mode cpu but device {t.device}", "remove the tenant's device or set mode")
    options = getattr(t, backend.name, None) if backend.options is not None else None
    if backend.validate is not None:
        backend.validate(TenantCheck(w, t, options, c.mode, tidx))
    _positive(f"{w}.cpu_threads", t.cpu_threads, "thread count")
    cores = os.cpu_count() or 1
    if c.mode == "cpu" and t.cpu_threads > cores:
        raise fail(
            f"{w}.cpu_threads",
            f"{t.cpu_threads} threads but this machine has {cores} logical cores: they would share cores and measure that",
            f"use at most {cores}",
        )
    _validate_workload(f"{w}.workload", t.workload)
    max_in, max_out = _max_lengths(f"{w}.workload.dataset", t)
    _validate_lengths(w, t, max_in, max_out)
    limit_bytes = _validate_share(f"{w}.share", t, c.mode, tidx)
    identity = baseline_identity(_plain(t), c.mode, backend.identity_of(options))
    return Tenant(name, t, backend, options, tidx, max_in, max_out, limit_bytes, identity)


def _plain(t: TenantConfig) -> dict[str, Any]:
    """The tenant's common fields as plain data (what config.resolved.yaml holds for it)."""
    return {f.name: _to_plain(getattr(t, f.name)) for f in dataclasses.fields(TenantConfig)}


def _to_plain(value: Any) -> Any:
    return dataclasses.asdict(value) if dataclasses.is_dataclass(value) and not isinstance(value, type) else value


def _checked_device(where: str, device: str) -> int | None:
    """``device_index`` with a message that names the field."""
    try:
        return device_index(device)
    except ConfigError:
        raise fail(where, f"{device!r} is not cpu, cuda or cuda:<index>", f"set {where}=cuda:0 or {where}=cpu") from None


def _positive(where: str, value: Any, what: str, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if value is None or not value > 0:
        raise fail(where, f"{what} must be > 0 (got {value})", f"set {where.rsplit('.', 1)[-1]} to a positive value")


def _validate_workload(w: str, wl: WorkloadConfig) -> None:
    ds, arr = wl.dataset, wl.arrival
    if ds.kind not in DATASETS:
        raise fail(f"{w}.dataset.kind", f"unknown dataset {ds.kind!r}", f"use one of {', '.join(DATASETS)}")
    if ds.kind == "random":
        _positive(f"{w}.dataset.input_len", ds.input_len, "input length")
        _positive(f"{w}.dataset.output_len", ds.output_len, "output length")
        if not 0 <= ds.range_ratio < 1:
            raise fail(f"{w}.dataset.range_ratio", f"must be in [0, 1) (got {ds.range_ratio})", "use e.g. 0.25")
    else:
        if not ds.path:
            raise fail(f"{w}.dataset.path", "jsonl dataset without a path", "set dataset.path=/path/to/file.jsonl")
        if not Path(ds.path).is_file():
            raise fail(f"{w}.dataset.path", f"{ds.path} does not exist", "point dataset.path at a .jsonl file")
        _positive(f"{w}.dataset.output_len", ds.output_len, "default output length")
    if arr.kind not in ARRIVALS:
        raise fail(f"{w}.arrival.kind", f"unknown arrival process {arr.kind!r}", f"use one of {', '.join(ARRIVALS)}")
    if arr.kind == "closed":
        _positive(f"{w}.arrival.concurrency", arr.concurrency, "concurrency")
        if arr.rate is not None:
            # A closed loop has no rate: a rate sweep over it would run the same point N times.
            raise fail(
                f"{w}.arrival.rate",
                f"rate={arr.rate} is given but arrival.kind is closed, which ignores it",
                f"add {w}.arrival.kind=poisson (or constant, gamma) for an open loop, or drop the rate",
            )
    else:
        _positive(f"{w}.arrival.rate", arr.rate, "request rate (req/s)")
        if arr.kind == "gamma":
            _positive(f"{w}.arrival.burstiness", arr.burstiness, "burstiness (gamma shape)")
    if wl.num_requests is None and wl.duration_s is None:
        raise fail(w, "neither num_requests nor duration_s is set", "set one of them (or both) so the tenant stops")
    _positive(f"{w}.num_requests", wl.num_requests, "num_requests", allow_none=True)
    _positive(f"{w}.duration_s", wl.duration_s, "duration_s", allow_none=True)
    if wl.warmup_requests < 0:
        raise fail(f"{w}.warmup_requests", f"must be >= 0 (got {wl.warmup_requests})", "use 0 or more")
    if wl.start_delay_s < 0:
        raise fail(f"{w}.start_delay_s", f"must be >= 0 (got {wl.start_delay_s})", "use 0 or more")


def _max_lengths(w: str, t: TenantConfig) -> tuple[int, int]:
    """The longest prompt and output the tenant's dataset can produce (token counts).

    A JSONL dataset is read fully here, so a malformed, empty or out-of-range file is refused
    before any process starts (token ids against the vocabulary of a ``synthetic:`` model; other
    models' vocabularies are only known once the tenant loads the model's config)."""
    ds = t.workload.dataset
    if ds.kind != "jsonl":
        return max_lengths(ds)
    vocab = 2**63 - 1
    if t.model.startswith(SYNTHETIC_PREFIX):
        with contextlib.suppress(Exception):  # an unknown arch is reported by check_model_name
            vocab = int(arch_config(t.model[len(SYNTHETIC_PREFIX) :])["vocab_size"])
    assert ds.path is not None
    try:
        prompts = load_jsonl_prompts(Path(ds.path), ds.output_len, vocab)
    except (ValueError, OSError, UnicodeDecodeError) as e:
        raise fail(f"{w}.path", str(e).replace(";", ","), "fix the file or point dataset.path at another") from None
    return max_lengths(ds, prompts)


def _validate_lengths(w: str, t: TenantConfig, max_in: int, max_out: int) -> None:
    """Prompt + output must fit the position table of a packaged (synthetic) architecture."""
    if not t.model.startswith(SYNTHETIC_PREFIX) or t.workload.dataset.kind != "random":
        return  # real models: checked at load, against their own config
    arch = arch_config(t.model[len(SYNTHETIC_PREFIX) :])
    limit = arch.get("max_position_embeddings") or arch.get("n_positions")
    if not limit:
        return
    longest = max_in + (max_out if t.task == "generate" else 0)
    if longest > limit:
        raise fail(
            f"{w}.workload.dataset",
            f"prompt + output can reach {longest} tokens but {t.model} has {limit} positions",
            "shorten input_len/output_len or lower range_ratio",
        )


def _validate_share(w: str, t: TenantConfig, mode: str, tidx: int | None) -> int | None:
    """Range checks; returns the pinned memory limit in bytes where the mode applies it.

    In timeslice/cpu mode a share is kept in the config (so one file serves the MPS runs and
    their control case) but not applied; the manifest says so."""
    share = t.share
    pct, mem, prio = share.active_thread_pct, share.pinned_mem_limit, share.priority
    if pct is not None and not 1 <= pct <= 100:
        raise fail(f"{w}.active_thread_pct", f"must be 1..100 (got {pct})", "give the SM cap in percent")
    if prio is not None and prio not in (0, 1):
        raise fail(f"{w}.priority", f"must be 0 or 1 (got {prio})", "use 0 (normal) or 1 (below normal)")
    if mem is None:
        return None
    try:
        share.pinned_mem_limit = parse_pinned_mem_limit(str(mem), tidx or 0)
    except ConfigError as e:  # its message names no field: say which tenant's it is
        raise ConfigError(f"{w}.pinned_mem_limit: {e}") from None
    return parse_mem_bytes(share.pinned_mem_limit) if mode in MPS_MODES else None

