"""A sweep's figures: metrics against the swept parameter with 95 % CI bands, the NP trade-off
of a split sweep with its Pareto points, STP and fairness against the split, SLO attainment
against the swept parameter (rate sweeps: with each tenant's highest rate meeting the target),
and heatmaps of a 2-D sweep.

The x axis is the sweep's first split axis, else its first rate axis, else its first axis (SLO
attainment: the first rate axis whenever there is one);
points that differ on the other axes are separate lines (their values in the legend). An axis
whose values are all numbers (a split ``70/30`` counts as its first share, 70) is numeric, any
other is categorical in the sweep's order. Bands span each point's CI, our own Student-t
interval over trials (``stats.estimate``), not seaborn's bootstrap; a point with one trial has
none, so the band has a gap there. seaborn draws the mean lines (``lineplot``, ``errorbar=None``)
and the 2-D heatmaps; legends sit right of the axes, never over the curves.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import seaborn as sns

from multitenant.analysis.names import RUN_LEVEL
from multitenant.analysis.plots import Plot, _save, legend_outside, plt, subplots
from multitenant.analysis.stats import Estimate
from multitenant.analysis.sweep import (
    Point,
    Sweep,
    axis_number,
    is_rate_key,
    is_split_key,
    short_key,
)

LINESTYLES = ("-", "--", ":", "-.")
MARKERS = ("o", "s", "^", "D", "v", "P")
AGGREGATE_COLOR = "0.15"


def primary_axis(sweep: Sweep) -> str | None:
    """The axis the curves are drawn against (module docstring)."""
    for pick in (sweep.split_axes, sweep.rate_axes, sweep.axes):
        if pick:
            return pick[0]
    return None


def axis_label(key: str) -> str:
    if key == "split":
        return "split (first tenant's active thread %)"
    if is_split_key(key):
        return f"{short_key(key)} (%)"
    if is_rate_key(key):
        return f"{short_key(key)} (req/s)"
    return short_key(key)


def _positions(sweep: Sweep, key: str) -> tuple[dict[str | None, float], list[float], list[str]]:
    """x of each value of ``key``, and the ticks to label them with."""
    k = sweep.axes.index(key)
    values: list[str | None] = []
    for p in sweep.points:
        if p.values[k] not in values:
            values.append(p.values[k])
    numbers = [axis_number(v) for v in values]
    if all(n is not None for n in numbers):
        xs = {v: float(n) for v, n in zip(values, numbers, strict=True) if n is not None}
    else:
        xs = {v: float(i) for i, v in enumerate(values)}
    ordered = sorted(values, key=lambda v: xs[v])
    return xs, [xs[v] for v in ordered], ["default" if v is None else v for v in ordered]


def _groups(sweep: Sweep, key: str) -> list[tuple[str, list[Point]]]:
    """Points split by their values on every axis but ``key``: (legend suffix, points)."""
    k = sweep.axes.index(key)
    groups: dict[tuple[str | None, ...], list[Point]] = {}
    for p in sweep.points:
        groups.setdefault(p.values[:k] + p.values[k + 1 :], []).append(p)
    others = [a for a in sweep.axes if a != key]
    out = []
    for fixed, points in groups.items():
        suffix = ", ".join(
            f"{short_key(a)}={'default' if v is None else v}" for a, v in zip(others, fixed, strict=True)
        )
        out.append((f" ({suffix})" if suffix else "", points))
    return out


def _band(ax: plt.Axes, xs: Sequence[float], estimates: Sequence[Estimate], color: str, label: str,
          ls: str = "-", marker: str = "o", scale: float = 1.0) -> bool:  # fmt: skip
    """Mean line with markers and a CI band; False (nothing drawn) when no point has a mean."""
    order = np.argsort(xs)
    x = np.asarray(xs, dtype=float)[order]
    ests = [estimates[i] for i in order]
    mean = np.array([np.nan if e.mean is None else e.mean * scale for e in ests])
    if np.all(np.isnan(mean)):
        return False
    lo = np.array([np.nan if e.ci_low is None else e.ci_low * scale for e in ests])
    hi = np.array([np.nan if e.ci_high is None else e.ci_high * scale for e in ests])
    keep = ~np.isnan(mean)
    sns.lineplot(x=x[keep], y=mean[keep], ax=ax, color=color, linestyle=ls, marker=marker, label=label, lw=1.5,
                 ms=5, errorbar=None, sort=False)  # fmt: skip
    has = ~np.isnan(lo)
    if has.any():
        ax.fill_between(x, lo, hi, where=has, color=color, alpha=0.18, lw=0, interpolate=False)
        # A point with an interval but no neighbour that has one spans no band: an error bar instead.
        neighbour = np.zeros_like(has)
        neighbour[1:] |= has[:-1]
        neighbour[:-1] |= has[1:]
        alone = has & ~neighbour
        if alone.any():
            ax.errorbar(x[alone], mean[alone], yerr=[mean[alone] - lo[alone], hi[alone] - mean[alone]], fmt="none",
                        ecolor=color, alpha=0.6, capsize=3, lw=1)  # fmt: skip
    return True


def _ticks(ax: plt.Axes, ticks: list[float], labels: list[str], key: str) -> None:
    ax.set_xticks(ticks, labels, rotation=30 if max((len(s) for s in labels), default=0) > 5 else 0)
    ax.set_xlabel(axis_label(key))


def _ci_title(sweep: Sweep) -> str:
    trials = sorted({p.n_trials for p in sweep.points})
    n = str(trials[0]) if len(trials) == 1 else f"{trials[0]}–{trials[-1]}"
    return f"mean of {n} trial(s), band: 95 % CI" if trials[-1] > 1 else "1 trial per point: no CI"


def _curves(
    sweep: Sweep, key: str, colors: dict[str, str], metric: str, ax: plt.Axes, scale: float = 1.0,
    aggregate: str | None = None, ls: str | None = None, tag: str = "",
) -> bool:  # fmt: skip
    """One line per tenant (and group of the other axes) of ``metric``; ``aggregate`` adds the
    run-level metric; ``ls`` fixes the line style (else one per group), ``tag`` ends each label."""
    xs, _, _ = _positions(sweep, key)
    k = sweep.axes.index(key)
    drawn = False
    for g, (suffix, points) in enumerate(_groups(sweep, key)):
        x = [xs[p.values[k]] for p in points]
        style = ls or LINESTYLES[g % len(LINESTYLES)]
        marker = MARKERS[g % len(MARKERS)]
        for t in sweep.tenants:
            if (t, metric) in sweep.rows:
                label = f"{t}{tag}{suffix}"
                drawn |= _band(
                    ax, x, [p.get(t, metric) for p in points], colors[t], label, style, marker, scale
                )
        if aggregate is not None and (RUN_LEVEL, aggregate) in sweep.rows:
            est = [p.get(RUN_LEVEL, aggregate) for p in points]
            drawn |= _band(ax, x, est, AGGREGATE_COLOR, f"all tenants{suffix}", style, marker, scale)
        for t, m, color in [*((t, metric, colors[t]) for t in sweep.tenants), (RUN_LEVEL, aggregate, AGGREGATE_COLOR)]:
            _predicted(ax, x, [p.predicted.get((t, m or "")) for p in points], color, f"{'all tenants' if t == RUN_LEVEL else t} predicted{suffix}", scale)
    return drawn


def _predicted(ax: plt.Axes, xs: Sequence[float], values: Sequence[float | None], color: str, label: str, scale: float) -> None:
    """``--predict``: the oracle's curve over the measured band (dotted, x markers)."""
    pts = sorted((x, v * scale) for x, v in zip(xs, values, strict=True) if v is not None)
    if pts:
        ax.plot([x for x, _ in pts], [v for _, v in pts], ls=":", marker="x", color=color, lw=1.6, label=label)


def _throughput(sweep: Sweep, key: str, colors: dict[str, str], out: Path, fmt: str) -> Plot | None:
    fig, ax = subplots(figsize=(8, 4.5))
    if not _curves(sweep, key, colors, "throughput_tok_s", ax, aggregate="gpu_throughput_tok_s"):
        plt.close(fig)
        return None
    _, ticks, labels = _positions(sweep, key)
    _ticks(ax, ticks, labels, key)
    ax.set_ylabel("throughput (tok/s, in window)")
    ax.set_ylim(bottom=0)
    legend_outside(ax, fontsize="small")
    ax.set_title(f"throughput vs {short_key(key)} — {_ci_title(sweep)}")
    return _save(fig, out, "sweep_throughput", f"Throughput vs {short_key(key)}", fmt)


def _latency(sweep: Sweep, key: str, colors: dict[str, str], out: Path, fmt: str) -> Plot | None:
    """TTFT, TPOT and E2E (columns) at p50 and p99 (rows): one panel per metric and percentile,
    so the two percentiles of a tenant never share a panel."""
    stats = ("p50", "p99")
    fig, axes = subplots(len(stats), 3, figsize=(15, 7.5), sharex=True)
    drawn = False
    _, ticks, labels = _positions(sweep, key)
    for r, stat in enumerate(stats):
        for c, metric in enumerate(("ttft", "tpot", "e2e")):
            ax = axes[r, c]
            drawn |= _curves(sweep, key, colors, f"{metric}_{stat}_ms", ax)
            _ticks(ax, ticks, labels, key)
            if r < len(stats) - 1:
                ax.set_xlabel("")
            ax.set_ylabel(f"{metric.upper()} {stat} (ms)")
            ax.set_ylim(bottom=0)
            if ax.get_legend() is not None:
                ax.get_legend().remove()
    if not drawn:
        plt.close(fig)
        return None
    # One legend for all panels (every panel has the same lines), right of the grid.
    handles, names = axes[0, 0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, names, loc="upper left", bbox_to_anchor=(1.0, 0.95), frameon=False, fontsize="small")
    fig.suptitle(f"latency percentiles vs {short_key(key)} — {_ci_title(sweep)}")
    fig.tight_layout()
    return _save(fig, out, "sweep_latency", f"Latency vs {short_key(key)}", fmt)


def _attainment(sweep: Sweep, key: str, colors: dict[str, str], out: Path, fmt: str) -> Plot | None:
    if sweep.slo is None:
        return None
    fig, ax = subplots(figsize=(8, 4.5))
    if not _curves(sweep, key, colors, "slo_attainment", ax, scale=100.0):
        plt.close(fig)
        return None
    ax.axhline(100 * sweep.target, color="0.3", ls="--", lw=1, label=f"target {100 * sweep.target:g} %")
    for r in sweep.rate_limits:
        if r.key == key and r.max_rate is not None and not r.fixed:
            ax.axvline(
                r.max_rate,
                color=colors[r.tenant],
                ls=":",
                lw=1.2,
                label=f"{r.tenant} max rate {r.max_rate:g}",
            )
    _, ticks, labels = _positions(sweep, key)
    _ticks(ax, ticks, labels, key)
    ax.set_ylabel("SLO attainment (%)")
    ax.set_ylim(0, 102)
    legend_outside(ax, fontsize="small")
    bounds = ", ".join(f"{k} ≤ {v:g} ms" for k, v in sweep.slo.items())
    ax.set_title(f"SLO attainment ({bounds}) vs {short_key(key)} — {_ci_title(sweep)}")
    return _save(fig, out, "sweep_slo_attainment", f"SLO attainment vs {short_key(key)}", fmt)


def _tradeoff(sweep: Sweep, key: str, colors: dict[str, str], out: Path, fmt: str) -> Plot | None:
    """NP of the first two tenants, one marker per point, CI as error bars, Pareto points starred
    and joined (the frontier)."""
    if len(sweep.tenants) < 2:
        return None
    a, b = sweep.tenants[:2]
    pts = [p for p in sweep.points if p.get(a, "np").mean is not None and p.get(b, "np").mean is not None]
    if not pts:
        return None
    fig, ax = subplots(figsize=(6.5, 6))
    for p in pts:
        ea, eb = p.get(a, "np"), p.get(b, "np")
        assert ea.mean is not None and eb.mean is not None
        xerr = (
            None
            if ea.half_width is None
            else [[ea.mean - (ea.ci_low or ea.mean)], [(ea.ci_high or ea.mean) - ea.mean]]
        )
        yerr = (
            None
            if eb.half_width is None
            else [[eb.mean - (eb.ci_low or eb.mean)], [(eb.ci_high or eb.mean) - eb.mean]]
        )
        star = bool(p.pareto)
        ax.errorbar(ea.mean, eb.mean, xerr=xerr, yerr=yerr, fmt="*" if star else "o", ms=13 if star else 6,
                    color="#d62728" if star else "0.4", ecolor="0.6", capsize=3)  # fmt: skip
        ax.annotate(p.label(sweep.axes).replace(", ", "\n"), (ea.mean, eb.mean), textcoords="offset points",
                    xytext=(6, 6), fontsize="x-small")  # fmt: skip
    frontier = sorted((p for p in pts if p.pareto), key=lambda p: p.get(a, "np").mean or 0.0)
    if len(frontier) > 1:
        fx = [p.get(a, "np").mean or 0.0 for p in frontier]
        fy = [p.get(b, "np").mean or 0.0 for p in frontier]
        ax.plot(fx, fy, color="#d62728", lw=1, ls="--", label="Pareto frontier")
    pred = [(p.predicted[(a, "np")], p.predicted[(b, "np")]) for p in pts if p.predicted.get((a, "np")) is not None
            and p.predicted.get((b, "np")) is not None]  # fmt: skip
    if pred:  # --predict: the oracle's NPs at the measured points
        ax.plot(*zip(*sorted(pred), strict=True), ls=":", marker="x", color="0.2", lw=1.2, label="predicted")
    ax.plot([], [], "*", color="#d62728", ms=11, ls="none", label="Pareto point")
    ax.plot([0, 1], [1, 0], color="0.75", lw=0.8, ls=":", label="STP = 1")
    ax.set_xlabel(f"NP of {a}")
    ax.set_ylabel(f"NP of {b}")
    ax.set_xlim(left=0)
    ax.set_ylim(bottom=0)
    legend_outside(ax, fontsize="small")
    ax.set_title(f"NP trade-off over {short_key(key)} — {_ci_title(sweep)}")
    return _save(fig, out, "sweep_np_tradeoff", "NP trade-off (Pareto points starred)", fmt)


def _stp_fairness(sweep: Sweep, key: str, colors: dict[str, str], out: Path, fmt: str) -> Plot | None:
    if (RUN_LEVEL, "stp") not in sweep.rows:
        return None
    fig, axes = subplots(1, 2, figsize=(12, 4.2))
    xs, ticks, labels = _positions(sweep, key)
    k = sweep.axes.index(key)
    for ax, metric, label in zip(
        axes, ("stp", "fairness"), ("STP (Σ NP)", "fairness (min NP / max NP)"), strict=True
    ):
        for g, (suffix, points) in enumerate(_groups(sweep, key)):
            _band(ax, [xs[p.values[k]] for p in points], [p.get(RUN_LEVEL, metric) for p in points], AGGREGATE_COLOR,
                  f"{metric}{suffix}", LINESTYLES[g % len(LINESTYLES)], MARKERS[g % len(MARKERS)])  # fmt: skip
        _ticks(ax, ticks, labels, key)
        ax.set_ylabel(label)
        ax.set_ylim(bottom=0)
        if ax.get_legend() is not None:
            ax.get_legend().remove()
    axes[0].axhline(1.0, color="0.7", lw=0.8, ls=":")
    # The panels differ only in the metric (their y labels): one legend of the other axes' values,
    # right of both panels (a legend beside the left panel would sit on the right one).
    handles, names = axes[0].get_legend_handles_labels()
    if len(_groups(sweep, key)) > 1 and handles:
        names = [n.removeprefix("stp").strip(" ()") for n in names]
        fig.legend(handles, names, loc="upper left", bbox_to_anchor=(1.0, 0.9), frameon=False, fontsize="small")
    fig.suptitle(f"STP and fairness vs {short_key(key)} — {_ci_title(sweep)}")
    fig.tight_layout()
    return _save(fig, out, "sweep_stp_fairness", f"STP and fairness vs {short_key(key)}", fmt)


def _heatmap(sweep: Sweep, out: Path, fmt: str) -> Plot | None:
    """A 2-D sweep: one heatmap panel per figure (aggregate throughput, STP, lowest-tenant SLO
    attainment), rows the second axis, columns the first; cells annotated with the mean."""
    if len(sweep.axes) != 2:
        return None
    kx, ky = sweep.axes
    xs, xticks, xlabels = _positions(sweep, kx)
    ys, yticks, ylabels = _positions(sweep, ky)
    col = {x: i for i, x in enumerate(xticks)}
    row = {y: i for i, y in enumerate(yticks)}
    panels: list[tuple[str, dict[int, float | None]]] = []

    def cells(get: Callable[[Point], float | None]) -> dict[int, float | None]:
        return {id(p): get(p) for p in sweep.points}

    panels.append(
        ("aggregate throughput (tok/s)", cells(lambda p: p.get(RUN_LEVEL, "gpu_throughput_tok_s").mean))
    )
    if (RUN_LEVEL, "stp") in sweep.rows:
        panels.append(("STP (Σ NP)", cells(lambda p: p.get(RUN_LEVEL, "stp").mean)))
    if sweep.choices:
        by_point = {id(c.point): c.min_attainment for c in sweep.choices}
        panels.append(
            (
                "lowest tenant SLO attainment (%)",
                {k: None if v is None else 100 * v for k, v in by_point.items()},
            )
        )
    fig, axes = plt.subplots(
        1, len(panels), figsize=(5.5 * len(panels), 0.5 * len(yticks) + 3), squeeze=False
    )
    for ax, (title, values) in zip(axes[0], panels, strict=True):
        grid = np.full((len(yticks), len(xticks)), np.nan)
        for p in sweep.points:
            v = values.get(id(p))
            if v is not None:
                grid[row[ys[p.values[1]]], col[xs[p.values[0]]]] = v
        # Rows bottom-up (the second axis grows upwards, as on the curves' y axes).
        flipped = grid[::-1]
        annot = np.array([["" if np.isnan(v) else f"{v:.3g}" for v in r] for r in flipped], dtype=object)
        ax.set_facecolor("0.85")  # a point without the figure: grey, "n/a"
        sns.heatmap(flipped, mask=np.isnan(flipped), annot=annot, fmt="", cmap="viridis", ax=ax,
                    xticklabels=xlabels, yticklabels=ylabels[::-1], linewidths=0.5, linecolor="white",
                    annot_kws={"fontsize": "small"})  # fmt: skip
        for (i, j), v in np.ndenumerate(flipped):
            if np.isnan(v):
                ax.text(j + 0.5, i + 0.5, "n/a", ha="center", va="center", fontsize="small")
        ax.tick_params(axis="y", rotation=0)
        ax.set_xlabel(axis_label(kx))
        ax.set_ylabel(axis_label(ky))
        ax.set_title(title)
    trials = sorted({p.n_trials for p in sweep.points})
    fig.suptitle(f"2-D sweep: means over {trials[0] if len(trials) == 1 else f'{trials[0]}–{trials[-1]}'} trial(s) per point", y=1.0)
    fig.tight_layout(rect=(0, 0, 1, 0.95))  # the suptitle above the panels' titles, not on them
    return _save(fig, out, "sweep_heatmap", "2-D sweep heatmap", fmt)


def plot_sweep(sweep: Sweep, out_dir: Path, fmt: str, colors: dict[str, str]) -> list[Plot]:
    """Every sweep figure its data allows (none for fewer than two points)."""
    key = primary_axis(sweep)
    if key is None or len(sweep.points) < 2:
        return []
    figures = [
        _throughput(sweep, key, colors, out_dir, fmt),
        _latency(sweep, key, colors, out_dir, fmt),
        # Attainment against the arrival rate when one is swept: the rate-sweep figure.
        _attainment(sweep, (sweep.rate_axes or [key])[0], colors, out_dir, fmt),
    ]
    if is_split_key(key):
        figures += [
            _tradeoff(sweep, key, colors, out_dir, fmt),
            _stp_fairness(sweep, key, colors, out_dir, fmt),
        ]
    figures.append(_heatmap(sweep, out_dir, fmt))
    return [f for f in figures if f is not None]
