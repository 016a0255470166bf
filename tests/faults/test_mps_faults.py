"""The orchestrator's MPS path on the CPU, against the test double of nvidia-cuda-mps-control
(tests/unit/fake_mps): a tenant that is not a client of the run's daemon, and a daemon that
will not quit. The tenant is an ``openai`` one (no CUDA), so nothing but the harness's own MPS
handling is under test; tests/gpu/test_mps.py does the same against the real daemon."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from tests.faults.helpers import (
    SOLO_T,
    Watched,
    attach_when_started,
    finish,
    mps_openai_args,
    mt_mps,
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]


def test_tenant_not_attached_to_the_daemon_fails_the_run(
    tmp_path: Path, fake_mps: dict[str, str], fault: Callable[..., None]
) -> None:
    run_dir = tmp_path / "run"
    run = Watched(mps_openai_args(tmp_path, run_dir, 2), fake_mps, tmp_path)
    code, out, err, m, logs, left, lost = finish(run, run_dir, tmp_path, fault, {SOLO_T: "interrupted"})
    assert code == 1, (out + err)[-2000:]
    assert m["status"] == "failed"
    pipe = m["mps"]["pipe_dir"]
    assert m["reason"].startswith(f"tenant(s) {SOLO_T} run WITHOUT MPS: not clients of the daemon on {pipe}"), m["reason"]
    assert m["tenants"][SOLO_T]["mps_attached"] is False and m["window"]["t0_ns"] is None
    assert m["mps"]["stop"] == {"clean": True, "actions": ["quit"], "left_pids": []}, "the run's daemon was stopped"
    assert mt_mps("status", env=fake_mps).returncode == 0, "no daemon of the harness is left"
    assert left == [] and lost == 0


def test_daemon_that_will_not_quit_is_stopped_by_signal_and_reported(
    tmp_path: Path, fake_mps: dict[str, str], fault: Callable[..., None]
) -> None:
    run_dir = tmp_path / "run"
    # FAKE_MPS_WEDGE=hard: after quit nothing answers and SIGTERM is ignored (a server stuck on
    # a faulted context): only SIGKILL ends the daemon.
    env = dict(fake_mps, FAKE_MPS_WEDGE="hard")
    run = Watched(mps_openai_args(tmp_path, run_dir, 2), env, tmp_path)
    attach_when_started(run, run_dir, SOLO_T)
    code, out, err, m, logs, left, lost = finish(run, run_dir, tmp_path, fault, {SOLO_T: "ok"})
    assert code == 0, (out + err)[-2000:]
    assert m["status"] == "ok" and m["tenants"][SOLO_T]["mps_attached"] is True
    stop, control_pid = m["mps"]["stop"], m["mps"]["control_pid"]
    assert stop["clean"] and stop["left_pids"] == [], stop
    assert f"SIGKILL {control_pid}" in stop["actions"], stop
    assert f"did not quit; stopped with SIGTERM {control_pid}" in out + err, "mt-run says so, not only the manifest"
    assert mt_mps("status", env=fake_mps).returncode == 0
    assert left == [] and lost == 0
