"""Edge cases of the analysis: token-less requests and SLOs, orphan tok events, a duplicate
sent, empty logs, the aggregate label of CPU runs, and the failed-run warning shown once."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from rich.console import Console

from multitenant.analysis.load import load_run
from multitenant.analysis.metrics import compute_run, parse_slo
from multitenant.analysis.report import markdown, print_terminal, run_tables
from tests.unit.analysis.builders import GPU, MS, RunBuilder, simple_run


def _slo_run(tmp_path: Path) -> RunBuilder:
    rb = RunBuilder(tmp_path)
    a = rb.tenant("a").start(0).window(1000, 2000)
    a.request(1, 1000, 1000, [1010, 1020])  # TTFT 10 ms, TPOT 10 ms: good
    a.request(2, 1100, 1100, [], n_out=0)  # ok but no token at all: no TTFT
    a.request(3, 1200, 1200, [1210])  # one token: TTFT 10 ms, no TPOT
    a.request(4, 1300, 1300, [1310, 1320])
    a.end(2100)
    return rb


@pytest.mark.parametrize(
    ("spec", "good"),
    [
        ("ttft=50ms", [True, False, True, True]),
        ("tpot=50ms", [True, False, True, True]),
        ("e2e=1s", [True, False, True, True]),
        ("ttft=50ms,tpot=50ms", [True, False, True, True]),
    ],
)
def test_a_request_without_tokens_meets_no_bound_one_token_meets_tpot(tmp_path: Path, spec: str, good: list[bool]) -> None:
    rm = compute_run(load_run(_slo_run(tmp_path).write()), parse_slo(spec))
    tm = rm.tenants["a"]
    assert tm.table is not None
    slo_ok = dict(zip(tm.table.columns["rid"].tolist(), tm.table.columns["slo_ok"].tolist(), strict=True))
    assert [slo_ok[r] for r in (1, 2, 3, 4)] == good
    assert tm.slo_attainment == 0.75
    assert rm.window_s == pytest.approx(0.32)  # [1000, last token 1320] ms
    assert tm.goodput_req_s == pytest.approx(3 / 0.32)  # 3 good requests


def test_forward_tenants_are_not_failed_on_token_bounds(tmp_path: Path) -> None:
    rb = RunBuilder(tmp_path)
    enc = rb.tenant("enc", task="forward").start(0).window(1000, 2000)
    enc.ev(1000, "sched", rid=1, n_in=16, n_out_target=0).ev(1000, "sent", rid=1)
    enc.ev(1100, "iter", batch=1, dur_ns=100 * MS).ev(1100, "done", rid=1, n_out=0, status="ok")
    rm = compute_run(load_run(rb.write()), parse_slo("ttft=50ms,e2e=1s"))
    assert rm.tenants["enc"].slo_attainment == 1.0


def test_orphan_tok_events_are_counted_and_warned(tmp_path: Path) -> None:
    rb = RunBuilder(tmp_path)
    a = rb.tenant("a").start(0).window(1000, 2000)
    a.request(1, 1000, 1000, [1100, 1200, 2000])
    a.ev(1300, "tok", rid=[7], n=[2]).ev(1400, "tok", rid=[7], n=[1]).ev(1500, "tok", rid=[9], n=[1])
    rm = compute_run(load_run(rb.write()))
    # Throughput counts every token in the window, the orphans' 4 too: (3 + 4) / 1 s.
    assert rm.tenants["a"].throughput == 7.0
    assert rm.tenants["a"].requests == 1  # the orphans are no request
    hits = [w for w in rm.warnings if "no sched, sent or done" in w]
    assert hits == [
        "tenant a: tok events for 2 request id(s) (4 token(s)) with no sched, sent or done event "
        "(first: rid 7); the log is damaged: their tokens count in throughput, they are in no request count"
    ]


def test_a_second_sent_is_ignored_with_a_warning(tmp_path: Path) -> None:
    rb = RunBuilder(tmp_path)
    a = rb.tenant("a").start(0).window(1000, 2000)
    a.request(1, 1000, 1000, [1100, 1200])
    a.ev(1050, "sent", rid=1)  # a second sent: must not halve TTFT
    a.request(2, 1300, 1300, [1400])
    a.ev(1350, "sent", rid=2)
    a.request(3, 1500, 1500, [1550])
    rm = compute_run(load_run(rb.write()))
    tm = rm.tenants["a"]
    assert tm.table is not None
    ttft = dict(zip(tm.table.columns["rid"].tolist(), tm.table.columns["ttft_ms"].tolist(), strict=True))
    assert ttft == {1: 100.0, 2: 100.0, 3: 50.0}
    assert [w for w in rm.warnings if "more than one sent" in w] == [
        "tenant a: 2 request(s) with more than one sent event (first: rid 1); the first sent is kept"
    ]


def test_a_second_sent_is_ignored_on_the_careful_path_too(tmp_path: Path) -> None:
    rb = RunBuilder(tmp_path)
    a = rb.tenant("a").start(0).window(1000, 2000)
    a.request(1, 1000, 1000, [1100, 1200]).ev(1050, "sent", rid=1)
    path = rb.write() / "tenants" / "a" / "events.jsonl"
    with open(path, "ab") as f:
        f.write(b'{"t":"x","ev":"sched","rid":99}\n')  # the fast loop rejects it: careful path
    rm = compute_run(load_run(path.parents[2]))
    tm = rm.tenants["a"]
    assert tm.table is not None and tm.table.columns["ttft_ms"].tolist() == [100.0]
    assert sum("more than one sent" in w for w in rm.warnings) == 1
    assert any("do not follow event schema v1" in w for w in rm.warnings)


@pytest.mark.parametrize("content", ["", "only_start"])
def test_an_empty_log_has_no_throughput(tmp_path: Path, content: str) -> None:
    rb = RunBuilder(tmp_path)
    a = rb.tenant("a")
    if content:
        a.start(0).window(1000, 2000).end(2100)
    else:
        a.write_events = False
    d = rb.write()
    if not content:
        (d / "tenants" / "a").mkdir(parents=True)
        (d / "tenants" / "a" / "events.jsonl").write_bytes(b"")
    manifest = (d / "manifest.json").read_text().replace('"t0_ns": null', f'"t0_ns": {10**16}')
    (d / "manifest.json").write_text(manifest.replace('"t1_ns": null', f'"t1_ns": {10**16 + 10**9}'))
    rm = compute_run(load_run(d))
    assert rm.tenants["a"].throughput is None
    assert rm.gpu_throughput_tok_s is None
    expected = "is empty" if not content else "has no request events"
    assert [w for w in rm.warnings if w.startswith("tenant a: its event log")] == [
        f"tenant a: its event log {expected}; it has no throughput"
    ]


def test_an_empty_tenant_beside_a_busy_one(tmp_path: Path) -> None:
    rb = RunBuilder(tmp_path)
    rb.tenant("a").start(0).window(1000, 2000).request(1, 1000, 1000, [1100, 2000])
    rb.tenant("b").start(0).window(1000, 2000).end(2100)
    rm = compute_run(load_run(rb.write()))
    assert rm.tenants["a"].throughput == 2.0 and rm.tenants["b"].throughput is None
    assert rm.gpu_throughput_tok_s == 2.0


def _terminal(rm: object) -> str:
    buf = io.StringIO()
    print_terminal([rm], {id(rm): "run"}, Console(file=buf, width=200, color_system=None))  # type: ignore[list-item]
    return buf.getvalue()


def test_cpu_runs_say_aggregate_gpu_runs_say_gpu(tmp_path: Path) -> None:
    cpu = compute_run(load_run(simple_run(tmp_path, "cpu").write()))
    gpu = compute_run(load_run(simple_run(tmp_path, "gpu", mode="gpu", gpu=GPU).write()))
    for rm, word in ((cpu, "aggregate"), (gpu, "GPU")):
        figures = [row[0] for row in run_tables(rm)[-1].rows]
        assert f"{word} throughput (tok/s, in window)" in figures
        assert f"{word} throughput, naive (tok/s, first send to last token)" in figures
        assert f"· {word} " in _terminal(rm)
        assert f"| {word} throughput (tok/s, in window) |" in markdown([rm], {id(rm): "run"})
    assert "GPU" not in "".join(row[0] for row in run_tables(cpu)[-1].rows)
    assert "· GPU " not in _terminal(cpu)


def test_a_failed_run_warns_once_on_the_terminal(tmp_path: Path) -> None:
    rm = compute_run(load_run(simple_run(tmp_path, status="failed", reason="tenant b crashed").write()))
    out = _terminal(rm)
    assert out.count("'failed'") == 1, out
    assert "WARNING: Run status 'failed': tenant b crashed" in out
    assert rm.warnings[0].startswith("run status is 'failed'")  # summary.json keeps it


def test_other_warnings_still_print_on_a_failed_run(tmp_path: Path) -> None:
    rb = simple_run(tmp_path, status="failed")
    rb.tenants["a"].ev(1500, "tok", rid=[42], n=[1])
    out = _terminal(compute_run(load_run(rb.write())))
    assert "warning: tenant a: tok events for 1 request id(s)" in out
    assert out.count("'failed'") == 1


def test_a_failed_run_warns_once_in_summary_md(tmp_path: Path) -> None:
    rm = compute_run(load_run(simple_run(tmp_path, status="failed", reason="tenant b crashed").write()))
    md = markdown([rm], {id(rm): "run"})
    assert md.lower().count("'failed'") == 1, md
    assert "WARNING: Run status 'failed': tenant b crashed" in md
