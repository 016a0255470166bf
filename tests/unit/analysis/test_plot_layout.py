"""Plots: legends never cover data, sweep_latency keeps p50 and p99 apart, ECDFs by seaborn.
Figures are caught before they are saved and measured once drawn."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from multitenant.analysis import plots, sweep_plots
from multitenant.analysis.cli import main
from tests.unit.analysis.sweep_builders import job, solo, sweep_dir

HAND = Path(__file__).resolve().parents[2] / "data" / "analysis" / "hand"


@pytest.fixture
def figures(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    caught: dict[str, Any] = {}

    def keep(fig: Any, out_dir: Path, name: str, title: str, fmt: str) -> plots.Plot:
        fig.canvas.draw()
        caught[name] = fig
        return plots.Plot(name=name, title=title, path=out_dir / f"{name}.{fmt}", png=b"")

    monkeypatch.setattr(plots, "_save", keep)
    monkeypatch.setattr(sweep_plots, "_save", keep)
    return caught


def _overlaps(a: Any, b: Any) -> bool:
    return a.x0 < b.x1 and b.x0 < a.x1 and a.y0 < b.y1 and b.y0 < a.y1


def assert_legends_outside(name: str, fig: Any) -> None:
    renderer = fig.canvas.get_renderer()
    legends = [ax.get_legend() for ax in fig.axes if ax.get_legend() is not None] + list(fig.legends)
    for legend in legends:
        box = legend.get_window_extent(renderer)
        for ax in fig.axes:
            if ax.get_label() == "<colorbar>":
                continue
            assert not _overlaps(box, ax.get_window_extent(renderer)), f"{name}: a legend lies on the data"


def test_per_run_legends_lie_outside_the_data(tmp_path: Path, figures: dict[str, Any]) -> None:
    argv = [str(HAND / "pair"), "--baseline", str(HAND / "solo_alpha"), "--baseline", str(HAND / "solo_beta")]
    assert main([*argv, "--out", str(tmp_path / "out")]) == 0
    assert {"np_throughput", "throughput_timeline", "telemetry", "ttft_cdf", "itl_distribution"} <= set(figures)
    for name, fig in figures.items():
        assert_legends_outside(name, fig)


def test_sweep_latency_has_a_panel_per_metric_and_percentile(tmp_path: Path, figures: dict[str, Any]) -> None:
    root = tmp_path / "experiments"
    sweep = sweep_dir(root / "pair")
    for trial in range(3):
        for i, (split, n_a) in enumerate((("70/30", 5), ("50/50", 3))):
            job(sweep, f"job{2 * trial + i}", [f"split={split}"], {"a": (n_a + trial, trial), "b": (3, 0)}, trial=trial)
    solo(root, "a", 7)
    solo(root, "b", 7)
    assert main([str(sweep), "--slo", "ttft=50ms", "--out", str(tmp_path / "out")]) == 0
    latency = figures["sweep_latency"]
    ylabels = sorted(ax.get_ylabel() for ax in latency.axes)
    assert ylabels == sorted(f"{m} {s} (ms)" for m in ("TTFT", "TPOT", "E2E") for s in ("p50", "p99"))
    for name, fig in figures.items():
        assert_legends_outside(name, fig)
