"""The hand-computed runs in tests/data/analysis/hand/, checked to the last digit.

All times below are milliseconds after B = 10_000_000_000_000_001 ns (odd and > 2**53, so a
float64 shortcut anywhere would break the last digit of a window or a latency).

pair/ (mode mps, "NVIDIA H100 80GB HBM3"), two tenants:

alpha: window t0 = 1000, t1 = 3500 (start_delay 0.1 s, duration 2.5 s)
  rid 0  warm-up: sent 100, tok 150, 170                        (before t0: never measured)
  rid 1  sched 1000 sent 1000, tok 1010, 1030, 1060, 1100        n_out 4
         ttft 10, ttft_sched 10, queue 0, tpot (1100-1010)/3 = 30, e2e 100, ITL 20, 30, 40
  rid 2  sched 1050 sent 1060, tok 1100 (same line as rid 1), 1120, 1140   n_out 3
         ttft 40, ttft_sched 50, queue 10, tpot (1140-1100)/2 = 20, e2e 80, ITL 20, 20
  rid 3  sent 1200, done 1250 status error                          (an error)
  rid 4  sent 1300, tok 1400 (n=2), 1500 (n=1)                     n_out 3
         ttft 100, ttft_sched 100, queue 0, tpot (1500-1400)/(3-1) = 50, e2e 200, ITL 100
  rid 5  sched 2900 sent 2950, tok 3000                             n_out 1
         ttft 50, ttft_sched 100, queue 50, e2e 50, no tpot (n_out 1), no ITL
  rid 6  sent 3100, cancelled at 3500 without a token
  alpha's end = min(t1 3500, last tok of a measured request 3000) = 3000

beta: window t0 = 900, t1 = null (stops on a request count)
  rid 0  warm-up: sent 300, tok 400
  rid 1  sent 900, tok 950, 1000, 1050               (measured, but sent before the run window)
  rid 2  sent 1050, tok 1100, 1200, 1300, 1400, 1500 n_out 5: ttft 50, tpot 400/4 = 100, e2e 450, ITL 4 x 100
  rid 3  sched 1500 sent 1510, tok 1600              n_out 1: ttft 90, ttft_sched 100, queue 10, e2e 90
  rid 4  sent 1600, tok 2000, 2500                   n_out 2: ttft 400, tpot 500, e2e 900, ITL 500
  rid 5  sent 2500, tok 2900, 2950, 3200, done cancelled at 3200
  beta's end = last tok of a measured request = 3200 (t1 is null)

run window = [max(1000, 900), min(3000, 3200)] = [1000, 3000] -> 2.000 s
"""

from __future__ import annotations

from pathlib import Path

import pytest

from multitenant.analysis.baselines import apply_baselines, choose_baseline
from multitenant.analysis.load import load_run, load_runs
from multitenant.analysis.metrics import compute_run, parse_slo

HAND = Path(__file__).resolve().parents[2] / "data" / "analysis" / "hand"
B = 10_000_000_000_000_001
MS = 1_000_000
EXACT = 1e-12  # relative: far below the last printed digit, far above float rounding


def approx(x: float) -> object:
    return pytest.approx(x, rel=EXACT, abs=1e-12)


@pytest.fixture(scope="module")
def pair():
    return compute_run(load_run(HAND / "pair"))


def test_window_is_overlap_of_measured_phases(pair) -> None:
    # [max(1000, 900), min(min(3500, 3000), 3200)] ms after B, as integers: no float rounding.
    assert pair.window_ns == (B + 1000 * MS, B + 3000 * MS)
    assert pair.window_s == 2.0
    assert pair.tenants["alpha"].phase_ns == (B + 1000 * MS, B + 3000 * MS)
    assert pair.tenants["beta"].phase_ns == (B + 900 * MS, B + 3200 * MS)


def test_throughput_counts_tokens_inside_window_inclusive(pair) -> None:
    # alpha tokens with 1000 <= t <= 3000: rid1 4 + rid2 3 + rid4 (2+1) + rid5 1 (at exactly 3000,
    # the inclusive end) = 11 -> 11 / 2 s = 5.5 tok/s. Warm-up tokens (150, 170) are outside.
    alpha = pair.tenants["alpha"]
    assert alpha.output_tokens == 11
    assert alpha.throughput == 5.5
    # beta: rid1 at 1000 (the inclusive start) and 1050 = 2, rid2 5, rid3 1, rid4 2, rid5 2900
    # and 2950 = 2 (3200 is after the end) -> 12 -> 6.0 tok/s.
    beta = pair.tenants["beta"]
    assert beta.output_tokens == 12
    assert beta.throughput == 6.0
    # GPU: (11 + 12) / 2 s = 11.5 tok/s.
    assert pair.gpu_throughput_tok_s == 11.5


def test_naive_throughput_is_the_seed_studys_figure(pair) -> None:
    # Measured output tokens: alpha rids 1-6: 4+3+0+3+1+0 = 11; beta rids 1-5: 3+5+1+2+3 = 14;
    # total 25 over (latest last tok 3200 (beta rid5) - earliest measured sent 900 (beta rid1))
    # = 2.3 s -> 25 / 2.3 = 10.869565217391305 tok/s.
    assert pair.gpu_throughput_naive_tok_s == approx(25 / 2.3)
    assert f"{pair.gpu_throughput_naive_tok_s:.12f}" == "10.869565217391"


def test_request_counts(pair) -> None:
    # Requests sent inside [1000, 3000]: alpha rids 1-5 (rid 6 was sent at 3100), one error;
    # beta rids 2-5 (rid 1 was sent at 900), one cancelled.
    alpha, beta = pair.tenants["alpha"], pair.tenants["beta"]
    assert (alpha.requests, alpha.completed, alpha.errors, alpha.cancelled, alpha.incomplete) == (5, 4, 1, 0, 0)
    assert (beta.requests, beta.completed, beta.errors, beta.cancelled, beta.incomplete) == (4, 3, 0, 1, 0)


def test_alpha_latency_statistics(pair) -> None:
    lat = pair.tenants["alpha"].latency
    # TTFT of completed requests sent in the window: [10, 40, 100, 50] -> sorted [10, 40, 50, 100].
    # mean 200/4 = 50; population variance (40^2 + 10^2 + 0 + 50^2)/4 = 4200/4 = 1050 -> std sqrt(1050).
    # Linear percentiles: position (n-1)q = 3q. p50: 1.5 -> 40 + 0.5*10 = 45; p90: 2.7 -> 50 + 0.7*50 = 85;
    # p95: 2.85 -> 92.5; p99: 2.97 -> 98.5; p99.9: 2.997 -> 99.85.
    assert lat["ttft"] == {
        "mean": approx(50.0), "std": approx(1050**0.5), "p50": approx(45.0), "p90": approx(85.0),
        "p95": approx(92.5), "p99": approx(98.5), "p99.9": approx(99.85),
    }  # fmt: skip
    # TPOT: rid1 30, rid2 20, rid4 50 (rid5 has one token) -> [20, 30, 50]; mean 100/3;
    # p50 30; p90: 1.8 -> 30 + 0.8*20 = 46; p99: 1.98 -> 49.6.
    assert lat["tpot"]["mean"] == approx(100 / 3)
    assert (lat["tpot"]["p50"], lat["tpot"]["p90"], lat["tpot"]["p99"]) == (approx(30.0), approx(46.0), approx(49.6))
    # ITL pooled: rid1 20, 30, 40; rid2 20, 20; rid4 100 -> [20, 20, 20, 30, 40, 100]; mean 230/6;
    # p50: position 2.5 -> 20 + 0.5*10 = 25.
    assert lat["itl"]["mean"] == approx(230 / 6)
    assert lat["itl"]["p50"] == approx(25.0)
    # E2E: [100, 80, 200, 50] -> mean 107.5, p50: 1.5 -> 80 + 0.5*20 = 90.
    assert (lat["e2e"]["mean"], lat["e2e"]["p50"]) == (approx(107.5), approx(90.0))
    # queue (sent - sched): [0, 10, 0, 50] -> mean 15, p50 5; ttft_sched: [10, 50, 100, 100] -> mean 65, p50 75.
    assert (lat["queue"]["mean"], lat["queue"]["p50"]) == (approx(15.0), approx(5.0))
    assert (lat["ttft_sched"]["mean"], lat["ttft_sched"]["p50"]) == (approx(65.0), approx(75.0))


def test_beta_latency_statistics(pair) -> None:
    lat = pair.tenants["beta"].latency
    # TTFT [50, 90, 400]: mean 180; variance (130^2 + 90^2 + 220^2)/3 = 73400/3;
    # p50 90; p99: position 1.98 -> 90 + 0.98*310 = 393.8.
    assert lat["ttft"]["mean"] == approx(180.0)
    assert lat["ttft"]["std"] == approx((73400 / 3) ** 0.5)
    assert (lat["ttft"]["p50"], lat["ttft"]["p99"]) == (approx(90.0), approx(393.8))
    # TPOT [100, 500] (rid3 has one token): p50 300, p99: 0.99 -> 100 + 0.99*400 = 496, std 200.
    assert (lat["tpot"]["p50"], lat["tpot"]["p99"], lat["tpot"]["std"]) == (approx(300.0), approx(496.0), approx(200.0))
    # ITL [100, 100, 100, 100, 500]: p50 100, mean 900/5 = 180.
    assert (lat["itl"]["p50"], lat["itl"]["mean"]) == (approx(100.0), approx(180.0))
    # E2E [450, 90, 900]: p50 450, mean 480.
    assert (lat["e2e"]["p50"], lat["e2e"]["mean"]) == (approx(450.0), approx(480.0))


def test_per_request_rows(pair) -> None:
    cols = pair.tenants["alpha"].table.columns
    row = list(cols["rid"]).index(2)
    # rid 2: first token on the shared 1100 line, last at 1140; exact integer nanoseconds.
    assert cols["first_tok_ns"][row] == B + 1100 * MS
    assert cols["last_tok_ns"][row] == B + 1140 * MS
    assert (cols["ttft_ms"][row], cols["tpot_ms"][row], cols["itl_max_ms"][row]) == (40.0, 20.0, 20.0)
    row0 = list(cols["rid"]).index(0)
    assert not cols["measured"][row0] and not cols["in_window"][row0]
    row6 = list(cols["rid"]).index(6)
    assert cols["measured"][row6] and not cols["in_window"][row6] and cols["status"][row6] == "cancelled"


def test_slo_attainment_and_goodput() -> None:
    slo = parse_slo("ttft=50ms,tpot=120ms,e2e=0.5s")
    assert slo == {"ttft": 50.0, "tpot": 120.0, "e2e": 500.0}
    rm = compute_run(load_run(HAND / "pair"), slo)
    # alpha judged: rids 1-5 (5). Good: rid1 (10, 30, 100), rid2 (40, 20, 80), rid5 (ttft 50 <= 50,
    # no tpot, e2e 50). Misses: rid3 (error), rid4 (ttft 100). 3/5 = 0.6; goodput 3 / 2 s = 1.5 req/s.
    assert rm.tenants["alpha"].slo_attainment == 0.6
    assert rm.tenants["alpha"].goodput_req_s == 1.5
    # beta judged: rids 2-4 (rid5 was cancelled: left out). Good: rid2 (50, 100, 450).
    # Misses: rid3 (ttft 90), rid4 (ttft 400). 1/3; goodput 1 / 2 s = 0.5 req/s.
    assert rm.tenants["beta"].slo_attainment == approx(1 / 3)
    assert rm.tenants["beta"].goodput_req_s == 0.5


def test_solo_baselines_np_stp_antt_fairness_jain() -> None:
    # solo_alpha: window [1000, min(3500, last tok 2000)] = 1 s; tokens 4 + 3 + (2+1) + 1 = 11
    #   -> 11 tok/s. TTFT [5, 10, 20, 10] -> p50 10, p99 10 + 0.97*10 = 19.7;
    #   TPOT [10, 20, 10] -> p50 10, p99 10 + 0.98*10 = 19.8.
    # solo_beta: window [1000, 2000] = 1 s; tokens 4 + 2 + 2 = 8 -> 8 tok/s.
    #   TTFT [40, 50, 100] -> p50 50, p99 50 + 0.98*50 = 99; TPOT [40, 250, 400] -> p50 250, p99 397.
    # Decoys beside them: solo_alpha_fp16 (dtype differs) and solo_alpha_a100 (GPU differs,
    # and the newest): neither may be chosen.
    paths = [HAND / n for n in ("pair", "solo_alpha", "solo_beta", "solo_alpha_fp16", "solo_alpha_a100")]
    runs = load_runs(paths)
    pair_run, *candidates = runs
    # Preference order puts the decoys first, so only the spec/GPU check can skip them.
    candidates = candidates[::-1]
    chosen = {name: choose_baseline(pair_run, name, candidates) for name in pair_run.tenants}
    assert {n: r.run_dir.name for n, r in chosen.items() if r} == {"alpha": "solo_alpha", "beta": "solo_beta"}
    rm = compute_run(pair_run)
    apply_baselines(rm, {n: compute_run(r) for n, r in chosen.items() if r})
    alpha, beta = rm.tenants["alpha"], rm.tenants["beta"]
    # NP: alpha 5.5 / 11 = 0.5, beta 6 / 8 = 0.75.
    assert (alpha.np, beta.np) == (0.5, 0.75)
    assert (alpha.solo_throughput, beta.solo_throughput) == (11.0, 8.0)
    # STP 1.25; ANTT (1/0.5 + 1/0.75)/2 = (2 + 4/3)/2 = 5/3; fairness 0.5/0.75 = 2/3;
    # Jain (1.25)^2 / (2 * (0.25 + 0.5625)) = 1.5625 / 1.625 = 0.9615384615384616.
    assert rm.stp == 1.25
    assert rm.antt == approx(5 / 3)
    assert rm.fairness == approx(2 / 3)
    assert rm.jain == approx(1.5625 / 1.625)
    # Slowdowns: alpha TTFT p50 45/10 = 4.5, p99 98.5/19.7 = 5, TPOT p50 30/10 = 3, p99 49.6/19.8.
    assert alpha.slowdown == {
        "ttft_p50": approx(4.5), "ttft_p99": approx(5.0), "tpot_p50": approx(3.0), "tpot_p99": approx(49.6 / 19.8)
    }  # fmt: skip
    # beta TTFT p50 90/50 = 1.8, p99 393.8/99, TPOT p50 300/250 = 1.2, p99 496/397.
    assert beta.slowdown == {
        "ttft_p50": approx(1.8), "ttft_p99": approx(393.8 / 99), "tpot_p50": approx(1.2), "tpot_p99": approx(496 / 397)
    }  # fmt: skip
    assert rm.missing_baselines == []


def test_without_a_baseline_everything_interference_is_null() -> None:
    rm = compute_run(load_run(HAND / "pair"))
    apply_baselines(rm, {"alpha": compute_run(load_run(HAND / "solo_alpha")), "beta": None})
    assert rm.tenants["alpha"].np == 0.5
    assert rm.tenants["beta"].np is None and rm.tenants["beta"].slowdown is None
    assert (rm.stp, rm.antt, rm.fairness, rm.jain) == (None, None, None, None)
    (message,) = rm.missing_baselines
    assert "tenant beta" in message and "synthetic:gpt2-tiny" in message and "--baseline" in message
