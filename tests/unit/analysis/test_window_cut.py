"""The run says how its window was cut: which tenant set its start and its end, and why."""

from __future__ import annotations

import io
from pathlib import Path

import orjson
from rich.console import Console

from multitenant.analysis.load import load_run
from multitenant.analysis.metrics import compute_run
from multitenant.analysis.names import WINDOW_END_LAST_TOKEN, WINDOW_END_PHASE
from multitenant.analysis.report import markdown, print_terminal
from multitenant.analysis.summary import write_summary_json
from tests.unit.analysis.builders import RunBuilder


def test_a_tenant_whose_last_token_comes_early_cuts_the_window_and_says_so(tmp_path: Path) -> None:
    rb = RunBuilder(tmp_path, "run")
    # a: closed loop, tokens up to its phase end (5 s after t0). b: open loop, its last token
    # 4.439 s after t0 and nothing in flight after it.
    rb.tenant("a").start(0).window(1000, 6000).request(1, 1000, 1000, [2000, 6000]).end(6100)
    rb.tenant("b").start(0).window(1000, 6000).request(1, 1000, 1000, [1500, 5439]).end(6100)
    rm = compute_run(load_run(rb.write()))
    cut = rm.window_cut
    assert cut is not None
    assert (cut.end_tenant, cut.end_reason, cut.end_tenant_phase_s) == ("b", WINDOW_END_LAST_TOKEN, 5.0)
    assert abs(cut.end_s - 4.439) < 1e-9 and abs(cut.window_s - 4.439) < 1e-9
    text = "window 4.439 s: starts at t0 (every tenant's phase start); ends at tenant b's last token (4.439 s after t0; its 5 s phase had no token after it)"
    assert cut.text == text

    buf = io.StringIO()
    print_terminal([rm], {id(rm): "run"}, Console(file=buf, width=300))
    assert text in buf.getvalue()
    assert text in markdown([rm], {id(rm): "run"})
    out = write_summary_json([rm], tmp_path / "summary.json")
    assert orjson.loads(out.read_bytes())["runs"][0]["window_cut"]["end_tenant"] == "b"


def test_a_staggered_start_and_a_phase_end_are_named(tmp_path: Path) -> None:
    rb = RunBuilder(tmp_path, "run")
    rb.tenant("a").start(0).window(1000, 3000).request(1, 1000, 1000, [2000, 3500]).end(3600)
    rb.tenant("b").start(0).window(1500, 4000).request(1, 1500, 1500, [2000, 3900]).end(4100)
    cut = compute_run(load_run(rb.write())).window_cut
    assert cut is not None and (cut.start_tenant, cut.end_tenant, cut.end_reason) == ("b", "a", WINDOW_END_PHASE)
    assert "starts at tenant b's phase start (0.500 s after t0, the latest start)" in cut.text
    assert "ends at tenant a's phase end (2.000 s after t0, its 2 s phase)" in cut.text
