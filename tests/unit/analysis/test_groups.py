"""A folder of many experiments is not one sweep: runs group by sweep folder
and experiment; unrelated runs get no sweep table across them."""

from __future__ import annotations

import json
from pathlib import Path

from multitenant.analysis.cli import main
from tests.unit.analysis.sweep_builders import job, sweep_dir


def experiments(root: Path) -> tuple[Path, Path]:
    pair = sweep_dir(root / "pair", "sweep-1")
    for i, split in enumerate(("70/30", "50/50")):
        job(pair, f"job{i}", [f"split={split}"], {"a": (3, 0), "b": (3, 0)}, name="pair")
    rates = sweep_dir(root / "rates", "sweep-2")
    for i, rate in enumerate((2, 4)):
        job(rates, f"job{i}", [f"tenants.b.workload.arrival.rate={rate}", "x=1"], {"b": (3, 0)}, name="rates")
    job(root / "lone", "20261122-000000-000000", ["model=other", "y=2"], {"c": (3, 0)}, name="lone")
    return pair, rates


def test_a_folder_of_experiments_gets_one_sweep_per_sweep_folder(tmp_path: Path) -> None:
    root = tmp_path / "experiments"
    experiments(root)
    out = tmp_path / "out"
    assert main([str(root), "--out", str(out)]) == 0
    assert not (out / "sweep.csv").exists(), "no sweep table across unrelated runs"
    pair = json.loads((out / "sweep__pair__sweep-1" / "sweep.json").read_text())
    rates = json.loads((out / "sweep__rates__sweep-2" / "sweep.json").read_text())
    assert pair["axes"] == ["split"] and len(pair["points"]) == 2
    assert rates["axes"] == ["tenants.b.workload.arrival.rate"]
    md = (out / "summary.md").read_text()
    assert "## Sweep pair__sweep-1" in md and "## Sweep rates__sweep-2" in md
    assert len(json.loads((out / "summary.json").read_text())["runs"]) == 5


def test_one_sweep_folder_named_is_one_sweep_as_before(tmp_path: Path) -> None:
    pair, _ = experiments(tmp_path / "experiments")
    out = tmp_path / "out"
    assert main([str(pair), "--out", str(out)]) == 0
    assert json.loads((out / "sweep.json").read_text())["axes"] == ["split"]
