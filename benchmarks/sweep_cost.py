"""What a sweep point costs: where a sweep's wall time goes, and the share that is measured.

Runs one ``mt-run -m`` sweep (the arguments after ``--``) and splits each job's wall time,
from the job's manifest and its tenants' events (one clock, ``time.monotonic_ns()``):

- ``start``: orchestrator start to the first tenant's ``run_start`` (MPS daemon, telemetry,
  process spawn);
- ``import``: ``run_start`` to the start of loading, per tenant (interpreter, torch,
  transformers / vLLM imports: ``ready - run_start - load_s - warmup_s``), the slowest tenant;
- ``load`` and ``warmup``: the slowest tenant's ``load_s`` and ``warmup_s`` (warm-up includes
  compile and graph capture, and the warm-up requests);
- ``lead``: last ``ready`` to the window's ``t0`` (``window_lead_s``);
- ``window``: ``t1 - t0``, the measured part;
- ``stop``: ``t1`` to the orchestrator's end (cancelling, tenants' exit, daemon stop);
- ``between``: the gap to the next job (Hydra's job setup), and before the first job
  (``mt-run``'s own start: Hydra, config composition).

The measured share is ``Σ window / sweep wall time`` (wall time from launching ``mt-run`` to
its exit, as the user pays for it). Goal on a GPU with a warm compile cache and 30 s windows:
at least 0.6.

    python benchmarks/sweep_cost.py --out /tmp/sweep_cost.json -- \\
        --config-name multitenant/pair_tiny split=50/50,70/30 tenants.a.workload.duration_s=5 \\
        tenants.b.workload.duration_s=5
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import orjson


def read_events(path: Path) -> list[dict[str, Any]]:
    """Every whole line of an events file (a truncated last line is skipped)."""
    return [orjson.loads(line) for line in path.read_bytes().splitlines(keepends=True) if line.endswith(b"\n")]


PHASES = ("start", "import", "load", "warmup", "lead", "window", "stop")


def job_phases(job: Path) -> dict[str, Any]:
    """One job's phases in seconds (see the module docstring), from manifest and events."""
    m = json.loads((job / "manifest.json").read_text())
    starts, ready, imports, loads, warms = [], [], [], [], []
    for name in m["tenants"]:
        events = read_events(job / "tenants" / name / "events.jsonl")
        first = {e["ev"]: e for e in reversed(events)}  # the first of each kind
        if "run_start" not in first or "ready" not in first:
            continue
        r = first["ready"]
        starts.append(first["run_start"]["t"])
        ready.append(r["t"])
        loads.append(r["load_s"])
        warms.append(r["warmup_s"])
        imports.append((r["t"] - first["run_start"]["t"]) / 1e9 - r["load_s"] - r["warmup_s"])
    t0, t1 = m["window"]["t0_ns"], m["window"]["t1_ns"]
    out: dict[str, Any] = {
        "job": job.name,
        "status": m["status"],
        "overrides": [o for o in m.get("overrides", []) if "=" in o],
        "started_ns": m["started_ns"],
        "ended_ns": m["ended_ns"],
        "wall": (m["ended_ns"] - m["started_ns"]) / 1e9,
    }
    if not ready or t0 is None or t1 is None:
        return out  # a failed job: its wall time counts, its phases do not
    # Tenants that load one after another (vLLM) overlap nothing: their phases add up in the
    # wall time, while these per-phase maxima assume tenants that load side by side.
    out.update(
        start=(min(starts) - m["started_ns"]) / 1e9,
        **{"import": max(imports)},
        load=max(loads),
        warmup=max(warms),
        lead=(t0 - max(ready)) / 1e9,
        window=(t1 - t0) / 1e9,
        stop=(m["ended_ns"] - t1) / 1e9,
    )
    return out


def summarize(jobs: list[dict[str, Any]], sweep_start_ns: int, sweep_end_ns: int) -> dict[str, Any]:
    wall = (sweep_end_ns - sweep_start_ns) / 1e9
    windows = sum(j.get("window", 0.0) for j in jobs)
    ordered = sorted(jobs, key=lambda j: j["started_ns"])
    between = [(b["started_ns"] - a["ended_ns"]) / 1e9 for a, b in zip(ordered, ordered[1:], strict=False)]
    measured = [j for j in jobs if "window" in j]
    return {
        "jobs": len(jobs),
        "ok": sum(j["status"] == "ok" for j in jobs),
        "sweep_wall_s": wall,
        "sum_window_s": windows,
        "measured_share": windows / wall if wall > 0 else None,
        "before_first_job_s": (ordered[0]["started_ns"] - sweep_start_ns) / 1e9 if ordered else None,
        "after_last_job_s": (sweep_end_ns - ordered[-1]["ended_ns"]) / 1e9 if ordered else None,
        "between_jobs_median_s": statistics.median(between) if between else None,
        "phase_median_s": {p: statistics.median(j[p] for j in measured) for p in PHASES} if measured else {},
        "job_wall_median_s": statistics.median(j["wall"] for j in jobs) if jobs else None,
    }


def table(jobs: list[dict[str, Any]], summary: dict[str, Any]) -> str:
    head = "| job | overrides | status | wall s | " + " | ".join(f"{p} s" for p in PHASES) + " |"
    lines = [head, "|" + "---|" * (4 + len(PHASES))]
    for j in jobs:
        phases = " | ".join(f"{j[p]:.1f}" if p in j else "-" for p in PHASES)
        over = " ".join(o for o in j["overrides"] if not o.startswith(("progress=", "hydra.")))
        lines.append(f"| {j['job']} | {over} | {j['status']} | {j['wall']:.1f} | {phases} |")
    s = summary
    lines += [
        "",
        f"sweep wall {s['sweep_wall_s']:.1f} s, Σ window {s['sum_window_s']:.1f} s, "
        f"measured share {s['measured_share']:.3f} ({s['ok']}/{s['jobs']} jobs ok); "
        f"mt-run start to job0 {s['before_first_job_s']:.1f} s, between jobs (median) "
        f"{(s['between_jobs_median_s'] or 0.0):.2f} s, after the last {s['after_last_job_s']:.1f} s",
    ]
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, help="write the figures as JSON here")
    ap.add_argument("--sweep-dir", type=Path, help="default: a new temporary folder")
    ap.add_argument("mt_run_args", nargs=argparse.REMAINDER, help="-- then mt-run's arguments (without -m)")
    args = ap.parse_args()
    run_args = [a for a in args.mt_run_args if a != "--"]
    sweep_dir = args.sweep_dir or Path(tempfile.mkdtemp(prefix="mt-sweep-cost-")) / "sweep"
    cmd = [sys.executable, "-m", "multitenant.cli", "-m", *run_args, f"hydra.sweep.dir={sweep_dir}", "progress=false"]
    print("$ " + " ".join(cmd), file=sys.stderr, flush=True)
    t_start = time.monotonic_ns()
    rc = subprocess.run(cmd, env={**os.environ, "PYTHONUNBUFFERED": "1"}).returncode
    t_end = time.monotonic_ns()
    jobs = [job_phases(p) for p in sorted(sweep_dir.glob("job*"), key=lambda p: int(p.name[3:])) if (p / "manifest.json").is_file()]
    summary = summarize(jobs, t_start, t_end)
    print(table(jobs, summary))
    if args.out:
        args.out.write_text(json.dumps({"command": cmd, "rc": rc, "summary": summary, "jobs": jobs}, indent=2))
    return rc


if __name__ == "__main__":
    sys.exit(main())
