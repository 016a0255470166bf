"""Run labels: sweep jobs are named after the overrides that differ between them."""

from __future__ import annotations

from pathlib import Path

from multitenant.analysis.cli import default_out, run_labels


def job(root: Path, name: str) -> Path:
    d = root / name
    d.mkdir(parents=True)
    return d


def test_sweep_jobs_are_labelled_by_what_varies(tmp_path: Path) -> None:
    common = ["tenants.a.workload.duration_s=10", "progress=False"]
    splits = ["90/10", "50/50"]
    dirs = [job(tmp_path, f"job{i}") for i in range(2)]
    assert run_labels({d: [f"split={s}", *common] for d, s in zip(dirs, splits, strict=True)}) == {dirs[0]: "job0__split=90-10", dirs[1]: "job1__split=50-50"}


def test_nested_keys_use_their_last_part_and_missing_overrides_are_fine(tmp_path: Path) -> None:
    a, b, c = job(tmp_path, "job0"), job(tmp_path, "job1"), job(tmp_path, "other")
    labels = run_labels({
        a: ["tenants.a.share.active_thread_pct=30"],
        b: ["tenants.a.share.active_thread_pct=70"],
        c: [],
    })
    assert labels[a] == "job0__active_thread_pct=30"
    assert labels[b] == "job1__active_thread_pct=70"
    assert labels[c] == "other"


def test_default_out_mirrors_experiments(tmp_path: Path) -> None:
    run = tmp_path / "experiments" / "pair_tiny" / "20261122-101500-000001"
    assert default_out([run]) == Path("plots", "pair_tiny", "20261122-101500-000001")
