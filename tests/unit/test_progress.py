"""Live progress values: never negative, never past the window, the real end state, seq/s."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from multitenant.progress import rate_text, state_text, window_text

S = 1_000_000_000


def tenant(progress: dict[str, Any], task: str = "generate", delay_s: float = 0.0) -> Any:
    return SimpleNamespace(progress=progress, cfg={"task": task, "workload": {"start_delay_s": delay_s}})


def test_rate_counts_from_the_tenants_window_start_and_ignores_warm_up_messages() -> None:
    orch = SimpleNamespace(window=(100 * S, 110 * S))
    # The last message before the window still carries warm-up counts: no rate from it.
    assert rate_text(orch, tenant({"t": 99 * S, "tokens": 5000, "requests": 10})) == ""
    # In the window the counts start again from zero (the tenant resets them at t0).
    assert rate_text(orch, tenant({"t": 102 * S, "tokens": 400, "requests": 4})) == "200.0 tok/s"
    assert rate_text(orch, tenant({"t": 102 * S, "tokens": 400, "requests": 4}, delay_s=1.0)) == "400.0 tok/s"
    assert rate_text(orch, tenant({"tokens": 400})) == "", "a message without t gives no rate"
    assert rate_text(SimpleNamespace(window=None), tenant({"t": 102 * S, "tokens": 1})) == ""


def test_forward_tenants_show_sequences_per_second() -> None:
    orch = SimpleNamespace(window=(100 * S, 110 * S))
    assert rate_text(orch, tenant({"t": 104 * S, "tokens": 0, "requests": 20}, task="forward")) == "5.0 seq/s"


def test_window_text_never_runs_past_the_window() -> None:
    w = (100 * S, 106 * S)
    assert window_text(None, 0).startswith("waiting")
    assert window_text(w, 99 * S) == "window starts in 1.0 s"
    assert window_text(w, 103 * S) == "window 3 / 6 s"
    assert window_text(w, 107 * S) == "window of 6 s closed; stopping tenants"
    assert "request counts" in window_text((100 * S, None), 130 * S)


def test_state_says_how_a_tenant_ended() -> None:
    assert state_text("finished", "ok") == "finished"
    assert state_text("finished", "interrupted") == "interrupted"
    assert state_text("finished", "error") == "error"
    assert state_text("running", None) == "running"
