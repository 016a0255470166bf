"""``mt-analyze``: experiment folders -> metrics, tables, plots, a report and (optionally) a trace.

    mt-analyze PATH [PATH ...] [--baseline PATH]... [--out DIR] [--slo ttft=200ms,tpot=50ms,e2e=10s]
               [--slo-target 0.9] [--objective throughput|goodput] [--format png|svg|pdf] [--trace]
               [--predict SOLO [SOLO ...]]
    mt-analyze --predict SOLO [SOLO ...] [--slo ...]     (the predicted split grid, ``oracle``)

PATH is a run folder, a sweep folder, or any folder that contains run folders (found by their
manifest.json). Solo baselines come from ``--baseline`` first, then from the PATHs themselves,
then from runs found beside each run (``find_beside``). Several runs (a sweep, or several sweep
folders, which merge into one sweep) also get the sweep outputs of ``sweep`` and
``sweep_report``. Exit codes: 0 done, 2 bad input (not an experiment, unknown schema,
unparsable SLO or SLO target), 1 an unexpected failure.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from multitenant.analysis import compare, export, hardware, oracle, oracle_report
from multitenant.analysis.baselines import (
    apply_baselines,
    baseline_trials,
    choose_baseline,
    nearest_solo,
    newest_first,
)
from multitenant.analysis.columns import AnalysisError
from multitenant.analysis.discover import find_beside, find_run_dirs
from multitenant.analysis.load import RunData, load_runs, read_head
from multitenant.analysis.metrics import RunMetrics, SloError, compute_run, parse_slo
from multitenant.analysis.names import OBJECTIVES
from multitenant.analysis.sweep import build_sweep, is_sweep, overrides_dict, short_key

PROGRESS_MIN_BYTES = 64 * 1024 * 1024  # show a progress bar when the logs are at least this big
DEFAULT_SLO_TARGET = 0.9


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mt-analyze",
        description="Metrics, plots, a one-page report and a trace from mt-run experiment folders.",
    )
    p.add_argument("paths", nargs="*", metavar="PATH", help="run folder, sweep folder, or a folder of runs")
    # One PATH per --baseline (repeat the flag for more), so `--baseline SOLO RUN` leaves RUN a
    # PATH to analyse; nargs="+" ate RUN, and a second flag replaced the first.
    p.add_argument(
        "--baseline", action="append", default=[], metavar="PATH",
        help="a solo run (or a folder of them) to normalise against; one PATH per --baseline, repeat "
        "the flag for more (--baseline S1 --baseline S2); it may come before or after the PATHs",
    )  # fmt: skip
    p.add_argument("--out", metavar="DIR", help="output folder (default: plots/<run or sweep name>)")
    p.add_argument("--slo", metavar="SPEC", help="SLO bounds, e.g. ttft=200ms,tpot=50ms,e2e=10s")
    p.add_argument(
        "--slo-target", type=float, metavar="Q",
        help=f"sweeps: a point is feasible when every tenant's mean SLO attainment is >= Q (default {DEFAULT_SLO_TARGET})",
    )  # fmt: skip
    p.add_argument(
        "--objective", choices=OBJECTIVES, default="throughput",
        help="sweeps: rank feasible points by mean aggregate throughput (default) or aggregate goodput",
    )  # fmt: skip
    p.add_argument("--format", choices=("png", "svg", "pdf"), default="png", help="plot file format")
    p.add_argument("--trace", action="store_true", help="also write trace.json (open in ui.perfetto.dev)")
    p.add_argument(
        "--export", action="append", choices=("br", "vllm-bench"), default=[], metavar="FORMAT",
        help="also write each tenant as an llm-d Benchmark Report v0.2.1 (br) or a vllm bench serve result "
        "(vllm-bench), under <out>/<FORMAT>/; repeatable (docs/exports.md)",
    )  # fmt: skip
    p.add_argument("--compare", metavar="FILE", help="a vllm bench serve or AIPerf result, printed beside ours")
    p.add_argument(
        "--predict", action="extend", nargs="+", metavar="SOLO", default=[],
        help="predict every split from solo runs at >= 3 MPS shares (docs/prediction.md); alone: the grid "
        "and best split; with a sweep: predicted vs measured; put it after the PATHs",
    )  # fmt: skip
    p.add_argument("--compare-tenant", metavar="NAME", help="the tenant --compare is about (default: the only one)")
    return p


def default_out(paths: list[Path]) -> Path:
    """plots/<experiment>/<run or sweep folder>, mirroring experiments/<name>/<time>/ (run folder
    names are timestamps, which alone say nothing); several PATHs: their common folder instead."""
    resolved = [p.resolve() for p in paths]
    if len(resolved) == 1:
        target = resolved[0]
    else:
        common = Path(os.path.commonpath([str(p) for p in resolved]))
        target = common if common.name and common not in resolved else resolved[0]
    # A run or a sweep sits in its experiment's folder (keep both names); any other folder (a
    # folder of experiments, say) stands for itself: its parent is not part of what it holds.
    is_run_or_sweep = (target / "manifest.json").exists() or (target / "multirun.yaml").exists()
    names = (target.parent.name, target.name) if is_run_or_sweep or not target.exists() else (target.name,)
    parts = [part for part in names if part]
    return Path("plots", *parts) if parts else Path("plots") / "analysis"


def run_labels(run_overrides: dict[Path, list[str]], root: Path | None = None) -> dict[Path, str]:
    """Short unique names, also used as folder names: the path below the runs' common folder
    ('/' -> '__'), followed by the command-line overrides (manifest ``overrides``, given per run
    folder) that differ between the runs, so sweep jobs read ``job1__split=50-50`` rather than
    ``job1`` ('/' in values -> '-'). ``root``: the folder paths are taken below (runs of several
    groups, ``groups``), instead of these runs' common folder."""
    run_dirs = list(run_overrides)
    if len(run_dirs) == 1 and root is None:
        return {run_dirs[0]: run_dirs[0].resolve().name}
    resolved = [d.resolve() for d in run_dirs]
    common = root or Path(os.path.commonpath([str(d) for d in resolved]))
    overrides = {d: overrides_dict(run_overrides[d]) for d in run_dirs}
    keys = sorted({k for o in overrides.values() for k in o})
    varying = [k for k in keys if len({o.get(k) for o in overrides.values()}) > 1]
    labels = {}
    for d, r in zip(run_dirs, resolved, strict=True):
        parts = list(r.relative_to(common).parts) or [r.name]
        parts += [f"{short_key(k)}={overrides[d][k]}".replace("/", "-") for k in varying if k in overrides[d]]
        labels[d] = "__".join(parts)
    return labels


def analyse(args: argparse.Namespace) -> int:
    from rich.console import Console

    # Piped into a log, an 80-column default would fold the table: use 120 there.
    console = Console(stderr=True, width=None if sys.stderr.isatty() else 120)
    slo = parse_slo(args.slo) if args.slo else None
    target = check_sweep_options(args, slo)
    if not args.paths:
        return oracle_report.predict_only(args.predict, slo, target, args.objective, console)
    run_dirs: list[Path] = []
    for path in args.paths:
        for d in find_run_dirs(path):
            if d.resolve() not in {r.resolve() for r in run_dirs}:
                run_dirs.append(d)
    heads = {d.resolve(): read_head(d) for d in run_dirs}

    # Baseline candidates in order of preference: --baseline, the PATHs, runs found beside.
    candidates: list[RunData] = []
    seen: set[Path] = set()

    def add(head: RunData) -> None:
        key = head.run_dir.resolve()
        if key not in seen:
            seen.add(key)
            candidates.append(head)

    explicit = [heads.get(d.resolve()) or read_head(d) for path in args.baseline for d in find_run_dirs(path)]
    for head in newest_first(explicit) + newest_first(list(heads.values())):
        add(head)
    if any(len(h.tenants) > 1 for h in heads.values()):
        beside: list[RunData] = []
        for d in sorted({b.resolve() for r in run_dirs for b in find_beside(r)}):
            if d in seen:
                continue
            try:
                beside.append(read_head(d))
            except AnalysisError:
                continue  # a damaged neighbour is not this analysis's business
        for head in newest_first(beside):
            add(head)

    choice: dict[Path, dict[str, list[RunData] | None]] = {}
    nearest: dict[Path, dict[str, str | None]] = {}
    needed: dict[Path, Path] = {}
    for key, head in heads.items():
        choice[key], nearest[key] = {}, {}
        if len(head.tenants) < 2:
            continue
        for name in head.tenants:
            solo = choose_baseline(head, name, candidates)
            pool = baseline_trials(solo, head, name, candidates) if solo is not None else None
            choice[key][name] = pool
            if solo is None:
                nearest[key][name] = nearest_solo(head, name, candidates)
            for s in pool or []:
                needed[s.run_dir.resolve()] = s.run_dir

    to_load = list(run_dirs) + [d for k, d in needed.items() if k not in heads]
    total = 0
    for d in to_load:
        tenants_dir = d / "tenants"
        if tenants_dir.is_dir():
            total += sum(f.stat().st_size for f in tenants_dir.glob("*/events.jsonl"))
    runs = _load_with_progress(to_load, total, console)
    by_dir = {r.run_dir.resolve(): r for r in runs}
    metrics: dict[Path, RunMetrics] = {}
    for key, run in by_dir.items():
        metrics[key] = compute_run(run, slo if key in heads else None)
    rms = [metrics[d.resolve()] for d in run_dirs]
    for rm in rms:
        key = rm.run.run_dir.resolve()
        solos: dict[str, RunMetrics | list[RunMetrics] | None] = {
            name: ([metrics[s.run_dir.resolve()] for s in pool] if pool is not None else None)
            for name, pool in choice[key].items()
        }
        apply_baselines(rm, solos, nearest[key])
        hardware.attach(rm, solos)
    hardware.compare_points(rms)

    out = Path(args.out) if args.out else default_out([Path(p) for p in args.paths])
    write_outputs(
        rms, out, args.format, args.trace, console, target=target, objective=args.objective,
        paths=[Path(p) for p in args.paths], predicted=oracle.for_runs(args.predict, rms, slo, target, args.objective),
    )  # fmt: skip
    if args.export:
        labels = run_labels({rm.run.run_dir: list(rm.run.manifest.overrides or []) for rm in rms})
        export.write_exports(rms, labels, out, args.export)
    if args.compare:
        compare.print_compare(rms, args.compare, args.compare_tenant)
    return 0


def check_sweep_options(args: argparse.Namespace, slo: dict[str, float] | None) -> float:
    """The SLO target (a fraction in (0, 1]); SloError (exit 2) for a bad one or a sweep option
    that needs ``--slo`` without it."""
    if args.slo_target is not None:
        q = args.slo_target
        if not 0 < q <= 1:
            hint = f"; write {q:g} % as {q / 100:g}" if 1 < q <= 100 else ""
            raise SloError(f"--slo-target {q:g} is not a fraction in (0, 1]{hint}, e.g. --slo-target 0.9")
        if slo is None:
            raise SloError("--slo-target needs --slo (the bounds it is a target for), e.g. --slo ttft=200ms")
    if args.objective == "goodput" and slo is None:
        raise SloError("--objective goodput needs --slo (goodput counts requests that meet it), e.g. --slo ttft=200ms")
    return DEFAULT_SLO_TARGET if args.slo_target is None else float(args.slo_target)


def _load_with_progress(run_dirs: list[Path], total: int, console: object) -> list[RunData]:
    if total < PROGRESS_MIN_BYTES:
        return load_runs(run_dirs)
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeElapsedColumn

    # auto_refresh=False: no refresh thread, so the parse workers can be forked safely.
    with Progress(
        TextColumn("reading event logs"), BarColumn(), DownloadColumn(), TimeElapsedColumn(),
        console=console, auto_refresh=False, transient=True,  # type: ignore[arg-type]
    ) as progress:  # fmt: skip
        task = progress.add_task("read", total=total)

        def advance(n_bytes: int) -> None:
            progress.advance(task, n_bytes)
            progress.refresh()

        progress.refresh()
        return load_runs(run_dirs, progress=advance)


def write_outputs(
    rms: list[RunMetrics],
    out: Path,
    fmt: str,
    trace: bool,
    console: object,
    target: float = DEFAULT_SLO_TARGET,
    objective: str = "throughput",
    paths: list[Path] | None = None,
    predicted: oracle.Oracle | None = None,
) -> dict[str, Path]:
    """Every output file; returns them by name. Several runs (``sweep.is_sweep``) also get
    sweep.csv, sweep.json, the sweep plots and sections, and the best point as the last lines.
    With ``paths`` (the PATHs given) runs are grouped first (``groups``): each group of several
    runs is its own sweep; with more than one group, each sweep's files go to its own
    ``sweep__<group>`` sub-folder. ``predicted`` (``--predict``): predictions beside each sweep's
    points, printed against them."""
    from multitenant.analysis import plots, report, summary, sweep_plots, sweep_report
    from multitenant.analysis.groups import common_folder, group_name, group_runs
    from multitenant.analysis.trace import write_trace

    out.mkdir(parents=True, exist_ok=True)
    groups = group_runs(rms, paths) if paths is not None else [list(rms)]
    root = common_folder(rms) if len(groups) > 1 else None
    # The manifests are already loaded: take the overrides from there, not from disk again.
    # Labels per group, so unrelated runs do not list each other's overrides.
    labels_by_dir: dict[Path, str] = {}
    for group in groups:
        labels_by_dir.update(run_labels({rm.run.run_dir: list(rm.run.manifest.overrides or []) for rm in group}, root))
    labels = {id(rm): labels_by_dir[rm.run.run_dir] for rm in rms}
    colors = plots.tenant_colors(name for rm in rms for name in rm.tenants)
    written: dict[str, Path] = {
        "summary.json": summary.write_summary_json(rms, out / "summary.json"),
        "requests.csv": summary.write_requests_csv(rms, out / "requests.csv"),
    }
    # (sweep, its output folder, its section title); one group: the sweep of all runs, as before.
    sweeps = [
        (build_sweep(g, labels_by_dir, target, objective), out, "Sweep")
        if root is None
        else (build_sweep(g, labels_by_dir, target, objective), out / f"sweep__{group_name(g, root)}",
              f"Sweep {group_name(g, root)}")
        for g in groups
        if is_sweep(g)
    ]  # fmt: skip
    sweep = sweeps[0][0] if sweeps else None
    md_text = report.markdown(rms, labels)
    sweep_md = ""
    for sw, sw_out, sw_title in sweeps:
        if predicted is not None:
            oracle.attach(sw, predicted)
        sw_out.mkdir(parents=True, exist_ok=True)
        prefix = "" if sw_out == out else f"{sw_out.name}/"
        written[f"{prefix}sweep.csv"] = sweep_report.write_sweep_csv(sw, sw_out / "sweep.csv")
        written[f"{prefix}sweep.json"] = sweep_report.write_sweep_json(sw, sw_out / "sweep.json")
        sweep_md += sweep_report.markdown(sw, sw_title)
    if sweep_md:
        title, _, rest = md_text.partition("\n")
        md_text = f"{title}\n\n{sweep_md}{rest}"
    md = out / "summary.md"
    md.write_text(md_text, encoding="utf-8")
    written["summary.md"] = md
    report.print_terminal(rms, labels, console)
    run_plots: dict[int, list[plots.Plot]] = {}
    for rm in rms:
        run_out = out if len(rms) == 1 else out / labels[id(rm)]
        run_plots[id(rm)] = plots.plot_run(rm, run_out, fmt, colors)
        if trace:
            written[f"trace:{labels[id(rm)]}"] = write_trace(rm, run_out / "trace.json")
    across = plots.plot_across(rms, labels, out, fmt, colors)
    sweep_html = ""
    for sw, sw_out, sw_title in sweeps:
        figures = sweep_plots.plot_sweep(sw, sw_out, fmt, colors)
        prefix = "" if sw_out == out else f"{sw_out.name}/"
        written.update({f"plot:{prefix}{p.name}": p.path for p in figures})
        sweep_html += sweep_report.html_section(sw, figures, sw_title)
        if len(sweeps) > 1:
            console.print(sw_title, style="bold", markup=False, highlight=False)  # type: ignore[attr-defined]
        sweep_report.print_sweep(sw, console)
    written["report.html"] = report.write_html(
        rms, labels, run_plots, across, colors, out / "report.html", sweep_html=sweep_html
    )
    files = "report.html, summary.json, summary.md, requests.csv" + (", sweep.csv, sweep.json" if sweep else "")
    print(f"mt-analyze: {len(rms)} run(s) -> {out}/ ({files})", file=sys.stderr)
    if predicted is not None:
        oracle_report.print_grid(predicted, console)
    for sw, _, sw_title in sweeps:
        if len(sweeps) > 1:
            print(sw_title, file=sys.stderr)
        if predicted is not None:
            oracle_report.print_versus(sw, console)
        sweep_report.print_best(sw, console)  # the answer comes last
    return written


def main(argv: list[str] | None = None) -> int:
    # Intermixed: PATHs may come before, between and after the options (`--baseline S RUN`).
    parser = build_parser()
    args = parser.parse_intermixed_args(argv)
    if not args.paths and not args.predict:
        parser.error("give a PATH to analyse, or --predict SOLO... to predict from solo runs")
    try:
        return analyse(args)
    except (AnalysisError, SloError) as e:
        print(f"mt-analyze: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
