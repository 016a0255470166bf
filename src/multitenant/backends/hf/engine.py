"""The ``hf`` engine: transformers model, static batching, greedy decoding, eager or graphs.

Two ways to drive it:

- the tenant's continuous-batching protocol (``backends.base.Engine``): ``submit`` requests at any
  time, ``poll`` runs one model step and reports who received a token. Static batching is this
  engine's own policy: ``poll`` starts a batch of up to ``max_batch`` waiting requests only when
  the previous batch is over, and a batch runs until its longest request is done (the others
  stop receiving tokens). New arrivals wait for the whole running batch.
- the step API underneath (benchmarks, tests): ``start_batch`` with token-id prompts and
  per-request output lengths, then ``step`` until it returns ``[]``. Each ``step`` is one model
  step (the first is the prefill, which gives every request its first token; then one decode
  step each) and returns, as host data and after the device work is synchronized, the requests
  that received a token.

Decoding is greedy (argmax), EOS is ignored, and every request gets exactly ``n_out`` tokens.

Execution modes:

- ``eager``: the model's own forward with its default dynamic KV cache, one Python-launched
  kernel at a time. Works on CPU and GPU. On a GPU a decode step is bound by Python and kernel
  launches (about 16 ms for a 1B Llama on an H100 whatever the batch), not by the GPU.
- ``graphs``: a static KV cache (``max_batch`` x ``cache_length(max_input_len, max_output_len)``
  slots per layer, allocated once), the decode step captured in CUDA graphs, one per batch-size
  bucket (``batch_buckets``); a partial batch runs in the graph of the next larger bucket with
  padding rows, so nothing is recaptured while the tenant serves. The prefill runs outside the
  graphs. The next decode step is launched before the host waits for the current one
  (one step of lookahead), so the GPU never idles while the tenant logs its events; the only
  host synchronization per step is the wait for that step's tokens, copied to pinned memory.
  ``graphs.py`` builds it.

Left padding: prompts of different lengths are left-padded to the longest; padding keys are
masked out and every real token gets its true position id (0 for the first prompt token), so a
request decodes the same tokens as it would alone (tests check this).
"""

from __future__ import annotations

import collections
import inspect
import platform
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from multitenant.backends.base import Completion, DeviceInfo, Emission, EngineContext, Iteration, Progress
from multitenant.backends.hf.batching import (
    bucket_for,
    cache_length,
    check_batch,
    left_pad,
    normalize_buckets,
    receivers,
    right_pad,
    window_buckets,
)
from multitenant.backends.hf.graphs import (
    DEFAULT_GRAPH_IMPL,
    FUSABLE_MODEL_TYPES,
    GRAPH_IMPLS,
    GRAPHS_MODEL_TYPES,
    StaticRunner,
    cache_kwarg,
    fuse_projections,
    use_static_attention,
)
from multitenant.models import build_model
from multitenant.schema import RequestStatus
from multitenant.workload import RequestSpec

EXECUTIONS = ("eager", "graphs")
TASKS = ("generate", "forward")
# Warm-up batches are this short: they exist to compile and capture, not to measure.
WARMUP_PROMPT_LEN = 8
WARMUP_OUTPUT_LEN = 3


def build(ctx: EngineContext) -> HFEngine:
    """The engine of one tenant (the factory ``HF.engine`` names); its graph buckets fit the arrival process."""
    t = ctx.tenant
    return HFEngine(
        model=t.model,
        dtype=t.dtype,
        device=ctx.device,
        execution=t.execution,
        task=t.task,
        max_batch=t.max_batch,
        max_input_len=ctx.max_input_len,
        max_output_len=ctx.max_output_len,
        batch_buckets=window_buckets(t.max_batch, t.workload.arrival.kind, t.workload.arrival.concurrency),
    )


class HFEngine:
    """One tenant's model, its static batches and the protocol around them (module docstring)."""

    def __init__(
        self,
        model: str,
        dtype: str,
        device: str,
        execution: str,
        task: str,
        max_batch: int,
        max_input_len: int,
        max_output_len: int,
        *,
        seed: int = 0,
        graph_impl: str = DEFAULT_GRAPH_IMPL,
        batch_buckets: Sequence[int] | None = None,
        keep_logits: bool = False,
        config_overrides: dict[str, Any] | None = None,
        fuse: bool = True,
    ) -> None:
        """``batch_buckets``: graph batch sizes (default ``batch_buckets(max_batch)``; fewer
        buckets warm up faster). ``keep_logits``: keep each step's logits (float32, on the CPU)
        for ``step_logits`` - for tests; it also turns off the one-step lookahead.
        ``config_overrides``: fields replaced in a synthetic arch config (smaller test models).
        ``fuse``: graphs only, llama/qwen2/mistral: one GEMM for q/k/v and one for gate/up."""
        if execution not in EXECUTIONS:
            raise ValueError(f"unknown execution {execution!r}; use one of {', '.join(EXECUTIONS)}")
        if task not in TASKS:
            raise ValueError(f"unknown task {task!r}; use one of {', '.join(TASKS)}")
        for name, v in (("max_batch", max_batch), ("max_input_len", max_input_len), ("max_output_len", max_output_len)):
            if not (isinstance(v, int) and v >= 1):
                raise ValueError(f"{name} must be a positive integer (got {v!r})")
        if graph_impl not in GRAPH_IMPLS:
            raise ValueError(f"unknown graph_impl {graph_impl!r}; use one of {', '.join(GRAPH_IMPLS)}")
        dev = torch.device(device)
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError(f"device {device} requested but CUDA is not available here; use device=cpu")
        if execution == "graphs":
            if task != "generate":
                raise ValueError("execution=graphs is for task=generate; use execution=eager for task=forward")
            if graph_impl != "none" and dev.type != "cuda":
                raise RuntimeError(
                    f"execution=graphs needs a CUDA GPU but device is {device}; use execution=eager on the CPU"
                )
        if dev.type == "cuda" and dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
        self.model_name = model
        self.dtype_name = dtype
        self.device = dev
        self.execution = execution
        self.task = task
        self.max_batch = max_batch
        self.max_input_len = max_input_len
        self.max_output_len = max_output_len
        self.seed = seed
        self.graph_impl = graph_impl
        self.buckets = normalize_buckets(batch_buckets, max_batch)
        self.keep_logits = keep_logits
        self.config_overrides = config_overrides
        self.fuse = fuse
        self.vocab_size = 0
        self.info: dict[str, Any] = {}
        self.model: Any = None
        self._runner: StaticRunner | None = None
        self._lookahead = execution == "graphs" and graph_impl != "none" and not keep_logits
        self._takes_logits_to_keep = False
        self._pad_id = 0
        self._waiting: collections.deque[RequestSpec] = collections.deque()  # protocol: not yet batched
        self._batch: list[RequestSpec] = []  # protocol: the running batch
        self._reset_batch_state()

    # -- lifecycle

    def load(self) -> None:
        """Build or load the model (the caller times this as ``load_s``)."""
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        model, info = build_model(
            self.model_name,
            self.dtype_name,
            str(self.device),
            self.task,
            seed=self.seed,
            config_overrides=self.config_overrides,
        )
        cfg = model.config
        limit = info["max_positions"]
        need = self.max_input_len + (self.max_output_len if self.task == "generate" else 0)
        if limit is not None and need > limit:
            raise ValueError(
                f"{self.model_name} has {limit} positions but max_input_len + max_output_len = {need}; "
                "use shorter prompts/outputs"
            )
        self.model, self.info = model, info
        self.vocab_size = info["vocab_size"]
        self._pad_id = int(getattr(cfg, "pad_token_id", None) or 0)
        self._takes_logits_to_keep = "logits_to_keep" in inspect.signature(model.forward).parameters
        self._cache_kwarg = cache_kwarg(model)
        if self.execution == "graphs":
            if cfg.model_type not in GRAPHS_MODEL_TYPES:
                raise ValueError(
                    f"execution=graphs does not support model_type {cfg.model_type} "
                    f"(supported: {', '.join(GRAPHS_MODEL_TYPES)}); use execution=eager"
                )
            cache_len = cache_length(self.max_input_len, self.max_output_len)
            window = getattr(cfg, "sliding_window", None)
            if window is not None and getattr(cfg, "use_sliding_window", True) and cache_len > window:
                raise ValueError(
                    f"{self.model_name} attends over a sliding window of {window} tokens but the static cache "
                    f"holds {cache_len}; use execution=eager or max_input_len + max_output_len <= {window}"
                )
            use_static_attention(model)
            if self.fuse and cfg.model_type in FUSABLE_MODEL_TYPES:
                fuse_projections(model)
            self._runner = StaticRunner(
                model,
                self.max_batch,
                cache_len,
                self.buckets,
                self.graph_impl,
                getattr(torch, self.dtype_name),
                self.device,
                self.keep_logits,
                self.vocab_size,
            )

    def warmup(self) -> None:
        """Compile and capture every bucket's decode graph, then run one short batch per bucket
        (eager: one batch of ``max_batch``; forward: one forward pass). Timed as ``warmup_s``."""
        if self.model is None:
            raise RuntimeError("call load() before warmup()")
        plen = min(WARMUP_PROMPT_LEN, self.max_input_len)
        n_out = min(WARMUP_OUTPUT_LEN, self.max_output_len)

        def prompts(b: int) -> list[np.ndarray]:
            return [(7 * i + np.arange(plen, dtype=np.int64)) % self.vocab_size for i in range(b)]

        if self.task == "forward":
            self.forward_batch(prompts(self.max_batch))
            return
        if self._runner is not None:
            # The cache is allocated by the first prefill; then compile and capture.
            self._runner.prefill(left_pad(prompts(1)))
            self._runner.prepare()
        sizes = self.buckets if self._runner is not None else [self.max_batch]
        for b in sorted(sizes, reverse=True):
            self.start_batch(prompts(b), [n_out] * b)
            while self.step():
                pass
        self._sync()
        self._reset_batch_state()

    def device_info(self) -> DeviceInfo:
        """What the tenant reports in ``ready``: device, its name, SMs it sees, memory."""
        if self.device.type == "cuda":
            idx = self.device.index if self.device.index is not None else torch.cuda.current_device()
            props = torch.cuda.get_device_properties(idx)
            return DeviceInfo(f"cuda:{idx}", props.name, int(props.multi_processor_count), int(props.total_memory))
        return DeviceInfo("cpu", platform.processor() or platform.machine() or "cpu", None, None)

    # -- generate: static batching

    def _reset_batch_state(self) -> None:
        self._prompts: list[np.ndarray] = []
        self._n_out: list[int] = []
        self._n = 0
        self._step = 0
        self._launched = 0  # steps whose device work is enqueued
        self._steps = 0
        self._generated: list[list[int]] = []
        self._kept_logits: list[torch.Tensor] = []
        self._bucket = 0
        self._width = 0
        # eager state
        self._cache: Any = None
        self._last_tokens: torch.Tensor | None = None
        self._lengths: torch.Tensor | None = None
        self._attn2d: torch.Tensor | None = None

    def start_batch(self, prompts: Sequence[np.ndarray], n_out: Sequence[int]) -> None:
        """Take a new batch (the previous one is dropped, finished or not)."""
        if self.task != "generate":
            raise RuntimeError("start_batch is for task=generate; use forward_batch for task=forward")
        if self.model is None:
            raise RuntimeError("call load() before start_batch()")
        check_batch(prompts, n_out, self.max_batch, self.max_input_len, self.max_output_len)
        if self._launched > self._step:
            self._sync()  # a lookahead step of an abandoned batch is still in flight
        self._reset_batch_state()
        self._prompts = list(prompts)
        self._n_out = list(n_out)
        self._n = len(prompts)
        self._steps = max(n_out)
        self._generated = [[] for _ in prompts]
        if self._runner is not None:
            self._bucket = bucket_for(self._n, self.buckets)

    def step(self) -> list[int]:
        """Run the next step; return the requests that received a token (host data, synced)."""
        s = self._step
        if s >= self._steps:
            return []
        tokens = self._step_static(s) if self._runner is not None else self._step_eager(s)
        got = receivers(self._n_out, s)
        for i in got:
            self._generated[i].append(tokens[i])
        self._step += 1
        return got

    def _launch_static(self, s: int) -> None:
        runner = self._runner
        assert runner is not None
        if s == 0:
            batch = left_pad(self._prompts, self._pad_id)
            self._width = batch.width
            runner.prefill(batch)
        else:
            runner.launch_decode(self._bucket, self._n, s % 2)
        self._launched = s + 1

    def _step_static(self, s: int) -> list[int]:
        runner = self._runner
        assert runner is not None
        if self._launched <= s:
            self._launch_static(s)
        if self._lookahead and s + 1 < self._steps:
            self._launch_static(s + 1)  # the GPU runs step s+1 while the host takes step s
        tokens = runner.wait(self._n, s % 2)
        if self.keep_logits and runner.logits is not None:
            self._kept_logits.append(runner.logits[: self._n].to("cpu", copy=True))  # copy: the buffer is reused
        return tokens

    def _step_eager(self, s: int) -> list[int]:
        dev = self.device
        extra = {"logits_to_keep": 1} if self._takes_logits_to_keep else {}
        if s == 0:
            batch = left_pad(self._prompts, self._pad_id)
            self._width = batch.width
            ids = torch.from_numpy(batch.input_ids).to(dev)
            pos = torch.from_numpy(batch.position_ids).to(dev)
            attn = torch.ones(self._n, batch.width + self._steps, dtype=torch.long, device=dev)
            attn[:, : batch.width] = torch.from_numpy(batch.attention_mask).to(dev)
            self._attn2d = attn
            self._lengths = torch.from_numpy(batch.lengths).to(dev)
            out = self.model(
                input_ids=ids,
                attention_mask=attn[:, : batch.width],
                position_ids=pos,
                use_cache=True,
                **extra,
            )
        else:
            assert self._attn2d is not None and self._lengths is not None and self._last_tokens is not None
            out = self.model(
                input_ids=self._last_tokens[:, None],
                attention_mask=self._attn2d[:, : self._width + s],
                position_ids=(self._lengths + (s - 1))[:, None],
                use_cache=True,
                **{self._cache_kwarg: self._cache},
                **extra,
            )
        self._cache = getattr(out, self._cache_kwarg)
        logits = out.logits[:, -1, :]
        self._last_tokens = torch.argmax(logits, dim=-1)
        if self.keep_logits:
            self._kept_logits.append(logits.to("cpu", torch.float32, copy=True))
        return self._last_tokens.tolist()  # the step's one synchronization

    def generated_tokens(self) -> list[list[int]]:
        """Token ids generated so far for each request of the current batch."""
        return [list(t) for t in self._generated]

    def step_logits(self) -> list[torch.Tensor]:
        """With ``keep_logits``: each step's ``[n, vocab]`` float32 logits so far (CPU)."""
        if not self.keep_logits:
            raise RuntimeError("construct the engine with keep_logits=True to keep logits")
        return list(self._kept_logits)

    # -- forward (encoders)

    def forward_batch(self, prompts: Sequence[np.ndarray]) -> None:
        """One forward pass over the batch (right-padded, masked), synchronized before return."""
        if self.task != "forward":
            raise RuntimeError("forward_batch is for task=forward; use start_batch/step for task=generate")
        if self.model is None:
            raise RuntimeError("call load() before forward_batch()")
        check_batch(prompts, [1] * len(prompts), self.max_batch, self.max_input_len, 1)
        ids, mask = right_pad(prompts, self._pad_id)
        self.model(
            input_ids=torch.from_numpy(ids).to(self.device),
            attention_mask=torch.from_numpy(mask).to(self.device),
        )
        self._sync()

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    # -- the tenant protocol (backends.base.Engine): static batching as this engine's policy

    def submit(self, request: RequestSpec) -> None:
        """Queue a request; it joins the next batch that starts (never the running one)."""
        self._waiting.append(request)

    def poll(self, timeout_s: float) -> Progress:
        """One model step of the running batch (a new batch first, if none runs): the requests
        that received a token at the moment the step's result reached the host, and those it
        finished. With nothing to run, sleep ``timeout_s`` and report nothing."""
        if self.task == "forward":
            return self._poll_forward(timeout_s)
        if not self._batch and self._waiting:
            take = min(self.max_batch, len(self._waiting))
            self._batch = [self._waiting.popleft() for _ in range(take)]
            self.start_batch([r.prompt_ids for r in self._batch], [r.n_out for r in self._batch])
        if not self._batch:
            time.sleep(timeout_s)
            return Progress(time.monotonic_ns())
        idx = self.step()
        t = time.monotonic_ns()  # after step(): the device work is synchronised
        batch = self._batch
        events: list[Any] = []
        if idx:
            events.append(Emission(t, [batch[i].rid for i in idx], [1] * len(idx)))
            s = self._step  # steps done so far: request i is finished once n_out[i] == s
            events.extend(Completion(t, batch[i].rid, RequestStatus.OK) for i in idx if batch[i].n_out == s)
        if self._step >= self._steps:
            self._batch = []
        return Progress(t, events)

    def _poll_forward(self, timeout_s: float) -> Progress:
        if not self._waiting:
            time.sleep(timeout_s)
            return Progress(time.monotonic_ns())
        take = min(self.max_batch, len(self._waiting))
        batch = [self._waiting.popleft() for _ in range(take)]
        t_start = time.monotonic_ns()
        self.forward_batch([r.prompt_ids for r in batch])
        t = time.monotonic_ns()
        events: list[Any] = [Iteration(t, len(batch), t - t_start)]
        events.extend(Completion(t, r.rid, RequestStatus.OK) for r in batch)
        return Progress(t, events)

    def cancel(self, rids: list[int]) -> None:
        """Forget these requests: waiting ones leave the queue; when every request of the
        running batch is cancelled the batch is dropped (a static batch cannot shrink)."""
        gone = set(rids)
        self._waiting = collections.deque(r for r in self._waiting if r.rid not in gone)
        if self._batch and all(r.rid in gone for r in self._batch):
            self._batch = []

    def engine_info(self) -> dict[str, Any]:
        """What the manifest records about the engine: model facts and execution settings."""
        return {
            "engine": "hf",
            "model_type": self.info.get("model_type"),
            "params": self.info.get("params"),
            "weight_bytes": self.info.get("weight_bytes"),
            "execution": self.execution,
            "graph_impl": self.graph_impl if self.execution == "graphs" else None,
            "batch_buckets": self.buckets if self.execution == "graphs" else None,
            "torch_threads": torch.get_num_threads(),  # intra-op threads it computes with
        }

    def close(self) -> None:
        """Wait for in-flight device work; the process exit frees the rest."""
        self._sync()
