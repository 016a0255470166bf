"""Analysis must run where torch is not installed: importing it (and running it) never loads torch."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

HAND = Path(__file__).resolve().parents[2] / "data" / "analysis" / "hand"

PROBE = """
import sys
import multitenant.analysis
from multitenant.analysis import (
    baselines, cli, columns, compare, discover, export, load, metrics, names, parse, plots, report, requests,
    stats, summary, sweep, sweep_cost, sweep_plots, sweep_report, tokblock, trace,
)
from multitenant.analysis.load import load_run
from multitenant.analysis.metrics import compute_run
rm = compute_run(load_run(sys.argv[1]))
assert rm.tenants
for name in rm.tenants:
    export.benchmark_report(rm, name, "pair")
    export.vllm_bench_result(rm, name)
heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers', 'vllm'))
print(','.join(heavy) or 'clean')
"""


def test_analysis_never_imports_torch() -> None:
    out = subprocess.run(
        [sys.executable, "-c", PROBE, str(HAND / "pair")], capture_output=True, text=True, timeout=120, check=True
    )
    assert out.stdout.strip() == "clean", out.stdout
