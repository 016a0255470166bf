"""Speed of ``mt-analyze`` on a large run: 1,000,000 ``tok`` events over 4 tenants.

Builds a run folder the way tenants write it (``EventWriter`` line format: one ``tok`` line per
emission instant with parallel ``rid``/``n`` lists, ``sched``/``sent``/``done`` per request,
10 Hz telemetry) with closed-loop batches of 1, 2, 4 and 8 (so 3.75 M tokens in all), then
times, separately and ``--repeats`` times each:

  * load + metrics: ``load_runs`` + ``compute_run``, with the events files parsed serially
    (what the CLI does on fewer than 4 cores) and in worker processes (4 or more cores);
  * plots: every per-run figure (``plot_run``);
  * outputs: summary.json + requests.csv + summary.md + report.html.

Goal on the 2-core development machine: load + metrics <= 2 s, plots <= 10 s.
Prints a table and writes JSON (``--out``).

    python benchmarks/analysis_speed.py --out /tmp/analysis_speed.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import orjson

BASE_NS = 5_000_000_000_000_000
STEP_NS = 2_400_000  # one decode step: 2.4 ms
OUTPUT_LEN = 64
BATCHES = {"t1": 1, "t2": 2, "t4": 4, "t8": 8}


def write_tenant(path: Path, name: str, batch: int, n_tok_lines: int, rng: np.random.Generator) -> int:
    """Closed loop, concurrency = batch: a batch of requests decodes OUTPUT_LEN steps together,
    then the next batch is sent. Returns the number of lines written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    dumps = orjson.dumps
    lines: list[bytes] = [
        dumps({"t": BASE_NS, "ev": "run_start", "tenant": name, "backend": "hf", "model": "synthetic:x", "pid": 1, "wall_ns": 0, "schema": 1}),
        dumps({"t": BASE_NS + 1, "ev": "ready", "load_s": 1.0, "warmup_s": 1.0, "pid": 1, "sms": 132, "device": "bench"}),
    ]
    t0 = BASE_NS + 1_000_000_000
    lines.append(dumps({"t": t0 - 1000, "ev": "window", "t0": t0, "t1": None}))
    jitter = rng.integers(0, 200_000, size=n_tok_lines + 1)
    t = t0
    rid = 0
    written = 0
    ones = [1] * batch
    while written < n_tok_lines:
        rids = list(range(rid, rid + batch))
        for r in rids:
            lines.append(dumps({"t": t, "ev": "sched", "rid": r, "n_in": 128, "n_out_target": OUTPUT_LEN}))
            lines.append(dumps({"t": t, "ev": "sent", "rid": r}))
        steps = min(OUTPUT_LEN, n_tok_lines - written)
        for _ in range(steps):
            t += STEP_NS + int(jitter[written])
            lines.append(dumps({"t": t, "ev": "tok", "rid": rids, "n": ones}))
            written += 1
        for r in rids:
            lines.append(dumps({"t": t, "ev": "done", "rid": r, "n_out": steps, "status": "ok"}))
        rid += batch
    lines.append(dumps({"t": t + 1, "ev": "run_end", "status": "ok", "counts": {}}))
    path.write_bytes(b"\n".join(lines) + b"\n")
    return len(lines)


def build_run(root: Path, n_tok_events: int) -> Path:
    run_dir = root / "bench_run"
    rng = np.random.default_rng(0)
    per_tenant = n_tok_events // len(BATCHES)
    end_ns = BASE_NS
    tenants = {}
    for name, batch in BATCHES.items():
        write_tenant(run_dir / "tenants" / name / "events.jsonl", name, batch, per_tenant, rng)
        tenants[name] = {"backend": "hf", "model": "synthetic:x", "task": "generate", "execution": "graphs",
                         "dtype": "bfloat16", "max_batch": batch}  # fmt: skip
        end_ns = max(end_ns, BASE_NS + 1_000_000_000 + per_tenant * (STEP_NS + 200_000))
    manifest = {"schema_version": 1, "run_id": "bench", "name": "bench", "status": "ok", "reason": None,
                "gpu": {"name": "bench GPU", "sm_count": 132}, "mode": "mps", "tenants": tenants,
                "window": {"t0_ns": BASE_NS + 1_000_000_000, "t1_ns": None}, "started_wall": "2026-11-22T00:00:00+00:00"}  # fmt: skip
    (run_dir / "manifest.json").write_bytes(orjson.dumps(manifest))
    with open(run_dir / "telemetry.jsonl", "wb") as f:
        for t in range(BASE_NS, end_ns, 100_000_000):
            f.write(orjson.dumps({"t": t, "gpu_util_pct": 90, "mem_util_pct": 40, "mem_used_bytes": 2**34,
                                  "power_w": 500.0, "sm_clock_mhz": 1980, "mem_clock_mhz": 2619,
                                  "tenant_cpu_pct": {n: 100.0 for n in BATCHES}}) + b"\n")  # fmt: skip
    return run_dir


def _cpu_s() -> float:
    """CPU seconds of this process and its finished children (the parse workers)."""
    own = time.process_time()
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own + kids.ru_utime + kids.ru_stime


def timed(fn, repeats: int) -> tuple[list[float], list[float], object]:
    """Wall and CPU seconds of each repeat. CPU time is reported beside wall time because this
    machine is shared: other work on the 2 cores inflates wall time, not CPU time."""
    times, cpus, result = [], [], None
    for _ in range(repeats):
        cpu0, start = _cpu_s(), time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
        cpus.append(_cpu_s() - cpu0)
    return times, cpus, result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tok-events", type=int, default=1_000_000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=None, help="JSON results (default: in the temp folder)")
    ap.add_argument("--keep", action="store_true", help="keep the generated run folder")
    ap.add_argument("--run-dir", type=Path, default=None, help="reuse a run folder kept by --keep")
    args = ap.parse_args()

    from multitenant.analysis import plots, report, summary
    from multitenant.analysis.load import PARALLEL_MIN_CORES, load_runs
    from multitenant.analysis.metrics import compute_run

    tmp = Path(tempfile.mkdtemp(prefix="mt-analysis-bench-"))
    t_build = time.perf_counter()
    run_dir = args.run_dir or build_run(tmp, args.tok_events)
    build_s = time.perf_counter() - t_build
    size = sum(p.stat().st_size for p in (run_dir / "tenants").glob("*/events.jsonl"))

    load_metrics = lambda parallel: compute_run(load_runs([run_dir], parallel=parallel)[0])  # noqa: E731
    load_metrics(None)  # warm the page cache and imports once, untimed
    par_times, par_cpu, rm = timed(lambda: load_metrics(True), args.repeats)
    ser_times, ser_cpu, _ = timed(lambda: load_metrics(False), args.repeats)
    load_only, load_cpu, _ = timed(lambda: load_runs([run_dir])[0], args.repeats)
    assert rm is not None
    tokens = sum(t.output_tokens for t in rm.tenants.values())  # type: ignore[attr-defined]
    colors = plots.tenant_colors(BATCHES)
    out_dir = tmp / "plots"
    plot_times, plot_cpu, _ = timed(lambda: plots.plot_run(rm, out_dir, "png", colors), args.repeats)  # type: ignore[arg-type]
    labels = {id(rm): "bench"}

    def outputs() -> None:
        summary.write_summary_json([rm], out_dir / "summary.json")  # type: ignore[list-item]
        summary.write_requests_csv([rm], out_dir / "requests.csv")  # type: ignore[list-item]
        (out_dir / "summary.md").write_text(report.markdown([rm], labels))  # type: ignore[list-item]
        report.write_html([rm], labels, {}, [], colors, out_dir / "report.html")  # type: ignore[list-item]

    out_times, out_cpu, _ = timed(outputs, args.repeats)

    cli_parallel = (os.cpu_count() or 1) >= PARALLEL_MIN_CORES  # what load_runs decides for this run
    rows = [
        ("load + metrics, serial parse (the CLI on < 4 cores)", ser_times, ser_cpu, None if cli_parallel else 2.0),
        ("load + metrics, parallel parse (the CLI on >= 4 cores)", par_times, par_cpu, 2.0 if cli_parallel else None),
        ("load only, as the CLI", load_only, load_cpu, None),
        ("all per-run plots (6 figures, png)", plot_times, plot_cpu, 10.0),
        ("summary.json + requests.csv + summary.md + report.html", out_times, out_cpu, None),
    ]
    print(f"\n{args.tok_events:,} tok events, {tokens:,} tokens in window, 4 tenants, {size / 2**20:.0f} MiB of events.jsonl "
          f"(built in {build_s:.1f} s); {args.repeats} repeats, {os.cpu_count()} CPU cores\n")  # fmt: skip
    print(f"| {'stage':<56} | wall median s | wall min s | CPU median s | goal s |")
    print(f"|{'-' * 58}|--------------:|-----------:|-------------:|-------:|")
    results = []
    for label, times, cpus, goal in rows:
        med, low, cpu = statistics.median(times), min(times), statistics.median(cpus)
        print(f"| {label:<56} | {med:13.2f} | {low:10.2f} | {cpu:12.2f} | {'' if goal is None else f'{goal:.0f}':>6} |")
        results.append(
            {"stage": label, "median_s": med, "min_s": low, "cpu_median_s": cpu, "times_s": times, "cpu_s": cpus, "goal_s": goal}
        )
    load_avg = os.getloadavg()
    print(f"\nload average during the run (1/5/15 min): {load_avg[0]:.2f} {load_avg[1]:.2f} {load_avg[2]:.2f}")
    payload = {
        "tok_events": args.tok_events,
        "tokens": tokens,
        "events_bytes": size,
        "repeats": args.repeats,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "load_average": load_avg,
        "results": results,
    }
    out = args.out or tmp / "analysis_speed.json"
    out.write_text(json.dumps(payload, indent=2))
    print(f"\nJSON: {out}")
    import shutil

    shutil.rmtree(out_dir, ignore_errors=True)
    if not args.keep and args.run_dir is None:
        shutil.rmtree(run_dir)
    else:
        print(f"run folder kept: {run_dir}")


if __name__ == "__main__":
    main()
