"""Check the ``openai`` backend against a real vLLM server on this machine (CPU or GPU).

Launches ``vllm.entrypoints.openai.api_server`` for a synthetic model through the engine
(``openai.launch``), then drives it three ways and prints what it saw:

1. with ``return_token_ids`` (exact counts per chunk): every request must get n_out tokens,
   usage must agree, no warning;
2. through a second engine at ``openai.url`` on the same server, without token ids (the
   count falls back to one per chunk and is reconciled with the final usage);
3. a prompt longer than ``--max-model-len``: an error completion, then a request that works.

Exits 1 if (1) or (3) does not hold, or if a server process is left after close. Startup
takes 25-60 s on a CPU::

    VLLM_CPU_KVCACHE_SPACE=1 python scripts/openai_vllm_check.py [--device cuda:0] [--concurrency 8]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import psutil

from multitenant.backends.base import Completion, Emission, EngineContext
from multitenant.backends.openai import OpenAIOptions
from multitenant.backends.openai.engine import OpenAIEngine, build
from multitenant.config.schema import TenantConfig
from multitenant.workload import RequestSpec

LAUNCH = (
    "{python} -m vllm.entrypoints.openai.api_server --model {model} --host {host} --port {port} "
    "--skip-tokenizer-init --load-format dummy --dtype float32 --max-model-len 256 --max-num-seqs 8 "
    "--enforce-eager --seed 0 --disable-uvicorn-access-log"
)


def drive(engine: OpenAIEngine, requests: list[RequestSpec], timeout_s: float = 120.0) -> dict[int, dict[str, Any]]:
    """Submit, poll until all completed; per request: chunk sizes, completion."""
    out: dict[int, dict[str, Any]] = {r.rid: {"chunks": [], "done": None} for r in requests}
    for r in requests:
        engine.submit(r)
    end = time.monotonic() + timeout_s
    prev_now = 0
    left = len(requests)
    while left and time.monotonic() < end:
        p = engine.poll(0.01)
        assert all(prev_now < ev.t_ns <= p.now_ns for ev in p.events), "Progress ordering violated"
        prev_now = p.now_ns
        for ev in p.events:
            if isinstance(ev, Emission):
                out[ev.rids[0]]["chunks"].append(ev.counts[0])
            elif isinstance(ev, Completion):
                out[ev.rid]["done"] = ev
                left -= 1
    return out


def summarize(label: str, res: dict[int, dict[str, Any]], n_out: int) -> bool:
    """Print one line per outcome kind; True when every request got n_out tokens with no warning."""
    sizes = Counter(n for r in res.values() for n in r["chunks"])
    totals = Counter(sum(r["chunks"]) for r in res.values())
    warnings = Counter((r["done"].fields or {}).get("warning") for r in res.values() if r["done"] is not None)
    statuses = Counter(r["done"].status if r["done"] is not None else "missing" for r in res.values())
    print(f"[{label}] statuses {dict(statuses)}; tokens per request {dict(totals)} (target {n_out}); "
          f"chunk sizes {dict(sizes)}; warnings {dict(warnings)}")
    return statuses == Counter(ok=len(res)) and totals == Counter({n_out: len(res)}) and warnings == Counter({None: len(res)})


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu", help="engine_device recorded (cpu or cuda:0)")
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--n-out", type=int, default=32)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="openai_vllm_check."))
    rng = np.random.default_rng(0)

    def requests(base: int, n_in: int = 24) -> list[RequestSpec]:
        return [RequestSpec(base + i, rng.integers(3, 1000, n_in, dtype=np.int64), args.n_out) for i in range(args.concurrency)]

    def engine(options: OpenAIOptions, folder: Path) -> OpenAIEngine:
        tenant = TenantConfig(backend="openai", model="synthetic:tiny-llama", dtype="float32")
        return build(EngineContext("check", tenant, options, args.device, folder, max_input_len=300, max_output_len=args.n_out))

    launched = engine(OpenAIOptions(launch=LAUNCH, extra_body={"return_token_ids": True}, health_timeout_s=300), tmp)
    ok = True
    t = time.monotonic()
    try:
        launched.load()
        print(f"server up in {time.monotonic() - t:.1f} s: {launched.engine_info()}")
        ok &= summarize("return_token_ids", drive(launched, requests(0)), args.n_out)

        plain = engine(OpenAIOptions(url=launched.base_url + "/v1", health_timeout_s=10), tmp / "url")
        plain.load()
        try:
            summarize("no token ids (url)", drive(plain, requests(100)), args.n_out)
        finally:
            plain.close()

        too_long = RequestSpec(200, rng.integers(3, 1000, 300, dtype=np.int64), args.n_out)
        res = drive(launched, [too_long, *requests(300)[:1]])
        bad, good = res[200]["done"], res[300]["done"]
        print(f"[too long] status {bad.status}: {bad.error}")
        print(f"[after it] status {good.status}, {sum(res[300]['chunks'])} tokens")
        ok &= bad.status == "error" and bad.error.startswith("HTTP 400") and good.status == "ok"
    finally:
        pid = launched.engine_info()["server_pid"]
        tree = []
        if pid is not None and psutil.pid_exists(pid):
            server = psutil.Process(pid)
            tree = [server, *server.children(recursive=True)]
        t = time.monotonic()
        launched.close()
        print(f"close took {time.monotonic() - t:.1f} s")
        left = [f"{p.pid} {p.name()}" for p in tree if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
        print(f"closed: server pid {pid} and {len(tree) - 1} descendants; still running: {left}; logs in {tmp}")
        ok &= not left
    print("OK" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
