"""Tallies of the fault-injection suite: faults tried, processes left, events lost.

Every test records its outcome through the ``fault`` fixture before it asserts, so a failing
test is counted too; the totals are printed at the end of the pytest run (the figures in
README's "Testing" section come from there).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

OUTCOMES: list[dict[str, Any]] = []


@pytest.fixture
def fault(request: pytest.FixtureRequest) -> Callable[..., None]:
    """``fault(processes_left=[...], events_lost=n)``: record what this fault left behind."""

    def record(processes_left: list[str], events_lost: int) -> None:
        OUTCOMES.append(
            {"test": request.node.nodeid, "processes_left": list(processes_left), "events_lost": int(events_lost)}
        )

    return record


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not OUTCOMES:
        return
    left = sum(len(o["processes_left"]) for o in OUTCOMES)
    lost = sum(o["events_lost"] for o in OUTCOMES)
    terminalreporter.write_sep("-", "fault-injection suite")
    terminalreporter.write_line(f"faults tried: {len(OUTCOMES)}, processes left: {left}, events lost: {lost}")
    for o in OUTCOMES:
        if o["processes_left"] or o["events_lost"]:
            terminalreporter.write_line(f"  {o['test']}: left {o['processes_left']}, lost {o['events_lost']}")


@pytest.fixture
def fake_mps(monkeypatch: pytest.MonkeyPatch, mt_env: dict[str, str]) -> Iterator[dict[str, str]]:
    """The environment for ``mt-run`` in mode mps against the test double of
    nvidia-cuda-mps-control (tests/unit/fake_mps), set here too so this process can talk to the
    daemon (``fake_attach``, ``mt-mps``). A short private state dir keeps the pipe's socket path
    under the unix limit. Afterwards no fake MPS process may live."""
    from multitenant.run.mps import control as mps_control
    from multitenant.run.mps import env as mps_env
    from multitenant.run.preflight import SKIP_ENV as SKIP_GPU_CHECK_ENV
    from tests.unit.test_mps import FAKE_DIR, _fake_processes

    tag = uuid.uuid4().hex
    state = Path(tempfile.mkdtemp(prefix="mtf-", dir="/tmp"))
    monkeypatch.setenv("PATH", f"{FAKE_DIR}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.delenv(mps_control.CONTROL_BIN_ENV, raising=False)
    monkeypatch.setenv(mps_env.STATE_DIR_ENV, str(state))
    monkeypatch.setenv("FAKE_MPS_TAG", tag)
    monkeypatch.delenv("FAKE_MPS_WEDGE", raising=False)
    env = {**mt_env, **{k: os.environ[k] for k in ("PATH", mps_env.STATE_DIR_ENV, "FAKE_MPS_TAG")}}
    # mode=mps on a machine without a GPU: the fake daemon stands in for the driver's.
    env[SKIP_GPU_CHECK_ENV] = "1"
    env.pop(mps_control.CONTROL_BIN_ENV, None)
    env.pop("FAKE_MPS_WEDGE", None)
    yield env
    survivors = _fake_processes(tag)
    for p in survivors:
        p.kill()
    shutil.rmtree(state, ignore_errors=True)
    assert not survivors, f"fake MPS processes survived the test: {[p.cmdline() for p in survivors]}"
