"""Print a markdown table of the runs under a folder: status, shares, SMs, attachment, tok/s.

    python scripts/validation_table.py experiments/pair_llama1b

A quick look for validation logs on the GPU machine (no pandas, no plots): tokens per second
of each tenant inside its own measured phase = tokens with t in [window.t0, window.t1]
/ (t1 - t0), where t1 is the tenant's planned end (or its last token when it stops on a count).
For the exact metrics, NP, STP and plots use ``mt-analyze``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import orjson


def tenant_rate(events_path: Path) -> tuple[float | None, int]:
    t0 = t1 = None
    toks: list[tuple[int, int]] = []
    with open(events_path, "rb") as f:
        for line in f:
            if not line.endswith(b"\n"):
                break
            e = orjson.loads(line)
            if e["ev"] == "window":
                t0, t1 = e["t0"], e["t1"]
            elif e["ev"] == "tok" and t0 is not None:
                toks.append((e["t"], sum(e["n"])))
    if t0 is None or not toks:
        return None, 0
    end = t1 if t1 is not None else toks[-1][0]
    n = sum(k for t, k in toks if t0 <= t <= end)
    return (n / ((end - t0) / 1e9) if end > t0 else None), n


def main() -> None:
    root = Path(sys.argv[1])
    print("| run | mode | status | tenant | share % | SMs seen | MPS attached | tokens in window | tok/s | reason |")
    print("|---|---|---|---|---:|---:|---|---:|---:|---|")
    for mpath in sorted(root.rglob("manifest.json")):
        run = mpath.parent
        m = json.loads(mpath.read_text())
        for name, t in m["tenants"].items():
            ev = run / "tenants" / name / "events.jsonl"
            rate, n = tenant_rate(ev) if ev.exists() else (None, 0)
            pct = t["share"].get("active_thread_pct") if t["share_applied"] else "-"
            reason = (m.get("reason") or "")[:90].replace("|", "/")
            print(
                f"| {run.relative_to(root)} | {m['mode']} | {m['status']} | {name} | {pct or 100} | "
                f"{t['effective_sms']} | {t['mps_attached']} | {n} | {'' if rate is None else f'{rate:.0f}'} | {reason} |"
            )


if __name__ == "__main__":
    main()
