"""Faults of one tenant of a pair (pair_tiny on the CPU): it crashes while loading or inside the
window, is killed, hangs, or its disk fills up. Each must fail the run naming the tenant, stop
the other tenant, leave no process, and leave every event written so far readable.

Crashes and the full disk are injected with ``MT_FAULT`` (``multitenant.run.faults``); the kill and
the hang are done to the tenant from here (SIGKILL, SIGSTOP)."""

from __future__ import annotations

import os
import re
import signal
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.faults.helpers import (
    CRASH_EXIT_CODE,
    PAIR,
    Watched,
    check_logs,
    finish,
    manifest,
    processes_left,
    short,
    wait_for_window,
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]


def test_tenant_crash_during_load_fails_the_run_before_the_window(
    tmp_path: Path, mt_env: dict[str, str], fault: Callable[..., None]
) -> None:
    run_dir = tmp_path / "run"
    env = dict(mt_env, MT_FAULT="b:crash@load")
    run = Watched(["--config-name", PAIR, f"hydra.run.dir={run_dir}", *short(2)], env, tmp_path)
    code, _, err, m, logs, left, lost = finish(run, run_dir, tmp_path, fault, {"a": "interrupted", "b": None})
    assert code == 1, err[-2000:]
    assert m["status"] == "failed"
    assert m["reason"] == f"tenant b failed (exit code {CRASH_EXIT_CODE}): MT_FAULT: injecting crash into tenant b"
    assert m["window"]["t0_ns"] is None, "no window opened"
    assert m["tenants"]["b"]["exit_code"] == CRASH_EXIT_CODE and m["tenants"]["a"]["exit_code"] == 0
    assert [e["ev"] for e in logs["b"]] == ["run_start"], "b died while loading"
    assert left == [] and lost == 0


def test_tenant_crash_mid_window_fails_the_run_at_once(
    tmp_path: Path, mt_env: dict[str, str], fault: Callable[..., None]
) -> None:
    run_dir = tmp_path / "run"
    env = dict(mt_env, MT_FAULT="b:crash@window+2")  # after the writer's first flush in the window (every 1 s)
    run = Watched(["--config-name", PAIR, f"hydra.run.dir={run_dir}", *short(20)], env, tmp_path)
    code, _, err, m, logs, left, lost = finish(run, run_dir, tmp_path, fault, {"a": "interrupted", "b": None})
    assert code == 1, err[-2000:]
    assert m["status"] == "failed"
    assert m["reason"] == f"tenant b failed (exit code {CRASH_EXIT_CODE}): MT_FAULT: injecting crash into tenant b"
    t0, t1 = m["window"]["t0_ns"], m["window"]["t1_ns"]
    assert m["ended_ns"] < t0 + 15_000_000_000 < t1, "the run stopped at the crash, not at the window's end"
    assert any(e["ev"] == "tok" and e["t"] >= t0 for e in logs["b"]), "b's tokens from before the crash are readable"
    assert left == [] and lost == 0


def test_tenant_sigkill_mid_window_fails_the_run(
    tmp_path: Path, mt_env: dict[str, str], fault: Callable[..., None]
) -> None:
    run_dir = tmp_path / "run"
    run = Watched(["--config-name", PAIR, f"hydra.run.dir={run_dir}", *short(30)], mt_env, tmp_path)
    m = wait_for_window(run, run_dir)
    os.kill(m["tenants"]["b"]["pid"], signal.SIGKILL)
    code, _, err, m, logs, left, lost = finish(run, run_dir, tmp_path, fault, {"a": "interrupted", "b": None})
    assert code == 1, err[-2000:]
    assert m["status"] == "failed" and m["reason"].startswith("tenant b failed (killed by signal 9)"), m["reason"]
    assert any(e["ev"] == "tok" for e in logs["b"]), "events b wrote before the kill are readable"
    assert left == [] and lost == 0


def test_hung_tenant_is_detected_within_hang_timeout_and_killed(
    tmp_path: Path, mt_env: dict[str, str], fault: Callable[..., None]
) -> None:
    run_dir = tmp_path / "run"
    argv = ["--config-name", PAIR, f"hydra.run.dir={run_dir}", *short(60), "hang_timeout_s=2"]
    run = Watched(argv, mt_env, tmp_path)
    m = wait_for_window(run, run_dir)
    # A stopped process is the purest hang: alive, silent, deaf to the stop command and SIGTERM.
    os.kill(m["tenants"]["b"]["pid"], signal.SIGSTOP)
    stopped_at = time.monotonic()
    code, _, err = run.wait()
    took_s = time.monotonic() - stopped_at
    m = manifest(run_dir)
    left = processes_left(run, m, tmp_path)
    logs, lost = check_logs(run_dir, {"a": "interrupted", "b": None})
    fault(processes_left=left, events_lost=lost)
    assert code == 1, err[-2000:]
    assert m["status"] == "failed"
    assert m["reason"].startswith("tenant b hung: nothing from it for 2."), m["reason"]
    assert "(hang_timeout_s=2), killed with SIGKILL; raise hang_timeout_s" in m["reason"], m["reason"]
    assert m["tenants"]["b"]["exit_code"] == -signal.SIGKILL
    # Detected after 2 s of silence; a's stop and the rest of the cleanup take a few seconds more.
    assert took_s < 2 + 8, f"the run took {took_s:.1f} s after the hang"
    assert any(e["ev"] == "tok" for e in logs["b"])
    assert left == [] and lost == 0


def test_disk_full_during_event_writes_fails_the_run_with_the_cause(
    tmp_path: Path, mt_env: dict[str, str], fault: Callable[..., None]
) -> None:
    run_dir = tmp_path / "run"
    env = dict(mt_env, MT_FAULT="b:enospc@window+1")
    run = Watched(["--config-name", PAIR, f"hydra.run.dir={run_dir}", *short(20)], env, tmp_path)
    code, _, err, m, logs, left, lost = finish(run, run_dir, tmp_path, fault, {"a": "interrupted", "b": None})
    assert code == 1, err[-2000:]
    assert m["status"] == "failed"
    reason = m["reason"]
    # "reported an error" when its error message arrives before its exit is seen
    assert re.match(r"tenant b failed \((exit code 1|reported an error)\): EventLogError: \[Errno 28\] writing ", reason), reason
    assert str(run_dir / "tenants" / "b" / "events.jsonl") in reason and "No space left on device" in reason
    t0 = m["window"]["t0_ns"]
    assert m["ended_ns"] < t0 + 15_000_000_000, "the tenant failed when its log broke, not at the window's end"
    assert m["tenants"]["b"]["exit_code"] == 1, "b ended through its own cleanup"
    assert any(e["ev"] == "window" for e in logs["b"]), "what b wrote before the disk filled is readable"
    assert left == [] and lost == 0
