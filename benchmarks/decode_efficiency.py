"""Decode efficiency on a GPU: model.generate vs the hf engine's eager and graphs execution.

For a synthetic model (default: Llama-3.2-1B shapes, bf16), at several batch sizes, with fixed
prompt and output lengths (default 512 in / 128 out), each variant serves ``--reps`` batches
after one warm-up batch and logs every emission instant as a ``tok`` event through
``multitenant.events.EventWriter``, as a tenant does. The figures come from those events:

- ``step_ms``: median gap between consecutive ``tok`` events of a batch after its first token
  (one decode step; the first token is the prefill, reported as ``ttft_ms``);
- ``tok_s``: output tokens / sum over batches of (last ``tok`` - ``sent``), prefill included;
- ``roofline_frac``: ``roofline_ms / step_ms`` with ``roofline_ms = weight_bytes / copy_bw``:
  a decode step must read every weight once (the tied embedding once, as the LM head), and
  ``copy_bw`` is a device-to-device copy measured in the same run, bytes read + written over
  time. KV-cache reads are extra and small at these lengths (reported as ``kv_bytes_step``).

Variants: ``generate`` (``model.generate``, dynamic cache, greedy, timed through a streamer that
synchronizes at each step), ``eager``, ``graphs:<impl>`` for the engine's graph impls
(``inductor_cudagraph``, ``cudagraph``, ``reduce_overhead``; ``none`` = static cache without
capture); ``-nofuse`` keeps q/k/v and gate/up as separate GEMMs (the engine fuses them by
default). ``variant@8`` restricts a variant to batch 8 (saves compile time).

    python benchmarks/decode_efficiency.py --out /tmp/decode.json
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import orjson
import torch

from multitenant.backends.hf.batching import cache_length
from multitenant.backends.hf.engine import HFEngine
from multitenant.events import EventWriter
from multitenant.models import build_model
from multitenant.schema import EV_DONE, EV_SENT, EV_TOK


def read_events(path: Path) -> list[dict[str, Any]]:
    """Every whole line of an events file (a truncated last line is skipped)."""
    return [orjson.loads(line) for line in path.read_bytes().splitlines(keepends=True) if line.endswith(b"\n")]


# Most informative first: a run that hits --time-budget-s skips the tail.
DEFAULT_VARIANTS = (
    "graphs:inductor_cudagraph,graphs:cudagraph,graphs:reduce_overhead@8,graphs:inductor_cudagraph-nofuse@8,"
    "generate,eager,graphs:none@8"
)
HOST_BOUND = ("generate", "eager", "graphs:none")  # ~16 ms/step: fewer batches say as much
RID_STRIDE = 100_000  # rid = batch_index * RID_STRIDE + request index: groups events by batch


def copy_bandwidth(device: torch.device, nbytes: int = 1 << 30, reps: int = 20) -> float:
    """Device-to-device copy bandwidth in bytes/s, counting bytes read plus bytes written
    (median of ``reps`` timed copies of ``nbytes`` after 3 warm-ups, CUDA events)."""
    if device.type != "cuda":
        nbytes, reps = 1 << 26, 5
    src = torch.randint(0, 255, (nbytes,), dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    times = []
    for _ in range(reps):
        if device.type != "cuda":
            t = time.perf_counter()
            dst.copy_(src)
            times.append(time.perf_counter() - t)
            continue
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        dst.copy_(src)
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    del src, dst
    return 2 * nbytes / statistics.median(times)


def make_batch(b: int, input_len: int, vocab: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(vocab) for _ in range(input_len)] for _ in range(b)]


def summarize(events: list[dict[str, Any]]) -> dict[str, Any]:
    """Per-batch TTFT, decode-step gaps and busy time from one events file."""
    sent: dict[int, int] = {}
    toks: dict[int, list[tuple[int, int]]] = {}
    for e in events:
        if e["ev"] == EV_SENT:
            sent.setdefault(e["rid"] // RID_STRIDE, e["t"])
        elif e["ev"] == EV_TOK:
            toks.setdefault(e["rid"][0] // RID_STRIDE, []).append((e["t"], sum(e["n"])))
    gaps, ttft, busy, tokens = [], [], 0, 0
    for k, seq in toks.items():
        ts = [t for t, _ in seq]
        ttft.append(ts[0] - sent[k])
        gaps.extend(b - a for a, b in zip(ts, ts[1:], strict=False))
        busy += ts[-1] - sent[k]
        tokens += sum(n for _, n in seq)
    return {
        "batches": len(toks),
        "tokens": tokens,
        "step_ms": statistics.median(gaps) / 1e6,
        "step_ms_mean": statistics.fmean(gaps) / 1e6,
        "step_ms_p90": sorted(gaps)[int(0.9 * (len(gaps) - 1))] / 1e6,
        "ttft_ms": statistics.median(ttft) / 1e6,
        "tok_s": tokens / (busy / 1e9),
    }


def run_engine(
    engine: HFEngine, w: EventWriter, b: int, args: argparse.Namespace, batch_index: int, measured: bool
) -> None:
    prompts = make_batch(b, args.input_len, engine.vocab_size, seed=batch_index)
    rids = [batch_index * RID_STRIDE + i for i in range(b)]
    t = time.monotonic_ns()
    if measured:
        for r in rids:
            w.emit(EV_SENT, t, rid=r)
    engine.start_batch(prompts, [args.output_len] * b)
    while True:
        idx = engine.step()
        t = time.monotonic_ns()
        if not idx:
            break
        if measured:
            w.emit(EV_TOK, t, rid=[rids[i] for i in idx], n=[1] * len(idx))
    if measured:
        for r in rids:
            w.emit(EV_DONE, t, rid=r, n_out=args.output_len, status="ok")


class _TokStreamer:
    """transformers streamer: a ``tok`` event per generated step, after synchronizing (generate
    itself synchronizes every step for its stopping check, so this adds no real wait)."""

    def __init__(self, w: EventWriter | None, rids: list[int]) -> None:
        self.w, self.rids, self.prompt_seen = w, rids, False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:  # generate first hands over the prompt
            self.prompt_seen = True
            return
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        if self.w is not None:
            self.w.emit(EV_TOK, time.monotonic_ns(), rid=self.rids, n=[1] * len(self.rids))

    def end(self) -> None:
        pass


def run_generate(model: Any, vocab: int, w: EventWriter, b: int, args: argparse.Namespace, batch_index: int, measured: bool) -> None:
    prompts = make_batch(b, args.input_len, vocab, seed=batch_index)
    rids = [batch_index * RID_STRIDE + i for i in range(b)]
    ids = torch.tensor(prompts, device=model.device)
    streamer = _TokStreamer(w if measured else None, rids)
    t = time.monotonic_ns()
    if measured:
        for r in rids:
            w.emit(EV_SENT, t, rid=r)
    model.generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=args.output_len,
        min_new_tokens=args.output_len,
        do_sample=False,
        pad_token_id=0,
        streamer=streamer,
    )


def parse_variant(v: str) -> tuple[str, list[int] | None]:
    name, _, only = v.partition("@")
    return name, ([int(x) for x in only.split("+")] if only else None)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="synthetic:llama-3.2-1b")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--input-len", type=int, default=512)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--reps", type=int, default=3, help="measured batches per variant and batch size")
    ap.add_argument("--reps-host-bound", type=int, default=2, help="the same for generate, eager, graphs:none")
    ap.add_argument("--variants", default=DEFAULT_VARIANTS)
    ap.add_argument("--profile", default="graphs:inductor_cudagraph@8",
                    help="variant@batch whose kernels to profile over one batch ('' = none)")
    ap.add_argument("--time-budget-s", type=float, default=1e9, help="skip variants that start after this")
    ap.add_argument("--device", default="cuda:0", help="cpu: a smoke test of the script (eager, generate)")
    ap.add_argument("--out", default=None, help="JSON results")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("decode_efficiency needs a CUDA GPU (or --device cpu for a smoke test)", file=sys.stderr)
        return 2
    t_start = time.monotonic()
    batches = [int(x) for x in args.batches.split(",")]
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        dev_name, sms = props.name, props.multi_processor_count
    else:
        dev_name, sms = platform.processor() or "cpu", None
    bw = copy_bandwidth(device)
    import transformers

    result: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d"),
        "device": dev_name,
        "sms": sms,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "argv": sys.argv,
        "model": args.model,
        "dtype": args.dtype,
        "input_len": args.input_len,
        "output_len": args.output_len,
        "copy_bw_bytes_s": bw,
        "rows": [],
        "skipped": [],
    }
    print(f"# {dev_name}, {sms} SMs; copy bandwidth {bw / 1e12:.3f} TB/s (read+write)")
    tmp = Path(tempfile.mkdtemp(prefix="decode_eff_"))
    weight_bytes = None
    profile_target: tuple[HFEngine, int] | None = None

    def save() -> None:
        if args.out:
            Path(args.out).write_text(json.dumps(result, indent=1))

    for vi, variant in enumerate(args.variants.split(",")):
        name, only = parse_variant(variant)
        sizes = batches if only is None else only
        if time.monotonic() - t_start > args.time_budget_s:
            result["skipped"].append(variant)
            print(f"# skipped {variant}: time budget")
            continue
        t0 = time.monotonic()
        engine: HFEngine | None = None
        model = None
        try:
            if name == "generate":
                model, info = build_model(args.model, args.dtype, str(device), "generate")
                load_s, warmup_s = time.monotonic() - t0, 0.0
                vocab = info["vocab_size"]
            else:
                execution, _, impl = name.partition(":")
                impl, _, option = impl.partition("-")
                engine = HFEngine(
                    args.model, args.dtype, str(device), execution, "generate", max(sizes),
                    args.input_len, args.output_len, graph_impl=impl or "inductor_cudagraph",
                    batch_buckets=sizes if execution == "graphs" else None, fuse=option != "nofuse",
                )  # fmt: skip
                engine.load()
                load_s = time.monotonic() - t0
                t1 = time.monotonic()
                engine.warmup()
                warmup_s = time.monotonic() - t1
                info, vocab = engine.info, engine.vocab_size
            weight_bytes = info["weight_bytes"]
            roofline_ms = weight_bytes / bw * 1e3
            for b in sizes:
                path = tmp / f"{vi}_{name.replace(':', '_')}_b{b}.jsonl"
                with EventWriter(path, background_flush=False) as w:
                    reps = args.reps_host_bound if name in HOST_BOUND else args.reps
                    for rep in range(reps + 1):
                        measured = rep > 0  # the first batch of each size warms up shapes and allocator
                        if engine is not None:
                            run_engine(engine, w, b, args, rep, measured)
                        else:
                            run_generate(model, vocab, w, b, args, rep, measured)
                s = summarize(read_events(path))
                cfg = (engine.model if engine is not None else model).config
                kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
                head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
                slots = cache_length(args.input_len, args.output_len) if name.startswith("graphs") else args.input_len + args.output_len // 2
                row = {
                    "variant": name, "batch": b, **s, "roofline_ms": roofline_ms,
                    "roofline_frac": roofline_ms / s["step_ms"], "load_s": load_s, "warmup_s": warmup_s,
                    "weight_bytes": weight_bytes,
                    "kv_bytes_step": 2 * cfg.num_hidden_layers * b * kv_heads * slots * head_dim * torch.finfo(getattr(torch, args.dtype)).bits // 8,
                }  # fmt: skip
                result["rows"].append(row)
                print(
                    f"{name:28s} b={b:<3d} step {s['step_ms']:7.3f} ms (mean {s['step_ms_mean']:.3f}) "
                    f"ttft {s['ttft_ms']:8.2f} ms  {s['tok_s']:9.0f} tok/s  roofline {row['roofline_frac']:.3f}  "
                    f"warmup {warmup_s:.1f} s  [{time.monotonic() - t_start:.0f} s]",
                    flush=True,
                )
                save()
                if args.profile == f"{name}@{b}" and engine is not None:
                    profile_target = (engine, b)  # profiled after every variant ran: the profiler is the riskiest part
        except Exception as e:  # record and go on: one broken variant must not cost the others
            import traceback

            traceback.print_exc()
            result["rows"].append({"variant": name, "error": f"{type(e).__name__}: {e}"})
            save()
        finally:
            del engine, model
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
    print_table(result)
    save()
    if profile_target is not None:
        try:
            result["profile"] = profile_batch(profile_target[0], profile_target[1], args)
        except Exception as e:
            result["profile"] = f"profiler failed: {type(e).__name__}: {e}"
        save()
    return 0


def profile_batch(engine: HFEngine, b: int, args: argparse.Namespace) -> str:
    """Kernel time per kernel name over one batch (CUDA graphs' kernels included via CUPTI)."""
    from torch.profiler import ProfilerActivity, profile

    prompts = make_batch(b, args.input_len, engine.vocab_size, seed=99)
    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        engine.start_batch(prompts, [args.output_len] * b)
        while engine.step():
            pass
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=70)
    print(table)
    return str(table)


def print_table(result: dict[str, Any]) -> None:
    print(f"\n## decode efficiency: {result['model']} {result['dtype']}, {result['input_len']} in / "
          f"{result['output_len']} out, {result['device']}, copy bw {result['copy_bw_bytes_s'] / 1e12:.2f} TB/s")  # fmt: skip
    print("| variant | batch | ms/step (median) | mean | TTFT ms | tok/s | roofline frac | warm-up s |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in result["rows"]:
        if "error" in r:
            print(f"| {r['variant']} | error: {r['error'][:80]} |")
            continue
        print(
            f"| {r['variant']} | {r['batch']} | {r['step_ms']:.3f} | {r['step_ms_mean']:.3f} | {r['ttft_ms']:.1f} "
            f"| {r['tok_s']:.0f} | {r['roofline_frac']:.3f} | {r['warmup_s']:.1f} |"
        )


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
