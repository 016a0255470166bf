"""``mt-analyze --predict`` end to end on constructed solo and pair runs (CPU only).

Every tenant has the same spec; each gets 10 requests in [1000, 3000] ms with TTFT 20 ms, so
its throughput is 5 (n_tok + 1) tok/s (sweep_builders). Solos of tenant ``llama``: MPS at 25, 50
and 100 % with 20, 40, 80 tok/s, and a time-sliced one with 80 tok/s (the reference); in every
solo 60 % of the SMs are active, DRAM bandwidth is 60 % of peak (B/A = 1: memory-bound) and a
kernel always runs (gpu_util 100 %).

By hand (docs/prediction.md): T(s) = 0.8 s tok/s; under MPS the two tenants demand 1.2 of peak
bandwidth at every split, so each is stretched by 1.2: at 50/50 T' = 40 / 1.2 = 33.3 tok/s,
NP = 0.4167; at 100/100 T' = 66.7, NP 0.833, STP 1.667; time-sliced U = 1 + 1: NP = 0.5 (1 - 0.02)
= 0.49. Under ttft = 50 ms predicted TTFT = 20 / NP: 50/50 48 ms and timeslice 40.8 ms meet it,
70/30's b (NP 0.25, 80 ms) does not; the best by aggregate throughput is 100/100 (133 tok/s).
"""

from __future__ import annotations

import io
from pathlib import Path

import pandas as pd
import pytest

from multitenant.analysis.cli import main
from multitenant.analysis.predict import TIMESLICE_OVERHEAD
from tests.unit.analysis.builders import RunBuilder
from tests.unit.analysis.hw_builders import activity, gpu, patch_manifest, samples
from tests.unit.analysis.sweep_builders import add_tenant

TELEMETRY = [{**s, "gpu_util_pct": 100} for s in samples([(ms, 60, 60, {}) for ms in range(1100, 3000, 100)])]


def run(root: Path, dirname: str, tenants: dict[str, int], shares: dict[str, int] | None, overrides: list[str]) -> Path:
    """A run of ``tenants`` {name: n_tok}; ``shares`` {name: active_thread_pct} under MPS, None: time-sliced."""
    rb = RunBuilder(root, dirname, mode="timeslice" if shares is None else "mps", gpu=gpu())
    for name, n_tok in tenants.items():
        add_tenant(rb, name, n_tok)
    rb.telemetry = TELEMETRY
    d = rb.write()
    records = {n: {"share": {"active_thread_pct": s}, "share_applied": True} for n, s in (shares or {}).items()}
    patch_manifest(d, activity=activity(), tenants=records, overrides=overrides)
    return d


@pytest.fixture
def solos(tmp_path: Path) -> Path:
    root = tmp_path / "solos"
    for share, n_tok in ((25, 3), (50, 7), (100, 15)):
        run(root, f"mps{share}", {"llama": n_tok}, {"llama": share}, [f"tenants.llama.share.active_thread_pct={share}"])
    run(root, "timeslice", {"llama": 15}, None, ["mode=timeslice"])
    return root


def _stderr(capsys: pytest.CaptureFixture[str]) -> str:
    return " ".join(capsys.readouterr().err.split())  # rich may fold long lines


def test_predict_alone_prints_the_grid_and_the_best_split(solos: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--predict", str(solos), "--slo", "ttft=50ms"]) == 0
    err = _stderr(capsys)
    assert "predicted from solo runs" in err
    for label in ("90/10", "50/50", "10/90", "100/100", "timeslice"):
        assert f" {label} " in err
    # 50/50: 33 tok/s each, NP 0.417, TTFT 20 / 0.4167 = 48 ms, TPOT 12 / 0.4167 = 28.8 ms (the
    # reference's TPOT: 15 tokens at +20 ms, one at +200: 180 / 15); STP 0.833, ANTT 2.4; SLO met.
    assert "50/50 33 (0.417) 33 (0.417) 48.0/28.8 48.0/28.8 0.833 2.40 1.00 100/100" in err
    assert "70/30 47 (0.583) 20 (0.250) 34.3/20.6 80.0/48.0 0.833 2.86 0.43 100/0" in err
    ts = 0.5 * (1 - TIMESLICE_OVERHEAD)
    assert f"timeslice 39 ({ts:.3f}) 39 ({ts:.3f}) 40.8/24.5 40.8/24.5 {2 * ts:.3f}" in err
    assert (
        "predicted best split (SLO ttft ≤ 50 ms, every tenant ≥ 90 %; by aggregate throughput): "
        "100/100 — aggregate 133 tok/s, STP 1.667, NP llama 0.833, llama#2 0.833"
    ) in err


def test_predict_without_an_slo_ranks_by_throughput(solos: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--predict", str(solos)]) == 0
    assert "predicted best split (no SLO; by aggregate throughput): 100/100" in _stderr(capsys)


def test_predicted_beside_a_measured_sweep(solos: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    sweep = tmp_path / "sweep"
    run(sweep, "job0", {"a": 9, "b": 3}, {"a": 70, "b": 30}, ["split=70/30"])  # 50 / 20 tok/s
    run(sweep, "job1", {"a": 6, "b": 6}, {"a": 50, "b": 50}, ["split=50/50"])  # 35 / 35
    run(sweep, "job2", {"a": 12, "b": 12}, {"a": 100, "b": 100}, ["split=100/100"])  # 65 / 65
    run(sweep, "job3", {"a": 7, "b": 7}, None, ["mode=timeslice"])  # 40 / 40
    out = tmp_path / "out"
    argv = [str(sweep), "--baseline", str(solos / "timeslice"), "--out", str(out), "--slo", "ttft=50ms", "--predict", str(solos)]
    assert main(argv) == 0
    err = _stderr(capsys)
    # 50/50 measured 35 tok/s, NP 35/80 = 0.4375; predicted 33.3 (-4.8 %), NP 0.4167 (-0.021).
    assert "mode=default, split=50/50: measured vs predicted: a 35 vs 33 tok/s (-4.8 %), NP 0.438 vs 0.417 (-0.021)" in err
    assert "predicted best split (SLO ttft ≤ 50 ms, every tenant ≥ 90 %; by aggregate throughput): 100/100" in err
    assert "prediction error over 4 point(s): mean |NP error|" in err
    csv = pd.read_csv(out / "sweep.csv", keep_default_na=False)
    assert "predicted" in csv.columns

    def cell(split: str, tenant: str, metric: str, column: str) -> float:
        row = csv[(csv["split"] == split) & (csv["tenant"] == tenant) & (csv["metric"] == metric)]
        assert len(row) == 1
        return float(row[column].iloc[0])

    assert cell("50/50", "a", "throughput_tok_s", "mean") == pytest.approx(35.0)
    assert cell("50/50", "a", "throughput_tok_s", "predicted") == pytest.approx(40 / 1.2)
    assert cell("70/30", "b", "np", "predicted") == pytest.approx(0.3 / 1.2)
    assert cell("100/100", "*", "stp", "predicted") == pytest.approx(2 / 1.2)
    ts = csv[(csv["mode"] == "timeslice") & (csv["tenant"] == "a") & (csv["metric"] == "np")]
    assert float(ts["predicted"].iloc[0]) == pytest.approx(0.5 * (1 - TIMESLICE_OVERHEAD))
    assert float(ts["mean"].iloc[0]) == pytest.approx(0.5)
    assert (out / "sweep_throughput.png").is_file()


def test_predict_names_a_tenant_without_solos(solos: Path, tmp_path: Path) -> None:
    other = RunBuilder(tmp_path / "other", "pair", mode="mps", gpu=gpu())
    add_tenant(other, "a", 3)
    other.tenants["a"].model = "synthetic:other"
    add_tenant(other, "b", 3)
    d = other.write()
    err = io.StringIO()
    import contextlib

    with contextlib.redirect_stderr(err):
        assert main([str(d), "--out", str(tmp_path / "o"), "--predict", str(solos)]) == 2
    assert "no solo run matches tenant a of the sweep" in err.getvalue()
