"""Host work per admitted batch of the hf tenant, before and after the backend seam.

"Before" is the code of commit 8948f72 (copied below, unchanged in what it computes): each
request's prompt drawn in the serving loop with ``random.randrange`` per token, a
``min``/``max`` over every prompt in ``check_batch``, ``left_pad`` building Python lists and
``torch.tensor`` of those lists. "After" is today's path: prompts drawn with numpy in blocks
before ``ready`` (``RequestSource.prefetch``), so admission only pops them; ``check_batch``
checks sizes only; ``left_pad`` fills numpy arrays; ``torch.from_numpy``. Both end with the
same CPU int64 tensors (ids, mask, positions) a prefill takes; the copy to the GPU is the same
in both and not counted.

Per variant: median and p90 of the host time of one admission (draw ``--batch`` requests,
check, pad, make tensors), over ``--batches`` admissions, variants alternated in rounds.

    python benchmarks/host_path.py --out /tmp/host_path.json
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from multitenant.backends.hf.batching import check_batch, left_pad
from multitenant.config.schema import DatasetConfig
from multitenant.workload import RequestSource, length_bounds

# --- before (commit 8948f72: workload.RequestSource.next, backend_hf.check_batch, left_pad)


def old_next(rng: random.Random, ds: dict[str, Any], vocab: int) -> tuple[list[int], int]:
    n_in = rng.randint(*length_bounds(ds["input_len"], ds["range_ratio"]))
    n_out = rng.randint(*length_bounds(ds["output_len"], ds["range_ratio"]))
    return [rng.randrange(vocab) for _ in range(n_in)], n_out


def old_check_batch(prompts: Sequence[Sequence[int]], n_out: Sequence[int], max_batch: int, max_in: int, max_out: int, vocab: int) -> None:
    if not prompts or len(prompts) != len(n_out) or len(prompts) > max_batch:
        raise ValueError("bad batch")
    for p, n in zip(prompts, n_out, strict=True):
        if not p or len(p) > max_in or not 1 <= n <= max_out:
            raise ValueError("bad request")
        if min(p) < 0 or max(p) >= vocab:
            raise ValueError("bad ids")


def old_left_pad(prompts: Sequence[Sequence[int]], pad_id: int = 0) -> tuple[list[list[int]], list[list[int]], list[list[int]]]:
    lengths = [len(p) for p in prompts]
    width = max(lengths)
    ids, mask, pos = [], [], []
    for p, n in zip(prompts, lengths, strict=True):
        pad = width - n
        ids.append([pad_id] * pad + list(p))
        mask.append([0] * pad + [1] * n)
        pos.append([0] * pad + list(range(n)))
    return ids, mask, pos


def admit_before(rng: random.Random, ds: dict[str, Any], vocab: int, batch: int, max_in: int, max_out: int) -> int:
    t0 = time.perf_counter_ns()
    reqs = [old_next(rng, ds, vocab) for _ in range(batch)]
    prompts, n_out = [p for p, _ in reqs], [n for _, n in reqs]
    old_check_batch(prompts, n_out, batch, max_in, max_out, vocab)
    ids, mask, pos = old_left_pad(prompts)
    tensors = (torch.tensor(ids), torch.tensor(mask), torch.tensor(pos))
    dt = time.perf_counter_ns() - t0
    assert tensors[0].shape[0] == batch
    return dt


def admit_after(source: RequestSource, batch: int, max_in: int, max_out: int) -> int:
    t0 = time.perf_counter_ns()
    reqs = [source.next() for _ in range(batch)]
    prompts, n_out = [r.prompt_ids for r in reqs], [r.n_out for r in reqs]
    check_batch(prompts, n_out, batch, max_in, max_out)
    b = left_pad(prompts)
    tensors = (torch.from_numpy(b.input_ids), torch.from_numpy(b.attention_mask), torch.from_numpy(b.position_ids))
    dt = time.perf_counter_ns() - t0
    assert tensors[0].shape[0] == batch
    return dt


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--input-len", type=int, default=512)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--range-ratio", type=float, default=0.25)
    p.add_argument("--vocab", type=int, default=128256, help="Llama-3 vocabulary")
    p.add_argument("--batches", type=int, default=400)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    torch.set_num_threads(1)
    ds = {"kind": "random", "input_len": args.input_len, "output_len": args.output_len,
          "range_ratio": args.range_ratio, "path": None, "seed": 0}  # fmt: skip
    max_in = length_bounds(args.input_len, args.range_ratio)[1]
    max_out = length_bounds(args.output_len, args.range_ratio)[1]
    before: list[int] = []
    after: list[int] = []
    per_round = args.batches // args.rounds
    for rnd in range(args.rounds + 1):  # round 0 warms up both paths
        rng = random.Random(rnd)
        source = RequestSource(DatasetConfig(**{**ds, "seed": rnd}), vocab_size=args.vocab)
        source.prefetch(per_round * args.batch)  # before ready, outside the measured path
        b = [admit_before(rng, ds, args.vocab, args.batch, max_in, max_out) for _ in range(per_round)]
        a = [admit_after(source, args.batch, max_in, max_out) for _ in range(per_round)]
        if rnd:
            before += b
            after += a

    def stats(xs: list[int]) -> dict[str, float]:
        q = np.percentile(np.array(xs) / 1e6, [50, 90])
        return {"median_ms": float(q[0]), "p90_ms": float(q[1]), "mean_ms": statistics.fmean(xs) / 1e6}

    res = {"before": stats(before), "after": stats(after)}
    ratio = res["before"]["median_ms"] / res["after"]["median_ms"]
    print(f"host time per admitted batch of {args.batch} (prompts {max_in} tokens at most, vocab {args.vocab})")
    print("| path | median ms | p90 ms | mean ms |")
    print("|---|---:|---:|---:|")
    for k, v in res.items():
        print(f"| {k} | {v['median_ms']:.3f} | {v['p90_ms']:.3f} | {v['mean_ms']:.3f} |")
    print(f"\nbefore / after (median) = {ratio:.1f}x")
    if args.out is not None:
        args.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, **res,
                                        "before_over_after": ratio, "machine": platform.processor() or platform.machine(),
                                        "date": time.strftime("%Y-%m-%d")}, indent=2))  # fmt: skip


if __name__ == "__main__":
    main()
