"""``mt-analyze``: experiment folders -> exact metrics, plots, a report and a trace.

Stages, data flowing one way (each module one job; none imports a later stage):

1. Reading: ``discover`` (run folders under a path, runs beside a run, a run's tenants) ->
   ``parse`` (the ``events.jsonl`` parser, with ``tokblock``'s vectorised ``tok`` lines, and the
   ``telemetry.jsonl`` parser) into ``columns`` (``TenantLog``, ``Telemetry``) -> ``load``
   (``RunData``: the typed ``schema.Manifest``, config.resolved.yaml, the columns).
2. Metrics (docs/design.md's definitions, names in ``names``): ``requests`` (the per-request table and
   the latency sample) -> ``metrics`` (per tenant and per run: windows, throughput, latency
   statistics from ``stats``, SLO attainment; ``window_cut`` says which tenant set the window
   and why) -> ``baselines`` (solo baseline matching by
   baseline identity, NP, slowdowns, STP, ANTT, fairness, Jain) -> ``hardware`` (what the GPU and
   host did over the window, the solos' too, and fingerprint differences). ``--predict``:
   ``predict`` (the split oracle's model, pure) <- ``oracle`` (solo runs -> profiles, the grid,
   the best split by the sweep's rule, predictions beside sweep points) -> ``oracle_report``.
3. Outputs: ``report`` (terminal, summary.md, report.html), ``summary`` (summary.json as
   ``schema.Summary``, requests.csv), ``plots`` (matplotlib, Agg; seaborn for ECDFs, curves and
   heatmaps) and ``trace`` (Chrome/Perfetto trace.json), ``export`` (``--export``: per tenant an
   llm-d Benchmark Report or a ``vllm bench serve`` result) and ``compare`` (``--compare``: such a
   result file, or AIPerf's, beside a tenant's figures). Several runs are grouped (``groups``: by
   sweep folder and experiment); a group of several runs also goes through ``sweep`` (points, estimates over
   trials from ``stats``, the best point under an SLO, rate limits) and ``sweep_cost`` (the
   measured share of wall time) to ``sweep_report`` (sweep.csv, sweep.json, terminal, report
   section) and ``sweep_plots``.

``cli`` wires them together. Nothing here imports torch or vLLM: analysis runs on a laptop long
after the GPU is gone; this package module imports nothing, so ``import multitenant.analysis``
stays cheap.
"""
