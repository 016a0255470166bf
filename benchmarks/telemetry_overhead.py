"""What the telemetry sampler costs: its own CPU per sample, and (on a GPU) a busy tenant's speed.

CPU part (any machine): ``TelemetrySampler.sample()`` called back to back with N stand-in tenant
processes (sleeping Python processes), timed with the thread's CPU clock; then the threaded
sampler at 100 ms and 10 ms for a few seconds: CPU per sample, share of one core, late samples.

GPU part (when torch sees a GPU): one tenant process runs a fixed GPU loop through phases of
equal length -- sampler off, on at 100 ms, on at 10 ms, repeated -- and reports iterations/s per
phase. Phases are scheduled on the shared CLOCK_MONOTONIC (the tenant gets the start time in
its argv), so the sampler in this process switches exactly at the tenant's phase boundaries.
Two workloads: ``launch`` (many tiny kernels: CPU-launch-bound, the case most exposed to a
sampler competing for the CPU or the driver) and ``matmul`` (4096^2 bf16 products: GPU-bound).

    python benchmarks/telemetry_overhead.py [--out benchmarks/telemetry_overhead.json] [--phase-s 2]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from multitenant.telemetry import TelemetrySampler, gpu_info

TENANT = r"""
import json, sys, time, torch
mode, t0, phase_ns, n_phases = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
dev = "cuda"
if mode == "matmul":
    a = torch.randn(4096, 4096, device=dev, dtype=torch.bfloat16); b = torch.randn_like(a)
    step = lambda: torch.mm(a, b)
else:
    x = torch.zeros(256, device=dev)
    step = lambda: x.add_(1.0)
for _ in range(50):
    step()
torch.cuda.synchronize()
out = []
for k in range(n_phases):
    start, end = t0 + k * phase_ns, t0 + (k + 1) * phase_ns
    while time.monotonic_ns() < start:
        pass
    n = 0
    while True:
        for _ in range(20):
            step()
        torch.cuda.synchronize()  # the clock is read only after the GPU work is done
        n += 20
        now = time.monotonic_ns()
        if now >= end:
            break
    out.append({"phase": k, "iters_per_s": n / ((now - start) / 1e9)})
print(json.dumps(out), flush=True)
"""


def cpu_part(n_tenants: int, n_direct: int, run_s: float) -> dict:
    sleepers = [subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"]) for _ in range(n_tenants)]
    pids = {f"t{i}": p.pid for i, p in enumerate(sleepers)}
    result: dict = {"tenants": n_tenants}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            s = TelemetrySampler(Path(tmp) / "direct.jsonl", None, 100, lambda: pids)
            s.sample()  # prime psutil
            c0, w0 = time.thread_time_ns(), time.perf_counter_ns()
            for _ in range(n_direct):
                s.sample()
            result["direct_cpu_us_per_sample"] = (time.thread_time_ns() - c0) / n_direct / 1e3
            result["direct_wall_us_per_sample"] = (time.perf_counter_ns() - w0) / n_direct / 1e3
            for interval_ms in (100, 10):
                s = TelemetrySampler(Path(tmp) / f"t{interval_ms}.jsonl", None, interval_ms, lambda: pids)
                s.start()
                time.sleep(run_s)
                s.stop()
                st = s.stats()
                result[f"thread_{interval_ms}ms"] = {
                    "samples": st["samples"],
                    "late_samples": st["late_samples"],
                    "cpu_us_per_sample": st["cpu_ns_per_sample"] / 1e3,
                    "core_share_pct": 100 * st["cpu_ns_per_sample"] / (interval_ms * 1e6),
                }
    finally:
        for p in sleepers:
            p.kill()
            p.wait()
    return result


def gpu_part(phase_s: float, reps: int, lead_s: float) -> dict | None:
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    plan = ["off", "100ms", "10ms"] * reps
    phase_ns = int(phase_s * 1e9)
    out: dict = {"plan": plan, "phase_s": phase_s, "workloads": {}}
    for mode in ("launch", "matmul"):
        t0 = time.monotonic_ns() + int(lead_s * 1e9)  # time for the tenant to import torch and warm up
        tenant = subprocess.Popen(
            [sys.executable, "-c", TENANT, mode, str(t0), str(phase_ns), str(len(plan))],
            stdout=subprocess.PIPE,
            text=True,
        )
        with tempfile.TemporaryDirectory() as tmp:
            for k, setting in enumerate(plan):
                start = t0 + k * phase_ns
                while time.monotonic_ns() < start:
                    time.sleep(0.001)
                if setting == "off":
                    time.sleep(phase_s * 0.98)
                    continue
                s = TelemetrySampler(
                    Path(tmp) / f"{mode}{k}.jsonl", 0, int(setting[:-2]), lambda pid=tenant.pid: {"tenant": pid}
                )
                s.start()
                time.sleep(max(0.0, (start + phase_ns - time.monotonic_ns()) / 1e9))
                s.stop()
        stdout, _ = tenant.communicate(timeout=120)
        phases = json.loads(stdout.strip().splitlines()[-1])
        by: dict[str, list[float]] = {}
        for ph, setting in zip(phases, plan, strict=True):
            by.setdefault(setting, []).append(ph["iters_per_s"])
        base = sum(by["off"]) / len(by["off"])
        out["workloads"][mode] = {
            setting: {
                "iters_per_s": [round(v, 1) for v in vals],
                "mean_rel_to_off_pct": round(100 * (sum(vals) / len(vals) / base - 1), 2),
            }
            for setting, vals in by.items()
        }
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("benchmarks/telemetry_overhead.json"))
    ap.add_argument("--tenants", type=int, default=4)
    ap.add_argument("--direct", type=int, default=2000, help="back-to-back sample() calls")
    ap.add_argument("--run-s", type=float, default=3.0, help="seconds per threaded run")
    ap.add_argument("--phase-s", type=float, default=2.0)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--lead-s", type=float, default=15.0, help="GPU tenant start-up allowance")
    args = ap.parse_args()

    res = {
        "machine": {"host": platform.node(), "cpu_count": os.cpu_count(), "python": platform.python_version()},
        "date": time.strftime("%Y-%m-%d"),
        "gpu": gpu_info(0),
        "cpu": cpu_part(args.tenants, args.direct, args.run_s),
    }
    res["gpu_tenant"] = gpu_part(args.phase_s, args.reps, args.lead_s)

    c = res["cpu"]
    print(f"sampler CPU cost, {c['tenants']} tenants, no NVML")
    print(f"  sample() back to back     {c['direct_cpu_us_per_sample']:8.1f} us CPU/sample")
    for k in ("thread_100ms", "thread_10ms"):
        t = c[k]
        print(f"  {k:<24}  {t['cpu_us_per_sample']:8.1f} us CPU/sample  {t['core_share_pct']:6.3f} % of a core  "
              f"{t['samples']} samples, {t['late_samples']} late")
    if res["gpu_tenant"]:
        print("busy tenant on the GPU, iterations/s by sampler setting (relative to off)")
        for mode, rows in res["gpu_tenant"]["workloads"].items():
            for setting, r in rows.items():
                print(f"  {mode:<7} {setting:<6} {r['mean_rel_to_off_pct']:+7.2f} %   {r['iters_per_s']}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
