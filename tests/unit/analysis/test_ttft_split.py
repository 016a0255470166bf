"""TTFT split from a serving engine's own timestamps, and the optional `done` fields behind it.

Times are ms after B = BASE_NS (builders.py). Tenant v (backend vllm), window [1000, 2000]:

  rid  sent    engine queued  scheduled  first tok  | first tok logged  -> front end in, engine queue, prefill, front end out = ttft
   0   100     100.5          101        105        | 105.5 (warm-up: before t0, never measured)
   1   1000    1000.25        1002       1010.5     | 1011   -> 0.25, 1.75, 8.5, 0.5 = 11
   2   1100    1100.5         1120       1135       | 1136   -> 0.5, 19.5, 15, 1     = 36
   3   1200    1200.125       1200.125   1204.125   | 1204.5 -> 0.125, 0, 4, 0.375   = 4.5
   4   1300    1300.5         1301       1309       | 1310   status error: a split, but not in the statistics
   5   1400    (no engine fields)                   | 1420   ok, latency sample, but no split

The summary covers the latency sample (ok, sent in the window) that has a split: rids 1-3, n = 3.
Every value above is a multiple of 1/8 ms, so the ms values are exact binary fractions.
"""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
import orjson
import pandas as pd
import pytest
from rich.console import Console

from multitenant.analysis.columns import NO_TIME
from multitenant.analysis.load import load_run, load_runs
from multitenant.analysis.metrics import compute_run
from multitenant.analysis.names import TTFT_SPLIT
from multitenant.analysis.parse import read_events
from multitenant.analysis.report import markdown, print_terminal
from multitenant.analysis.summary import summary, write_requests_csv
from tests.unit.analysis.builders import BASE_NS, MS, RunBuilder, engine_times, simple_run

SPLIT_COLUMNS = tuple(f"ttft_{name}_ms" for name in TTFT_SPLIT)
ENGINE_ARRAYS = (
    "req_engine_queued_ns", "req_engine_scheduled_ns", "req_engine_first_tok_ns", "req_engine_last_tok_ns",
    "req_usage_tokens", "req_warning",
)  # fmt: skip


def vllm_run(root: Path, dirname: str = "vllm") -> RunBuilder:
    rb = RunBuilder(root, dirname)
    v = rb.tenant("v", backend="vllm", vllm={"kv_cache_memory_bytes": 2**30, "seed": 0})
    v.start(0).ready(200).window(1000, 2000)
    v.request(0, 100, 100, [105.5, 106.5], done_fields=engine_times(100.5, 101, 105, 106))
    v.request(1, 1000, 1000, [1011, 1020], done_fields=engine_times(1000.25, 1002, 1010.5, 1019.75))
    v.request(2, 1100, 1100, [1136, 1150], done_fields=engine_times(1100.5, 1120, 1135, 1149.5))
    v.request(3, 1200, 1200, [1204.5], done_fields=engine_times(1200.125, 1200.125, 1204.125, 1204.125))
    v.request(4, 1300, 1300, [1310], status="error", error="engine died", done_fields=engine_times(1300.5, 1301, 1309, 1309))
    v.request(5, 1400, 1400, [1420])
    v.end(2100)
    return rb


def split_of(cols: dict[str, np.ndarray], rid: int) -> list[float]:
    row = int(np.flatnonzero(cols["rid"] == rid)[0])
    return [float(cols[c][row]) for c in SPLIT_COLUMNS]


@pytest.fixture(scope="module")
def vllm(tmp_path_factory: pytest.TempPathFactory):
    return compute_run(load_run(vllm_run(tmp_path_factory.mktemp("split")).write()))


@pytest.mark.parametrize(
    ("rid", "expected"),
    [(0, [0.5, 0.5, 4.0, 0.5]), (1, [0.25, 1.75, 8.5, 0.5]), (2, [0.5, 19.5, 15.0, 1.0]), (3, [0.125, 0.0, 4.0, 0.375])],
)
def test_split_per_request_in_ms(vllm, rid: int, expected: list[float]) -> None:
    got = split_of(vllm.tenants["v"].table.columns, rid)
    assert got == expected, f"rid {rid}: split {got} ms, expected {expected} ms ({', '.join(TTFT_SPLIT)})"


@pytest.mark.parametrize("rid", [0, 1, 2, 3, 4])
def test_split_sums_to_ttft(vllm, rid: int) -> None:
    cols = vllm.tenants["v"].table.columns
    ttft = float(cols["ttft_ms"][int(np.flatnonzero(cols["rid"] == rid)[0])])
    parts = split_of(cols, rid)
    assert math.fsum(parts) == ttft, f"rid {rid}: {parts} sum to {math.fsum(parts)} ms, ttft is {ttft} ms"


def test_request_without_engine_fields_has_no_split(vllm) -> None:
    parts = split_of(vllm.tenants["v"].table.columns, 5)
    assert all(math.isnan(x) for x in parts), f"rid 5 logged no engine times but got split {parts}"


def test_split_summary_covers_the_latency_sample(vllm) -> None:
    # rids 1-3: rid 0 is warm-up, rid 4 failed, rid 5 has no engine times. p99 of three sorted
    # values a <= b <= c: position 1.98 -> b + 0.98 (c - b).
    split = vllm.tenants["v"].ttft_split
    expected = {
        "frontend_in_ms": {"mean": 0.875 / 3, "p50": 0.25, "p99": 0.25 + 0.98 * 0.25},
        "engine_queue_ms": {"mean": 21.25 / 3, "p50": 1.75, "p99": 1.75 + 0.98 * 17.75},
        "prefill_ms": {"mean": 27.5 / 3, "p50": 8.5, "p99": 8.5 + 0.98 * 6.5},
        "frontend_out_ms": {"mean": 0.625, "p50": 0.5, "p99": 0.5 + 0.98 * 0.5},
    }
    assert split is not None and split["n"] == 3, f"ttft_split {split}, expected n = 3"
    for key, stats in expected.items():
        if key != "n":
            assert split[key] == pytest.approx(stats, rel=1e-12), f"{key}: {split[key]}, expected {stats}"


def test_engine_timestamps_load_as_exact_integers(vllm) -> None:
    log = vllm.run.tenants["v"]
    assert log.req_engine_queued_ns.dtype == np.int64
    assert log.req_engine_queued_ns[1] == BASE_NS + 1_000_250_000, log.req_engine_queued_ns[1]
    assert log.req_engine_last_tok_ns[2] == BASE_NS + 1_149_500_000, log.req_engine_last_tok_ns[2]
    assert log.req_engine_queued_ns[5] == NO_TIME and log.req_usage_tokens[5] == -1 and log.req_warning[5] is None


def test_tenant_without_engine_fields_has_no_split(tmp_path: Path) -> None:
    rm = compute_run(load_run(simple_run(tmp_path).write()))
    cols = rm.tenants["a"].table.columns
    assert rm.tenants["a"].ttft_split is None
    assert all(np.isnan(cols[c]).all() for c in SPLIT_COLUMNS)
    assert summary([rm])["runs"][0]["tenants"]["a"]["ttft_split"] is None
    assert not [w for w in rm.warnings if "TTFT component" in w or "usage" in w], rm.warnings


def test_tenant_with_engine_fields_but_none_in_the_sample_has_n_zero(tmp_path: Path) -> None:
    rb = RunBuilder(tmp_path)
    v = rb.tenant("v", backend="vllm").start(0).window(1000, 2000)
    v.request(0, 100, 100, [105], done_fields=engine_times(101, 102, 104, 104))  # warm-up only
    v.request(1, 1000, 1000, [1010])
    split = compute_run(load_run(rb.write())).tenants["v"].ttft_split
    assert split == {"n": 0, **{f"{c}_ms": {"mean": None, "p50": None, "p99": None} for c in TTFT_SPLIT}}, split


# ---------------------------------------------------------------------------------------------
# Negative components


def _one_request(tmp_path: Path, engine_first_ms: float) -> object:
    """sent 1000, queued 1000.5, scheduled 1001, first tok logged at 1010."""
    rb = RunBuilder(tmp_path)
    v = rb.tenant("v", backend="vllm").start(0).window(1000, 2000)
    v.request(1, 1000, 1000, [1010], done_fields=engine_times(1000.5, 1001, engine_first_ms, engine_first_ms))
    return compute_run(load_run(rb.write()))


def test_negative_component_beyond_1ms_is_reported_with_a_warning(tmp_path: Path) -> None:
    rm = _one_request(tmp_path, engine_first_ms=1012)  # engine's first token 2 ms after delivery
    parts = split_of(rm.tenants["v"].table.columns, 1)
    assert parts == [0.5, 0.5, 11.0, -2.0], f"split {parts} ms: the negative part must stay as logged"
    (warning,) = [w for w in rm.warnings if "TTFT component" in w]
    assert "tenant v: 1 request(s)" in warning and "ttft_frontend_out -2.000 ms, rid 1" in warning, warning


def test_sub_millisecond_negative_jitter_gives_no_warning(tmp_path: Path) -> None:
    rm = _one_request(tmp_path, engine_first_ms=1010.0005)
    parts = split_of(rm.tenants["v"].table.columns, 1)
    assert parts[3] == pytest.approx(-0.0005, abs=1e-12), f"frontend_out {parts[3]} ms, expected -0.0005"
    assert not [w for w in rm.warnings if "TTFT component" in w], rm.warnings


# ---------------------------------------------------------------------------------------------
# Fast and careful parse paths


def test_fast_and_careful_paths_give_identical_engine_arrays(tmp_path: Path) -> None:
    path = vllm_run(tmp_path).write() / "tenants" / "v" / "events.jsonl"
    fast = read_events(path, "v")
    # One event without its t: the fast loop gives up and the careful one parses every record.
    records = [orjson.loads(x) for x in path.read_bytes().splitlines()]
    records.insert(3, {"ev": "sent", "rid": 99})
    path.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in records))
    careful = read_events(path, "v")
    assert any("1 event(s) that do not follow event schema v1" in w for w in careful.warnings), careful.warnings
    for column in ENGINE_ARRAYS:
        np.testing.assert_array_equal(getattr(careful, column), getattr(fast, column), err_msg=column)


def test_parallel_read_keeps_engine_arrays(tmp_path: Path) -> None:
    dirs = [vllm_run(tmp_path, f"r{i}").write() for i in range(2)]
    serial = load_runs(dirs, parallel=False)
    parallel = load_runs(dirs, parallel=True)  # TenantLogs pickled back from worker processes
    for s, p in zip(serial, parallel, strict=True):
        for column in ENGINE_ARRAYS:
            np.testing.assert_array_equal(getattr(p.tenants["v"], column), getattr(s.tenants["v"], column), err_msg=column)


def test_later_done_without_engine_fields_replaces_the_earlier_on_both_paths(tmp_path: Path) -> None:
    path = vllm_run(tmp_path).write() / "tenants" / "v" / "events.jsonl"
    with open(path, "ab") as f:  # a second done of rid 2, without engine fields
        f.write(orjson.dumps({"t": BASE_NS + 2050 * MS, "ev": "done", "rid": 2, "n_out": 2, "status": "ok"}) + b"\n")
    fast = read_events(path, "v")
    with open(path, "ab") as f:
        f.write(b'{"ev":"sent","rid":98}\n')  # off schema: the careful path
    careful = read_events(path, "v")
    for log, label in ((fast, "fast"), (careful, "careful")):
        assert log.req_engine_queued_ns[2] == NO_TIME, f"{label}: rid 2 engine_queued_ns {log.req_engine_queued_ns[2]}"
        assert log.req_engine_queued_ns[1] == BASE_NS + 1_000_250_000, f"{label}: rid 1 lost its engine time"


def test_malformed_engine_field_is_ignored_and_counted(tmp_path: Path) -> None:
    rb = RunBuilder(tmp_path)
    v = rb.tenant("v", backend="vllm").start(0).window(1000, 2000)
    fields = {**engine_times(1000.5, 1001, 1009, 1009), "engine_queued_ns": 1.5e16}  # a float, not int ns
    v.request(1, 1000, 1000, [1010], done_fields=fields)
    v.request(2, 1100, 1100, [1110], done_fields=engine_times(1100.5, 1101, 1109, 1109))
    run = load_run(rb.write())
    log = run.tenants["v"]
    (warning,) = [w for w in run.warnings if "malformed" in w]
    assert "1 done event(s)" in warning, warning
    # The request itself stays (status ok); only the bad field is dropped, the others are kept.
    assert list(log.req_status) == ["ok", "ok"], list(log.req_status)
    assert log.req_engine_queued_ns[0] == NO_TIME and log.req_engine_scheduled_ns[0] == BASE_NS + 1001 * MS
    assert log.req_engine_queued_ns[1] == BASE_NS + 1_100_500_000
    cols = compute_run(run).tenants["v"].table.columns
    assert math.isnan(split_of(cols, 1)[0]) and split_of(cols, 2) == [0.5, 0.5, 8.0, 1.0]


# ---------------------------------------------------------------------------------------------
# openai usage warnings


def openai_run(root: Path) -> RunBuilder:
    rb = RunBuilder(root)
    b = rb.tenant("b", backend="openai", openai={"url": "http://127.0.0.1:8000"}).start(0).window(1000, 2000)
    b.request(1, 1000, 1000, [1010, 1020], n_out=2, done_fields={"usage_tokens": 3, "warning": "usage 3 != 2 streamed"})
    b.request(2, 1100, 1100, [1110, 1120], n_out=2, done_fields={"usage_tokens": 2})
    b.request(3, 1200, 1200, [1210], done_fields={"usage_tokens": 4, "warning": "usage 4 != 1 streamed"})
    b.request(4, 1300, 1300, [1310], done_fields={"usage_tokens": 2, "warning": "usage 2 != 1 streamed"})
    return rb


def test_usage_warnings_are_counted_in_one_line_per_tenant(tmp_path: Path) -> None:
    rm = compute_run(load_run(openai_run(tmp_path).write()))
    lines = [w for w in rm.warnings if "server usage disagreed" in w]
    assert lines == [
        "tenant b: 3 request(s): server usage disagreed with the streamed token count (first: rid 1: usage 3 != 2 streamed)"
    ], lines


def test_usage_tokens_load_per_request(tmp_path: Path) -> None:
    log = load_run(openai_run(tmp_path).write()).tenants["b"]
    assert list(log.req_usage_tokens) == [3, 2, 4, 2], list(log.req_usage_tokens)
    assert list(log.req_warning) == ["usage 3 != 2 streamed", None, "usage 4 != 1 streamed", "usage 2 != 1 streamed"]
    assert (log.req_engine_queued_ns == NO_TIME).all()


# ---------------------------------------------------------------------------------------------
# Outputs


def test_requests_csv_has_engine_times_split_and_usage(tmp_path: Path, vllm) -> None:
    frame = pd.read_csv(write_requests_csv([vllm], tmp_path / "requests.csv")).set_index("rid")
    row = frame.loc[1]
    got = [row[c] for c in SPLIT_COLUMNS]
    assert got == [0.25, 1.75, 8.5, 0.5], f"rid 1 split in requests.csv: {got}"
    assert row["engine_queued_ns"] == BASE_NS + 1_000_250_000  # exact integer, no float
    assert pd.isna(frame.loc[5, "engine_queued_ns"]) and pd.isna(frame.loc[5, SPLIT_COLUMNS[0]])
    assert pd.isna(row["usage_tokens"]) and pd.isna(row["warning"])


def test_split_table_in_markdown_and_terminal_has_one_row_per_tenant_with_it(tmp_path: Path) -> None:
    rb = vllm_run(tmp_path)
    hf = rb.tenant("h").start(0).window(1000, 2000)
    hf.request(1, 1000, 1000, [1010, 1500])
    rm = compute_run(load_run(rb.write()))
    text = markdown([rm], {id(rm): "run"})
    assert "### TTFT split (ms, mean / p50)" in text
    assert "| v | 3 | 0.29 / 0.25 | 7.08 / 1.75 | 9.17 / 8.50 | 0.62 / 0.50 |" in text, text
    assert "| h | " not in text.split("### TTFT split")[1].split("###")[0]
    buf = io.StringIO()
    print_terminal([rm], {id(rm): "run"}, Console(file=buf, width=160, color_system=None))
    lines = [line for line in buf.getvalue().splitlines() if "TTFT split" in line]
    assert lines == [
        "  TTFT split v (n=3, ms mean / p50): front end in 0.29 / 0.25 · engine queue 7.08 / 1.75"
        " · prefill 9.17 / 8.50 · front end out 0.62 / 0.50"
    ], lines


def test_summary_json_ttft_split_shape(vllm) -> None:
    entry = summary([vllm])["runs"][0]["tenants"]["v"]
    split = entry["ttft_split"]
    assert list(split) == ["n", "frontend_in_ms", "engine_queue_ms", "prefill_ms", "frontend_out_ms"], list(split)
    assert all(list(v) == ["mean", "p50", "p99"] for k, v in split.items() if k != "n"), split
    assert orjson.loads(orjson.dumps(split)) == split
