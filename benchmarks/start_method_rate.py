"""Does a forked tenant (``tenant_start=fork``) measure what a fresh one (``spawn``) measures?

Runs one experiment repeatedly, alternating the start methods (spawn, fork, spawn, ...), and
prints every tenant's measured rate: output tokens of its measured phase (``run_end`` counts)
per second of its window. Each run is its own ``mt-run`` (so each fork run starts its own
zygote).

    python benchmarks/start_method_rate.py --rounds 3 -- --config-name multitenant/pair_tiny \\
        tenants.a.workload.duration_s=5 tenants.b.workload.duration_s=5
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

METHODS = ("spawn", "fork")


def rates(run_dir: Path) -> dict[str, Any]:
    """Each tenant's tokens per second of its window, and how it started, from one run."""
    m = json.loads((run_dir / "manifest.json").read_text())
    out: dict[str, Any] = {"status": m["status"], "tenant_start": m.get("tenant_start"), "tenants": {}}
    for name, rec in m["tenants"].items():
        events = [json.loads(x) for x in (run_dir / "tenants" / name / "events.jsonl").read_text().splitlines() if x.strip()]
        window = next(e for e in events if e["ev"] == "window")
        end = next(e for e in reversed(events) if e["ev"] == "run_end")
        seconds = (window["t1"] - window["t0"]) / 1e9
        out["tenants"][name] = {
            "start": rec.get("start"), "import_s": rec.get("import_s"),
            "tok_s": end["counts"]["tokens"] / seconds, "requests": end["counts"]["requests"],
            "torch_threads": (rec.get("engine") or {}).get("torch_threads"),
        }  # fmt: skip
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", type=Path)
    ap.add_argument("mt_run_args", nargs=argparse.REMAINDER, help="-- then mt-run's arguments")
    args = ap.parse_args()
    run_args = [a for a in args.mt_run_args if a != "--"]
    root = Path(tempfile.mkdtemp(prefix="mt-start-rate-"))
    runs = []
    for rnd in range(args.rounds):
        for method in METHODS:
            run_dir = root / f"r{rnd}_{method}"
            cmd = [sys.executable, "-m", "multitenant.cli", *run_args, f"tenant_start={method}", "progress=false",
                   f"hydra.run.dir={run_dir}"]  # fmt: skip
            rc = subprocess.run(cmd, env={**os.environ, "PYTHONUNBUFFERED": "1"}, capture_output=True, text=True).returncode
            r = {"round": rnd, "method": method, "rc": rc, **rates(run_dir)}
            runs.append(r)
            cells = ", ".join(f"{n} {t['tok_s']:.1f} tok/s ({t['start']}, import {t['import_s']:.2f} s)" for n, t in r["tenants"].items())
            print(f"round {rnd} {method}: {r['status']}: {cells}", flush=True)
    print("\n| start method | runs | tok/s per tenant (median) | min-max | import s (median) |\n|---|---:|---:|---:|---:|")
    for method in METHODS:
        ts = [t for r in runs if r["method"] == method for t in r["tenants"].values()]
        tok = [t["tok_s"] for t in ts]
        print(f"| {method} | {sum(r['method'] == method for r in runs)} | {statistics.median(tok):.1f} | "
              f"{min(tok):.1f}-{max(tok):.1f} | {statistics.median(t['import_s'] for t in ts):.2f} |")  # fmt: skip
    if args.out:
        args.out.write_text(json.dumps(runs, indent=2))
    return max(r["rc"] for r in runs)


if __name__ == "__main__":
    sys.exit(main())
