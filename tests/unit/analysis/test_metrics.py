"""Metric rules on built runs, and a randomised comparison with a plain-Python reference."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from multitenant.analysis.baselines import apply_baselines, choose_baseline, newest_first
from multitenant.analysis.load import load_run, load_runs
from multitenant.analysis.metrics import SloError, compute_run, parse_slo
from multitenant.analysis.names import PERCENTILES
from tests.unit.analysis.builders import (
    BASE_NS,
    GPU,
    MS,
    RunBuilder,
    TenantBuilder,
    default_workload,
    simple_run,
)


def test_window_end_is_t1_when_tokens_run_past_it(tmp_path: Path) -> None:
    rb = RunBuilder(tmp_path)
    a = rb.tenant("a").start(0).window(1000, 2000)
    a.request(1, 1000, 1000, [1500, 1990, 2000, 2010, 2500])  # two tokens after t1
    rm = compute_run(load_run(rb.write()))
    # end = min(t1 2000, last tok 2500) = 2000; tokens in [1000, 2000]: 1500, 1990, 2000 -> 3 / 1 s.
    assert rm.window_ns == (BASE_NS + 1000 * MS, BASE_NS + 2000 * MS)
    assert rm.tenants["a"].output_tokens == 3
    assert rm.tenants["a"].throughput == 3.0


def test_window_counts_tokens_at_both_edges(tmp_path: Path) -> None:
    rb = RunBuilder(tmp_path)
    a = rb.tenant("a").start(0).window(1000, 1500)
    b = rb.tenant("b").start(0).window(1000, None)
    a.request(1, 900, 900, [1000, 1250, 1500, 1600])  # measured? sent 900 < t0: no, but its tokens count
    b.request(1, 1000, 1000, [1100, 1400])  # b's end = 1400 = last tok
    b.request(2, 1400, 1400, [1500], status="cancelled")
    rm = compute_run(load_run(rb.write()))
    # b's phase end = last tok of a measured request = 1500 (rid 2, cancelled, still a token);
    # window [1000, min(1500, 1500)] = 0.5 s. a: 1000 (start edge), 1250, 1500 (end edge) = 3.
    assert rm.window_ns == (BASE_NS + 1000 * MS, BASE_NS + 1500 * MS)
    assert rm.tenants["a"].output_tokens == 3
    assert rm.tenants["a"].throughput == 6.0
    # a's only request was sent before the window: it is in no latency statistic.
    assert rm.tenants["a"].requests == 0 and rm.tenants["a"].latency["ttft"]["p50"] is None


def test_phases_that_do_not_overlap_give_no_window(tmp_path: Path) -> None:
    rb = RunBuilder(tmp_path)
    rb.tenant("a").start(0).window(1000, 2000).request(1, 1000, 1000, [1500])
    rb.tenant("b").start(0).window(3000, 4000).request(1, 3000, 3000, [3500])
    rm = compute_run(load_run(rb.write()))
    assert rm.window_ns is None
    assert rm.tenants["a"].throughput is None and rm.gpu_throughput_tok_s is None
    assert any("do not overlap" in w for w in rm.warnings)
    # The naive figure does not need an overlap: 2 tokens over [1000, 3500] = 2.5 s.
    assert rm.gpu_throughput_naive_tok_s == pytest.approx(2 / 2.5, rel=1e-12)


def test_forward_tenant_counts_sequences_per_second(tmp_path: Path) -> None:
    rb = RunBuilder(tmp_path)
    enc = rb.tenant("enc", task="forward", model="synthetic:bert-tiny").start(0).window(1000, 2000)
    # Two batches: sequences 1-4 end at 1100 (batch 4), 5-6 end at 1300 (batch 2); 7 after t1.
    for rid in range(1, 5):
        enc.request(rid, 1000, 1000, [], done=1100, n_out=0)
    enc.ev(1100, "iter", i=0, batch=4, dur_ns=100 * MS)
    for rid in (5, 6):
        enc.request(rid, 1150, 1200, [], done=1300, n_out=0)
    enc.ev(1300, "iter", i=1, batch=2, dur_ns=100 * MS)
    enc.request(7, 1900, 1900, [], done=2100, status="cancelled", n_out=0)
    enc.ev(2100, "iter", i=2, batch=1, dur_ns=200 * MS)
    rm = compute_run(load_run(rb.write()))
    tm = rm.tenants["enc"]
    # Forward end = min(t1 2000, last done of a measured request 2100) = 2000; window 1 s;
    # iterations inside: batch 4 + batch 2 = 6 sequences -> 6 seq/s.
    assert (tm.task, tm.throughput_unit, tm.throughput) == ("forward", "seq/s", 6.0)
    # e2e = done - sent: four at 100 ms, two at 100 ms; queue: 0 x4, 50 x2.
    assert tm.latency["e2e"]["p50"] == 100.0
    assert tm.latency["queue"]["mean"] == pytest.approx(100 / 6, rel=1e-12)
    assert tm.latency["ttft"]["mean"] is None and tm.output_tokens == 0
    assert rm.gpu_throughput_tok_s is None  # no generate tenant: no token figure
    assert (tm.requests, tm.completed, tm.cancelled) == (7, 6, 1)


def test_failed_run_is_analysed_with_a_warning_first(tmp_path: Path) -> None:
    rb = simple_run(tmp_path, status="failed", reason="tenant b exited with code 1")
    rm = compute_run(load_run(rb.write()))
    assert rm.warnings[0] == "run status is 'failed' (tenant b exited with code 1); its numbers may be incomplete"
    assert rm.tenants["a"].throughput is not None


def test_unfinished_unknown_status_and_n_out_mismatch(tmp_path: Path) -> None:
    rb = RunBuilder(tmp_path)
    a = rb.tenant("a").start(0).window(1000, 2000)
    a.request(1, 1000, 1000, [1010, 1020, 1030], n_out=5)  # n_out 5 but 3 tok counts
    a.request(2, 1100, 1100, [1110], status="timeout")  # not a schema-v1 status
    a.request(3, 1200, 1200, [1210, 1300], status=None)  # never finished (crash)
    a.request(4, 1300, 1300, [1400, 1500])
    rm = compute_run(load_run(rb.write()), parse_slo("e2e=1s"))
    tm = rm.tenants["a"]
    assert (tm.requests, tm.completed, tm.errors, tm.cancelled, tm.incomplete) == (4, 2, 1, 0, 1)
    assert any("['timeout'] counted as errors" in w for w in rm.warnings)
    assert any("done.n_out differs" in w for w in rm.warnings)
    # TPOT of rid 1 uses n_out 5: (1030 - 1010) / 4 = 5 ms; rid 4: 100 ms.
    assert sorted(tm.table.columns["tpot_ms"][[0, 3]]) == [5.0, 100.0]
    # SLO: judged = 4 (error and unfinished count as misses) -> 2 good / 4.
    assert tm.slo_attainment == 0.5


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("ttft=200", "has no unit"),
        ("latency=2s", "is unknown"),
        ("ttft200ms", "is not name=value<unit>"),
        ("ttft=1ms,ttft=2ms", "given twice"),
        ("ttft=0ms", "must be positive"),
        ("ttft=2h", "is not name=value<unit>"),
        (",", "names no bound"),
    ],
)
def test_bad_slo_is_rejected_with_the_fix(text: str, message: str) -> None:
    with pytest.raises(SloError, match=message):
        parse_slo(text)


def test_slo_units() -> None:
    assert parse_slo("ttft=250000us, tpot=0.05s ,e2e=1e9ns") == {"ttft": 250.0, "tpot": 50.0, "e2e": 1000.0}


def _solo(root: Path, dirname: str, started: str, gpu: dict[str, Any] | None = None, status: str = "ok", **tenant: Any) -> RunBuilder:
    rb = RunBuilder(root, dirname, gpu=gpu, started_wall=started, status=status)
    a = rb.tenant("a", **tenant).start(0).window(1000, 2000)
    a.request(1, 1000, 1000, [1100, 1200])
    return rb


def test_baseline_matching_rules(tmp_path: Path) -> None:
    pair = RunBuilder(tmp_path, "pair", gpu=None)
    pair.tenant("x", workload=default_workload(start_delay_s=0.5)).start(0).window(1000, 2000)
    pair.tenant("y", model="synthetic:other").start(0).window(1000, 2000)
    pair_run = load_run(pair.write())
    runs = load_runs([
        _solo(tmp_path, "old", "2026-11-20T00:00:00+00:00").write(),
        _solo(tmp_path, "new", "2026-11-21T00:00:00+00:00").write(),
        _solo(tmp_path, "failed", "2026-11-22T00:00:00+00:00", status="failed").write(),
        _solo(tmp_path, "gpu", "2026-11-22T00:00:00+00:00", gpu=GPU).write(),
        _solo(tmp_path, "longer", "2026-11-22T00:00:00+00:00", workload=default_workload(
            dataset={"kind": "random", "input_len": 16, "output_len": 8, "range_ratio": 0.0, "path": None, "seed": 0},
        )).write(),
        _solo(tmp_path, "batch", "2026-11-22T00:00:00+00:00", max_batch=4).write(),
    ])  # fmt: skip
    # x differs from the solos only in start_delay_s (ignored); the GPU (null) must match null;
    # a failed run, another GPU, another workload or batch limit never match; newest wins.
    chosen = choose_baseline(pair_run, "x", newest_first(runs))
    assert chosen is not None and chosen.run_dir.name == "new"
    assert choose_baseline(pair_run, "y", newest_first(runs)) is None
    # A run is never its own baseline, and single-tenant runs get no interference figures.
    solo = runs[1]
    assert choose_baseline(solo, "a", [solo]) is None
    rm = compute_run(solo)
    apply_baselines(rm, {"a": compute_run(runs[0])})
    assert rm.tenants["a"].np is None and rm.missing_baselines == []


def test_baseline_needs_a_config(tmp_path: Path) -> None:
    rb = simple_run(tmp_path, write_config=False)
    rb.tenant("b").start(0).window(1000, 2000)
    run = load_run(rb.write())
    assert any("no config.resolved.yaml" in w for w in run.warnings)
    assert choose_baseline(run, "a", []) is None


# ---------------------------------------------------------------------------------------------
# Randomised comparison with a plain-Python reference implementation


def _reference(tbs: dict[str, TenantBuilder]) -> dict[str, Any]:
    """Metrics computed the slow, obvious way from the builders' event lists (not the files)."""
    phases, per = {}, {}
    for name, tb in tbs.items():
        evs = tb.events
        win = next(e for e in evs if e["ev"] == "window")
        t0, t1 = win["t0"], win["t1"]
        req: dict[int, dict[str, Any]] = {}
        toks: list[tuple[int, int, int]] = []
        for e in evs:
            if e["ev"] in ("sched", "sent", "done"):
                req.setdefault(e["rid"], {})[e["ev"]] = e
            elif e["ev"] == "tok":
                for rid, n in zip(e["rid"], e["n"], strict=True):
                    toks.append((e["t"], rid, n))
                    req.setdefault(rid, {})
        for rid, r in req.items():
            ts = sorted(t for t, x, _ in toks if x == rid)
            r["toks"] = ts
            r["n_tok"] = sum(n for _, x, n in toks if x == rid)
            ref = r["sent"]["t"] if "sent" in r else r["sched"]["t"]
            r["measured"] = t0 <= ref and (t1 is None or ref <= t1)
        last = [r["toks"][-1] for r in req.values() if r["measured"] and r["toks"]]
        end = min(x for x in (t1, max(last) if last else None) if x is not None)
        phases[name] = (t0, end)
        per[name] = (req, toks)
    w0 = max(p[0] for p in phases.values())
    w1 = min(p[1] for p in phases.values())
    out: dict[str, Any] = {"window": (w0, w1), "tenants": {}}
    for name, (req, toks) in per.items():
        samples: dict[str, list[float]] = {k: [] for k in ("ttft", "tpot", "itl", "e2e", "queue")}
        for r in req.values():
            if "sent" not in r or not (w0 <= r["sent"]["t"] <= w1) or r.get("done", {}).get("status") != "ok":
                continue
            sent, ts = r["sent"]["t"], r["toks"]
            samples["queue"].append((sent - r["sched"]["t"]) / 1e6)
            if ts:
                samples["ttft"].append((ts[0] - sent) / 1e6)
                samples["e2e"].append((ts[-1] - sent) / 1e6)
                n_out = r["done"]["n_out"]
                if n_out > 1:
                    samples["tpot"].append((ts[-1] - ts[0]) / (n_out - 1) / 1e6)
                samples["itl"] += [(b - a) / 1e6 for a, b in zip(ts, ts[1:], strict=False)]
        tokens = sum(n for t, _, n in toks if w0 <= t <= w1)
        out["tenants"][name] = {"samples": samples, "tokens": tokens, "throughput": tokens / ((w1 - w0) / 1e9)}
    return out


def _random_tenant(rb: RunBuilder, name: str, rng: random.Random, t0: float, t1: float | None) -> None:
    tb = rb.tenant(name).start(0).window(t0, t1)
    rid = 0
    now = t0 - 300.0
    while now < (t1 or t0 + 3000):
        rid += 1
        sched = round(now + rng.uniform(0, 20), 3)
        sent = round(sched + rng.choice([0.0, rng.uniform(0, 15)]), 3)
        n = rng.randint(1, 12)
        toks, t = [], sent
        for _ in range(n):
            t = round(t + rng.uniform(0.5, 40.0), 3)
            toks.append(t)
        status = rng.choice(["ok"] * 8 + ["error", "cancelled"])
        tb.request(rid, sched, sent, toks if status != "error" else [], status=status, done=toks[-1])
        now = sent + rng.uniform(5, 60)  # next request overlaps this one (concurrency > 1)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_matches_reference_implementation(tmp_path: Path, seed: int) -> None:
    rng = random.Random(seed)
    rb = RunBuilder(tmp_path, f"rand{seed}")
    _random_tenant(rb, "p", rng, 1000.0, 3000.0)
    _random_tenant(rb, "q", rng, 1100.0, None)
    _random_tenant(rb, "r", rng, 900.0, 2600.0)
    rm = compute_run(load_run(rb.write()))
    ref = _reference(rb.tenants)
    assert rm.window_ns == ref["window"]
    for name, expected in ref["tenants"].items():
        tm = rm.tenants[name]
        assert tm.output_tokens == expected["tokens"]
        assert tm.throughput == pytest.approx(expected["throughput"], rel=1e-12)
        for metric, values in expected["samples"].items():
            stats = tm.latency[metric]
            assert values, f"seed {seed}: {name} has no {metric} sample; the generator is too sparse"
            arr = np.asarray(values)
            assert stats["mean"] == pytest.approx(float(np.mean(arr)), rel=1e-9)
            assert stats["std"] == pytest.approx(float(np.std(arr)), rel=1e-9, abs=1e-9)
            for key, q in PERCENTILES:
                assert stats[key] == pytest.approx(float(np.percentile(arr, q)), rel=1e-9), (name, metric, key)
