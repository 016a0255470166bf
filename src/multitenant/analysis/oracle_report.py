"""``--predict``'s text: the predicted grid and best split (terminal), and predicted vs measured
per sweep point with the errors: NP error = predicted - measured mean (absolute, NP units);
throughput and STP errors = (predicted - measured) / measured, in percent."""

from __future__ import annotations

import math
from typing import Any

from multitenant.analysis.names import RUN_LEVEL
from multitenant.analysis.oracle import Oracle
from multitenant.analysis.predict import Prediction
from multitenant.analysis.sweep import Sweep


def _num(value: float | None, digits: int = 0) -> str:
    return "–" if value is None or not math.isfinite(value) else f"{value:,.{digits}f}"


def grid_rows(oracle: Oracle) -> tuple[list[str], list[list[str]]]:
    """Per configuration: each tenant's tok/s (NP), its TTFT/TPOT p50 (ms), STP, ANTT, fairness
    and, with an SLO, each tenant's predicted attainment (%, in the tenants' order)."""
    names = [p.name for p in oracle.profiles]
    header = ["split", *[f"{n} tok/s (NP)" for n in names], *[f"{n} TTFT/TPOT ms" for n in names], "STP", "ANTT", "fair"]
    if oracle.slo is not None:
        header.append("SLO %")
    rows = []
    for p in oracle.predictions:
        row = [p.label, *[f"{_num(t.throughput)} ({_num(t.np, 3)})" for t in p.tenants],
               *[f"{_num(t.ttft_p50_ms, 1)}/{_num(t.tpot_p50_ms, 1)}" for t in p.tenants],
               _num(p.stp, 3), _num(p.antt, 2), _num(p.fairness, 2)]  # fmt: skip
        if oracle.slo is not None:
            row.append("/".join("–" if t.slo_attainment is None else f"{100 * float(t.slo_attainment):.0f}" for t in p.tenants))
        rows.append(row)
    return header, rows


def best_line(oracle: Oracle) -> str:
    """'predicted best split (SLO ttft ≤ 200 ms, every tenant ≥ 90 %; by aggregate throughput): 50/50 — ...'."""
    if oracle.slo is None:
        head = "predicted best split (no SLO; by aggregate throughput)"
    else:
        bounds = ", ".join(f"{m} ≤ {v:g} ms" for m, v in oracle.slo.items())
        head = f"predicted best split (SLO {bounds}, every tenant ≥ {100 * oracle.target:g} %; by aggregate {oracle.objective})"
    if oracle.best is not None:
        return f"{head}: {_describe(oracle.best)}"
    if oracle.closest is not None:
        return f"{head}: none feasible; closest {_describe(oracle.closest)}"
    return f"{head}: none"


def _describe(p: Prediction) -> str:
    nps = ", ".join(f"{t.name} {t.np:.3f}" for t in p.tenants)
    return f"{p.label} — aggregate {_num(p.throughput)} tok/s, STP {p.stp:.3f}, NP {nps}"


def print_grid(oracle: Oracle, console: Any) -> None:
    from rich import box
    from rich.table import Table

    header, rows = grid_rows(oracle)
    table = Table(title="predicted from solo runs (docs/prediction.md)", title_justify="left", box=box.SIMPLE_HEAD,
                  pad_edge=False)  # fmt: skip
    for i, h in enumerate(header):
        table.add_column(h, justify="left" if i == 0 else "right")
    for row in rows:
        table.add_row(*row)
    console.print(table)
    for w in oracle.warnings:
        console.print(f"  warning: {w}", style="yellow", markup=False, highlight=False)
    console.print(best_line(oracle), style="bold", markup=False, highlight=False)


def _err(pred: float | None, meas: float | None, relative: bool) -> float | None:
    if pred is None or meas is None:
        return None
    if relative:
        return None if meas == 0 else 100.0 * (pred - meas) / meas
    return pred - meas


def versus_lines(sweep: Sweep) -> list[str]:
    """One line per point with predictions, then the summary: mean |NP error|, mean |STP error| %,
    the largest NP error."""
    lines: list[str] = []
    np_errors: list[tuple[float, str]] = []
    stp_errors: list[float] = []
    for point in sweep.points:
        if not point.predicted:
            continue
        parts = []
        for t in point.tenants:
            meas_t, pred_t = point.get(t, "throughput_tok_s").mean, point.predicted.get((t, "throughput_tok_s"))
            e = _err(pred_t, meas_t, True)
            parts.append(f"{t} {_num(meas_t)} vs {_num(pred_t)} tok/s ({'–' if e is None else f'{e:+.1f} %'})")
            meas_np, pred_np = point.get(t, "np").mean, point.predicted.get((t, "np"))
            if (d := _err(pred_np, meas_np, False)) is not None:
                parts[-1] += f", NP {meas_np:.3f} vs {pred_np:.3f} ({d:+.3f})"
                np_errors.append((abs(d), f"{point.label(sweep.axes)} {t}"))
        meas_stp, pred_stp = point.get(RUN_LEVEL, "stp").mean, point.predicted.get((RUN_LEVEL, "stp"))
        if (e := _err(pred_stp, meas_stp, True)) is not None:
            parts.append(f"STP {meas_stp:.3f} vs {pred_stp:.3f} ({e:+.1f} %)")
            stp_errors.append(abs(e))
        lines.append(f"{point.label(sweep.axes)}: measured vs predicted: " + "; ".join(parts))
    if np_errors:
        worst = max(np_errors)
        lines.append(
            f"prediction error over {len(lines)} point(s): mean |NP error| {sum(e for e, _ in np_errors) / len(np_errors):.3f}"
            + (f", mean |STP error| {sum(stp_errors) / len(stp_errors):.1f} %" if stp_errors else "")
            + f", largest |NP error| {worst[0]:.3f} ({worst[1]})"
        )
    return lines


def print_versus(sweep: Sweep, console: Any) -> None:
    for line in versus_lines(sweep):
        console.print(line, markup=False, highlight=False)


def predict_only(solo_dirs: list[str], slo: dict[str, float] | None, target: float, objective: str, console: Any) -> int:
    """``mt-analyze --predict SOLO...`` without a PATH: the predicted grid, the best split last."""
    from multitenant.analysis.oracle import build

    print_grid(build(solo_dirs, slo, target, objective), console)
    return 0
