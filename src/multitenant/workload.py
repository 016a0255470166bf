"""Workloads: what each tenant is asked (datasets) and when (arrival schedules).

Open-loop schedules are computed up front in absolute ``time.monotonic_ns()`` values, so a
tenant that falls behind cannot make later arrivals drift: a late request is still logged with
its intended time (``sched``) and its lateness shows up as ``queue`` = t(sent) - t(sched).

Arrival processes (rate λ in requests/s, gaps in seconds):
- ``constant``: gap = 1/λ.
- ``poisson``: gap ~ Exponential(mean 1/λ).
- ``gamma``: gap ~ Gamma(shape k = burstiness, scale 1/(λ k)); mean 1/λ, coefficient of
  variation 1/sqrt(k), so k < 1 is burstier than Poisson and k = 1 is Poisson.
- ``closed``: no schedule; N requests are kept in flight, a new one is issued when one ends.
"""

from __future__ import annotations

import collections
import json
import math
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from multitenant.config.schema import ArrivalConfig, DatasetConfig

NS_PER_S = 1_000_000_000


@dataclass(frozen=True, slots=True)
class RequestSpec:
    """One request: token-id prompt (int64 array) and the number of tokens to generate (EOS ignored)."""

    rid: int
    prompt_ids: np.ndarray
    n_out: int

    @property
    def n_in(self) -> int:
        return int(self.prompt_ids.size)


def length_bounds(mean_len: int, range_ratio: float) -> tuple[int, int]:
    """Inclusive [lo, hi] of lengths uniform around ``mean_len``: [L(1-r), L(1+r)], lo >= 1."""
    lo = max(1, math.floor(mean_len * (1.0 - range_ratio)))
    hi = max(lo, math.ceil(mean_len * (1.0 + range_ratio)))
    if range_ratio == 0:
        lo = hi = mean_len
    return lo, hi


def max_lengths(dataset: DatasetConfig, jsonl: list[tuple[np.ndarray, int]] | None = None) -> tuple[int, int]:
    """Largest (input, output) length, in tokens, a dataset can produce: what sizes static KV
    caches and vLLM's max_model_len. ``jsonl``: the prompts of a jsonl dataset, as read."""
    if jsonl is not None:
        return max(p.size for p, _ in jsonl), max(n for _, n in jsonl)
    return length_bounds(dataset.input_len, dataset.range_ratio)[1], length_bounds(dataset.output_len, dataset.range_ratio)[1]


class RequestSource:
    """Yields requests of one tenant in order: deterministic for a given dataset config.

    Random prompts are drawn with numpy in blocks (one call for the lengths of a block, one for
    all its token ids) and kept ahead of use: ``prefetch(n)`` before the measured phase builds
    the requests it will need, so the serving loop only pops them (no per-token Python work
    between engine steps). The same seed gives the same requests whatever the block sizes.
    """

    BLOCK = 256  # requests drawn at a time when the prefetched ones run out

    def __init__(self, dataset: DatasetConfig, vocab_size: int) -> None:
        self.dataset = dataset
        self.vocab_size = vocab_size
        self._jsonl: list[tuple[np.ndarray, int]] | None = None
        if dataset.kind == "jsonl":
            assert dataset.path is not None
            self._jsonl = load_jsonl_prompts(Path(dataset.path), dataset.output_len, vocab_size)
        else:
            seed = int(dataset.seed)
            # Three streams, so lengths and ids stay the same whatever the block boundaries.
            self._len_rng = np.random.default_rng([seed, 0])
            self._out_rng = np.random.default_rng([seed, 1])
            self._id_rng = np.random.default_rng([seed, 2])
        self._ready: collections.deque[RequestSpec] = collections.deque()
        self._next_rid = 0
        self._jsonl_pos = 0

    def prefetch(self, n: int) -> None:
        """Build requests until at least ``n`` are waiting to be taken."""
        while len(self._ready) < n:
            self._draw(max(self.BLOCK, n - len(self._ready)))

    def next(self) -> RequestSpec:
        if not self._ready:
            self._draw(self.BLOCK)
        return self._ready.popleft()

    def _draw(self, k: int) -> None:
        if self._jsonl is not None:
            for _ in range(k):
                prompt, n_out = self._jsonl[self._jsonl_pos % len(self._jsonl)]
                self._jsonl_pos += 1
                self._ready.append(RequestSpec(self._next_rid, prompt, n_out))
                self._next_rid += 1
            return
        ds = self.dataset
        in_lo, in_hi = length_bounds(ds.input_len, ds.range_ratio)
        out_lo, out_hi = length_bounds(ds.output_len, ds.range_ratio)
        lens_in = self._len_rng.integers(in_lo, in_hi + 1, size=k)
        lens_out = self._out_rng.integers(out_lo, out_hi + 1, size=k)
        # Ids below vocab_size; 0..2 are often special tokens, which is harmless with EOS ignored.
        ids = self._id_rng.integers(0, self.vocab_size, size=int(lens_in.sum()), dtype=np.int64)
        for prompt, out in zip(np.split(ids, np.cumsum(lens_in)[:-1]), lens_out.tolist(), strict=True):
            self._ready.append(RequestSpec(self._next_rid, prompt, int(out)))
            self._next_rid += 1


def load_jsonl_prompts(path: Path, default_output_len: int, vocab_size: int) -> list[tuple[np.ndarray, int]]:
    """Read ``{"prompt_ids": [...], "output_len": n?}`` lines. Text prompts need a tokenizer,
    which synthetic models do not have, so they are rejected with the fix in the message."""
    out: list[tuple[np.ndarray, int]] = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not JSON ({e.msg}); one object per line") from None
            ids = rec.get("prompt_ids")
            if ids is None:
                raise ValueError(f"{path}:{lineno}: no prompt_ids; give token ids as \"prompt_ids\": [..]")
            if not ids or not all(isinstance(i, int) and 0 <= i < vocab_size for i in ids):
                raise ValueError(f"{path}:{lineno}: prompt_ids must be non-empty ints in [0, {vocab_size})")
            n_out = int(rec.get("output_len", default_output_len))
            if n_out < 1:
                raise ValueError(f"{path}:{lineno}: output_len must be >= 1")
            out.append((np.asarray(ids, dtype=np.int64), n_out))
    if not out:
        raise ValueError(f"{path}: no requests in the file")
    return out


def arrival_gaps_s(arrival: ArrivalConfig) -> Iterator[float]:
    """Inter-arrival gaps in seconds for an open-loop process (infinite, seeded)."""
    if arrival.rate is None:
        raise ValueError(f"{arrival.kind} arrivals need a rate")
    rate = float(arrival.rate)
    rng = random.Random(arrival.seed)
    kind = arrival.kind
    if kind == "constant":
        while True:
            yield 1.0 / rate
    elif kind == "poisson":
        while True:
            yield rng.expovariate(rate)
    elif kind == "gamma":
        k = float(arrival.burstiness)
        while True:
            yield rng.gammavariate(k, 1.0 / (rate * k))
    else:
        raise ValueError(f"{kind} is not an open-loop arrival process")


def open_loop_schedule(
    arrival: ArrivalConfig, start_ns: int, max_requests: int | None, end_ns: int | None
) -> list[int]:
    """Absolute arrival times (ns) from ``start_ns``: the first request arrives at ``start_ns``,
    then one per gap, until ``max_requests`` are scheduled or the next arrival is past ``end_ns``.

    Times accumulate in float seconds and are rounded once per arrival, so rounding never adds up.
    """
    if max_requests is None and end_ns is None:
        raise ValueError("an open-loop schedule needs a request count or an end time")
    times: list[int] = []
    elapsed_s = 0.0
    gaps = arrival_gaps_s(arrival)
    while max_requests is None or len(times) < max_requests:
        t = start_ns + round(elapsed_s * NS_PER_S)
        if end_ns is not None and t >= end_ns:
            break
        times.append(t)
        elapsed_s += next(gaps)
    return times
