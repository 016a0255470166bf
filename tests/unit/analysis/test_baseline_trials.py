"""A solo baseline measured in trials: NP divides by the mean over the solo sweep's trials."""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest

from tests.integration.test_analysis_cli import mt_analyze
from tests.unit.analysis.sweep_builders import job, solo, sweep_dir


def test_np_uses_the_mean_of_the_solo_trials_and_nothing_beside_them(tmp_path: Path) -> None:
    root = tmp_path / "experiments"
    pair = sweep_dir(root / "pair")
    # a and b: 5 (3 + 1) = 20 tok/s each in the pair (sweep_builders' arithmetic)
    job(pair, "job0", ["split=50/50"], {"a": (3, 0), "b": (3, 0)})
    # a alone, three trials of one solo sweep: 30, 40 and 65 tok/s -> mean 45 (b has the same
    # spec, so the same baseline): NP 20/45 each
    solo_sweep = sweep_dir(root / "solo_a")
    for trial, n_tok in enumerate((5, 7, 12)):
        job(solo_sweep, f"job{trial}", ["trials=3"], {"a": (n_tok, 0)}, trial=trial, trials=3, name="solo_a")
    # an unrelated solo run of a beside them (10 tok/s) is never pooled into the trials
    solo(root, "a", 1)
    out = tmp_path / "out"
    proc = mt_analyze(pair / "job0", "--baseline", solo_sweep, "--out", out)
    assert proc.returncode == 0, proc.stderr
    (run,) = orjson.loads((out / "summary.json").read_bytes())["runs"]
    for name in ("a", "b"):
        t = run["tenants"][name]
        assert t["solo_throughput"] == pytest.approx(45.0), t
        assert t["np"] == pytest.approx(20 / 45) and t["baseline_trials"] == 3
        assert "/solo_a/" in t["baseline_run_dir"]
    assert run["aggregate"]["stp"] == pytest.approx(40 / 45)


def test_a_single_solo_run_stays_the_baseline(tmp_path: Path) -> None:
    root = tmp_path / "experiments"
    pair = sweep_dir(root / "pair")
    job(pair, "job0", ["split=50/50"], {"a": (3, 0), "b": (3, 0)})
    solo(root, "a", 7)  # 40 tok/s, no trials
    out = tmp_path / "out"
    assert mt_analyze(pair / "job0", "--baseline", root / "solo_a", "--out", out).returncode == 0
    (run,) = orjson.loads((out / "summary.json").read_bytes())["runs"]
    assert run["tenants"]["a"]["np"] == pytest.approx(0.5) and run["tenants"]["a"]["baseline_trials"] == 1
