"""Command-line options and engine construction shared by the single-tenant GPU benchmarks
(logging_overhead.py, mps_overhead.py): one graphs tenant, one batch size, fixed lengths."""

from __future__ import annotations

import argparse
from typing import Any


def add_engine_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--model", default="synthetic:llama-3.2-1b")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--device", default="cuda:0")
    ap.add_argument("--execution", default="graphs")
    ap.add_argument("--graph-impl", default="inductor_cudagraph")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--input-len", type=int, default=512)
    ap.add_argument("--output-len", type=int, default=128)


def engine_from_args(args: argparse.Namespace) -> Any:
    """An HFEngine for exactly ``--batch`` requests (one graph bucket), not yet loaded."""
    from multitenant.backends.hf.engine import HFEngine

    return HFEngine(
        args.model, args.dtype, args.device, args.execution, "generate", args.batch, args.input_len,
        args.output_len, graph_impl=args.graph_impl, batch_buckets=[args.batch],
    )  # fmt: skip
