"""Faults that hit ``mt-run`` itself: Ctrl-C and SIGTERM, SIGKILL (then the README's cleanup),
an output pipe that closes (``mt-run ... | head -1``), also in a sweep, and a run folder that
already holds a run."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest

from tests.faults.helpers import (
    PAIR,
    SOLO_T,
    Watched,
    attach_when_started,
    check_logs,
    finish,
    manifest,
    mps_openai_args,
    mt_analyze,
    mt_mps,
    processes_left,
    short,
    wait_for_window,
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_to_mt_run_interrupts_the_run_cleanly(
    tmp_path: Path, mt_env: dict[str, str], fault: Callable[..., None], sig: signal.Signals
) -> None:
    run_dir = tmp_path / "run"
    run = Watched(["--config-name", PAIR, f"hydra.run.dir={run_dir}", *short(30)], mt_env, tmp_path)
    wait_for_window(run, run_dir)
    run.send_signal(sig)
    code, _, err, m, logs, left, lost = finish(run, run_dir, tmp_path, fault, {"a": "interrupted", "b": "interrupted"})
    assert code == 130, err[-2000:]
    assert m["status"] == "interrupted" and m["reason"] == f"interrupted by {sig.name}"
    assert m["tenants"]["a"]["exit_code"] == 0 and m["tenants"]["b"]["exit_code"] == 0
    assert left == [] and lost == 0


def test_sigkill_to_mt_run_tenants_stop_by_themselves_and_the_documented_cleanup_works(
    tmp_path: Path, fake_mps: dict[str, str], fault: Callable[..., None]
) -> None:
    """Nothing in mt-run runs after SIGKILL: its tenants must notice (end-of-file on their
    command pipe) and stop, launched servers included; the MPS daemon stays until ``mt-mps stop
    --all``; the manifest stays ``running`` and ``mt-analyze`` says so (README, "MPS daemons")."""
    run_dir = tmp_path / "run"
    run = Watched(mps_openai_args(tmp_path, run_dir, 60), fake_mps, tmp_path)
    attach_when_started(run, run_dir, SOLO_T)
    m = wait_for_window(run, run_dir)
    tenant = m["tenants"][SOLO_T]
    orphans = [psutil.Process(p) for p in (tenant["pid"], tenant["engine"]["server_pid"])]
    run.proc.kill()
    run.wait()
    killed_at = time.monotonic()
    while any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in orphans) and time.monotonic() < killed_at + 20:
        time.sleep(0.1)
    orphaned_s = time.monotonic() - killed_at
    status_before = mt_mps("status", env=fake_mps)
    stop = mt_mps("stop", "--all", "--timeout", "5", env=fake_mps)
    status_after = mt_mps("status", env=fake_mps)
    m = manifest(run_dir)
    left = processes_left(run, m, tmp_path)
    logs, lost = check_logs(run_dir, {SOLO_T: "interrupted"})
    analysis = mt_analyze(run_dir, "--out", tmp_path / "plots", env=fake_mps)
    fault(processes_left=left, events_lost=lost)
    assert orphaned_s < 15, f"the tenant and its server outlived mt-run by {orphaned_s:.1f} s"
    assert m["status"] == "running" and m["ended_ns"] is None, "nothing could write the end of the run"
    assert status_before.returncode == 1 and m["mps"]["pipe_dir"] in status_before.stdout, status_before
    assert stop.returncode == 0, stop.stdout + stop.stderr
    assert status_after.returncode == 0, status_after.stdout
    assert analysis.returncode == 0, analysis.stderr[-2000:]
    assert "Run status 'running'" in analysis.stderr, analysis.stderr[-2000:]
    assert "mt-mps stop --all" in analysis.stderr  # what to do about it
    assert left == [] and lost == 0


@pytest.mark.parametrize("stderr_too", [True, False], ids=["stdout+stderr", "stdout"])
def test_closed_output_pipe_neither_stops_nor_mislabels_the_run(
    tmp_path: Path, mt_env: dict[str, str], fault: Callable[..., None], stderr_too: bool
) -> None:
    # `mt-run ... | head -1` (2>&1 | head -1): the reader goes away after one line.
    run_dir = tmp_path / "run"
    argv = ["--config-name", PAIR, f"hydra.run.dir={run_dir}", "tenants.a.workload.duration_s=2", "tenants.b.workload.duration_s=2"]
    run = Watched(argv, mt_env, tmp_path, stderr=subprocess.STDOUT if stderr_too else subprocess.PIPE)
    assert run.proc.stdout is not None
    if stderr_too:
        run.proc.stdout.readline()
    run.proc.stdout.close()
    err = run.proc.stderr.read() if run.proc.stderr is not None else ""
    code = run.proc.wait(timeout=150)
    m = manifest(run_dir)
    left = processes_left(run, m, tmp_path)
    logs, lost = check_logs(run_dir, {"a": "ok", "b": "ok"})
    fault(processes_left=left, events_lost=lost)
    assert code == 0, err[-2000:]
    assert m["status"] == "ok" and m["reason"] is None and m["window"]["t0_ns"] is not None, "status agrees with the exit code"
    assert "Logging error" not in err and "BrokenPipeError" not in err
    assert left == [] and lost == 0


def test_sweep_interrupted_through_a_closed_pipe_starts_no_further_job(
    tmp_path: Path, mt_env: dict[str, str], fault: Callable[..., None]
) -> None:
    # Ctrl-C of `mt-run -m ... 2>&1 | head -1`: the reader is gone, then SIGINT in job0's window.
    sweep = tmp_path / "sweep"
    argv = ["-m", "--config-name", PAIR, f"hydra.sweep.dir={sweep}", "tenants.a.workload.duration_s=30,31", "tenants.b.workload.duration_s=30"]
    run = Watched(argv, mt_env, tmp_path, stderr=subprocess.STDOUT)
    assert run.proc.stdout is not None
    run.proc.stdout.readline()
    run.proc.stdout.close()
    wait_for_window(run, sweep / "job0")
    run.send_signal(signal.SIGINT)
    code = run.proc.wait(timeout=150)
    time.sleep(1)  # a job1 that would start starts at once
    m = manifest(sweep / "job0")
    left = processes_left(run, m, tmp_path)
    logs, lost = check_logs(sweep / "job0", {"a": "interrupted", "b": "interrupted"})
    fault(processes_left=left, events_lost=lost)
    assert code == 130
    assert m["status"] == "interrupted" and m["reason"] == "interrupted by SIGINT"
    assert not (sweep / "job1").exists(), "no job starts after an interrupted one"
    assert left == [] and lost == 0


def test_existing_run_dir_is_refused_and_never_overwritten(
    tmp_path: Path, mt_env: dict[str, str], fault: Callable[..., None]
) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "manifest.json").write_text(json.dumps({"status": "ok", "note": "an earlier run"}))
    run = Watched(["--config-name", PAIR, f"hydra.run.dir={run_dir}", *short(2)], mt_env, tmp_path)
    code, _, err = run.wait(60)
    left = processes_left(run, None, tmp_path)
    fault(processes_left=left, events_lost=0)
    assert code == 2, err
    assert err.strip() == f"mt-run: error: hydra.run.dir={run_dir} already holds a run (never overwritten); choose a new folder"
    assert json.loads((run_dir / "manifest.json").read_text())["note"] == "an earlier run"
    assert sorted(p.name for p in run_dir.iterdir()) == ["manifest.json"], "nothing was added to it"
    assert left == []
