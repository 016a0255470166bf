"""Stage 3b of ``mt-analyze``: metrics -> what people read: the terminal table, summary.md and
report.html (the tables they share, and the run's banner and warnings). The files other tools
read are ``summary``'s.
"""

from __future__ import annotations

import base64
import html
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from multitenant.analysis import hardware
from multitenant.analysis.metrics import RunMetrics, TenantMetrics, status_warning
from multitenant.analysis.names import LATENCY_METRICS, NP_E2E, SLOWDOWN_KEYS, STAT_KEYS, TTFT_SPLIT
from multitenant.analysis.plots import Plot
from multitenant.schema import GpuInfo, RunStatus

# ---------------------------------------------------------------------------------------------
# Tables shared by the terminal, summary.md and report.html


def fmt(value: float | int | None, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    if isinstance(value, (int, np.integer)):
        return str(value)
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    return f"{value:.{digits}f}"


@dataclass
class Table:
    title: str
    header: list[str]
    rows: list[list[str]]


def _has_gpu(rm: RunMetrics) -> bool:
    """Whether the manifest names a GPU record (null or ``{}``: a CPU run)."""
    gpu = rm.run.manifest.gpu
    return gpu is not None and gpu != GpuInfo()


def aggregate_label(rm: RunMetrics) -> str:
    """What the summed throughput is of: "GPU" for a GPU run, "aggregate" for a CPU run (mode
    cpu, or no GPU in the manifest). summary.json keeps its ``gpu_throughput_*`` keys either way."""
    return "GPU" if rm.run.mode != "cpu" and _has_gpu(rm) else "aggregate"


def run_tables(rm: RunMetrics) -> list[Table]:
    """Tenant overview, latency percentiles, and the run's aggregate figures."""
    has_slo = rm.slo is not None
    overview = Table(
        "Tenants",
        ["tenant", "requests", "completed", "errors", "cancelled", "unfinished", "throughput", "NP",
         "TTFT p50 (ms)", "TTFT p99 (ms)", "TPOT p50 (ms)", "TPOT p99 (ms)", "ITL p50 (ms)", "E2E p50 (ms)"]
        + (["SLO met", "goodput (req/s)"] if has_slo else []),
        [],
    )  # fmt: skip
    for name, tm in rm.tenants.items():
        row = [
            name, str(tm.requests), str(tm.completed), str(tm.errors), str(tm.cancelled), str(tm.incomplete),
            f"{fmt(tm.throughput)} {tm.throughput_unit}", np_cell(tm, 3),
            fmt(tm.latency["ttft"]["p50"]), fmt(tm.latency["ttft"]["p99"]),
            fmt(tm.latency["tpot"]["p50"]), fmt(tm.latency["tpot"]["p99"]),
            fmt(tm.latency["itl"]["p50"]), fmt(tm.latency["e2e"]["p50"]),
        ]  # fmt: skip
        if has_slo:
            attained = tm.slo_attainment
            row += [("–" if attained is None else f"{100 * attained:.1f} %"), fmt(tm.goodput_req_s)]
        overview.rows.append(row)
    latency = Table("Latency (ms)", ["tenant", "metric", *STAT_KEYS], [])
    for name, tm in rm.tenants.items():
        for metric in LATENCY_METRICS:
            stats = tm.latency[metric]
            if all(v is None for v in stats.values()):
                continue
            latency.rows.append([name, metric, *(fmt(stats[k]) for k in STAT_KEYS)])
    slowdown = Table("Slowdown vs solo (×)", ["tenant", "baseline", "NP from", *(k for k, _, _ in SLOWDOWN_KEYS)], [])
    for name, tm in rm.tenants.items():
        if tm.slowdown is not None:
            slowdown.rows.append(
                [name, "/".join(Path(tm.baseline_run_dir or "").parts[-2:]), np_basis(tm),
                 *(fmt(tm.slowdown[k], 3) for k, _, _ in SLOWDOWN_KEYS)]
            )  # fmt: skip
    window = "–"
    if rm.window_ns is not None and rm.window_s is not None:
        window = f"{rm.window_s:.3f} s [{rm.window_ns[0]}, {rm.window_ns[1]}] ns"
    aggregate = Table(
        "Aggregate",
        ["figure", "value"],
        [
            ["window", window],
            ["window cut", rm.window_cut.text if rm.window_cut else "–"],
            [f"{aggregate_label(rm)} throughput (tok/s, in window)", fmt(rm.gpu_throughput_tok_s)],
            [f"{aggregate_label(rm)} throughput, naive (tok/s, first send to last token)", fmt(rm.gpu_throughput_naive_tok_s)],
            ["STP (Σ NP)", fmt(rm.stp, 3)],
            ["ANTT (mean 1/NP)", fmt(rm.antt, 3)],
            ["fairness (min NP / max NP)", fmt(rm.fairness, 3)],
            ["Jain's index over NP", fmt(rm.jain, 3)],
        ],
    )
    tables = [overview, latency]
    split = split_table(rm)
    if split.rows:
        tables.append(split)
    if slowdown.rows:
        tables.append(slowdown)
    tables.append(aggregate)
    return tables


def np_cell(tm: TenantMetrics, digits: int) -> str:
    """NP as the tables show it: an open-loop tenant's (mean E2E solo / co-located) marked "E2E"."""
    return fmt(tm.np, digits) + (" E2E" if tm.np_definition == NP_E2E and tm.np is not None else "")


def np_basis(tm: TenantMetrics) -> str:
    """What the tenant's NP divides: the throughputs, or (open loop) the two mean E2Es."""
    if tm.np_definition != NP_E2E:
        return "throughput"
    return f"mean E2E {fmt(tm.solo_e2e_mean_ms)} ms solo / {fmt(tm.colocated_e2e_mean_ms)} ms co-located"


SPLIT_LABELS = {"frontend_in": "front end in", "engine_queue": "engine queue", "prefill": "prefill",
                "frontend_out": "front end out"}  # fmt: skip


def _split_cell(tm: TenantMetrics, name: str) -> str:
    """``mean / p50`` of one TTFT component (ms; two decimals, the front-end parts are small)."""
    stats = (tm.ttft_split or {}).get(f"{name}_ms") or {}
    return f"{fmt(stats.get('mean'))} / {fmt(stats.get('p50'))}"


def split_table(rm: RunMetrics) -> Table:
    """TTFT split, one row per tenant that logged engine timestamps: mean / p50 of each part."""
    table = Table(
        "TTFT split (ms, mean / p50)", ["tenant", "requests", *(SPLIT_LABELS[n] for n in TTFT_SPLIT)], []
    )
    for name, tm in rm.tenants.items():
        if tm.ttft_split is not None:
            table.rows.append([name, str(tm.ttft_split["n"]), *(_split_cell(tm, n) for n in TTFT_SPLIT)])
    return table


def setup_rows(rm: RunMetrics) -> list[list[str]]:
    """The run's setup: GPU, mode, and per tenant its spec, share and effective SMs."""
    run = rm.run
    rows: list[list[str]] = []
    for name in run.tenants:
        cfg = run.tenant_config(name)
        man = run.tenant_manifest(name)
        given = man.share.given() or (cfg.share.given() if cfg else {})
        share_text = ", ".join(f"{k}={v}" for k, v in given.items()) or "none"
        if name in run.manifest.tenants and man.share_applied is False:
            share_text += " (not applied)"
        model, backend, execution, dtype, max_batch = (
            (getattr(cfg, key) if cfg is not None else None) or getattr(man, key) or "?"
            for key in ("model", "backend", "execution", "dtype", "max_batch")
        )
        rows.append(
            [
                name,
                str(model),
                f"{backend} / {execution} / {dtype}",
                str(max_batch),
                share_text,
                fmt(man.effective_sms),
                "–" if man.mps_attached is None else ("yes" if man.mps_attached else "NO"),
            ]
        )
    return rows


SETUP_HEADER = ["tenant", "model", "backend / execution / dtype", "max_batch", "share", "effective SMs", "MPS attached"]


def banner(rm: RunMetrics) -> str | None:
    """A warning line for a run that did not end cleanly."""
    if rm.run.status == RunStatus.OK:
        return None
    reason = rm.run.manifest.reason
    if rm.run.status == RunStatus.RUNNING and not reason:
        # mt-run never ended it (killed, or still going): its MPS daemon may still be up.
        reason = "mt-run did not end this run (killed?); if it used mode=mps, run `mt-mps stop --all`"
    return f"Run status {rm.run.status!r}" + (f": {reason}" if reason else "") + " — numbers may be incomplete."


def heading(rm: RunMetrics, labels: dict[int, str]) -> str:
    """The run's label and id, without saying the same thing twice."""
    label, run_id = labels[id(rm)], rm.run.run_id
    return run_id if label in run_id else f"{label} — {run_id}"


def _md_table(table: Table) -> str:
    lines = [f"| {' | '.join(table.header)} |", "|" + "---|" * len(table.header)]
    lines += [f"| {' | '.join(cell.replace('|', '/') for cell in row)} |" for row in table.rows]
    return "\n".join(lines)


def listed_warnings(rm: RunMetrics) -> list[str]:
    """The run's warnings as the terminal, summary.md and report.html list them: the run-status
    warning is left out when the banner above already says it (summary.json keeps it)."""
    opening = status_warning(rm.run) if banner(rm) is not None else None
    return [w for w in rm.warnings if w != opening]


def markdown(rms: Sequence[RunMetrics], labels: dict[int, str]) -> str:
    parts = ["# mt-analyze summary", ""]
    for rm in rms:
        run = rm.run
        parts += [f"## {heading(rm, labels)}", ""]
        if (line := banner(rm)) is not None:
            parts += [f"> **WARNING: {line}**", ""]
        parts += [
            f"- folder: `{run.run_dir}`",
            f"- mode: {run.mode}, GPU: {run.gpu_name or 'none'}, status: {run.status}",
            "",
            "### Setup",
            "",
            _md_table(Table("Setup", SETUP_HEADER, setup_rows(rm))),
            "",
        ]
        for table in run_tables(rm):
            parts += [f"### {table.title}", "", _md_table(table), ""]
        if hw_lines := hardware.report_lines(rm):
            parts += ["### Hardware", ""] + [f"- {line}" for line in hw_lines] + [""]
        if rm.missing_baselines:
            parts += ["### Missing baselines", ""] + [f"- {m}" for m in rm.missing_baselines] + [""]
        if shown := listed_warnings(rm):
            parts += ["### Warnings", ""] + [f"- {w}" for w in shown] + [""]
    return "\n".join(parts)


def print_terminal(rms: Sequence[RunMetrics], labels: dict[int, str], console: Any) -> None:
    """A compact rich table per run (p50 / p99 in one cell) and its aggregate figures."""
    from rich import box
    from rich.table import Table as RichTable

    for rm in rms:
        if (line := banner(rm)) is not None:
            console.print(f"[bold red]WARNING: {line}[/]", markup=True, highlight=False)
        table = RichTable(
            title=f"{labels[id(rm)]} · {rm.run.mode} · {rm.run.gpu_name or 'no GPU'} · latencies in ms",
            title_justify="left",
            box=box.SIMPLE_HEAD,
            pad_edge=False,
        )
        units = {tm.throughput_unit for tm in rm.tenants.values()}
        head = ["tenant", "req", "err", "canc", "/".join(sorted(units)) or "tok/s", "NP", "TTFT p50/99", "TPOT p50/99", "E2E p50"]
        if rm.slo is not None:
            head.append("SLO")
        for i, name in enumerate(head):
            table.add_column(name, justify="left" if i == 0 else "right", min_width=6 if i == 0 else None)
        for name, tm in rm.tenants.items():
            lat = tm.latency
            row = [
                name, str(tm.requests), str(tm.errors), str(tm.cancelled),
                fmt(tm.throughput, 1) + ("" if len(units) == 1 else f" {tm.throughput_unit}"), np_cell(tm, 2),
                f"{fmt(lat['ttft']['p50'], 1)}/{fmt(lat['ttft']['p99'], 1)}",
                f"{fmt(lat['tpot']['p50'], 1)}/{fmt(lat['tpot']['p99'], 1)}",
                fmt(lat["e2e"]["p50"], 1),
            ]  # fmt: skip
            if rm.slo is not None:
                row.append("–" if tm.slo_attainment is None else f"{100 * tm.slo_attainment:.1f}%")
            table.add_row(*row)
        console.print(table)
        window = "none" if rm.window_s is None else f"{rm.window_s:.3f} s"
        console.print(
            f"  window {window} · {aggregate_label(rm)} {fmt(rm.gpu_throughput_tok_s, 1)} tok/s"
            f" (naive {fmt(rm.gpu_throughput_naive_tok_s, 1)}) · STP {fmt(rm.stp, 3)} · ANTT {fmt(rm.antt, 3)}"
            f" · fairness {fmt(rm.fairness, 3)} · Jain {fmt(rm.jain, 3)}",
            highlight=False,
        )
        if rm.window_cut is not None:
            console.print(f"  {rm.window_cut.text}", markup=False, highlight=False)
        for name, tm in rm.tenants.items():
            if tm.np_definition == NP_E2E and tm.baseline_run_dir is not None:
                console.print(
                    f"  NP {name} = mean E2E solo / co-located: {fmt(tm.solo_e2e_mean_ms)} / {fmt(tm.colocated_e2e_mean_ms)} ms"
                    " (open-loop tenant)",
                    markup=False,
                    highlight=False,
                )
        for name, tm in rm.tenants.items():
            if tm.ttft_split is not None:
                parts = " · ".join(f"{SPLIT_LABELS[n]} {_split_cell(tm, n)}" for n in TTFT_SPLIT)
                console.print(
                    f"  TTFT split {name} (n={tm.ttft_split['n']}, ms mean / p50): {parts}", markup=False, highlight=False
                )
        for line in hardware.report_lines(rm):
            console.print(f"  {line}", markup=False, highlight=False)
        for message in rm.missing_baselines:
            console.print(f"  {message}", style="yellow", markup=False, highlight=False)
        for message in listed_warnings(rm):
            console.print(f"  warning: {message}", style="yellow", markup=False, highlight=False)


# ---------------------------------------------------------------------------------------------
# report.html

PROSE_CHARS = 60  # a table cell longer than this is prose: it wraps in report.html
_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2rem auto;max-width:1200px;color:#222;padding:0 1rem}
h1{font-size:1.6rem}h2{border-bottom:2px solid #ddd;padding-bottom:.2rem;margin-top:2.5rem}h3{margin-top:1.5rem}
table{border-collapse:collapse;margin:.5rem 0 1rem;font-size:.9rem}
th,td{border:1px solid #ccc;padding:.25rem .5rem;text-align:right}th{background:#f2f2f2}td{white-space:nowrap}
td.prose{white-space:normal;text-align:left;min-width:24rem;max-width:48rem}
td:first-child,th:first-child{text-align:left}
.banner{background:#b00020;color:#fff;padding:.6rem 1rem;border-radius:4px;font-weight:600}
.best{background:#1b5e20;color:#fff;padding:.6rem 1rem;border-radius:4px;font-weight:600}
.warn{color:#8a5300}.missing{color:#8a5300}
figure{margin:1rem 0}figure img{max-width:100%;border:1px solid #eee}
.swatch{display:inline-block;width:.8rem;height:.8rem;border-radius:2px;margin-right:.3rem;vertical-align:middle}
"""


def _html_table(table: Table, colors: dict[str, str] | None = None) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in table.header)
    body = []
    for row in table.rows:
        cells = []
        for i, cell in enumerate(row):
            text = html.escape(cell)
            if i == 0 and colors and cell in colors:
                text = f'<span class="swatch" style="background:{colors[cell]}"></span>{text}'
            # A sentence (how the window was cut) wraps; numbers and names stay on one line.
            cells.append(f'<td class="prose">{text}</td>' if len(cell) > PROSE_CHARS else f"<td>{text}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _img(plot: Plot) -> str:
    data = base64.b64encode(plot.png).decode("ascii")
    return (
        f'<figure><img alt="{html.escape(plot.title)}" src="data:image/png;base64,{data}">'
        f"<figcaption>{html.escape(plot.title)}</figcaption></figure>"
    )


def write_html(
    rms: Sequence[RunMetrics],
    labels: dict[int, str],
    run_plots: dict[int, list[Plot]],
    across: list[Plot],
    colors: dict[str, str],
    path: Path,
    sweep_html: str = "",
) -> Path:
    """One self-contained page: every image is a data: URI, no external resource at all.
    ``sweep_html`` (``sweep_report.html_section``) opens the page when the runs are a sweep."""
    esc = html.escape
    title = "mt-analyze report — " + (rms[0].run.run_id if len(rms) == 1 else f"{len(rms)} runs")
    out = [f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{esc(title)}</title>",
           f"<style>{_CSS}</style></head><body>", f"<h1>{esc(title)}</h1>"]  # fmt: skip
    # A sweep opens with its points and the comparison across its runs; a single run with its own setup.
    if sweep_html:
        out.append(sweep_html)
    if across and len(rms) > 1:
        out.append("<h2>Across runs</h2>")
        out += [_img(p) for p in across]
    for rm in rms:
        run = rm.run
        out.append(f"<h2>{esc(heading(rm, labels))}</h2>")
        if (line := banner(rm)) is not None:
            out.append(f'<p class="banner">WARNING: {esc(line)}</p>')
        gpu = run.manifest.gpu
        facts = [
            ("folder", str(run.run_dir)),
            ("mode", str(run.mode)),
            ("GPU", f"{gpu.name} ({gpu.sm_count} SMs, driver {gpu.driver_version})" if gpu and _has_gpu(rm) else "none (CPU)"),
            ("status", run.status),
            ("started", str(run.manifest.started_wall or "–")),
        ]
        out.append("<ul>" + "".join(f"<li><b>{esc(k)}</b>: {esc(v)}</li>" for k, v in facts) + "</ul>")
        out.append("<h3>Setup</h3>" + _html_table(Table("Setup", SETUP_HEADER, setup_rows(rm)), colors))
        for table in run_tables(rm):
            out.append(f"<h3>{esc(table.title)}</h3>" + _html_table(table, colors))
        if hw_lines := hardware.report_lines(rm):
            out.append("<h3>Hardware</h3><ul>" + "".join(f"<li>{esc(line)}</li>" for line in hw_lines) + "</ul>")
        if rm.missing_baselines:
            out.append("<h3>Missing baselines</h3><ul>")
            out += [f'<li class="missing">{esc(m)}</li>' for m in rm.missing_baselines]
            out.append("</ul>")
        if shown := listed_warnings(rm):
            out.append("<h3>Warnings</h3><ul>")
            out += [f'<li class="warn">{esc(w)}</li>' for w in shown]
            out.append("</ul>")
        plots = run_plots.get(id(rm), [])
        if len(rms) == 1:
            plots = plots + across
        if plots:
            out.append("<h3>Plots</h3>")
            out += [_img(p) for p in plots]
    out.append("</body></html>")
    path.write_text("\n".join(out), encoding="utf-8")
    return path
