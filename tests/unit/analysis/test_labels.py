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


def test_nested_keys_use_their_tenant_and_last_part_and_missing_overrides_are_fine(tmp_path: Path) -> None:
    a, b, c = job(tmp_path, "job0"), job(tmp_path, "job1"), job(tmp_path, "other")
    labels = run_labels({
        a: ["tenants.a.share.active_thread_pct=30"],
        b: ["tenants.a.share.active_thread_pct=70"],
        c: [],
    })
    assert labels[a] == "job0__a.active_thread_pct=30"
    assert labels[b] == "job1__a.active_thread_pct=70"
    assert labels[c] == "other"


def test_default_out_mirrors_experiments(tmp_path: Path) -> None:
    run = tmp_path / "experiments" / "pair_tiny" / "20261122-101500-000001"
    assert default_out([run]) == Path("plots", "pair_tiny", "20261122-101500-000001")


def test_labels_say_which_tenant_an_override_belongs_to(tmp_path: Path) -> None:
    a, b = job(tmp_path, "r1"), job(tmp_path, "r2")
    labels = run_labels({
        a: ["tenants.a.workload.duration_s=3", "tenants.b.workload.duration_s=3"],
        b: ["tenants.a.workload.duration_s=5", "tenants.b.workload.duration_s=6"],
    })
    assert labels[a] == "r1__a.duration_s=3__b.duration_s=3"
    assert labels[b] == "r2__a.duration_s=5__b.duration_s=6"


def test_default_out_of_a_folder_of_experiments_is_that_folder(tmp_path: Path) -> None:
    root = tmp_path / "repo" / "experiments"
    run = root / "pair_tiny" / "20261122-101500-000001"
    run.mkdir(parents=True)
    (run / "manifest.json").write_text("{}")
    assert default_out([root]) == Path("plots", "experiments")
    assert default_out([run]) == Path("plots", "pair_tiny", "20261122-101500-000001")
    sweep = root / "pair_tiny" / "sweep-1"
    sweep.mkdir()
    (sweep / "multirun.yaml").write_text("")
    assert default_out([sweep]) == Path("plots", "pair_tiny", "sweep-1")
