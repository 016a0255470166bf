"""Stage 3a of ``mt-analyze``: metrics -> figures (matplotlib, Agg backend, no display needed;
seaborn where it serves: ECDFs, heatmaps, the whitegrid style).

Per run: TTFT CDF, TPOT CDF, ITL distribution, tokens/s per tenant over time (1 s bins,
stacked, the measured window shaded; GPU activity under it when the telemetry has the counters),
TTFT and end-to-end latency of each request over time, and telemetry (utilization, memory, power, clocks, tenant CPU) when the run has it.
Across runs (when solo baselines matched): solo vs co-located throughput with NP, and a
slowdown heatmap. Every axis names its unit; a tenant has the same colour in every figure
(``tenant_colors``). Time axes are seconds since the start of the run's window.

Each figure is written in the requested format and also rendered to PNG bytes for the
self-contained HTML report (browsers cannot show a PDF inside ``<img>``). Legends sit outside
the axes (right of them), never over the data.
"""

from __future__ import annotations

import io
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # before pyplot: never look for a display

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from multitenant.analysis.columns import NO_TIME  # noqa: E402
from multitenant.analysis.metrics import RunMetrics  # noqa: E402
from multitenant.analysis.names import NP_E2E, NS_PER_MS, NS_PER_S, SLOWDOWN_KEYS  # noqa: E402
from multitenant.analysis.requests import latency_sample  # noqa: E402
from multitenant.schema import RequestStatus  # noqa: E402

FORMATS = ("png", "svg", "pdf")
DPI = 110  # one rendering serves both the PNG file and the report
WINDOW_COLOR = "0.85"
# Lines that belong to no tenant (GPU-wide telemetry) are grey/black so they never look like one.
NEUTRAL_STYLES = (("0.1", "-"), ("0.5", "--"))
# (legend label, values, tenant name for its colour or None) of one telemetry line.
Series = tuple[str, np.ndarray, "str | None"]
# An ECDF of more values than this is drawn from its quantiles at this many levels: the same
# curve to 1/ECDF_POINTS in y, without a vertex per token gap (a run has millions).
ECDF_POINTS = 2000
STYLE = "whitegrid"


def subplots(*args: Any, **kwargs: Any) -> tuple[Figure, Any]:
    """``plt.subplots`` in seaborn's whitegrid style (a style applies when axes are made; the
    context keeps it from leaking into anything else)."""
    with sns.axes_style(STYLE):
        return plt.subplots(*args, **kwargs)


def legend_outside(ax: plt.Axes, **kwargs: object) -> None:
    """The axes' legend right of them, so it never covers data (``_save`` keeps it in the file)."""
    handles, labels = ax.get_legend_handles_labels()
    if handles:
        ax.legend(handles, labels, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0,
                  frameon=False, **kwargs)  # fmt: skip


@dataclass
class Plot:
    """One figure: where it was written and its PNG rendering for the report."""

    name: str
    title: str
    path: Path
    png: bytes


def tenant_colors(names: Iterable[str]) -> dict[str, str]:
    """One colour per tenant name, stable across runs: names sorted, then tab10 (tab20 beyond)."""
    ordered = sorted(set(names))
    cmap = plt.get_cmap("tab10" if len(ordered) <= 10 else "tab20")
    return {name: matplotlib.colors.to_hex(cmap(i % cmap.N)) for i, name in enumerate(ordered)}


def _save(fig: Figure, out_dir: Path, name: str, title: str, fmt: str) -> Plot:
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.{fmt}"
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, bbox_inches="tight")
    png = buf.getvalue()
    if fmt == "png":
        path.write_bytes(png)
    else:
        fig.savefig(path, format=fmt, dpi=DPI, bbox_inches="tight")
    plt.close(fig)
    return Plot(name=name, title=title, path=path, png=png)


def time_origin_ns(rm: RunMetrics) -> int:
    """Zero of every time axis: the window's start, else the earliest logged event."""
    if rm.window_ns is not None:
        return rm.window_ns[0]
    firsts = []
    for log in rm.run.tenants.values():
        for arr in (log.tok_t_ns, log.req_sent_ns, log.req_sched_ns, log.iter_t_ns):
            valid = arr[arr != NO_TIME]
            if valid.size:
                firsts.append(int(valid.min()))
    return min(firsts) if firsts else 0


def _shade_window(ax: plt.Axes, rm: RunMetrics, origin: int, label: bool = True) -> None:
    if rm.window_ns is not None:
        end_s = (rm.window_ns[1] - origin) / NS_PER_S
        ax.axvspan(0.0, end_s, label="window" if label else None, color=WINDOW_COLOR, alpha=0.5, zorder=0, lw=0)


def _latency_sample(rm: RunMetrics, name: str, column: str) -> np.ndarray:
    """One column over the sample the statistics use (``requests.latency_sample``)."""
    tm = rm.tenants[name]
    assert tm.table is not None
    cols = tm.table.columns
    values = cols[column][latency_sample(cols["sent_ns"], cols["status"], rm.window_ns)]
    return values[~np.isnan(values)]


def _ecdf_values(values: np.ndarray) -> np.ndarray:
    if values.size <= ECDF_POINTS:
        return values
    return np.quantile(values, np.linspace(0.0, 1.0, ECDF_POINTS + 1))


def _ecdf(
    samples: dict[str, np.ndarray], colors: dict[str, str], xlabel: str, title: str, out_dir: Path, name: str,
    plot_title: str, fmt: str, ylabel: str = "fraction of requests",
) -> Plot | None:  # fmt: skip
    """One ECDF per tenant (seaborn ``ecdfplot``, hue = tenant in its colour); a log x axis when
    the values are positive and span more than 20×."""
    samples = {t: v for t, v in samples.items() if v.size}
    if not samples:
        return None
    keys = {t: f"{t} (n={v.size})" for t, v in samples.items()}
    data = pd.concat(
        [pd.DataFrame({"value": _ecdf_values(v), "tenant": keys[t]}) for t, v in samples.items()], ignore_index=True
    )
    values = data["value"].to_numpy()
    log = bool(values.min() > 0 and values.max() / values.min() > 20)
    fig, ax = subplots(figsize=(7.5, 4))
    sns.ecdfplot(data=data, x="value", hue="tenant", palette={keys[t]: colors[t] for t in samples}, ax=ax,
                 log_scale=log, lw=1.6)  # fmt: skip
    if ax.get_legend() is not None:
        sns.move_legend(ax, "upper left", bbox_to_anchor=(1.01, 1.0), title=None, frameon=False)
    if log:
        # Plain numbers at 1, 2, 5 × 10ⁿ; no labels on the minor ticks (3×10¹ 4×10¹ ... collide).
        ax.xaxis.set_major_locator(matplotlib.ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xlabel(xlabel.replace(")", ", log scale)") if log else xlabel)
    ax.set_ylabel(ylabel)
    ax.set_ylim(0, 1.01)
    ax.set_title(title)
    return _save(fig, out_dir, name, plot_title, fmt)


def _cdf(rm: RunMetrics, colors: dict[str, str], column: str, label: str, out_dir: Path, name: str, fmt: str) -> Plot | None:
    samples = {tenant: _latency_sample(rm, tenant, column) for tenant in rm.tenants}
    return _ecdf(samples, colors, f"{label} (ms)", f"{label} CDF — {rm.run.run_id}", out_dir, name, f"{label} CDF", fmt)


def _itl(rm: RunMetrics, colors: dict[str, str], out_dir: Path, fmt: str) -> Plot | None:
    samples: dict[str, np.ndarray] = {}
    for tenant, tm in rm.tenants.items():
        table = tm.table
        if table is None or not table.itl_ns.size or rm.window_ns is None:
            continue
        cols = table.columns
        keep = latency_sample(cols["sent_ns"], cols["status"], rm.window_ns)
        samples[tenant] = table.itl_ns[keep[table.itl_row]] / NS_PER_MS
    return _ecdf(samples, colors, "inter-token latency (ms)", f"ITL distribution (ECDF) — {rm.run.run_id}", out_dir,
                 "itl_distribution", "ITL distribution", fmt, ylabel="fraction of gaps")  # fmt: skip


def _throughput_timeline(rm: RunMetrics, colors: dict[str, str], out_dir: Path, fmt: str) -> Plot | None:
    origin = time_origin_ns(rm)
    gen: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    fwd: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for tenant, log in rm.run.tenants.items():
        if rm.tenants[tenant].task == "forward":
            if log.iter_t_ns.size:
                fwd[tenant] = (log.iter_t_ns, log.iter_batch)
        elif log.tok_t_ns.size:
            gen[tenant] = (log.tok_t_ns, log.tok_n)
    if not gen and not fwd:
        return None
    everything = np.concatenate([t for t, _ in (*gen.values(), *fwd.values())])
    # 1 s bins aligned on the window's start, so the window's edges fall on bin edges.
    lo = int(np.floor((everything.min() - origin) / NS_PER_S))
    hi = int(np.floor((everything.max() - origin) / NS_PER_S)) + 1
    edges = np.arange(lo, hi + 1, dtype=np.float64)
    panels = [p for p in (("tok", gen), ("seq", fwd)) if p[1]]
    activity = _activity_series(rm)
    heights = [3.6] * len(panels) + ([2.6] if activity else [])
    fig, axes = subplots(len(heights), 1, figsize=(9, sum(heights)), sharex=True, squeeze=False,
                         gridspec_kw={"height_ratios": heights})  # fmt: skip
    if activity:
        _draw_activity(axes[-1, 0], rm, origin, activity)
    for ax, (unit, series) in zip(axes[:, 0], panels, strict=False):
        _shade_window(ax, rm, origin)
        stack = []
        for t, n in series.values():
            counts, _ = np.histogram((t - origin) / NS_PER_S, bins=edges, weights=n)
            stack.append(counts)
        ax.stackplot(
            edges[:-1],
            np.vstack(stack),
            labels=list(series),
            colors=[colors[t] for t in series],
            step="post",
            alpha=0.85,
        )
        ax.set_ylabel("tokens/s (1 s bins)" if unit == "tok" else "sequences/s (1 s bins)")
        legend_outside(ax)
    axes[-1, 0].set_xlabel("time since window start (s)")
    axes[0, 0].set_title(f"throughput per tenant, stacked — {rm.run.run_id}")
    return _save(fig, out_dir, "throughput_timeline", "Throughput over time", fmt)


# GPU activity lines under the throughput timeline: (telemetry key, legend label, style).
ACTIVITY_LINES = (
    ("sm_active_pct", "SM active", ("0.1", "-")),
    ("sm_occupancy_pct", "SM occupancy", ("0.45", ":")),
    ("dram_bw_pct", "DRAM bandwidth", ("0.35", "--")),
    ("tensor_active_pct", "tensor active", ("0.6", "-.")),
)


def _activity_series(rm: RunMetrics) -> list[tuple[str, str, tuple[str, str]]]:
    """The ACTIVITY_LINES the run's telemetry holds (empty without telemetry or counters)."""
    tel = rm.run.telemetry
    return [line for line in ACTIVITY_LINES if tel is not None and tel.has(line[0])]


def _draw_activity(ax: plt.Axes, rm: RunMetrics, origin: int, lines: list[tuple[str, str, tuple[str, str]]]) -> None:
    """GPU activity (%) over time, each sample drawn over the interval it describes (it covers
    the time since the previous sample: ``step="pre"``)."""
    tel = rm.run.telemetry
    assert tel is not None
    x = (tel.t_ns - origin) / NS_PER_S
    _shade_window(ax, rm, origin, label=False)
    for key, label, (color, style) in lines:
        ax.step(x, tel.columns[key], where="pre", label=label, color=color, ls=style, lw=1.3)
    source = rm.run.manifest.activity.gpu_activity_source if rm.run.manifest.activity is not None else None
    ax.set_ylabel(f"GPU activity (%)\nsource: {source or 'unknown'}")
    ax.set_ylim(0, 105)
    legend_outside(ax, fontsize="small")


def _request_latency(rm: RunMetrics, colors: dict[str, str], out_dir: Path, fmt: str) -> Plot | None:
    origin = time_origin_ns(rm)
    fig, (ax_ttft, ax_e2e) = subplots(2, 1, figsize=(9, 6.5), sharex=True)
    drawn = False
    for tenant, tm in rm.tenants.items():
        if tm.table is None:
            continue
        cols = tm.table.columns
        ok = (cols["status"] == RequestStatus.OK) & (cols["sent_ns"] != NO_TIME)
        x = (cols["sent_ns"][ok] - origin) / NS_PER_S
        for ax, column in ((ax_ttft, "ttft_ms"), (ax_e2e, "e2e_ms")):
            y = cols[column][ok]
            keep = ~np.isnan(y)
            if keep.any():
                size = 6 if keep.sum() < 2000 else 2  # thousands of points: small dots, less overdraw
                ax.scatter(x[keep], y[keep], s=size, color=colors[tenant], label=tenant, alpha=0.6, rasterized=True)
                drawn = True
    if not drawn:
        plt.close(fig)
        return None
    for ax, label in ((ax_ttft, "TTFT (ms)"), (ax_e2e, "end-to-end latency (ms)")):
        _shade_window(ax, rm, origin, label=ax is ax_ttft)
        ax.set_ylabel(label)
    legend_outside(ax_ttft, markerscale=2)
    ax_e2e.set_xlabel("request sent, time since window start (s)")
    ax_ttft.set_title(f"latency of each completed request — {rm.run.run_id}")
    return _save(fig, out_dir, "request_latency", "Latency of each request", fmt)


def _telemetry(rm: RunMetrics, colors: dict[str, str], out_dir: Path, fmt: str) -> Plot | None:
    tel = rm.run.telemetry
    if tel is None or not tel.t_ns.size:
        return None
    origin = time_origin_ns(rm)
    x = (tel.t_ns - origin) / NS_PER_S
    panels: list[tuple[str, list[Series]]] = []
    util: list[Series] = [(lbl, tel.columns[k], None) for k, lbl in (("gpu_util_pct", "GPU"), ("mem_util_pct", "memory bus")) if tel.has(k)]
    if util:
        panels.append(("utilization (%)", util))
    if tel.has("mem_used_bytes"):
        panels.append(("memory used (GiB)", [("GPU memory", tel.columns["mem_used_bytes"] / 2**30, None)]))
    per_tenant_mem: list[Series] = [
        (k.split("/", 1)[1], v / 2**30, k.split("/", 1)[1]) for k, v in tel.columns.items()
        if k.startswith("tenant_gpu_mem_bytes/") and tel.has(k)
    ]
    if per_tenant_mem:
        panels.append(("tenant GPU memory (GiB)", per_tenant_mem))
    if tel.has("power_w"):
        panels.append(("power (W)", [("board power", tel.columns["power_w"], None)]))
    clocks: list[Series] = [(lbl, tel.columns[k], None) for k, lbl in (("sm_clock_mhz", "SM clock"), ("mem_clock_mhz", "memory clock")) if tel.has(k)]
    if clocks:
        panels.append(("clock (MHz)", clocks))
    cpu: list[Series] = [
        (k.split("/", 1)[1], v, k.split("/", 1)[1]) for k, v in tel.columns.items()
        if k.startswith("tenant_cpu_pct/") and tel.has(k)
    ]
    if cpu:
        panels.append(("tenant CPU (%)", cpu))
    if not panels:
        return None
    fig, axes = subplots(len(panels), 1, figsize=(9, 2.3 * len(panels) + 0.6), sharex=True, squeeze=False)
    for i, (ax, (ylabel, series)) in enumerate(zip(axes[:, 0], panels, strict=True)):
        _shade_window(ax, rm, origin, label=i == 0)
        for j, (label, values, tenant) in enumerate(series):
            color, style = (colors[tenant], "-") if tenant else NEUTRAL_STYLES[j % len(NEUTRAL_STYLES)]
            ax.plot(x, values, label=label, color=color, ls=style, lw=1.2)
        ax.set_ylabel(ylabel)
        legend_outside(ax, fontsize="small")
    axes[-1, 0].set_xlabel("time since window start (s)")
    axes[0, 0].set_title(f"telemetry — {rm.run.run_id}")
    return _save(fig, out_dir, "telemetry", "Telemetry", fmt)


def plot_run(rm: RunMetrics, out_dir: Path, fmt: str, colors: dict[str, str]) -> list[Plot]:
    """Every per-run figure that the run's data allows, written to ``out_dir``."""
    plots = [
        _cdf(rm, colors, "ttft_ms", "TTFT", out_dir, "ttft_cdf", fmt),
        _cdf(rm, colors, "tpot_ms", "TPOT", out_dir, "tpot_cdf", fmt),
        _itl(rm, colors, out_dir, fmt),
        _throughput_timeline(rm, colors, out_dir, fmt),
        _request_latency(rm, colors, out_dir, fmt),
        _telemetry(rm, colors, out_dir, fmt),
    ]
    return [p for p in plots if p is not None]


def plot_across(
    rms: list[RunMetrics], labels: dict[int, str], out_dir: Path, fmt: str, colors: dict[str, str]
) -> list[Plot]:
    """Solo vs co-located throughput (with NP) and the slowdown heatmap, over every tenant of
    every run that has a matched baseline; empty when none has. ``labels[id(rm)]`` names runs."""
    rows = [(rm, name, tm) for rm in rms for name, tm in rm.tenants.items() if tm.np is not None]
    if not rows:
        return []
    plots: list[Plot] = []
    multi = len({id(rm) for rm, _, _ in rows}) > 1
    # Run labels can be long (job1__split=50-50): one line per "__" part, so they never collide.
    names = [f"{labels[id(rm)].replace('__', chr(10))}\n{name}" if multi else name for rm, name, _ in rows]

    fig, ax = subplots(figsize=(max(6.0, 1.3 * len(rows) + 2), 4.5))
    x = np.arange(len(rows))
    solo = [tm.solo_throughput or 0.0 for _, _, tm in rows]
    colo = [tm.throughput or 0.0 for _, _, tm in rows]
    bar_colors = [colors[name] for _, name, _ in rows]
    ax.bar(x - 0.2, solo, 0.4, color=bar_colors, alpha=0.35, hatch="//", edgecolor="0.3", label="solo")
    ax.bar(x + 0.2, colo, 0.4, color=bar_colors, edgecolor="0.3", label="co-located")
    for xi, (_, _, tm), height in zip(x, rows, colo, strict=True):
        # An open-loop tenant's NP is its mean solo / co-located E2E, not this bar pair's ratio.
        label = f"NP {tm.np:.2f}" + (" E2E" if tm.np_definition == NP_E2E else "")
        ax.annotate(label, (xi + 0.2, height), ha="center", va="bottom", fontsize="small")
    ax.set_xticks(x, names, fontsize="small")
    units = {tm.throughput_unit for _, _, tm in rows}
    ax.set_ylabel("throughput (" + " or ".join(sorted(units)) + ")")
    ax.set_ylim(top=ax.get_ylim()[1] * 1.08)  # room for the NP labels above the bars
    legend_outside(ax)
    ax.set_title("solo vs co-located throughput (NP = co-located / solo)")
    plots.append(_save(fig, out_dir, "np_throughput", "Solo vs co-located throughput", fmt))

    grid = np.array(
        [[np.nan if (tm.slowdown or {}).get(k) is None else (tm.slowdown or {})[k] for k, _, _ in SLOWDOWN_KEYS] for _, _, tm in rows],
        dtype=float,
    )
    fig, ax = plt.subplots(figsize=(7, 0.55 * len(rows) + 2))
    finite = grid[np.isfinite(grid)]
    # 1x (no slowdown) at the bottom of the scale unless some tenant got faster than solo.
    vmin = min(1.0, float(finite.min())) if finite.size else 1.0
    vmax = max(2.0, float(finite.max())) if finite.size else 2.0
    annot = np.array([["n/a" if np.isnan(v) else f"{v:.2f}×" for v in r] for r in grid], dtype=object)
    ax.set_facecolor("0.8")  # a missing slowdown (masked) shows grey with "n/a"
    sns.heatmap(grid, mask=np.isnan(grid), annot=annot, fmt="", cmap="viridis", vmin=vmin, vmax=vmax, ax=ax,
                cbar_kws={"label": "slowdown (co-located / solo, ×)"}, annot_kws={"fontsize": "small"},
                xticklabels=[k.replace("_", " ") for k, _, _ in SLOWDOWN_KEYS],
                yticklabels=[n.replace("\n", " / ") for n in names], linewidths=0.5, linecolor="white")  # fmt: skip
    for (i, j), value in np.ndenumerate(grid):
        if np.isnan(value):  # seaborn leaves masked cells unannotated
            ax.text(j + 0.5, i + 0.5, "n/a", ha="center", va="center", fontsize="small")
    ax.tick_params(axis="y", rotation=0)
    ax.set_title("latency slowdown vs solo")
    plots.append(_save(fig, out_dir, "slowdown_heatmap", "Slowdown heatmap", fmt))
    return plots
