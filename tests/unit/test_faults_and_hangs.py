"""MT_FAULT parsing (multitenant.run.faults) and the orchestrator's hang detection, without processes."""

from __future__ import annotations

import signal
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from multitenant.run import tenants as tenants_mod
from multitenant.run.faults import Fault, from_env
from multitenant.run.orchestrator import Orchestrator

S = 1_000_000_000


def test_mt_fault_hits_only_the_tenant_it_names() -> None:
    assert from_env("a", {}) is None
    assert from_env("a", {"MT_FAULT": "b:crash@load"}) is None
    assert from_env("b", {"MT_FAULT": "b:crash@load"}) == Fault("b", "crash", at_load=True)
    assert from_env("b", {"MT_FAULT": "b:enospc@window+1.5"}) == Fault("b", "enospc", at_load=False, window_after_s=1.5)


@pytest.mark.parametrize("value", ["b:explode@load", "b:crash", "crash@load", "b:crash@window", "b:crash@window+x"])
def test_a_malformed_mt_fault_is_an_error_not_a_silent_no_op(value: str) -> None:
    with pytest.raises(ValueError, match="MT_FAULT="):
        from_env("b", {"MT_FAULT": value})


def hang_check(tmp_path: Path, delay_s: float, silent_s: float, monkeypatch: pytest.MonkeyPatch) -> tuple[str | None, list[Any]]:
    """_kill_hung_tenant for one tenant whose window began 10 s ago (plus its start delay) and
    that last sent something ``silent_s`` ago."""
    killed: list[Any] = []
    monkeypatch.setattr(tenants_mod.os, "killpg", lambda pid, sig: killed.append((pid, sig)))
    now = time.monotonic_ns()
    orch = Orchestrator.__new__(Orchestrator)
    orch.config = SimpleNamespace(hang_timeout_s=5.0)  # type: ignore[assignment]
    orch.window = (now - 10 * S, None)
    (tmp_path / "stderr.log").write_text("serving\n")
    tp = SimpleNamespace(
        name="b", exit_code=None, popen=SimpleNamespace(pid=4242),
        last_msg_ns=now - int(silent_s * S), stderr_path=tmp_path / "stderr.log", state="running",
        window=(orch.window[0] + int(delay_s * S), None),  # its own phase, as the announcement sets it
    )  # fmt: skip
    orch.tenants = {"b": tp}  # type: ignore[dict-item]
    return orch._kill_hung_tenant(), killed


def test_a_silent_tenant_is_killed_after_hang_timeout(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    why, killed = hang_check(tmp_path, delay_s=0.0, silent_s=6.0, monkeypatch=monkeypatch)
    assert why is not None and why.startswith("tenant b hung: nothing from it for 6.0 s"), why
    assert "hang_timeout_s=5" in why and "last stderr line: serving" in why
    assert killed == [(4242, signal.SIGKILL)]


def test_a_tenant_inside_the_timeout_or_before_its_staggered_start_is_not_hung(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert hang_check(tmp_path, delay_s=0.0, silent_s=4.0, monkeypatch=monkeypatch) == (None, [])
    # Silent for 30 s, but its own phase starts 20 s after the common t0: waiting is not hanging.
    assert hang_check(tmp_path, delay_s=20.0, silent_s=30.0, monkeypatch=monkeypatch) == (None, [])
