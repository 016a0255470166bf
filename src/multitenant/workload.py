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

import json
import math
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

NS_PER_S = 1_000_000_000


@dataclass(frozen=True)
class RequestSpec:
    """One request: token-id prompt and the number of tokens to generate (EOS is ignored)."""

    rid: int
    prompt_ids: list[int]
    n_out: int

    @property
    def n_in(self) -> int:
        return len(self.prompt_ids)


def length_bounds(mean_len: int, range_ratio: float) -> tuple[int, int]:
    """Inclusive [lo, hi] of lengths uniform around ``mean_len``: [L(1-r), L(1+r)], lo >= 1."""
    lo = max(1, math.floor(mean_len * (1.0 - range_ratio)))
    hi = max(lo, math.ceil(mean_len * (1.0 + range_ratio)))
    if range_ratio == 0:
        lo = hi = mean_len
    return lo, hi


class RequestSource:
    """Yields requests of one tenant in order: deterministic for a given dataset config."""

    def __init__(self, dataset: dict[str, Any], vocab_size: int) -> None:
        self.dataset = dataset
        self.vocab_size = vocab_size
        self._rng = random.Random(dataset.get("seed", 0))
        self._jsonl: list[tuple[list[int], int]] | None = None
        if dataset["kind"] == "jsonl":
            self._jsonl = load_jsonl_prompts(Path(dataset["path"]), dataset["output_len"], vocab_size)
        self._next_rid = 0
        self._jsonl_pos = 0

    def max_lengths(self) -> tuple[int, int]:
        """Largest (input, output) length this source can produce: sizes static KV caches."""
        if self._jsonl is not None:
            return max(len(p) for p, _ in self._jsonl), max(n for _, n in self._jsonl)
        return (
            length_bounds(self.dataset["input_len"], self.dataset["range_ratio"])[1],
            length_bounds(self.dataset["output_len"], self.dataset["range_ratio"])[1],
        )

    def next(self) -> RequestSpec:
        rid = self._next_rid
        self._next_rid += 1
        if self._jsonl is not None:
            prompt, n_out = self._jsonl[self._jsonl_pos % len(self._jsonl)]
            self._jsonl_pos += 1
            return RequestSpec(rid, list(prompt), n_out)
        ds = self.dataset
        n_in = self._rng.randint(*length_bounds(ds["input_len"], ds["range_ratio"]))
        n_out = self._rng.randint(*length_bounds(ds["output_len"], ds["range_ratio"]))
        # Ids below vocab_size; 0..2 are often special tokens, which is harmless with EOS ignored.
        prompt = [self._rng.randrange(self.vocab_size) for _ in range(n_in)]
        return RequestSpec(rid, prompt, n_out)


def load_jsonl_prompts(path: Path, default_output_len: int, vocab_size: int) -> list[tuple[list[int], int]]:
    """Read ``{"prompt_ids": [...], "output_len": n?}`` lines. Text prompts need a tokenizer,
    which synthetic models do not have, so they are rejected with the fix in the message."""
    out: list[tuple[list[int], int]] = []
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
            out.append((ids, n_out))
    if not out:
        raise ValueError(f"{path}: no requests in the file")
    return out


def arrival_gaps_s(arrival: dict[str, Any]) -> Iterator[float]:
    """Inter-arrival gaps in seconds for an open-loop process (infinite, seeded)."""
    rate = float(arrival["rate"])
    rng = random.Random(arrival.get("seed", 0))
    kind = arrival["kind"]
    if kind == "constant":
        while True:
            yield 1.0 / rate
    elif kind == "poisson":
        while True:
            yield rng.expovariate(rate)
    elif kind == "gamma":
        k = float(arrival["burstiness"])
        while True:
            yield rng.gammavariate(k, 1.0 / (rate * k))
    else:
        raise ValueError(f"{kind} is not an open-loop arrival process")


def open_loop_schedule(
    arrival: dict[str, Any], start_ns: int, max_requests: int | None, end_ns: int | None
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
