"""NP of open-loop tenants: mean solo E2E / mean co-located E2E; closed-loop ones keep throughput NP.

Hand-computed runs (mode cpu; times in ms after BASE_NS; every request's ``done`` at its last token):

closed-loop tenant ``a`` (arrival closed, concurrency 1)
  pair:  window [1000, 3000]; rid 1 sent 1000, 10 toks 1100..2000; rid 2 sent 2000, 10 toks 2100..3000
         -> 20 tokens in the run window [1000, 3000] (2 s) = 10 tok/s
  solo:  window [1000, 3000]; rid 1 sent 1000, 16 toks every 62.5 ms, last at 2000
         -> its end is its last token 2000: 16 tokens / 1 s = 16 tok/s;  NP_a = 10 / 16 = 0.625

open-loop tenant ``b`` (poisson, 2 req/s)
  pair:  rid 1 sent 1000, toks 1100, 1300 (e2e 300); rid 2 sent 2700, toks 2800, 3000 (e2e 300): mean 300
  solo:  rid 1 sent 1000, toks 1050, 1100 (e2e 100); rid 2 sent 2700, toks 2800, 2900 (e2e 200): mean 150
         NP_b = 150 / 300 = 0.5 (its throughput ratio, (4 / 2 s) / (4 / 1.9 s) = 0.95, would hide it)

open-loop tenant ``c`` (constant, 1 req/s)
  pair:  rid 1 sent 1000, toks 1200, 1400 (e2e 400); rid 2 sent 2000, toks 2200, 2400 (e2e 400): mean 400
  solo:  rid 1 sent 1000, toks 1050, 1100 (e2e 100); rid 2 sent 2000, toks 2050, 2100 (e2e 100): mean 100
         NP_c = 100 / 400 = 0.25

A warm-up request (rid 0, sent at 100) precedes every window and is never measured.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from multitenant.analysis.baselines import apply_baselines, choose_baseline, np_definition
from multitenant.analysis.load import load_run
from multitenant.analysis.metrics import RunMetrics, compute_run
from multitenant.analysis.report import markdown, print_terminal
from multitenant.analysis.summary import summary
from tests.unit.analysis.builders import RunBuilder, TenantBuilder, default_workload

approx = pytest.approx


def workload(name: str) -> dict[str, Any]:
    arrivals = {
        "a": {"kind": "closed", "concurrency": 1, "rate": None, "burstiness": 1.0, "seed": 0},
        "b": {"kind": "poisson", "concurrency": 1, "rate": 2.0, "burstiness": 1.0, "seed": 0},
        "c": {"kind": "constant", "concurrency": 1, "rate": 1.0, "burstiness": 1.0, "seed": 0},
    }
    return default_workload(arrival=arrivals[name])


def requests(tb: TenantBuilder, name: str, solo: bool) -> None:
    """The requests of the module docstring for tenant ``name``, solo or co-located."""
    tb.start(0).request(0, 100, 100, [150]).ready(200).window(1000, 3000)
    if name == "a" and solo:
        tb.request(1, 1000, 1000, [1000 + 62.5 * k for k in range(1, 17)])
    elif name == "a":
        tb.request(1, 1000, 1000, [1000 + 100 * k for k in range(1, 11)])
        tb.request(2, 2000, 2000, [2000 + 100 * k for k in range(1, 11)])
    elif name == "b":
        tb.request(1, 1000, 1000, [1050, 1100] if solo else [1100, 1300])
        tb.request(2, 2700, 2700, [2800, 2900] if solo else [2800, 3000])
    else:
        tb.request(1, 1000, 1000, [1050, 1100] if solo else [1200, 1400])
        tb.request(2, 2000, 2000, [2050, 2100] if solo else [2200, 2400])
    tb.end(3100)


def solo_run(root: Path, name: str) -> RunBuilder:
    rb = RunBuilder(root, f"solo_{name}")
    requests(rb.tenant(name, workload=workload(name)), name, solo=True)
    return rb


def pair_run(root: Path, names: tuple[str, ...]) -> RunBuilder:
    rb = RunBuilder(root, "pair_" + "".join(names))
    for name in names:
        requests(rb.tenant(name, workload=workload(name)), name, solo=False)
    return rb


def analysed(pair: RunBuilder, solos: list[RunBuilder]) -> RunMetrics:
    """The pair's metrics with baselines chosen by the ordinary spec match."""
    run = load_run(pair.write())
    candidates = [load_run(s.write()) for s in solos]
    chosen = {name: choose_baseline(run, name, candidates) for name in run.tenants}
    rm = compute_run(run)
    apply_baselines(rm, {n: None if r is None else compute_run(r) for n, r in chosen.items()})
    return rm


def test_open_loop_tenants_get_solo_e2e_over_colocated_e2e(tmp_path: Path) -> None:
    rm = analysed(pair_run(tmp_path, ("b", "c")), [solo_run(tmp_path, "b"), solo_run(tmp_path, "c")])
    b, c = rm.tenants["b"], rm.tenants["c"]
    assert rm.missing_baselines == []
    assert (b.np_definition, c.np_definition) == ("e2e", "e2e")
    assert (b.np, c.np) == (0.5, 0.25), f"NP b {b.np}, c {c.np}: want 150/300 and 100/400"
    assert (b.solo_e2e_mean_ms, b.colocated_e2e_mean_ms) == (150.0, 300.0)
    assert (c.solo_e2e_mean_ms, c.colocated_e2e_mean_ms) == (100.0, 400.0)
    # STP 0.5 + 0.25; ANTT (2 + 4) / 2; fairness 0.25 / 0.5; Jain 0.5625 / (2 * 0.3125).
    assert (rm.stp, rm.antt, rm.fairness) == (0.75, 3.0, 0.5)
    assert rm.jain == approx(0.9)


@pytest.mark.parametrize("kind", ["poisson", "gamma", "constant"])
def test_every_open_loop_arrival_kind_uses_e2e(tmp_path: Path, kind: str) -> None:
    rb = RunBuilder(tmp_path)
    rb.tenant("x", workload=default_workload(arrival={"kind": kind, "rate": 1.0, "concurrency": 1}))
    rb.tenant("y")  # the builders' default: closed loop
    run = load_run(rb.write())
    assert (np_definition(run, "x"), np_definition(run, "y")) == ("e2e", "throughput")


def test_closed_loop_tenant_keeps_throughput_np(tmp_path: Path) -> None:
    rm = analysed(pair_run(tmp_path, ("a", "c")), [solo_run(tmp_path, "a"), solo_run(tmp_path, "c")])
    a = rm.tenants["a"]
    assert a.np_definition == "throughput"
    assert (a.throughput, a.solo_throughput) == (10.0, 16.0)
    assert a.np == 0.625, f"NP a {a.np}: want 10 tok/s / 16 tok/s"
    assert (a.solo_e2e_mean_ms, a.colocated_e2e_mean_ms) == (None, None)


def test_mixed_pair_sums_both_definitions(tmp_path: Path) -> None:
    rm = analysed(pair_run(tmp_path, ("a", "b")), [solo_run(tmp_path, "a"), solo_run(tmp_path, "b")])
    a, b = rm.tenants["a"], rm.tenants["b"]
    assert (a.np_definition, b.np_definition) == ("throughput", "e2e")
    assert (a.np, b.np) == (0.625, 0.5)
    # b's throughput ratio would have been (4 / 2 s) / (4 / 1.9 s) = 0.95; it is not used.
    assert b.throughput / b.solo_throughput == approx(0.95)
    # STP 1.125; ANTT (1.6 + 2) / 2 = 1.8; fairness 0.5 / 0.625 = 0.8;
    # Jain 1.125^2 / (2 * (0.390625 + 0.25)) = 1.265625 / 1.28125.
    assert rm.stp == 1.125
    assert rm.antt == approx(1.8)
    assert rm.fairness == approx(0.8)
    assert rm.jain == approx(1.265625 / 1.28125)


def test_open_loop_np_is_null_without_completed_colocated_requests(tmp_path: Path) -> None:
    pair = RunBuilder(tmp_path, "pair")
    requests(pair.tenant("a", workload=workload("a")), "a", solo=False)
    b = pair.tenant("b", workload=workload("b"))
    b.start(0).request(0, 100, 100, [150]).ready(200).window(1000, 3000)
    b.request(1, 1000, 1000, [1100], status="error", error="CUDA error: out of memory")
    b.request(2, 2700, 2700, [2800, 3000], status="cancelled")
    b.end(3100)
    rm = analysed(pair, [solo_run(tmp_path, "a"), solo_run(tmp_path, "b")])
    tb = rm.tenants["b"]
    assert tb.np_definition == "e2e" and tb.np is None
    assert (tb.solo_e2e_mean_ms, tb.colocated_e2e_mean_ms) == (150.0, None)
    assert rm.tenants["a"].np == 0.625
    assert (rm.stp, rm.antt, rm.fairness, rm.jain) == (None, None, None, None)
    (warning,) = [w for w in rm.warnings if "NP" in w]
    assert "tenant b" in warning and "co-located run" in warning and "no completed request" in warning, warning


def test_open_loop_np_is_null_without_completed_solo_requests(tmp_path: Path) -> None:
    solo = RunBuilder(tmp_path, "solo_b")
    b = solo.tenant("b", workload=workload("b"))
    b.start(0).request(0, 100, 100, [150]).ready(200).window(1000, 3000)
    b.request(1, 1000, 1000, [1100, 2900], status="cancelled")
    b.end(3100)
    rm = analysed(pair_run(tmp_path, ("a", "b")), [solo_run(tmp_path, "a"), solo])
    tb = rm.tenants["b"]
    assert tb.np is None and (tb.solo_e2e_mean_ms, tb.colocated_e2e_mean_ms) == (None, 300.0)
    assert rm.stp is None
    (warning,) = [w for w in rm.warnings if "NP" in w]
    assert "tenant b" in warning and "solo run" in warning and "no completed request" in warning, warning


def test_summary_json_names_each_tenants_np_definition(tmp_path: Path) -> None:
    rm = analysed(pair_run(tmp_path, ("a", "b")), [solo_run(tmp_path, "a"), solo_run(tmp_path, "b")])
    tenants = summary([rm])["runs"][0]["tenants"]
    assert tenants["a"]["np_definition"] == "throughput"
    assert (tenants["a"]["solo_e2e_mean_ms"], tenants["a"]["colocated_e2e_mean_ms"]) == (None, None)
    assert tenants["b"]["np_definition"] == "e2e" and tenants["b"]["np"] == 0.5
    assert (tenants["b"]["solo_e2e_mean_ms"], tenants["b"]["colocated_e2e_mean_ms"]) == (150.0, 300.0)
    assert summary([rm])["runs"][0]["aggregate"]["stp"] == 1.125


def test_markdown_and_terminal_say_which_np_is_e2e(tmp_path: Path) -> None:
    rm = analysed(pair_run(tmp_path, ("a", "b")), [solo_run(tmp_path, "a"), solo_run(tmp_path, "b")])
    text = markdown([rm], {id(rm): "pair"})
    assert "| 0.625 |" in text  # closed loop: the plain figure
    assert "| 0.500 E2E |" in text
    assert "mean E2E 150.00 ms solo / 300.00 ms co-located" in text
    buf = io.StringIO()
    print_terminal([rm], {id(rm): "pair"}, Console(file=buf, width=160, color_system=None))
    out = buf.getvalue()
    assert "0.50 E2E" in out
    assert "NP b = mean E2E solo / co-located: 150.00 / 300.00 ms" in out, out
