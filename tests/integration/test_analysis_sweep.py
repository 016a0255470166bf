"""``mt-analyze`` over sweep folders in a subprocess: sweep.csv/json agree with the per-run
summaries, the best point is the last line, merged folders pool, and bad sweep options exit 2."""

from __future__ import annotations

import csv
import statistics
from pathlib import Path

import orjson
import pytest

from tests.integration.test_analysis_cli import mt_analyze
from tests.unit.analysis.sweep_builders import S, job, solo, sweep_dir

# 70/30: a 35 tok/s (attains 90 %), b 20; 50/50: a 20, b 30 (both 100 %); each + 5 tok/s in trial 1.
SPLITS = {"70/30": {"a": (6, 1), "b": (3, 0)}, "50/50": {"a": (3, 0), "b": (5, 0)}}


def split_sweep(root: Path, trials: int = 2) -> Path:
    """experiments/pair/sweep-*/job0..: SPLITS x trials, interleaved; n_tok grows by 1 per trial
    so the trials differ; solo baselines of a and b beside it (NP and STP defined)."""
    sweep = sweep_dir(root / "pair")
    i = 0
    for trial in range(trials):
        for split, tenants in SPLITS.items():
            varied = {t: (n + trial, slow) for t, (n, slow) in tenants.items()}
            job(sweep, f"job{i}", [f"split={split}", f"trials={trials}"], varied, trial=trial, trials=trials,
                started_ns=5 * i * S, ended_ns=(5 * i + 4) * S)  # fmt: skip
            i += 1
    solo(root, "a", 7)
    solo(root, "b", 7)
    return sweep


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_sweep_csv_means_agree_with_the_per_run_summaries(tmp_path: Path) -> None:
    sweep = split_sweep(tmp_path / "experiments")
    out = tmp_path / "out"
    proc = mt_analyze(sweep, "--out", out, "--slo", "ttft=50ms")
    assert proc.returncode == 0, proc.stderr
    runs = orjson.loads((out / "summary.json").read_bytes())["runs"]
    rows = read_csv(out / "sweep.csv")
    assert list(rows[0])[:3] == ["split", "tenant", "metric"]
    by = {(r["split"], r["tenant"], r["metric"]): r for r in rows}
    checked = 0
    for split in SPLITS:
        mine = [r for r in runs if _split_of(r) == split]
        assert len(mine) == 2, [r["run_dir"] for r in runs]
        for tenant, metric, value in (
            ("a", "throughput_tok_s", lambda r: r["tenants"]["a"]["throughput_tok_s"]),
            ("b", "ttft_p99_ms", lambda r: r["tenants"]["b"]["ttft_ms"]["p99"]),
            ("a", "np", lambda r: r["tenants"]["a"]["np"]),
            ("a", "slo_attainment", lambda r: r["tenants"]["a"]["slo_attainment"]),
            ("*", "stp", lambda r: r["aggregate"]["stp"]),
            ("*", "gpu_throughput_tok_s", lambda r: r["aggregate"]["gpu_throughput_tok_s"]),
        ):
            values = [value(r) for r in mine]
            row = by[(split, tenant, metric)]
            assert int(row["n_trials"]) == 2
            assert float(row["mean"]) == pytest.approx(statistics.mean(values), rel=1e-9), (split, metric, row, values)
            half = 12.706204736 * statistics.stdev(values) / 2**0.5  # t_{0.975,1} s / sqrt(2)
            assert float(row["ci_high"]) == pytest.approx(statistics.mean(values) + half, rel=1e-8, abs=1e-9)
            checked += 1
    assert checked == 12
    data = orjson.loads((out / "sweep.json").read_bytes())
    assert data["axes"] == ["split"] and [p["n_trials"] for p in data["points"]] == [2, 2]
    # Both points are feasible at 0.9; 70/30 has more aggregate throughput (55, 65 vs 50, 60 tok/s).
    assert data["best"]["label"] == "split=70/30", data["best"]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("best point (SLO ttft ≤ 50 ms, every tenant ≥ 90 %") and "split=70/30" in last, proc.stderr
    assert "measured share of wall time: 0.42" in proc.stderr, proc.stderr  # 4 x 2 s windows / 19 s
    html = (out / "report.html").read_text()
    assert "<h2>Sweep</h2>" in html and 'class="best"' in html and "NP trade-off (Pareto points starred)" in html
    figures = {f"sweep_{n}.png" for n in ("throughput", "latency", "slo_attainment", "np_tradeoff", "stp_fairness")}
    assert figures <= {p.name for p in out.iterdir()}
    assert "## Sweep" in (out / "summary.md").read_text()


def _split_of(run: dict[str, object]) -> str:
    manifest = orjson.loads((Path(str(run["run_dir"])) / "manifest.json").read_bytes())
    return next(o.split("=", 1)[1] for o in manifest["overrides"] if o.startswith("split="))


def test_merged_sweep_folders_are_one_sweep(tmp_path: Path) -> None:
    folders = []
    for node, n_tok in (("node1", 3), ("node2", 5)):
        sweep = sweep_dir(tmp_path / node)
        folders.append(sweep)
        for i, split in enumerate(SPLITS):
            job(sweep, f"job{i}", [f"split={split}"], {"a": (n_tok, 0), "b": (3, 0)}, trial=0, host=node,
                started_ns=5 * i * S, ended_ns=(5 * i + 4) * S)  # fmt: skip
    out = tmp_path / "out"
    proc = mt_analyze(*folders, "--out", out)
    assert proc.returncode == 0, proc.stderr
    rows = read_csv(out / "sweep.csv")
    a = {r["split"]: r for r in rows if r["tenant"] == "a" and r["metric"] == "throughput_tok_s"}
    assert {s: (r["n_trials"], float(r["mean"])) for s, r in a.items()} == {"70/30": ("2", 25.0), "50/50": ("2", 25.0)}
    cost = orjson.loads((out / "sweep.json").read_bytes())["cost"]
    assert [f["measured_share"] for f in cost["folders"]] == [pytest.approx(4 / 9)] * 2
    assert "pooled over 2 folders (each timed on its own host's clock)" in proc.stderr, proc.stderr


def test_a_single_run_gets_no_sweep_outputs(tmp_path: Path) -> None:
    run_dir = job(tmp_path, "run", [], {"a": (3, 0)})
    proc = mt_analyze(run_dir, "--out", tmp_path / "out")
    assert proc.returncode == 0, proc.stderr
    assert not (tmp_path / "out" / "sweep.csv").exists() and "sweep" not in proc.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--slo-target", "0.9"], "--slo-target needs --slo"),
        (["--slo", "ttft=50ms", "--slo-target", "90"], "--slo-target 90 is not a fraction in (0, 1]; write 90 % as 0.9"),
        (["--objective", "goodput"], "--objective goodput needs --slo"),
    ],
)
def test_bad_sweep_options_exit_2_with_one_line(tmp_path: Path, args: list[str], message: str) -> None:
    sweep = sweep_dir(tmp_path)
    job(sweep, "job0", ["split=70/30"], {"a": (3, 0)})
    proc = mt_analyze(sweep, *args, "--out", tmp_path / "out")
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], proc.stderr
    assert not (tmp_path / "out").exists()
