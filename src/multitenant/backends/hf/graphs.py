"""The ``graphs`` execution of the ``hf`` engine: static KV cache, its attention, fused
projections and the per-bucket decode runner (compiled and/or captured in CUDA graphs).

How the decode step is built (``graph_impl``; docs/execution-modes.md has the measurements
behind the default):

- ``inductor_cudagraph`` (default): ``torch.compile`` (Inductor, fused kernels, no cudagraphs of
  its own) of the decode step, captured per bucket with ``torch.cuda.CUDAGraph``.
- ``cudagraph``: the plain eager kernels of the decode step captured with ``torch.cuda.CUDAGraph``.
- ``reduce_overhead``: ``torch.compile(mode="reduce-overhead")``: Inductor and its own CUDA-graph
  trees.
- ``none``: the same static-cache decode step without capture (works on the CPU): for tests and
  for measuring what the graphs buy.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
import torch.nn.functional as F
from transformers import AttentionInterface

from multitenant.backends.hf.batching import PaddedBatch

GRAPH_IMPLS = ("inductor_cudagraph", "cudagraph", "reduce_overhead", "none")
DEFAULT_GRAPH_IMPL = "inductor_cudagraph"
# model_type values whose decoder layers call ``update`` on the cache they are given and the registered
# attention function, which is what the static path relies on (tested on CPU for each).
GRAPHS_MODEL_TYPES = ("llama", "qwen2", "mistral", "gpt2")
STATIC_ATTENTION = "multitenant_static"



class StaticKVCache:
    """Preallocated K/V of every layer, ``[max_batch, kv_heads, cache_len, head_dim]``.

    Duck-types the part of transformers' ``Cache`` that decoder layers call (``update``). Two
    modes, switched by the owner:

    - prefill (``self.prefill`` True): a layer's keys/values are copied into slots
      ``0..width-1`` of rows ``0..n-1``; attention then runs over just those (returned as given).
      The tensors are allocated here, at the first prefill, from the shapes the layers produce.
    - decode: the single new key/value goes to slot ``write_pos`` (a device tensor, so the same
      captured graph serves every step) of the active bucket's rows; attention runs over all
      ``cache_len`` slots, the owner's mask hiding padding and unwritten slots.

    Buckets use views ``[:b]`` of the full tensors, made once per bucket, so a compiled or
    captured step sees fixed tensors and fixed addresses.
    """

    is_compileable = True

    def __init__(self, max_batch: int, cache_len: int, write_pos: torch.Tensor) -> None:
        self.max_batch = max_batch
        self.cache_len = cache_len
        self.write_pos = write_pos
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.prefill = False
        self.active_keys: list[torch.Tensor] = []
        self.active_values: list[torch.Tensor] = []
        self._views: dict[int, tuple[list[torch.Tensor], list[torch.Tensor]]] = {}
        self.seq_len = 0  # host-side bookkeeping only (get_seq_length)

    def select_bucket(self, b: int) -> None:
        """Point decode at rows ``[:b]`` (views made once per bucket, then reused)."""
        if b not in self._views:
            self._views[b] = ([k[:b] for k in self.keys], [v[:b] for v in self.values])
        self.active_keys, self.active_values = self._views[b]

    def update(
        self,
        key_states: torch.Tensor,
        value_states: torch.Tensor,
        layer_idx: int,
        cache_kwargs: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # transformers 5.x releases pass the layer's extra arguments as cache_kwargs= or
        # kwargs=, depending on the release; this cache needs neither.
        if self.prefill:
            if layer_idx == len(self.keys):
                shape = (self.max_batch, key_states.shape[1], self.cache_len, key_states.shape[3])
                vshape = (self.max_batch, value_states.shape[1], self.cache_len, value_states.shape[3])
                self.keys.append(torch.zeros(shape, dtype=key_states.dtype, device=key_states.device))
                self.values.append(torch.zeros(vshape, dtype=value_states.dtype, device=value_states.device))
            n, _, width, _ = key_states.shape
            self.keys[layer_idx][:n, :, :width].copy_(key_states)
            self.values[layer_idx][:n, :, :width].copy_(value_states)
            return key_states, value_states
        k = self.active_keys[layer_idx]
        v = self.active_values[layer_idx]
        k.index_copy_(2, self.write_pos, key_states)
        v.index_copy_(2, self.write_pos, value_states)
        return k, v

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seq_len

    def __len__(self) -> int:
        return len(self.keys)


def cache_kwarg(model: Any) -> str:
    """The name of the model forward's KV-cache argument, also the output's attribute: ``cache``
    in the transformers versions that deprecate ``past_key_values`` (removed in 5.40), else
    ``past_key_values``."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """``[b, kv_heads, s, d] -> [b, kv_heads * n_rep, s, d]`` (query head h uses kv head h // n_rep)."""
    if n_rep == 1:
        return x
    b, kvh, s, d = x.shape
    return x[:, :, None].expand(b, kvh, n_rep, s, d).reshape(b, kvh * n_rep, s, d)


def static_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Attention for the static path (registered with transformers as ``multitenant_static``).

    ``attention_mask`` is the additive 4D mask the engine passes (0 = attend, dtype minimum =
    masked). Decode (one query token) with grouped KV heads runs the ``n_rep`` query heads of a
    KV head as ``n_rep`` query rows against that head, so K/V are read once and never expanded
    (transformers' masked path would copy them ``n_rep`` times: 4x the KV bytes for Llama-3).
    Returns ``[b, q, heads, d]`` like transformers' attention functions.
    """
    b, heads, q, d = query.shape
    kv_heads = key.shape[1]
    if q == 1 and heads != kv_heads:
        n_rep = heads // kv_heads
        out = F.scaled_dot_product_attention(
            query.reshape(b, kv_heads, n_rep, d), key, value, attn_mask=attention_mask, scale=scaling
        )
        out = out.reshape(b, heads, 1, d)
    else:
        n_rep = heads // kv_heads
        out = F.scaled_dot_product_attention(
            query, _repeat_kv(key, n_rep), _repeat_kv(value, n_rep), attn_mask=attention_mask, scale=scaling
        )
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(STATIC_ATTENTION, static_attention)


def use_static_attention(model: Any) -> None:
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(STATIC_ATTENTION)
    else:  # older transformers: the attribute is what the layers read
        model.config._attn_implementation = STATIC_ATTENTION


# Model types whose decoder layers call q_proj, k_proj, v_proj (attention) and gate_proj, up_proj
# (MLP) on the same input, in that order (checked in transformers 5.17 and 5.23; CPU tests compare
# the fused model with eager).
FUSABLE_MODEL_TYPES = ("llama", "qwen2", "mistral")


class _ProjectionStash:
    """Outputs of a fused projection waiting for the module that would have computed them."""


class _FusedLinear(torch.nn.Module):
    """Stands in for the first of several linear layers of one input: one GEMM for all of them
    (one weight read, one launch); returns the first output and stashes the others for the
    ``_StashedLinear`` modules that replace the rest. At batch 8 a 2 MB ``k_proj`` is a
    latency-bound launch of its own; fused with q and v it rides along the larger GEMM."""

    def __init__(self, linears: list[torch.nn.Linear], stash: _ProjectionStash, names: list[str]) -> None:
        super().__init__()
        weights: list[torch.Tensor] = [m.weight for m in linears]
        self.weight = torch.nn.Parameter(torch.cat(weights), requires_grad=False)
        biases = [m.bias for m in linears]
        if any(b is not None for b in biases):
            full: list[torch.Tensor] = [
                b if b is not None else m.weight.new_zeros(m.out_features) for b, m in zip(biases, linears, strict=True)
            ]
            self.bias: torch.nn.Parameter | None = torch.nn.Parameter(torch.cat(full), requires_grad=False)
        else:
            self.bias = None
        self.sizes = [m.out_features for m in linears]
        self.stash = stash
        self.names = names[1:]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        first, *rest = F.linear(x, self.weight, self.bias).split(self.sizes, dim=-1)
        for name, t in zip(self.names, rest, strict=True):
            setattr(self.stash, name, t)
        return first


class _StashedLinear(torch.nn.Module):
    """Returns what the fused projection computed for this layer (and forgets it)."""

    def __init__(self, stash: _ProjectionStash, name: str) -> None:
        super().__init__()
        self.stash = stash
        self.name = name
        setattr(stash, name, None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = getattr(self.stash, self.name)
        if t is None:
            raise RuntimeError(f"fused projection {self.name} read before its GEMM ran; use fuse_projections=False")
        setattr(self.stash, self.name, None)
        return t


def fuse_projections(model: Any) -> int:
    """Fuse q/k/v and gate/up projections of every decoder layer (llama, qwen2, mistral).
    Returns the number of fused groups. Memory stays the same (weights are moved, not copied,
    apart from one layer's worth while it is rebuilt)."""
    groups = (("self_attn", ("q_proj", "k_proj", "v_proj")), ("mlp", ("gate_proj", "up_proj")))
    n = 0
    for layer in model.base_model.layers:
        for parent_name, names in groups:
            parent = getattr(layer, parent_name)
            linears = [getattr(parent, name) for name in names]
            if not all(isinstance(m, torch.nn.Linear) for m in linears):
                continue
            stash = _ProjectionStash()
            fused = _FusedLinear(linears, stash, list(names))
            setattr(parent, names[0], fused)
            for name in names[1:]:
                setattr(parent, name, _StashedLinear(stash, name))
            n += 1
    return n


def _raise_dynamo_recompile_limit(n: int) -> None:
    """One compiled entry per bucket: Dynamo's default limit (8) would silently fall back to
    eager for the 9th bucket."""
    import torch._dynamo.config as dc

    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(dc, name) and getattr(dc, name) < n:
            setattr(dc, name, n)


# ---------------------------------------------------------------------------------------------
# The static decode runner (graphs execution)


class StaticRunner:
    """Static buffers, prefill, and the per-bucket decode step (compiled/captured or not)."""

    def __init__(
        self,
        model: Any,
        max_batch: int,
        cache_len: int,
        buckets: list[int],
        impl: str,
        dtype: torch.dtype,
        device: torch.device,
        keep_logits: bool,
        vocab_size: int,
    ) -> None:
        self.model = model
        self.max_batch = max_batch
        self.cache_len = cache_len
        self.buckets = buckets
        self.impl = impl
        self.dtype = dtype
        self.device = device
        self.cuda = device.type == "cuda"
        self.neg = torch.finfo(dtype).min  # additive mask value; finite, so no row ever gets NaN
        self.input_ids = torch.zeros(max_batch, 1, dtype=torch.long, device=device)
        self.position_ids = torch.zeros(max_batch, 1, dtype=torch.long, device=device)
        self.write_pos = torch.zeros(1, dtype=torch.long, device=device)
        self.mask = torch.full((max_batch, 1, 1, cache_len), self.neg, dtype=dtype, device=device)
        self.next_tokens = torch.zeros(max_batch, dtype=torch.long, device=device)
        self.logits = torch.zeros(max_batch, vocab_size, dtype=torch.float32, device=device) if keep_logits else None
        self.cache = StaticKVCache(max_batch, cache_len, self.write_pos)
        if impl == "reduce_overhead":
            # Graph trees replay only if every tensor the step mutates has a fixed address
            # (measured 2026-11-22: without this mark on write_pos Inductor skipped the graphs).
            torch._dynamo.mark_static_address(self.write_pos)
        # Host copies of each step's tokens: two pinned buffers, so the step launched ahead
        # writes one while the host reads the other.
        self.host = [torch.zeros(max_batch, dtype=torch.long, pin_memory=self.cuda) for _ in range(2)]
        self.events = [torch.cuda.Event() for _ in range(2)] if self.cuda else None
        self._views: dict[int, tuple[torch.Tensor, ...]] = {}
        self._graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self._pool: Any = None
        self._fn: Any = self._decode_core
        if impl in ("inductor_cudagraph", "reduce_overhead"):
            # One entry per bucket and engine (several engines in one process share the code
            # object, e.g. in tests): far below this unless something recompiles per call.
            _raise_dynamo_recompile_limit(len(buckets) + 64)
            mode = "reduce-overhead" if impl == "reduce_overhead" else None
            self._fn = torch.compile(self._decode_core, mode=mode, fullgraph=True, dynamic=False)
        self._takes_logits_to_keep = "logits_to_keep" in inspect.signature(model.forward).parameters
        self._cache_kwarg = cache_kwarg(model)

    # -- buffers per bucket

    def _bucket_views(self, b: int) -> tuple[torch.Tensor, ...]:
        if b not in self._views:
            views = [self.input_ids[:b], self.position_ids[:b], self.mask[:b], self.next_tokens[:b]]
            if self.logits is not None:
                views.append(self.logits[:b])
            if self.impl == "reduce_overhead":
                # CUDA-graph trees replay only if every tensor the step mutates has a fixed address
                for t in views:
                    torch._dynamo.mark_static_address(t)
            self._views[b] = tuple(views)
        self.cache.select_bucket(b)
        if self.impl == "reduce_overhead":
            for t in self.cache.active_keys + self.cache.active_values:
                torch._dynamo.mark_static_address(t)
        return self._views[b]

    def _decode_core(self, b: int) -> None:
        """One decode step of bucket ``b`` entirely on the device: feed each row's last token,
        write its K/V at ``write_pos``, pick the next token, advance positions. Captured as is."""
        views = self._views[b]
        input_ids, position_ids, mask, next_tokens = views[:4]
        mask.index_fill_(3, self.write_pos, 0.0)  # the new token attends to itself
        out = self.model(
            input_ids=input_ids,
            position_ids=position_ids,
            attention_mask=mask,
            use_cache=True,
            **{self._cache_kwarg: self.cache},
        )
        logits = out.logits[:, -1, :]
        tokens = torch.argmax(logits, dim=-1)
        next_tokens.copy_(tokens)
        input_ids.copy_(tokens[:, None])
        position_ids.add_(1)
        self.write_pos.add_(1)
        if len(views) > 4:
            views[4].copy_(logits.float())

    # -- prefill and decode

    def prefill(self, batch: PaddedBatch) -> torch.Tensor:
        """Run the prompts (outside any graph), fill the cache, set up the decode state.
        Returns the first tokens (device tensor, ``[n]``); enqueues their host copy in slot 0."""
        n, w = len(batch.lengths), batch.width
        dev = self.device
        ids = torch.from_numpy(batch.input_ids).to(dev)
        pos = torch.from_numpy(batch.position_ids).to(dev)
        valid = torch.from_numpy(batch.attention_mask).to(dev).bool()
        causal = torch.ones(w, w, dtype=torch.bool, device=dev).tril()
        allowed = causal[None] & valid[:, None, :]
        # A padding query row attends to itself only: never a fully masked row. Real queries
        # never see padding keys, so these rows change nothing that is returned.
        allowed |= torch.eye(w, dtype=torch.bool, device=dev)[None]
        mask4 = torch.zeros(n, 1, w, w, dtype=self.dtype, device=dev)
        mask4.masked_fill_(~allowed[:, None], self.neg)
        extra = {"logits_to_keep": 1} if self._takes_logits_to_keep else {}
        self.cache.prefill = True
        try:
            out = self.model(
                input_ids=ids,
                position_ids=pos,
                attention_mask=mask4,
                use_cache=True,
                **{self._cache_kwarg: self.cache},
                **extra,
            )
        finally:
            self.cache.prefill = False
        logits = out.logits[:, -1, :]
        tokens = torch.argmax(logits, dim=-1)
        # Decode state. Padding rows of a bucket (n..b-1) attend to slot 0 only: finite, unused.
        self.input_ids.zero_()
        self.input_ids[:n, 0] = tokens
        self.position_ids.zero_()
        self.position_ids[:n, 0] = torch.from_numpy(batch.lengths).to(dev)
        self.write_pos.fill_(w)
        self.mask.fill_(self.neg)
        self.mask[:n, 0, 0, :w].masked_fill_(valid, 0.0)
        self.mask[n:, 0, 0, 0] = 0.0
        self.next_tokens[:n] = tokens
        self.cache.seq_len = w
        if self.logits is not None:
            self.logits[:n] = logits.float()
        self._to_host(n, 0)
        return tokens

    def launch_decode(self, b: int, n: int, slot: int) -> None:
        """Enqueue one decode step of bucket ``b`` and the host copy of its ``n`` real tokens."""
        if self.impl in ("inductor_cudagraph", "cudagraph"):
            self._graphs[b].replay()
        else:
            self._bucket_views(b)
            if self.impl == "reduce_overhead":
                torch.compiler.cudagraph_mark_step_begin()
            self._fn(b)
        self.cache.seq_len += 1
        self._to_host(n, slot)

    def _to_host(self, n: int, slot: int) -> None:
        self.host[slot][:n].copy_(self.next_tokens[:n], non_blocking=self.cuda)
        if self.events is not None:
            self.events[slot].record()

    def wait(self, n: int, slot: int) -> list[int]:
        """The one host synchronization of a step: wait for its tokens, return them."""
        if self.events is not None:
            self.events[slot].synchronize()
        return self.host[slot][:n].tolist()

    # -- warm-up: compile and capture

    def _reset_for_warmup(self) -> None:
        self.write_pos.zero_()
        self.position_ids.zero_()  # learned position tables (GPT-2) must not be indexed past their end
        self.mask.zero_()  # attend to every slot of the (finite) cache: any values will do

    def prepare(self) -> None:
        """Compile and/or capture the decode step of every bucket (largest first, so smaller
        graphs reuse the largest one's memory pool). The cache must exist: call after a prefill."""
        if not self.cache.keys:
            raise RuntimeError("static cache not allocated; run a prefill before prepare()")
        # Every bucket's views exist before anything is compiled: Dynamo guards on the dicts
        # that hold them, and a dict that grows later would invalidate earlier entries.
        for b in self.buckets:
            self._bucket_views(b)
        if self.impl == "none":
            return
        if self.impl == "reduce_overhead":
            from torch._dynamo.utils import counters

            skips = counters["inductor"]["cudagraph_skips"]
            for b in sorted(self.buckets, reverse=True):
                self._bucket_views(b)
                for _ in range(3):  # warm-up run, recording run, first replay
                    self._reset_for_warmup()
                    torch.compiler.cudagraph_mark_step_begin()
                    self._fn(b)
            torch.cuda.synchronize(self.device)
            if counters["inductor"]["cudagraph_skips"] > skips:
                # Inductor ran the step without graphs (it logs why): refuse rather than serve
                # a launch-bound tenant under the name graphs.
                raise RuntimeError(
                    "torch.compile(mode='reduce-overhead') skipped CUDA graphs for the decode step "
                    "(see the [__cudagraphs] warning); use graph_impl=inductor_cudagraph"
                )
            return
        self._pool = torch.cuda.graph_pool_handle()
        for b in sorted(self.buckets, reverse=True):
            self._bucket_views(b)
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                for _ in range(3):  # compile (inductor), cuBLAS/cuDNN handles and workspaces
                    self._reset_for_warmup()
                    self._fn(b)
            torch.cuda.current_stream(self.device).wait_stream(side)
            self._reset_for_warmup()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._pool):
                self._fn(b)
            self._graphs[b] = graph
        torch.cuda.synchronize(self.device)
