"""``mt-analyze``: experiment folders -> exact metrics, plots, a report and a trace.

Stages, one module each, data flowing one way:
``load`` (folders -> columns) -> ``metrics`` (DESIGN.md's definitions) ->
``report`` (summary.json, requests.csv, summary.md, terminal, report.html), ``plots``
(matplotlib, Agg) and ``trace`` (Chrome/Perfetto trace.json); several runs also go through
``sweep`` (points, means and confidence intervals over trials, the best point under an SLO) to
``sweep_report`` (sweep.csv, sweep.json, terminal, report section) and ``sweep_plots``;
``cli`` wires them together.

Nothing here imports torch: analysis runs on a laptop long after the GPU is gone.
"""

from multitenant.analysis.load import AnalysisError, RunData, TenantLog, find_run_dirs, load_run, load_runs
from multitenant.analysis.metrics import RunMetrics, TenantMetrics, apply_baselines, compute_run, parse_slo

__all__ = [
    "AnalysisError",
    "RunData",
    "RunMetrics",
    "TenantLog",
    "TenantMetrics",
    "apply_baselines",
    "compute_run",
    "find_run_dirs",
    "load_run",
    "load_runs",
    "parse_slo",
]
