"""Live progress values: never negative, never past the window, the real end state, seq/s; and
a live table that log lines cannot corrupt."""

from __future__ import annotations

import io
import logging
import re
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from rich.console import Console

from multitenant.run.progress import LiveProgress, rate_text, state_text, window_text

S = 1_000_000_000


def tenant(progress: dict[str, Any], task: str = "generate", delay_s: float = 0.0, t0: int | None = 100 * S) -> Any:
    """A tenant as the progress view sees it: its own window (common t0 + its delay), its last
    counts and their time."""
    from multitenant.schema import Counts

    counts = Counts(tokens=progress.get("tokens", 0), requests=progress.get("requests", 0)) if progress else None
    window = None if t0 is None else (t0 + int(delay_s * S), t0 + 10 * S)
    return SimpleNamespace(
        counts=counts, progress_t_ns=progress.get("t"), window=window, tenant=SimpleNamespace(config=SimpleNamespace(task=task))
    )


def test_rate_counts_from_the_tenants_window_start_and_ignores_warm_up_messages() -> None:
    # The last message before the window still carries warm-up counts: no rate from it.
    assert rate_text(tenant({"t": 99 * S, "tokens": 5000, "requests": 10})) == ""
    # In the window the counts start again from zero (the tenant resets them at t0).
    assert rate_text(tenant({"t": 102 * S, "tokens": 400, "requests": 4})) == "200.0 tok/s"
    assert rate_text(tenant({"t": 102 * S, "tokens": 400, "requests": 4}, delay_s=1.0)) == "400.0 tok/s"
    assert rate_text(tenant({"tokens": 400})) == "", "a message without t gives no rate"
    assert rate_text(tenant({"t": 102 * S, "tokens": 1}, t0=None)) == ""


def test_forward_tenants_show_sequences_per_second() -> None:
    assert rate_text(tenant({"t": 104 * S, "tokens": 0, "requests": 20}, task="forward")) == "5.0 seq/s"


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


class Terminal(io.StringIO):
    """What a terminal is sent (rich's console and a log handler both write here)."""

    def isatty(self) -> bool:
        return True


def screen(raw: str, width: int) -> list[str]:
    """The rows a terminal shows after ``raw``: the few controls rich's Live uses (carriage
    return, newline, cursor up, erase line), auto-wrap at ``width``; colours are dropped."""
    rows: list[list[str]] = [[]]
    row = col = 0
    i = 0
    while i < len(raw):
        if raw[i] == "\x1b":
            m = re.match(r"\x1b\[\??(\d*)([A-Za-z])", raw[i:])
            assert m, repr(raw[i : i + 10])
            if m[2] == "A":
                row = max(0, row - int(m[1] or 1))
            elif m[2] == "K" and m[1] == "2":
                rows[row] = []
            i += len(m[0])
            continue
        ch = raw[i]
        i += 1
        if ch == "\r":
            col = 0
            continue
        if ch == "\n" or col >= width:  # a tty turns \n into \r\n; a full row wraps
            row, col = row + 1, 0
            while len(rows) <= row:
                rows.append([])
            if ch == "\n":
                continue
        line = rows[row]
        line.extend(" " * (col + 1 - len(line)))
        line[col] = ch
        col += 1
    return ["".join(r).rstrip() for r in rows if "".join(r).strip()]


def test_log_lines_during_the_live_table_leave_no_stale_lines() -> None:
    term = Terminal()
    console = Console(file=term, force_terminal=True, width=60, height=40, color_system=None)
    handler = logging.StreamHandler(term)  # like Hydra's: it holds the stream it was given
    log = logging.getLogger("test_progress_live")
    log.addHandler(handler)
    log.propagate = False
    log.setLevel(logging.INFO)
    a = SimpleNamespace(counts=None, progress_t_ns=None, window=None, state="loading", final_status=None)
    orch = SimpleNamespace(tenants={"a": a}, window=None)
    try:
        with LiveProgress("pair_tiny (cpu)", console=console) as live:
            live.update(orch)
            time.sleep(0.3)  # the table is on screen (it refreshes 4 times a second)
            log.info("tenant a ready (load 0.4s, warm-up 0.1s) and a long tail to wrap the line ......")
            a.state, orch.window = "running", (time.monotonic_ns() - S, time.monotonic_ns() + 5 * S)
            live.update(orch)
            time.sleep(0.3)  # a few refreshes of the live display
    finally:
        log.removeHandler(handler)
    shown = screen(term.getvalue(), 60)
    text = "\n".join(shown)
    assert sum("tenant a ready" in r for r in shown) == 1, text
    assert "waiting for every tenant" not in text, f"a stale table from before the log line:\n{text}"
    assert sum("pair_tiny (cpu)" in r for r in shown) == 1, f"one table only:\n{text}"
    assert shown[0].startswith("tenant a ready"), f"the log line sits above the table:\n{text}"
    assert handler.stream is term, "the handler writes to its own stream again after the table"


def test_final_counts_keep_a_rate_over_the_whole_measured_phase() -> None:
    # The tenant's last message ("finished") carries the whole phase's counts but no time: the
    # rate is counted to the tenant's window end (the final table showed no rate before).
    from multitenant.run.tenants import TenantProc
    from multitenant.schema import Counts, FinishedMsg

    tp = TenantProc.__new__(TenantProc)
    tp.tenant = SimpleNamespace(name="a", config=SimpleNamespace(task="generate"))  # type: ignore[assignment]
    tp.window = (100 * S, 110 * S)  # the tenant's own window, as the announcement sets it
    tp.counts, tp.progress_t_ns, tp.final_status = Counts(tokens=900, requests=9), 109 * S, None
    tp.on_message(FinishedMsg(status="ok", counts=Counts(tokens=1000, requests=10)))
    assert tp.final_status == "ok"
    assert rate_text(tp) == "100.0 tok/s"


def test_a_sweep_ends_with_its_folder_and_how_many_jobs_ended_ok(tmp_path: Path) -> None:
    from multitenant.cli import sweep_line

    jobs = [(tmp_path / "job0", "ok"), (tmp_path / "job1", "failed"), (tmp_path / "job2", "ok")]
    assert sweep_line(tmp_path, jobs, 4) == f"mt-run: sweep {tmp_path}: 2/4 jobs ok (job1 failed, 1 refused by validation)"
    assert sweep_line(tmp_path, jobs[:1], 1) == f"mt-run: sweep {tmp_path}: 1/1 jobs ok"


def test_outside_a_terminal_the_last_line_has_every_tenants_final_counts_and_their_moment() -> None:
    from multitenant.schema import Counts

    console = Console(file=io.StringIO(), force_terminal=False, width=200)
    a = tenant({"t": 105 * S, "tokens": 500, "requests": 5})
    a.state, a.final_status, a.counts = "finished", "ok", Counts(tokens=1000, requests=10)
    a.progress_t_ns = 110 * S
    orch = SimpleNamespace(tenants={"a": a}, window=(100 * S, 110 * S))
    with LiveProgress("pair (cpu)", console=console) as live:
        live.finish(orch, "ok")  # type: ignore[arg-type]
    out = console.file.getvalue().strip().splitlines()  # type: ignore[attr-defined]
    assert len(out) == 1 and out[0].startswith("[pair (cpu)] ok: window of 10 s closed"), out
    assert "a: finished, 10 req, 1000 tok at +10.0 s, 100.0 tok/s" in out[0], out
