"""Sweeps on the CPU end to end: repeated trials in interleaved order, and a sweep through
Hydra's submitit launcher (submitit_local: every job a process of its own, all at once)."""

from __future__ import annotations

import csv
import json
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.integration.test_analysis_cli import mt_analyze
from tests.integration.test_pair_tiny import tenant_pids_alive

pytestmark = pytest.mark.slow

SHORT = ["progress=false", "tenants.a.workload.duration_s=1", "tenants.b.workload.duration_s=1"]


def mt_run(args: list[str], env: dict[str, str], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "multitenant.cli", *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout
    )


def jobs(sweep: Path) -> list[Path]:
    return sorted((p for p in sweep.glob("job*") if p.is_dir()), key=lambda p: int(p.name[3:]))


def test_trials_run_every_point_once_per_trial_in_interleaved_order(tmp_path: Path, mt_env: dict[str, str]) -> None:
    sweep = tmp_path / "sweep"
    res = mt_run(
        ["--config-name", "multitenant/pair_tiny", "split=50/50,70/30", "trials=2", f"hydra.sweep.dir={sweep}", *SHORT],
        mt_env,
        tmp_path,
    )  # no -m: trials=2 makes it a sweep
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stderr.strip().splitlines()[-1] == f"mt-run: sweep {sweep}: 4/4 jobs ok", "the sweep ends with its folder and tally"
    order = []
    for job in jobs(sweep):
        m = json.loads((job / "manifest.json").read_text())
        assert m["status"] == "ok", m["reason"]
        assert tenant_pids_alive(m) == []
        cfg = yaml.safe_load((job / "config.resolved.yaml").read_text())
        assert m["trial"] == cfg["trial"] and cfg["trials"] == 2
        assert m["cache_dir"] == mt_env["MT_CACHE_DIR"]
        order.append((cfg["trial"], cfg["split"]))
    # trial-major: each trial is one whole pass over the points
    assert order == [(0, "50/50"), (0, "70/30"), (1, "50/50"), (1, "70/30")]

    # mt-analyze groups the two trials of each point: sweep.csv's means are the means of the
    # per-run figures in summary.json (trial is not an axis; the shared overrides are not either).
    out = tmp_path / "plots"
    proc = mt_analyze(sweep, "--out", out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = json.loads((out / "summary.json").read_text())["runs"]
    with open(out / "sweep.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0])[:3] == ["split", "tenant", "metric"]
    by = {(r["split"], r["tenant"], r["metric"]): r for r in rows}
    split_of = {str(job): yaml.safe_load((job / "config.resolved.yaml").read_text())["split"] for job in jobs(sweep)}
    for split in ("50/50", "70/30"):
        mine = [r for r in runs if split_of[str(Path(r["run_dir"]))] == split]
        assert len(mine) == 2
        for tenant in ("a", "b"):
            row = by[(split, tenant, "throughput_tok_s")]
            assert int(row["n_trials"]) == 2
            values = [r["tenants"][tenant]["throughput_tok_s"] for r in mine]
            assert float(row["mean"]) == pytest.approx(statistics.mean(values), rel=1e-6)
            assert float(row["ci_low"]) <= float(row["mean"]) <= float(row["ci_high"])
        total = [r["aggregate"]["gpu_throughput_tok_s"] for r in mine]
        assert float(by[(split, "*", "gpu_throughput_tok_s")]["mean"]) == pytest.approx(statistics.mean(total), rel=1e-6)


def submitit_sweep(tmp_path: Path, env: dict[str, str], split: str) -> tuple[Path, subprocess.CompletedProcess[str]]:
    """pair_tiny swept over ``split`` through hydra/launcher=submitit_local: (sweep dir, result)."""
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="pip install -e '.[cluster]'")
    sweep = tmp_path / "sweep"
    args = ["-m", "--config-name", "multitenant/pair_tiny", f"split={split}", "hydra/launcher=submitit_local"]
    return sweep, mt_run([*args, f"hydra.sweep.dir={sweep}", *SHORT], env, tmp_path)


def test_submitit_local_sweep_end_to_end(tmp_path: Path, mt_env: dict[str, str]) -> None:
    sweep, res = submitit_sweep(tmp_path, mt_env, "50/50,70/30")
    assert res.returncode == 0, res.stderr[-3000:]
    found = jobs(sweep)
    assert [j.name for j in found] == ["job0", "job1"]
    for job in found:
        m = json.loads((job / "manifest.json").read_text())
        assert m["status"] == "ok", m["reason"]
        assert m["window"]["t0_ns"] < m["window"]["t1_ns"]
        assert tenant_pids_alive(m) == []
        for t in ("a", "b"):
            assert (job / "tenants" / t / "events.jsonl").stat().st_size > 0
    assert (sweep / ".submitit").is_dir()  # the launcher's own logs, beside the jobs


def test_submitit_local_sweep_exit_code_comes_from_the_jobs(tmp_path: Path, mt_env: dict[str, str]) -> None:
    # The jobs run in other processes: mt-run's exit code is read from their manifests. A job
    # refused by validation (a split that does not add up to the tenants) writes no manifest.
    sweep, res = submitit_sweep(tmp_path, mt_env, "50/50/50")
    assert res.returncode == 2, res.stderr[-3000:]
    assert "the launcher's job logs" in res.stderr
    job_logs = "".join(p.read_text() for p in (sweep / ".submitit").rglob("*_log.err"))
    assert "split: '50/50/50' does not give one whole percentage per tenant" in job_logs
