"""One graphs tenant alone on the GPU: without MPS, then under MPS at 100 %, 50 % and 25 %.

Each configuration is a fresh tenant process (``--child``) running the same engine (default:
graphs, synthetic Llama-3.2-1B, bf16, batch 8, 512 in / 128 out) on the same batches. Without
MPS it gets the time-slice environment the harness gives a ``timeslice`` tenant; under MPS one
private control daemon (``multitenant.run.mps.start_daemon``: its own pipe and log directory) serves
every configuration, each child with its ``CUDA_MPS_ACTIVE_THREAD_PERCENTAGE``; the daemon is
stopped at the end in every case (also on SIGTERM). After a child is warm the parent checks that
it is a client of the daemon's server (``verify_clients``) before letting it measure.

Figures per configuration: tokens/s, decode ms/step (median gap between steps), TTFT, the SMs
the child sees, and tokens/s relative to no MPS: the cost of MPS itself at 100 %, and the
single-tenant scaling curve at 50 % and 25 %.

    python benchmarks/mps_overhead.py --out /tmp/mps.json
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from engine_args import add_engine_args, engine_from_args


def child(args: argparse.Namespace) -> int:
    """A tenant: load + warm up, report READY, wait for 'go', measure, report RESULT."""
    engine = engine_from_args(args)
    t0 = time.monotonic()
    engine.load()
    load_s = time.monotonic() - t0
    t1 = time.monotonic()
    engine.warmup()
    warmup_s = time.monotonic() - t1
    info = engine.device_info()
    print("READY " + json.dumps({"pid": os.getpid(), **info, "load_s": load_s, "warmup_s": warmup_s}), flush=True)
    if sys.stdin.readline().strip() != "go":
        return 1
    rng = random.Random(0)
    batches = [
        [[rng.randrange(engine.vocab_size) for _ in range(args.input_len)] for _ in range(args.batch)]
        for _ in range(args.batches + 1)
    ]
    gaps: list[int] = []
    ttft: list[int] = []
    tokens = 0
    busy = 0
    for k, prompts in enumerate(batches):
        t_sent = time.monotonic_ns()
        engine.start_batch(prompts, [args.output_len] * len(prompts))
        times = []
        n = 0
        while idx := engine.step():
            times.append(time.monotonic_ns())
            n += len(idx)
        if k == 0:
            continue  # warm-up batch
        tokens += n
        busy += times[-1] - t_sent
        ttft.append(times[0] - t_sent)
        gaps.extend(b - a for a, b in zip(times, times[1:], strict=False))
    out = {
        "tokens": tokens,
        "tok_s": tokens / (busy / 1e9),
        "step_ms": statistics.median(gaps) / 1e6,
        "step_ms_mean": statistics.fmean(gaps) / 1e6,
        "ttft_ms": statistics.median(ttft) / 1e6,
    }
    print("RESULT " + json.dumps(out), flush=True)
    return 0


def run_child(args: argparse.Namespace, label: str, env: dict[str, str], daemon: Any = None) -> dict[str, Any]:
    from multitenant.run.mps import control as mps_control

    cmd = [sys.executable, __file__, "--child"] + [
        f"--{k.replace('_', '-')}={v}"
        for k, v in vars(args).items()
        if k in ("model", "dtype", "device", "execution", "graph_impl", "batch", "input_len", "output_len", "batches")
    ]
    row: dict[str, Any] = {"config": label, "env": {k: v for k, v in env.items() if k.startswith("CUDA_")}}
    p = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + args.child_timeout_s
    try:
        assert p.stdout is not None and p.stdin is not None
        for line in p.stdout:
            if line.startswith("READY "):
                row["ready"] = json.loads(line[6:])
                if daemon is not None:
                    row["mps_attached"] = mps_control.verify_clients(daemon, {label: p.pid})[label]
                    row["mps_clients"] = mps_control.all_client_pids(daemon)
                p.stdin.write("go\n")
                p.stdin.flush()
            elif line.startswith("RESULT "):
                row.update(json.loads(line[7:]))
            else:
                print(f"[{label}] {line.rstrip()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{label}: child still running after {args.child_timeout_s} s")
        p.wait(timeout=max(1.0, deadline - time.monotonic()))
        row["exit_code"] = p.returncode
    except Exception as e:
        row["error"] = f"{type(e).__name__}: {e}"
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    print(f"{label:10s} " + (f"{row['tok_s']:9.1f} tok/s  step {row['step_ms']:.3f} ms  sms {row['ready'].get('sms')}  "
                              f"attached {row.get('mps_attached')}" if "tok_s" in row else f"failed: {row.get('error')} exit {row.get('exit_code')}"), flush=True)  # fmt: skip
    return row


def _interrupt(signum: int, frame: object) -> None:
    # Once: a second SIGTERM (timeout signals the group) must not abort the cleanup itself.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    add_engine_args(ap)
    ap.add_argument("--batches", type=int, default=5, help="measured batches per configuration")
    ap.add_argument("--pcts", default="100,50,25")
    ap.add_argument("--pipe-dir", default=None, help="MPS pipe directory (default: a fresh one under /tmp)")
    ap.add_argument("--child-timeout-s", type=float, default=300.0)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if args.child:
        return child(args)

    from multitenant.config.schema import ShareConfig
    from multitenant.run.mps import control as mps_control
    from multitenant.run.mps import daemon as mps_daemon
    from multitenant.run.mps import env as mps_env
    from multitenant.run.mps import logs as mps_logs

    # SIGTERM (e.g. from `timeout`) must still run the finally that stops the daemon.
    signal.signal(signal.SIGTERM, _interrupt)
    result: dict[str, Any] = {"date": time.strftime("%Y-%m-%d"), "argv": sys.argv, "config": vars(args), "rows": []}

    def save() -> None:
        if args.out:
            Path(args.out).write_text(json.dumps(result, indent=1))

    base = mps_env.child_env(os.environ, mps_env.tenant_env(ShareConfig(), 0, None, None))
    result["rows"].append(run_child(args, "no_mps", base))
    save()
    if mps_control.control_binary() is None:
        result["mps_error"] = "nvidia-cuda-mps-control not found"
    else:
        pipe = Path(args.pipe_dir or tempfile.mkdtemp(prefix="mtb-mps-", dir="/tmp"))
        log = Path(tempfile.mkdtemp(prefix="mtb-mpslog-", dir="/tmp"))
        daemon = None
        try:
            daemon = mps_daemon.start_daemon(pipe, log, 0)
            result["daemon"] = {"pipe_dir": str(pipe), "log_dir": str(log), "control_pid": daemon.control_pid}
            for pct in [int(x) for x in args.pcts.split(",")]:
                env = mps_env.child_env(os.environ, mps_env.tenant_env(ShareConfig(active_thread_pct=pct), 0, daemon.pipe_dir, daemon.log_dir))
                result["rows"].append(run_child(args, f"mps_{pct}", env, daemon))
                save()
        except Exception as e:
            result["mps_error"] = f"{type(e).__name__}: {e}"
        finally:
            if daemon is not None:
                stop = mps_daemon.stop_daemon(daemon)
                result["daemon_stop"] = {"clean": stop.clean, "actions": stop.actions, "left_pids": stop.left_pids}
                result["server_log_errors"] = mps_logs.read_server_log_errors(log)
    ref = next((r["tok_s"] for r in result["rows"] if r["config"] == "no_mps" and "tok_s" in r), None)
    print("\n## one graphs tenant alone: without MPS and under MPS")
    print("| config | SMs seen | tok/s | ms/step | TTFT ms | ratio to no MPS | attached |")
    print("|---|---:|---:|---:|---:|---:|---|")
    for r in result["rows"]:
        if "tok_s" not in r:
            print(f"| {r['config']} | failed: {r.get('error')} |")
            continue
        r["ratio_to_no_mps"] = r["tok_s"] / ref if ref else None
        print(
            f"| {r['config']} | {r['ready'].get('sms')} | {r['tok_s']:.1f} | {r['step_ms']:.3f} | {r['ttft_ms']:.1f} "
            f"| {r['ratio_to_no_mps']:.3f} | {r.get('mps_attached', '-')} |"
        )
    if "mps_error" in result:
        print(f"MPS: {result['mps_error']}")
    save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
