"""Transformers engine of an ``hf`` tenant: static batching, greedy decoding, eager or graphs.

The tenant process drives one ``HFEngine``: ``start_batch`` with token-id prompts and per-request
output lengths, then ``step`` until it returns ``[]``. Each ``step`` is one model step (the first
is the prefill, which gives every request its first token; then one decode step each) and returns,
as host data and after the device work is synchronized, the requests that received a token.
Decoding is greedy (argmax), EOS is ignored, and every request gets exactly ``n_out`` tokens; a
batch runs until its longest request is done (the others simply stop receiving tokens).

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

How the decode step is built for ``graphs`` (``graph_impl``; docs/execution-modes.md has the
measurements behind the default):

- ``inductor_cudagraph`` (default): ``torch.compile`` (Inductor, fused kernels, no cudagraphs of
  its own) of the decode step, captured per bucket with ``torch.cuda.CUDAGraph``.
- ``cudagraph``: the plain eager kernels of the decode step captured with ``torch.cuda.CUDAGraph``.
- ``reduce_overhead``: ``torch.compile(mode="reduce-overhead")``: Inductor and its own CUDA-graph
  trees.
- ``none``: the same static-cache decode step without capture (works on the CPU): for tests and
  for measuring what the graphs buy.

Left padding: prompts of different lengths are left-padded to the longest; padding keys are
masked out and every real token gets its true position id (0 for the first prompt token), so a
request decodes the same tokens as it would alone (tests check this).
"""

from __future__ import annotations

import inspect
import platform
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from transformers import AttentionInterface

from multitenant.models import build_model

EXECUTIONS = ("eager", "graphs")
TASKS = ("generate", "forward")
GRAPH_IMPLS = ("inductor_cudagraph", "cudagraph", "reduce_overhead", "none")
DEFAULT_GRAPH_IMPL = "inductor_cudagraph"
# model_type values whose decoder layers call ``past_key_values.update`` and the registered
# attention function, which is what the static path relies on (tested on CPU for each).
GRAPHS_MODEL_TYPES = ("llama", "qwen2", "mistral", "gpt2")
# Static KV cache length is rounded up to this many slots: the attention kernels want the mask's
# last dimension 16-element aligned, and a round size keeps one cache shape per config.
CACHE_LEN_MULTIPLE = 64
STATIC_ATTENTION = "multitenant_static"
# Warm-up batches are this short: they exist to compile and capture, not to measure.
WARMUP_PROMPT_LEN = 8
WARMUP_OUTPUT_LEN = 3


# ---------------------------------------------------------------------------------------------
# Pure bookkeeping (no device work; unit-tested on the CPU)


def batch_buckets(max_batch: int) -> list[int]:
    """Batch sizes that get a decode graph: powers of two below ``max_batch``, then ``max_batch``.

    ``8 -> [1, 2, 4, 8]``, ``12 -> [1, 2, 4, 8, 12]``. A batch of n runs in the smallest bucket
    >= n, so at most half of a graph's rows are padding (except below ``max_batch`` where it is
    not a power of two: still less than half).
    """
    if max_batch < 1:
        raise ValueError(f"max_batch must be >= 1 (got {max_batch})")
    out = []
    b = 1
    while b < max_batch:
        out.append(b)
        b *= 2
    out.append(max_batch)
    return out


def bucket_for(n: int, buckets: Sequence[int]) -> int:
    """Smallest bucket that holds a batch of ``n`` requests."""
    for b in sorted(buckets):
        if b >= n:
            return b
    raise ValueError(f"batch of {n} requests exceeds the largest graph bucket {max(buckets)}; raise max_batch")


def normalize_buckets(buckets: Sequence[int] | None, max_batch: int) -> list[int]:
    """Sorted unique buckets; ``None`` -> ``batch_buckets(max_batch)``. The largest must be
    ``max_batch`` so every admissible batch has a graph."""
    if buckets is None:
        return batch_buckets(max_batch)
    out = sorted(set(int(b) for b in buckets))
    if not out or out[0] < 1 or out[-1] != max_batch:
        raise ValueError(f"batch buckets {list(buckets)} must be >= 1 and end at max_batch={max_batch}")
    return out


def cache_length(max_input_len: int, max_output_len: int, multiple: int = CACHE_LEN_MULTIPLE) -> int:
    """Slots per sequence in the static KV cache: prompt + generated tokens, rounded up.

    The last generated token is never fed back, so ``max_input_len + max_output_len - 1`` slots
    are written at most; the rounding covers the one left over.
    """
    need = max_input_len + max_output_len
    return -(-need // multiple) * multiple


@dataclass(frozen=True)
class PaddedBatch:
    """Prompts left-padded to a common width.

    ``attention_mask[i][j]`` is 1 for a real token; ``position_ids`` count real tokens from 0
    (padding gets 0); ``lengths`` are the prompt lengths; ``width`` the padded length.
    """

    input_ids: list[list[int]]
    attention_mask: list[list[int]]
    position_ids: list[list[int]]
    lengths: list[int]
    width: int


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int = 0) -> PaddedBatch:
    """Left-pad token-id prompts so that every prompt's last token is in the last column
    (the column whose logits give each request its next token)."""
    lengths = [len(p) for p in prompts]
    width = max(lengths)
    ids, mask, pos = [], [], []
    for p, n in zip(prompts, lengths, strict=True):
        pad = width - n
        ids.append([pad_id] * pad + list(p))
        mask.append([0] * pad + [1] * n)
        pos.append([0] * pad + list(range(n)))
    return PaddedBatch(ids, mask, pos, lengths, width)


def right_pad(prompts: Sequence[Sequence[int]], pad_id: int = 0) -> tuple[list[list[int]], list[list[int]]]:
    """Right-pad (encoders: absolute positions start at the first column). Returns ids, mask."""
    width = max(len(p) for p in prompts)
    ids = [list(p) + [pad_id] * (width - len(p)) for p in prompts]
    mask = [[1] * len(p) + [0] * (width - len(p)) for p in prompts]
    return ids, mask


def receivers(n_out: Sequence[int], step: int) -> list[int]:
    """Indices of the requests that receive a token at ``step`` (0 = prefill): those that want
    more than ``step`` tokens."""
    return [i for i, n in enumerate(n_out) if n > step]


def decode_write_slot(width: int, step: int) -> int:
    """Static-cache slot written by decode ``step`` (>= 1) after a prefill of ``width`` columns:
    the prefill fills slots ``0..width-1``; step k feeds token k and writes slot width + k - 1."""
    if step < 1:
        raise ValueError("the prefill (step 0) writes slots 0..width-1; decode steps start at 1")
    return width + step - 1


def check_batch(
    prompts: Sequence[Sequence[int]],
    n_out: Sequence[int],
    max_batch: int,
    max_input_len: int,
    max_output_len: int,
    vocab_size: int,
) -> None:
    """Raise ValueError (one line, with the fix) if a batch does not fit the engine."""
    if not prompts:
        raise ValueError("empty batch; pass at least one prompt")
    if len(prompts) != len(n_out):
        raise ValueError(f"{len(prompts)} prompts but {len(n_out)} output lengths; pass one n_out per prompt")
    if len(prompts) > max_batch:
        raise ValueError(f"batch of {len(prompts)} exceeds max_batch={max_batch}; split it or raise max_batch")
    for i, (p, n) in enumerate(zip(prompts, n_out, strict=True)):
        if not p:
            raise ValueError(f"prompt {i} is empty; give every request at least one token")
        if len(p) > max_input_len:
            raise ValueError(f"prompt {i} has {len(p)} tokens > max_input_len={max_input_len}; raise max_input_len")
        if not 1 <= n <= max_output_len:
            raise ValueError(f"request {i} wants {n} output tokens; it must be 1..max_output_len={max_output_len}")
        if min(p) < 0 or max(p) >= vocab_size:
            raise ValueError(f"prompt {i} has token ids outside [0, {vocab_size}); draw ids below the vocab size")


# ---------------------------------------------------------------------------------------------
# Static KV cache and the attention function that reads it


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
    ) -> tuple[torch.Tensor, torch.Tensor]:
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


def _use_static_attention(model: Any) -> None:
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


class _StaticRunner:
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
            past_key_values=self.cache,
            use_cache=True,
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
        ids = torch.tensor(batch.input_ids, dtype=torch.long, device=dev)
        pos = torch.tensor(batch.position_ids, dtype=torch.long, device=dev)
        valid = torch.tensor(batch.attention_mask, dtype=torch.bool, device=dev)
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
                past_key_values=self.cache,
                use_cache=True,
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
        self.position_ids[:n, 0] = torch.tensor(batch.lengths, dtype=torch.long, device=dev)
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


# ---------------------------------------------------------------------------------------------
# The engine


class HFEngine:
    """One tenant's model and its batch loop (see the module docstring)."""

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
        self._runner: _StaticRunner | None = None
        self._lookahead = execution == "graphs" and graph_impl != "none" and not keep_logits
        self._takes_logits_to_keep = False
        self._pad_id = 0
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
            _use_static_attention(model)
            if self.fuse and cfg.model_type in FUSABLE_MODEL_TYPES:
                fuse_projections(model)
            self._runner = _StaticRunner(
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

        def prompts(b: int) -> list[list[int]]:
            return [[(7 * i + j) % self.vocab_size for j in range(plen)] for i in range(b)]

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

    def device_info(self) -> dict[str, Any]:
        """What the tenant reports in ``ready``: device, its name, SMs it sees, memory."""
        if self.device.type == "cuda":
            idx = self.device.index if self.device.index is not None else torch.cuda.current_device()
            props = torch.cuda.get_device_properties(idx)
            return {
                "device": f"cuda:{idx}",
                "device_name": props.name,
                "sms": int(props.multi_processor_count),
                "total_memory_bytes": int(props.total_memory),
            }
        return {
            "device": "cpu",
            "device_name": platform.processor() or platform.machine() or "cpu",
            "sms": None,
            "total_memory_bytes": None,
        }

    # -- generate: static batching

    def _reset_batch_state(self) -> None:
        self._prompts: list[list[int]] = []
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

    def start_batch(self, prompts: list[list[int]], n_out: list[int]) -> None:
        """Take a new batch (the previous one is dropped, finished or not)."""
        if self.task != "generate":
            raise RuntimeError("start_batch is for task=generate; use forward_batch for task=forward")
        if self.model is None:
            raise RuntimeError("call load() before start_batch()")
        check_batch(prompts, n_out, self.max_batch, self.max_input_len, self.max_output_len, self.vocab_size)
        if self._launched > self._step:
            self._sync()  # a lookahead step of an abandoned batch is still in flight
        self._reset_batch_state()
        self._prompts = prompts
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
            ids = torch.tensor(batch.input_ids, dtype=torch.long, device=dev)
            pos = torch.tensor(batch.position_ids, dtype=torch.long, device=dev)
            attn = torch.ones(self._n, batch.width + self._steps, dtype=torch.long, device=dev)
            attn[:, : batch.width] = torch.tensor(batch.attention_mask, dtype=torch.long, device=dev)
            self._attn2d = attn
            self._lengths = torch.tensor(batch.lengths, dtype=torch.long, device=dev)
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
                past_key_values=self._cache,
                use_cache=True,
                **extra,
            )
        self._cache = out.past_key_values
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

    def forward_batch(self, prompts: list[list[int]]) -> None:
        """One forward pass over the batch (right-padded, masked), synchronized before return."""
        if self.task != "forward":
            raise RuntimeError("forward_batch is for task=forward; use start_batch/step for task=generate")
        if self.model is None:
            raise RuntimeError("call load() before forward_batch()")
        check_batch(prompts, [1] * len(prompts), self.max_batch, self.max_input_len, 1, self.vocab_size)
        ids, mask = right_pad(prompts, self._pad_id)
        self.model(
            input_ids=torch.tensor(ids, dtype=torch.long, device=self.device),
            attention_mask=torch.tensor(mask, dtype=torch.long, device=self.device),
        )
        self._sync()

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
