"""Cost of one event on the tenant's token loop (EventWriter.emit), against what it must stay under.

Runs, in one process and alternating, the writer as used by tenants (orjson, buffered, flushed
every second by size/age) and two references: a plain ``json.dumps`` + ``file.write`` per event
(line-buffered, what a naive logger does) and the bare cost of building the dict. Prints a table
and writes JSON (``--out``). The figure that matters is ns per ``tok`` event as a fraction of a
decode step (1.5 ms for a CUDA-graphs 1B tenant at batch 8, the issue-5 goal).

    python benchmarks/event_writer.py --events 200000 --batch 8 --out benchmarks/event_writer.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

from multitenant.events import EventWriter

DECODE_STEP_NS = 1_500_000


def bench_writer(path: Path, n: int, batch: int) -> float:
    rids = list(range(batch))
    ones = [1] * batch
    w = EventWriter(path)
    t0 = time.perf_counter_ns()
    for _ in range(n):
        w.emit("tok", rid=rids, n=ones)
    t1 = time.perf_counter_ns()
    w.close()
    return (t1 - t0) / n


def bench_naive(path: Path, n: int, batch: int) -> float:
    rids = list(range(batch))
    ones = [1] * batch
    with open(path, "w", buffering=1) as f:
        t0 = time.perf_counter_ns()
        for _ in range(n):
            f.write(json.dumps({"t": time.monotonic_ns(), "ev": "tok", "rid": rids, "n": ones}) + "\n")
        t1 = time.perf_counter_ns()
    return (t1 - t0) / n


def bench_dict_only(n: int, batch: int) -> float:
    rids = list(range(batch))
    ones = [1] * batch
    sink = []
    t0 = time.perf_counter_ns()
    for _ in range(n):
        sink.append({"t": time.monotonic_ns(), "ev": "tok", "rid": rids, "n": ones})
        if len(sink) > 1000:
            sink.clear()
    t1 = time.perf_counter_ns()
    return (t1 - t0) / n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--events", type=int, default=200_000)
    ap.add_argument("--batch", type=int, default=8, help="requests per tok event")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    results: dict[str, list[float]] = {"EventWriter.emit": [], "json.dumps+write (naive)": [], "dict only": []}
    with tempfile.TemporaryDirectory() as d:
        for r in range(args.repeats):  # alternate variants so drift hits all of them alike
            results["EventWriter.emit"].append(bench_writer(Path(d) / f"w{r}.jsonl", args.events, args.batch))
            results["json.dumps+write (naive)"].append(bench_naive(Path(d) / f"n{r}.jsonl", args.events, args.batch))
            results["dict only"].append(bench_dict_only(args.events, args.batch))
    anchor = statistics.median(results["EventWriter.emit"])
    rows = []
    print(f"{'variant':28} {'ns/event (median)':>18} {'ratio to emit':>14} {'% of 1.5 ms step':>17}")
    for name, vals in results.items():
        med = statistics.median(vals)
        rows.append({"variant": name, "ns_per_event_median": med, "all": vals, "ratio_to_emit": med / anchor,
                     "fraction_of_decode_step": med / DECODE_STEP_NS})
        print(f"{name:28} {med:18.0f} {med / anchor:14.2f} {100 * med / DECODE_STEP_NS:16.3f}%")
    out = {"date": time.strftime("%Y-%m-%d"), "machine": platform.platform(), "cpus": os.cpu_count(),
           "events": args.events, "batch": args.batch, "repeats": args.repeats, "rows": rows}
    if args.out:
        args.out.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
