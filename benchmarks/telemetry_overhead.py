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
Each sampler phase is compared with the "off" phase just before it. With NVML it also times
each source of a sample (utilization, memory, power, clocks, temperature, process list).

    python benchmarks/telemetry_overhead.py [--out benchmarks/telemetry_overhead.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from multitenant.run.host import gpu_info
from multitenant.run.telemetry import TelemetrySampler
from multitenant.schema import to_dict

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


def source_costs(n_calls: int) -> dict | None:
    """CPU and wall time of each NVML source of a sample, on GPU 0 (None without NVML)."""
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        with tempfile.TemporaryDirectory() as tmp:
            s = TelemetrySampler(Path(tmp) / "x.jsonl", 0, 100, lambda: {"t": sleeper.pid})
            s._open_nvml()
            if s._nvml is None:
                return None
            out: dict = {}
            calls = dict(s._gpu_fields)
            calls["process_memory"] = lambda: s._gpu_mem({"t": sleeper.pid})
            calls["tenant_cpu_pct"] = lambda: s._cpu_pct({"t": sleeper.pid})
            for name, fn in calls.items():
                fn()
                c0, w0 = time.thread_time_ns(), time.perf_counter_ns()
                for _ in range(n_calls):
                    fn()
                out[name] = {
                    "cpu_us": round((time.thread_time_ns() - c0) / n_calls / 1e3, 1),
                    "wall_us": round((time.perf_counter_ns() - w0) / n_calls / 1e3, 1),
                }
            s._proc_mem_ns = 0
            c0 = time.thread_time_ns()
            for _ in range(n_calls):
                s.sample()
            out["sample_total_process_memory_cached"] = {"cpu_us": round((time.thread_time_ns() - c0) / n_calls / 1e3, 1)}
            s.stop()
            return out
    finally:
        sleeper.kill()
        sleeper.wait()


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
        phases = [p["iters_per_s"] for p in json.loads(stdout.strip().splitlines()[-1])]
        # Each sampler phase is compared with the "off" phase of its own repetition (the one just
        # before it), so slow drifts (clocks, temperature) cancel out.
        rel: dict[str, list[float]] = {"100ms": [], "10ms": []}
        for r in range(reps):
            off = phases[3 * r]
            rel["100ms"].append(100 * (phases[3 * r + 1] / off - 1))
            rel["10ms"].append(100 * (phases[3 * r + 2] / off - 1))
        off_all = phases[0::3]
        out["workloads"][mode] = {
            "off_iters_per_s_median": round(statistics.median(off_all), 1),
            "off_phase_spread_pct": round(100 * (max(off_all) - min(off_all)) / statistics.median(off_all), 2),
            **{
                f"{k}_rel_pct": {
                    "median": round(statistics.median(v), 2),
                    "min": round(min(v), 2),
                    "max": round(max(v), 2),
                }
                for k, v in rel.items()
            },
        }
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("benchmarks/telemetry_overhead.json"))
    ap.add_argument("--tenants", type=int, default=4)
    ap.add_argument("--direct", type=int, default=2000, help="back-to-back sample() calls")
    ap.add_argument("--run-s", type=float, default=3.0, help="seconds per threaded run")
    ap.add_argument("--phase-s", type=float, default=1.0)
    ap.add_argument("--reps", type=int, default=8)
    ap.add_argument("--lead-s", type=float, default=15.0, help="GPU tenant start-up allowance")
    args = ap.parse_args()

    res = {
        "machine": {"host": platform.node(), "cpu_count": os.cpu_count(), "python": platform.python_version()},
        "date": time.strftime("%Y-%m-%d"),
        "gpu": None if (info := gpu_info(0)) is None else to_dict(info),
        "cpu": cpu_part(args.tenants, args.direct, args.run_s),
    }
    res["nvml_sources"] = source_costs(200)
    res["gpu_tenant"] = gpu_part(args.phase_s, args.reps, args.lead_s)

    c = res["cpu"]
    print(f"sampler CPU cost, {c['tenants']} tenants, no NVML")
    print(f"  sample() back to back     {c['direct_cpu_us_per_sample']:8.1f} us CPU/sample")
    for k in ("thread_100ms", "thread_10ms"):
        t = c[k]
        print(f"  {k:<24}  {t['cpu_us_per_sample']:8.1f} us CPU/sample  {t['core_share_pct']:6.3f} % of a core  "
              f"{t['samples']} samples, {t['late_samples']} late")
    if res["nvml_sources"]:
        print("cost of each source of a GPU sample (us per call)")
        for name, v in res["nvml_sources"].items():
            print(f"  {name:<36} {v['cpu_us']:8.1f} CPU" + (f" {v['wall_us']:8.1f} wall" if "wall_us" in v else ""))
    if res["gpu_tenant"]:
        g = res["gpu_tenant"]
        print(f"busy tenant on the GPU: iterations/s with the sampler on vs off ({len(g['plan']) // 3} reps "
              f"of {g['phase_s']} s phases; median [min, max] of per-rep change)")
        for mode, w in g["workloads"].items():
            print(f"  {mode:<7} off {w['off_iters_per_s_median']:>10} it/s (off phases spread {w['off_phase_spread_pct']} %)")
            for k in ("100ms", "10ms"):
                r = w[f"{k}_rel_pct"]
                print(f"  {mode:<7} {k:<6} {r['median']:+6.2f} %  [{r['min']:+.2f}, {r['max']:+.2f}]")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
