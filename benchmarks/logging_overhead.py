"""What per-token event logging costs a GPU-bound tenant: logging on vs off, alternated.

One process, one engine (default: graphs execution, synthetic Llama-3.2-1B, bf16, batch 8,
512 in / 128 out). Each round serves the same batches twice, once with the tenant's events
(``sched``/``sent`` per request, one ``tok`` per emission instant, ``done`` per request, written
through ``multitenant.events.EventWriter``) and once without; the order alternates between
rounds so drift (clocks, temperature) falls on both sides equally. Figure: tokens/s with
logging over tokens/s without (median of rounds, and of the per-round ratios). Goal: <= 1% lost.

    python benchmarks/logging_overhead.py --out /tmp/logging.json
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from engine_args import add_engine_args, engine_from_args

from multitenant.backends.hf.engine import HFEngine
from multitenant.events import EventWriter
from multitenant.schema import EV_DONE, EV_SCHED, EV_SENT, EV_TOK


def serve(
    engine: HFEngine, batches: list[list[list[int]]], n_out: int, writer: EventWriter | None, rid0: int
) -> tuple[int, int]:
    """Serve the batches back to back like a closed-loop tenant; returns (tokens, elapsed ns)."""
    tokens = 0
    t_begin = time.monotonic_ns()
    rid = rid0
    for prompts in batches:
        rids = list(range(rid, rid + len(prompts)))
        rid += len(prompts)
        if writer is not None:
            t = time.monotonic_ns()
            for r, p in zip(rids, prompts, strict=True):
                writer.emit(EV_SCHED, t, rid=r, n_in=len(p), n_out_target=n_out)
                writer.emit(EV_SENT, t, rid=r)
        engine.start_batch(prompts, [n_out] * len(prompts))
        got = [0] * len(prompts)
        while idx := engine.step():
            t = time.monotonic_ns()
            tokens += len(idx)
            if writer is not None:
                writer.emit(EV_TOK, t, rid=[rids[i] for i in idx], n=[1] * len(idx))
                for i in idx:
                    got[i] += 1
                    if got[i] == n_out:
                        writer.emit(EV_DONE, t, rid=rids[i], n_out=n_out, status="ok")
    return tokens, time.monotonic_ns() - t_begin


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_engine_args(ap)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--batches-per-round", type=int, default=4)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)

    engine = engine_from_args(args)
    t0 = time.monotonic()
    engine.load()
    engine.warmup()
    print(f"# engine ready in {time.monotonic() - t0:.1f} s: {engine.device_info()}", flush=True)
    rng = random.Random(0)
    batches = [
        [[rng.randrange(engine.vocab_size) for _ in range(args.input_len)] for _ in range(args.batch)]
        for _ in range(args.batches_per_round)
    ]
    serve(engine, batches[:1], args.output_len, None, 0)  # one more batch of warm-up
    tmp = Path(tempfile.mkdtemp(prefix="logging_overhead_"))
    runs: list[dict[str, Any]] = []
    for r in range(args.rounds):
        order = (False, True) if r % 2 == 0 else (True, False)
        for log in order:
            writer = EventWriter(tmp / f"round{r}.jsonl") if log else None
            tokens, ns = serve(engine, batches, args.output_len, writer, rid0=r * 10_000)
            lines = 0
            if writer is not None:
                writer.close()  # flush + fsync, as at a tenant's end: outside the timed part
                lines = writer.lines_written
            runs.append({"round": r, "logging": log, "tokens": tokens, "s": ns / 1e9, "tok_s": tokens / (ns / 1e9), "lines": lines})
            print(f"round {r} logging={'on ' if log else 'off'} {tokens / (ns / 1e9):9.1f} tok/s  ({lines} lines)", flush=True)
    on = [x["tok_s"] for x in runs if x["logging"]]
    off = [x["tok_s"] for x in runs if not x["logging"]]
    paired = [a / b for a, b in zip(on, off, strict=True)]
    result = {
        "date": time.strftime("%Y-%m-%d"),
        "device": engine.device_info(),
        "torch": torch.__version__,
        "argv": sys.argv,
        "config": vars(args),
        "runs": runs,
        "tok_s_on_median": statistics.median(on),
        "tok_s_off_median": statistics.median(off),
        "loss_frac_median_of_medians": 1 - statistics.median(on) / statistics.median(off),
        "loss_frac_median_paired": 1 - statistics.median(paired),
        "spread_off_frac": (max(off) - min(off)) / statistics.median(off),
    }
    print(
        f"\n## logging overhead: on {result['tok_s_on_median']:.1f} tok/s, off {result['tok_s_off_median']:.1f} tok/s; "
        f"lost {100 * result['loss_frac_median_of_medians']:.2f} % (paired median {100 * result['loss_frac_median_paired']:.2f} %, "
        f"off-run spread {100 * result['spread_off_frac']:.2f} %)"
    )
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
