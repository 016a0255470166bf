"""What a sweep point costs: where a sweep's wall time goes, and the share that is measured.

Runs one ``mt-run -m`` sweep (the arguments after ``--``) and splits each job's wall time,
from the job's manifest and its tenants' events (one clock, ``time.monotonic_ns()``):

- ``start``: orchestrator start to the first tenant's spawn (``spawned_ns`` in its
  ``spec.json``; older runs: its ``run_start``): MPS daemon, telemetry, and under
  ``tenant_start=fork`` the zygote's start and preload (``preload``, also shown alone);
- ``import``: the tenant's spawn (or fork) to the start of loading (``import_s`` in the
  manifest: interpreter, torch, transformers / vLLM imports, engine construction; older runs:
  ``ready - run_start - load_s - warmup_s``, without the interpreter's start);
- ``load`` and ``warmup``: ``load_s`` and ``warmup_s`` from the manifest (else the ``ready``
  event). For vLLM that is the engine's start (engine core, model, KV cache, CUDA graphs), for
  an openai tenant the server's launch and first answer; warm-up includes compile and graph
  capture, and the warm-up requests;
- ``lead``: last ``ready`` to the window's ``t0`` (``window_lead_s``);
- ``window``: ``t1 - t0``, the measured part;
- ``stop``: ``t1`` to the orchestrator's end (cancelling, tenants' exit, daemon stop);
- ``between``: the gap to the next job (Hydra's job setup), and before the first job
  (``mt-run``'s own start: Hydra, config composition).

Tenants that load side by side (hf) count with the slowest of each phase; tenants that load
one after another (vLLM, a launched server: each starts after the one before it is ready) add
up, so ``import``, ``load`` and ``warmup`` are their sums (``sequential`` in the JSON).

The measured share is ``Σ window / sweep wall time`` (wall time from launching ``mt-run`` to
its exit, as the user pays for it). Goal on a GPU with a warm compile cache and 30 s windows:
at least 0.6.

    python benchmarks/sweep_cost.py --out /tmp/sweep_cost.json -- \\
        --config-name multitenant/pair_tiny split=50/50,70/30 tenants.a.workload.duration_s=5 \\
        tenants.b.workload.duration_s=5

``--variant`` (repeatable) runs the sweep once per variant, each adding its overrides, and
``--rounds N`` repeats that N times alternated (A B A B ...): e.g. ``--variant
tenant_start=spawn --variant tenant_start=fork --rounds 2`` compares the two start methods in
one session; the last lines compare the variants (median over rounds).
"""

from __future__ import annotations

import argparse
import contextlib
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
COLUMNS = ("preload", *PHASES)  # preload: part of start (tenant_start=fork)


def job_phases(job: Path) -> dict[str, Any]:
    """One job's phases in seconds (see the module docstring), from manifest and events."""
    m = json.loads((job / "manifest.json").read_text())
    per: list[dict[str, Any]] = []
    for name, record in m["tenants"].items():
        tdir = job / "tenants" / name
        events = read_events(tdir / "events.jsonl") if (tdir / "events.jsonl").is_file() else []
        first = {e["ev"]: e for e in reversed(events)}  # the first of each kind
        if "run_start" not in first or "ready" not in first:
            continue
        r = first["ready"]
        load_s = record.get("load_s") if record.get("load_s") is not None else r["load_s"]
        warmup_s = record.get("warmup_s") if record.get("warmup_s") is not None else r["warmup_s"]
        spawned = None
        with contextlib.suppress(OSError, ValueError, KeyError):
            spawned = json.loads((tdir / "spec.json").read_text()).get("spawned_ns")
        import_s = record.get("import_s")
        if import_s is None:  # a run before import_s: from run_start, without the interpreter's start
            import_s = (r["t"] - first["run_start"]["t"]) / 1e9 - load_s - warmup_s
        per.append({
            "name": name, "backend": record.get("backend"), "start_method": record.get("start"),
            "started": spawned if spawned is not None else first["run_start"]["t"],
            "run_start": first["run_start"]["t"], "ready": r["t"],
            "import": import_s, "load": load_s, "warmup": warmup_s,
        })  # fmt: skip
    t0, t1 = m["window"]["t0_ns"], m["window"]["t1_ns"]
    out: dict[str, Any] = {
        "job": job.name,
        "status": m["status"],
        "overrides": [o for o in m.get("overrides", []) if "=" in o],
        "tenant_start": m.get("tenant_start"),
        "started_ns": m["started_ns"],
        "ended_ns": m["ended_ns"],
        "wall": (m["ended_ns"] - m["started_ns"]) / 1e9,
        "tenants": per,
    }
    if not per or t0 is None or t1 is None:
        return out  # a failed job: its wall time counts, its phases do not
    # Tenants that load one after another (each starts once the one before it is ready: vLLM,
    # launched servers) add up; tenants that load side by side overlap (the slowest counts).
    order = sorted(per, key=lambda p: p["started"])
    sequential = len(order) > 1 and all(b["started"] >= a["ready"] for a, b in zip(order, order[1:], strict=False))
    combine = sum if sequential else max
    out.update(
        sequential=sequential,
        preload=m.get("zygote_preload_s") or 0.0,
        start=(order[0]["started"] - m["started_ns"]) / 1e9,
        **{p: combine(t[p] for t in per) for p in ("import", "load", "warmup")},
        lead=(t0 - max(t["ready"] for t in per)) / 1e9,
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
        "phase_median_s": {p: statistics.median(j[p] for j in measured) for p in COLUMNS} if measured else {},
        "import_per_tenant_s": [t["import"] for j in measured for t in j["tenants"]],
        "job_wall_median_s": statistics.median(j["wall"] for j in jobs) if jobs else None,
    }


def table(jobs: list[dict[str, Any]], summary: dict[str, Any]) -> str:
    head = "| job | overrides | start method | status | wall s | " + " | ".join(f"{p} s" for p in COLUMNS) + " |"
    lines = [head, "|" + "---|" * (5 + len(COLUMNS))]
    for j in jobs:
        phases = " | ".join(f"{j[p]:.2f}" if p in j else "-" for p in COLUMNS)
        over = " ".join(o for o in j["overrides"] if not o.startswith(("progress=", "hydra.", "tenant_start=")))
        methods = ",".join(sorted({t["start_method"] or "?" for t in j["tenants"]})) or "-"
        lines.append(f"| {j['job']} | {over} | {methods} | {j['status']} | {j['wall']:.1f} | {phases} |")
    s = summary
    lines += [
        "",
        f"sweep wall {s['sweep_wall_s']:.1f} s, Σ window {s['sum_window_s']:.1f} s, "
        f"measured share {s['measured_share']:.3f} ({s['ok']}/{s['jobs']} jobs ok); "
        f"mt-run start to job0 {s['before_first_job_s']:.1f} s, between jobs (median) "
        f"{(s['between_jobs_median_s'] or 0.0):.2f} s, after the last {s['after_last_job_s']:.1f} s",
    ]
    return "\n".join(lines)


def run_sweep(run_args: list[str], sweep_dir: Path) -> dict[str, Any]:
    """One ``mt-run -m`` sweep, timed from launch to exit, and its jobs' phases."""
    cmd = [sys.executable, "-m", "multitenant.cli", "-m", *run_args, f"hydra.sweep.dir={sweep_dir}", "progress=false"]
    print("$ " + " ".join(cmd), file=sys.stderr, flush=True)
    t_start = time.monotonic_ns()
    rc = subprocess.run(cmd, env={**os.environ, "PYTHONUNBUFFERED": "1"}).returncode
    t_end = time.monotonic_ns()
    jobs = [job_phases(p) for p in sorted(sweep_dir.glob("job*"), key=lambda p: int(p.name[3:])) if (p / "manifest.json").is_file()]
    summary = summarize(jobs, t_start, t_end)
    print(table(jobs, summary), flush=True)
    return {"command": cmd, "rc": rc, "summary": summary, "jobs": jobs}


def compare(runs: list[dict[str, Any]]) -> str:
    """Per variant, the median over its rounds: measured share, import per tenant, job wall."""
    lines = ["| variant | rounds | measured share | import s per tenant (median, min-max) | preload s | job wall s (median) |",
             "|---|---:|---:|---:|---:|---:|"]  # fmt: skip
    for variant in dict.fromkeys(r["variant"] for r in runs):
        mine = [r for r in runs if r["variant"] == variant]
        shares = [r["summary"]["measured_share"] for r in mine if r["summary"]["measured_share"] is not None]
        imports = [x for r in mine for x in r["summary"]["import_per_tenant_s"]]
        preloads = [j.get("preload", 0.0) for r in mine for j in r["jobs"] if "window" in j]
        walls = [r["summary"]["job_wall_median_s"] for r in mine if r["summary"]["job_wall_median_s"] is not None]
        imp = f"{statistics.median(imports):.2f} ({min(imports):.2f}-{max(imports):.2f})" if imports else "-"
        lines.append(
            f"| {variant or '(none)'} | {len(mine)} | {statistics.median(shares):.3f} | {imp} | "
            f"{max(preloads) if preloads else 0.0:.2f} | {statistics.median(walls):.1f} |"
        )
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, help="write the figures as JSON here")
    ap.add_argument("--sweep-dir", type=Path, help="default: a new temporary folder (with variants: its parent)")
    ap.add_argument("--variant", action="append", default=[], help="overrides added for one variant (space-separated)")
    ap.add_argument("--rounds", type=int, default=1, help="run every variant this many times, alternated")
    ap.add_argument("mt_run_args", nargs=argparse.REMAINDER, help="-- then mt-run's arguments (without -m)")
    args = ap.parse_args()
    run_args = [a for a in args.mt_run_args if a != "--"]
    if not args.variant and args.rounds == 1:
        sweep_dir = args.sweep_dir or Path(tempfile.mkdtemp(prefix="mt-sweep-cost-")) / "sweep"
        result = run_sweep(run_args, sweep_dir)
        if args.out:
            args.out.write_text(json.dumps(result, indent=2))
        return int(result["rc"])
    root = args.sweep_dir or Path(tempfile.mkdtemp(prefix="mt-sweep-cost-"))
    runs = []
    for rnd in range(args.rounds):
        for k, variant in enumerate(args.variant or [""]):
            result = run_sweep([*run_args, *variant.split()], root / f"r{rnd}_v{k}")
            runs.append({"round": rnd, "variant": variant, **result})
    print("\n" + compare(runs))
    if args.out:
        args.out.write_text(json.dumps({"runs": runs}, indent=2))
    return max(int(r["rc"]) for r in runs)


if __name__ == "__main__":
    sys.exit(main())
