"""A sweep's outputs: sweep.csv, sweep.json, the terminal summary (best point last), the
summary.md section and report.html's "Sweep" section. The numbers come from ``sweep`` and
``sweep_cost``."""

from __future__ import annotations

import html
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import orjson

from multitenant.analysis.names import OBJECTIVE_METRIC, RUN_LEVEL
from multitenant.analysis.plots import Plot
from multitenant.analysis.report import Table, _html_table, _img, _md_table, aggregate_label, fmt
from multitenant.analysis.stats import CONFIDENCE, UNINFORMATIVE_BELOW, Estimate
from multitenant.analysis.summary import clean
from multitenant.analysis.sweep import Choice, Point, Sweep, short_key

CI_NOTE = (
    f"± is the half-width of the {int(CONFIDENCE * 100)} % Student-t interval over trials "
    "(mean ± t(0.975, n-1)·s/√n); [low, high] where it is clipped to the metric's possible range "
    "(a proportion to 0–100 %, anything else at 0); a point with one trial has no interval (n=1), "
    "one with two an uninformative one (n=2: t = 12.7)"
)
TERMINAL_CI_NOTE = (
    f"±: half-width of the {int(CONFIDENCE * 100)} % Student-t CI over trials (t(0.975, n-1)·s/√n), "
    "[low,high] where clipped to the possible range; ¹: one trial, no CI; ²: two trials, CI uninformative"
)


# ---------------------------------------------------------------------------------------------
# As data (sweep.json, sweep.csv)


def estimate_dict(e: Estimate) -> dict[str, Any]:
    return {"n": e.n, "mean": e.mean, "std": e.std, "ci_low": e.ci_low, "ci_high": e.ci_high}


def single_trial_note(point: Point) -> str | None:
    """Why a point's intervals say little: none (one trial), or too wide to read (two)."""
    if point.n_trials == 1:
        return "1 trial: no confidence interval"
    if point.n_trials == 0:
        return "no run that counts: no estimates"
    if point.n_trials < UNINFORMATIVE_BELOW:
        return f"{point.n_trials} trials: confidence interval uninformative (t(0.975, 1) = 12.7)"
    return None


def choice_dict(sweep: Sweep, c: Choice | None) -> dict[str, Any] | None:
    if c is None:
        return None
    return {
        "point": dict(zip(sweep.axes, c.point.values, strict=True)),
        "label": c.point.label(sweep.axes),
        "n_trials": c.point.n_trials,
        "feasible": c.feasible,
        "objective": sweep.objective,
        "objective_metric": OBJECTIVE_METRIC[sweep.objective],
        "objective_value": estimate_dict(c.objective),
        "min_attainment": c.min_attainment,
        "worst_tenant": c.worst_tenant,
        "attainment": {t: estimate_dict(c.point.get(t, "slo_attainment")) for t in c.point.tenants},
        "holds_at_ci_low": c.holds_at_ci_low,
    }


def sweep_dict(sweep: Sweep) -> dict[str, Any]:
    """Everything sweep.json holds (see docs/analysis.md, "Sweeps")."""
    points = []
    for p in sweep.points:
        metrics: dict[str, dict[str, Any]] = {}
        for tenant, metric in sweep.rows:
            if tenant == RUN_LEVEL or tenant in p.tenants:
                metrics.setdefault(tenant, {})[metric] = estimate_dict(p.get(tenant, metric))
        points.append(
            {
                "point": dict(zip(sweep.axes, p.values, strict=True)),
                "label": p.label(sweep.axes),
                "n_trials": p.n_trials,
                "note": single_trial_note(p),
                "trials": [sr.trial for sr in p.runs],
                "runs": [str(sr.rm.run.run_dir) for sr in p.runs],
                "excluded": [{"run_dir": str(sr.rm.run.run_dir), "why": sr.excluded} for sr in p.excluded],
                "feasible": p.feasible,
                "pareto": p.pareto,
                "metrics": metrics,
            }
        )
        if p.predicted:  # --predict: the oracle's values by tenant and metric (``oracle``)
            points[-1]["predicted"] = {
                t: {m: v for (t2, m), v in p.predicted.items() if t2 == t} for t in dict.fromkeys(t for t, _ in p.predicted)
            }
    cost = sweep.cost
    return {
        "schema": 1,
        "axes": sweep.axes,
        "tenants": sweep.tenants,
        "run_level": RUN_LEVEL,
        "ci": f"{int(CONFIDENCE * 100)} % Student t over trials: mean ± t(0.975, n-1)·s/√n, s the sample std (n-1), "
        "clipped to the metric's possible range (proportions [0, 1], others >= 0); none for n = 1, uninformative for n = 2",
        "points": points,
        "slo_ms": sweep.slo,
        "slo_target": sweep.target if sweep.slo is not None else None,
        "objective": sweep.objective if sweep.slo is not None else None,
        "best": choice_dict(sweep, sweep.best),
        "closest": choice_dict(sweep, sweep.closest),
        "closest_rule": "highest lowest-tenant mean SLO attainment (ties: higher objective)",
        "rate_limits": [
            {
                "axis": r.key,
                "tenant": r.tenant,
                "fixed": r.fixed,
                "rates": r.rates,
                "attainment": [estimate_dict(e) for e in r.attainment],
                "max_rate": r.max_rate,
            }
            for r in sweep.rate_limits
        ],
        "cost": {
            "folders": [
                {
                    "folder": str(f.folder),
                    "runs": f.runs,
                    "hosts": f.hosts,
                    "clock": f.clock,
                    "window_s": f.window_s,
                    "wall_s": f.wall_s,
                    "measured_share": f.share,
                    "load_s": f.load_s,
                    "warmup_s": f.warmup_s,
                }
                for f in cost.folders
            ],
            "window_s": cost.window_s,
            "wall_s": cost.wall_s,
            "measured_share": cost.share,
            "load_s": cost.load_s,
            "warmup_s": cost.warmup_s,
        },
        "warnings": sweep.warnings,
    }


def csv_rows(sweep: Sweep) -> tuple[list[str], list[list[Any]]]:
    """sweep.csv: one row per point x tenant x metric (the axes as columns, then tenant, metric,
    n_trials, mean, std, ci_low, ci_high, note); n_trials counts the trials where the metric is
    defined; note says when the point's intervals are missing or uninformative (fewer than 3 trials);
    with ``--predict`` a last column ``predicted`` (the oracle's value, empty where it has none)."""
    header = [*sweep.axes, "tenant", "metric", "n_trials", "mean", "std", "ci_low", "ci_high", "note"]
    predicted = any(p.predicted for p in sweep.points)
    if predicted:
        header.append("predicted")
    rows: list[list[Any]] = []
    for p in sweep.points:
        note = single_trial_note(p) or ""
        for tenant, metric in sweep.rows:
            if tenant != RUN_LEVEL and tenant not in p.tenants:
                continue
            e = p.get(tenant, metric)
            rows.append([*p.values, tenant, metric, e.n, e.mean, e.std, e.ci_low, e.ci_high, note])
            if predicted:
                rows[-1].append(p.predicted.get((tenant, metric)))
    return header, rows


# ---------------------------------------------------------------------------------------------
# Files and text


def write_sweep_csv(sweep: Sweep, path: Path) -> Path:
    import pandas as pd

    header, rows = csv_rows(sweep)
    pd.DataFrame(rows, columns=header).to_csv(path, index=False, float_format="%.10g")
    return path


def write_sweep_json(sweep: Sweep, path: Path) -> Path:
    path.write_bytes(orjson.dumps(clean(sweep_dict(sweep)), option=orjson.OPT_INDENT_2) + b"\n")
    return path


# ---------------------------------------------------------------------------------------------
# Text shared by the terminal, summary.md and report.html


def cell(e: Estimate, digits: int = 1, percent: bool = False, compact: bool = False) -> str:
    """``mean ± half-width``; ``mean (n=1)`` without an interval; ``–`` without a value.
    ``percent``: a fraction shown in %; ``compact`` (the terminal): no spaces, no unit."""
    if e.mean is None:
        return "–"
    scale = 100.0 if percent else 1.0
    unit = " %" if percent and not compact else ""
    text = fmt(e.mean * scale, digits)
    if e.half_width is None or e.ci_low is None or e.ci_high is None:
        return f"{text}{unit}" + (" (n=1)" if not compact else "¹")
    mark = ("²" if compact else " (n=2)") if e.n < UNINFORMATIVE_BELOW else ""
    if not math.isclose(e.mean - e.ci_low, e.ci_high - e.mean, rel_tol=1e-9, abs_tol=1e-12):
        # Clipped to the possible range: the interval is no longer mean ± one half-width.
        sep = "," if compact else ", "
        return f"{text} [{fmt(e.ci_low * scale, digits)}{sep}{fmt(e.ci_high * scale, digits)}]{unit}{mark}"
    pm = "±" if compact else " ± "
    return f"{text}{pm}{fmt(e.half_width * scale, digits)}{unit}{mark}"


def _throughput_label(sweep: Sweep) -> str:
    counted = [sr.rm for sr in sweep.runs if sr.excluded is None] or [sr.rm for sr in sweep.runs]
    return f"{aggregate_label(counted[0])} tok/s" if counted else "aggregate tok/s"


def sweep_table(sweep: Sweep, compact: bool = False) -> Table:
    """One row per point: axes, trials, aggregate throughput, STP, fairness, and per tenant its
    throughput and (with an SLO) attainment, else its TTFT p99; whether it is feasible and on
    the NP Pareto front. ``compact`` (the terminal): short cells, no fairness or Pareto column."""
    has_np = any(m == "stp" for _, m in sweep.rows)
    pareto = not compact and any(p.pareto is not None for p in sweep.points)
    header = [short_key(k) for k in sweep.axes] + ["n" if compact else "trials", _throughput_label(sweep)]
    if has_np:
        header += ["STP"] + ([] if compact else ["fairness"])
    for t in sweep.tenants:
        header.append(f"{t} tok/s")
        if sweep.slo is not None:
            header.append(f"{t} SLO %" if compact else f"{t} SLO met")
        elif not compact:
            header.append(f"{t} TTFT p99 (ms)")
    if sweep.slo is not None:
        header.append("ok" if compact else "feasible")
    if pareto:
        header.append("Pareto (NP)")
    rows: list[list[str]] = []
    for p in sweep.points:
        row = ["default" if v is None else v for v in p.values]
        row += [str(p.n_trials), cell(p.get(RUN_LEVEL, "gpu_throughput_tok_s"), compact=compact)]
        if has_np:
            row.append(cell(p.get(RUN_LEVEL, "stp"), 3 if not compact else 2, compact=compact))
            if not compact:
                row.append(cell(p.get(RUN_LEVEL, "fairness"), 3))
        for t in sweep.tenants:
            row.append(cell(p.get(t, "throughput_tok_s"), compact=compact))
            if sweep.slo is not None:
                row.append(cell(p.get(t, "slo_attainment"), 1, percent=True, compact=compact))
            elif not compact:
                row.append(cell(p.get(t, "ttft_p99_ms")))
        if sweep.slo is not None:
            row.append("yes" if p.feasible else "no")
        if pareto:
            row.append("★" if p.pareto else ("" if p.pareto is False else "–"))
        rows.append(row)
    return Table("Sweep points (mean ± 95 % CI over trials)", header, rows)


def _slo_text(sweep: Sweep) -> str:
    bounds = ", ".join(f"{k} ≤ {v:g} ms" for k, v in (sweep.slo or {}).items())
    return f"SLO {bounds}, every tenant ≥ {100 * sweep.target:g} %"


def _choice_text(sweep: Sweep, c: Choice) -> str:
    unit = "tok/s" if sweep.objective == "throughput" else "req/s"
    attained = ", ".join(
        f"{t} {cell(c.point.get(t, 'slo_attainment'), 1, percent=True)}" for t in c.point.tenants
    )
    text = (
        f"{c.point.label(sweep.axes)} — aggregate {sweep.objective} {cell(c.objective)} {unit}; attainment {attained}"
        f" ({c.point.n_trials} trial{'s' if c.point.n_trials != 1 else ''})"
    )
    if c.feasible and c.holds_at_ci_low is False:
        text += "; some tenant's CI reaches below the target"
    return text


def best_lines(sweep: Sweep) -> list[str]:
    """The answer: the best feasible point, or the closest one (empty without an SLO)."""
    if sweep.slo is None:
        return []
    if sweep.best is not None:
        return [f"best point ({_slo_text(sweep)}; by aggregate {sweep.objective}): {_choice_text(sweep, sweep.best)}"]
    lines = [f"no point is feasible ({_slo_text(sweep)})"]
    c = sweep.closest
    if c is not None:
        lines.append(
            f"closest (highest lowest-tenant attainment: {c.worst_tenant} "
            f"{100 * (c.min_attainment or 0.0):.1f} %): {_choice_text(sweep, c)}"
        )
    else:
        lines.append("no point has an SLO attainment for every tenant, so none comes closest")
    return lines


def rate_lines(sweep: Sweep) -> list[str]:
    """Each tenant's highest swept rate that still meets the target, per rate axis."""
    lines = []
    for r in sweep.rate_limits:
        fixed = ", ".join(f"{short_key(k)}={v}" for k, v in r.fixed.items())
        where = f" at {fixed}" if fixed else ""
        if r.max_rate is None:
            limit = (
                f"misses {100 * sweep.target:g} % already at {r.rates[0]:g} req/s"
                if r.rates
                else "no rate"
            )
        else:
            limit = f"meets {100 * sweep.target:g} % up to {r.max_rate:g} req/s"
            if r.max_rate == r.rates[-1]:
                limit += " (the highest swept rate)"
        lines.append(f"rate sweep {short_key(r.key)}{where}: tenant {r.tenant} {limit}")
    return lines


def cost_lines(sweep: Sweep) -> list[str]:
    """Measured share of wall time per folder (and pooled), mean load and warm-up per tenant."""
    cost = sweep.cost
    lines = []

    def per_tenant(values: dict[str, float]) -> str:
        return ", ".join(f"{t} {v:.1f} s" for t, v in values.items()) or "–"

    several = len(cost.folders) > 1
    for f in cost.folders:
        share = "–" if f.share is None else f"{f.share:.2f}"
        wall = "–" if f.wall_s is None else f"{f.wall_s:.1f} s"
        clock = "" if f.clock != "wall" else f"; {len(f.hosts)} hosts: wall clock"
        name = f" {f.folder.name}" if several else ""
        lines.append(
            f"measured share of wall time{name}: {share} (Σ windows {f.window_s:.1f} s / sweep wall time {wall}, "
            f"{f.runs} run(s){clock}); mean load {per_tenant(f.load_s)}; mean warm-up {per_tenant(f.warmup_s)}"
        )
    if several:
        share = "–" if cost.share is None else f"{cost.share:.2f}"
        lines.append(
            f"pooled over {len(cost.folders)} folders (each timed on its own host's clock): {share} "
            f"(Σ windows {cost.window_s:.1f} s / Σ folder wall times "
            f"{'–' if cost.wall_s is None else f'{cost.wall_s:.1f} s'}); mean load {per_tenant(cost.load_s)}; "
            f"mean warm-up {per_tenant(cost.warmup_s)}"
        )
    return lines


def notes(sweep: Sweep) -> list[str]:
    """Points without an interval, and what the axes are."""
    out = []
    single = [p.label(sweep.axes) for p in sweep.points if p.n_trials < 2]
    if single:
        out.append(
            f"{len(single)} point(s) without a confidence interval (fewer than 2 trials): {'; '.join(single)}"
        )
    two = [p.label(sweep.axes) for p in sweep.points if 2 <= p.n_trials < UNINFORMATIVE_BELOW]
    if two:
        out.append(
            f"{len(two)} point(s) with an uninformative interval (2 trials: t(0.975, 1) = 12.7; run trials>=3): "
            + "; ".join(two)
        )
    if not sweep.axes:
        out.append("no override differs between the runs: they are one point")
    return out


# ---------------------------------------------------------------------------------------------
# Terminal, summary.md, report.html


def print_sweep(sweep: Sweep, console: Any) -> None:
    """The sweep table, notes, rate limits and wall-time share (the best point comes later,
    from ``print_best``, as the very last lines)."""
    from rich import box
    from rich.table import Table as RichTable

    table = sweep_table(sweep, compact=True)
    axes = f"{len(sweep.axes)} axis(es): {', '.join(sweep.axes)}" if sweep.axes else "no axis"
    rich = RichTable(
        title=f"sweep · {len(sweep.points)} point(s) · {axes}",
        title_justify="left",
        box=box.SIMPLE_HEAD,
        pad_edge=False,
    )
    for i, name in enumerate(table.header):
        rich.add_column(name, justify="left" if i < len(sweep.axes) else "right")
    for row in table.rows:
        rich.add_row(*row)
    console.print(rich)
    console.print(f"  {TERMINAL_CI_NOTE}", markup=False, highlight=False, soft_wrap=True)
    for line in notes(sweep) + rate_lines(sweep) + cost_lines(sweep):
        console.print(f"  {line}", markup=False, highlight=False, soft_wrap=True)
    for message in sweep.warnings:
        console.print(f"  warning: {message}", style="yellow", markup=False, highlight=False, soft_wrap=True)


def print_best(sweep: Sweep, console: Any) -> None:
    for i, line in enumerate(best_lines(sweep)):
        style = "bold green" if sweep.best is not None else ("bold red" if i == 0 else "yellow")
        console.print(line, style=style, markup=False, highlight=False, soft_wrap=True)


def markdown(sweep: Sweep, title: str = "Sweep") -> str:
    parts = [f"## {title}", "", f"- axes: {', '.join(f'`{k}`' for k in sweep.axes) or 'none'}", f"- {CI_NOTE}"]
    parts += [f"- {line}" for line in notes(sweep) + rate_lines(sweep) + cost_lines(sweep)]
    parts += ["", _md_table(sweep_table(sweep)), ""]
    if lines := best_lines(sweep):
        parts += [f"**{lines[0]}**", *lines[1:], ""]
    if sweep.warnings:
        parts += ["### Sweep warnings", ""] + [f"- {w}" for w in sweep.warnings] + [""]
    return "\n".join(parts) + "\n"


def html_section(sweep: Sweep, plots: Sequence[Plot], title: str = "Sweep") -> str:
    esc = html.escape
    out = [f"<h2>{esc(title)}</h2>"]
    if lines := best_lines(sweep):
        style = "best" if sweep.best is not None else "banner"
        out.append(f'<p class="{style}">{esc(lines[0])}</p>' + "".join(f"<p>{esc(x)}</p>" for x in lines[1:]))
    facts = [
        f"axes: {', '.join(sweep.axes) or 'none'}",
        CI_NOTE,
        *notes(sweep),
        *rate_lines(sweep),
        *cost_lines(sweep),
    ]
    out.append("<ul>" + "".join(f"<li>{esc(x)}</li>" for x in facts) + "</ul>")
    out.append(_html_table(sweep_table(sweep)))
    if sweep.slo is not None:
        out.append(
            f"<p>Objective: mean <code>{esc(OBJECTIVE_METRIC[sweep.objective])}</code>; "
            "every number per point and metric is in sweep.csv and sweep.json.</p>"
        )
    if sweep.warnings:
        out.append(
            "<h3>Sweep warnings</h3><ul>"
            + "".join(f'<li class="warn">{esc(w)}</li>' for w in sweep.warnings)
            + "</ul>"
        )
    out += [_img(p) for p in plots]
    return "\n".join(out)
