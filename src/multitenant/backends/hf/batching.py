"""Batch bookkeeping of the ``hf`` engine: graph buckets, KV-cache sizing, padding, receivers.

Pure host-side functions (numpy, no torch, no device work), unit-tested on the CPU.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

# Static KV cache length is rounded up to this many slots: the attention kernels want the mask's
# last dimension 16-element aligned, and a round size keeps one cache shape per config.
CACHE_LEN_MULTIPLE = 64


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


def window_buckets(max_batch: int, arrival_kind: str, concurrency: int) -> list[int]:
    """The buckets a tenant's workload can use, so warm-up compiles and captures only those.

    A closed loop with at least ``max_batch`` requests in flight refills the batch as soon as
    it ends, so every batch is full: one graph of ``max_batch`` (a last, partial batch cut by
    ``num_requests`` runs in it with padding rows). Any other workload gets every bucket of
    ``batch_buckets``. Each bucket is one Inductor compile and one capture: seconds even with
    a warm cache, tens of seconds without one.
    """
    if arrival_kind == "closed" and concurrency >= max_batch:
        return [max_batch]
    return batch_buckets(max_batch)


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
    """Prompts left-padded to a common width, as int64 arrays ``[n, width]`` (``lengths``: ``[n]``).

    ``attention_mask[i, j]`` is 1 for a real token; ``position_ids`` count real tokens from 0
    (padding gets 0); ``lengths`` are the prompt lengths; ``width`` the padded length.
    """

    input_ids: np.ndarray
    attention_mask: np.ndarray
    position_ids: np.ndarray
    lengths: np.ndarray
    width: int


def left_pad(prompts: Sequence[np.ndarray], pad_id: int = 0) -> PaddedBatch:
    """Left-pad token-id prompts so that every prompt's last token is in the last column
    (the column whose logits give each request its next token). Array work only: a batch of 8
    prompts of 512 tokens costs a few microseconds, not a Python loop per token."""
    lengths = np.fromiter((len(p) for p in prompts), np.int64, len(prompts))
    width = int(lengths.max())
    n = len(prompts)
    ids = np.full((n, width), pad_id, np.int64)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = p
    col = np.arange(width, dtype=np.int64)
    first_real = (width - lengths)[:, None]  # the column of each prompt's first token
    mask = (col[None, :] >= first_real).astype(np.int64)
    pos = np.maximum(col[None, :] - first_real, 0)
    return PaddedBatch(ids, mask, pos, lengths, width)


def right_pad(prompts: Sequence[np.ndarray], pad_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Right-pad (encoders: absolute positions start at the first column). Returns ids, mask ``[n, width]``."""
    lengths = np.fromiter((len(p) for p in prompts), np.int64, len(prompts))
    width = int(lengths.max())
    ids = np.full((len(prompts), width), pad_id, np.int64)
    for i, p in enumerate(prompts):
        ids[i, : len(p)] = p
    mask = (np.arange(width)[None, :] < lengths[:, None]).astype(np.int64)
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
    prompts: Sequence[np.ndarray],
    n_out: Sequence[int],
    max_batch: int,
    max_input_len: int,
    max_output_len: int,
) -> None:
    """Raise ValueError (one line, with the fix) if a batch does not fit the engine.

    Sizes only: token ids are checked where they are made (``workload.RequestSource`` draws
    them below the vocab size and validates a JSONL file when it reads it), so the serving path
    does not scan every prompt.
    """
    if not len(prompts):
        raise ValueError("empty batch; pass at least one prompt")
    if len(prompts) != len(n_out):
        raise ValueError(f"{len(prompts)} prompts but {len(n_out)} output lengths; pass one n_out per prompt")
    if len(prompts) > max_batch:
        raise ValueError(f"batch of {len(prompts)} exceeds max_batch={max_batch}; split it or raise max_batch")
    for i, (p, n) in enumerate(zip(prompts, n_out, strict=True)):
        if not len(p):
            raise ValueError(f"prompt {i} is empty; give every request at least one token")
        if len(p) > max_input_len:
            raise ValueError(f"prompt {i} has {len(p)} tokens > max_input_len={max_input_len}; raise max_input_len")
        if not 1 <= n <= max_output_len:
            raise ValueError(f"request {i} wants {n} output tokens; it must be 1..max_output_len={max_output_len}")
