"""Reading experiment folders: damage, schemas, layouts, and the fast/careful/parallel paths."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import orjson
import pytest

from multitenant.analysis.columns import NO_TIME, AnalysisError
from multitenant.analysis.discover import find_beside, find_run_dirs
from multitenant.analysis.load import load_run, load_runs
from multitenant.analysis.metrics import compute_run
from multitenant.analysis.parse import read_events
from tests.unit.analysis.builders import BASE_NS, MS, RunBuilder, simple_run


def events_path(run_dir: Path, tenant: str = "a") -> Path:
    return run_dir / "tenants" / tenant / "events.jsonl"


def test_truncated_last_line_is_skipped_with_a_warning(tmp_path: Path) -> None:
    run_dir = simple_run(tmp_path).write()
    path = events_path(run_dir)
    intact = compute_run(load_run(run_dir))
    # A writer killed mid-line: half of one more tok line, no newline.
    with open(path, "ab") as f:
        f.write(b'{"t":10000003050000001,"ev":"tok","rid":[3],"n":[')
    run = load_run(run_dir)
    assert any("truncated last line" in w and "skipped" in w for w in run.warnings)
    damaged = compute_run(run)
    assert damaged.tenants["a"].output_tokens == intact.tenants["a"].output_tokens
    assert damaged.tenants["a"].latency == intact.tenants["a"].latency


def test_complete_last_line_without_newline_is_kept(tmp_path: Path) -> None:
    run_dir = simple_run(tmp_path).write()
    path = events_path(run_dir)
    data = path.read_bytes()
    # Drop the final newline: the last object is whole, so it still counts (run_end here).
    path.write_bytes(data[:-1])
    run = load_run(run_dir)
    assert run.tenants["a"].run_end is not None
    assert not any("truncated" in w for w in run.warnings)


def test_damaged_lines_in_the_middle_are_counted(tmp_path: Path) -> None:
    run_dir = simple_run(tmp_path).write()
    path = events_path(run_dir)
    lines = path.read_bytes().split(b"\n")
    lines.insert(5, b'{"t":1,"ev":"tok","rid":[1')  # torn line
    lines.insert(7, b"")  # a blank line is not damage
    path.write_bytes(b"\n".join(lines))
    run = load_run(run_dir)
    (warning,) = [w for w in run.warnings if "unreadable" in w]
    assert "1 unreadable line(s)" in warning and "line 6" in warning
    assert run.tenants["a"].n_requests == 4


def test_events_off_schema_take_the_careful_path_with_same_results(tmp_path: Path) -> None:
    rb = simple_run(tmp_path)
    run_dir = rb.write()
    fast = read_events(events_path(run_dir), "a")
    # Same log, but one tok written with scalars and one event missing its t: the fast loop
    # gives up, the careful one keeps every valid event and counts the other.
    records = [orjson.loads(x) for x in events_path(run_dir).read_bytes().splitlines()]
    for r in records:
        if r["ev"] == "tok" and r["rid"] == [2]:
            r["rid"], r["n"] = 2, 1
            break
    records.insert(3, {"ev": "sent", "rid": 99})
    events_path(run_dir).write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in records))
    careful = read_events(events_path(run_dir), "a")
    assert any("1 event(s) that do not follow event schema v1" in w for w in careful.warnings)
    for column in ("tok_t_ns", "tok_rid", "tok_n", "req_rid", "req_sent_ns", "req_done_ns"):
        np.testing.assert_array_equal(getattr(careful, column), getattr(fast, column))


def test_unknown_event_kind_is_reported(tmp_path: Path) -> None:
    rb = simple_run(tmp_path)
    rb.tenants["a"].ev(1500, "gc_pause", dur_ns=5)
    run = load_run(rb.write())
    assert any("'gc_pause'" in w for w in run.warnings)


def test_columns_are_exact_integers(tmp_path: Path) -> None:
    run = load_run(simple_run(tmp_path).write())
    log = run.tenants["a"]
    assert log.tok_t_ns.dtype == np.int64
    # rid 3's last token at 2999 ms after an odd base: exact to the nanosecond.
    assert log.tok_t_ns[-1] == BASE_NS + 2999 * MS
    assert log.window_t0_ns == BASE_NS + 1000 * MS and log.window_t1_ns == BASE_NS + 3000 * MS
    assert list(log.req_rid) == [0, 1, 2, 3]
    assert log.req_done_ns[3] == BASE_NS + 2999 * MS


def test_parallel_and_serial_reads_agree(tmp_path: Path) -> None:
    dirs = [simple_run(tmp_path, f"r{i}").write() for i in range(3)]
    serial = load_runs(dirs, parallel=False)
    parallel = load_runs(dirs, parallel=True)
    for s, p in zip(serial, parallel, strict=True):
        for column in ("tok_t_ns", "tok_rid", "tok_n", "req_rid", "req_sched_ns", "req_sent_ns", "req_status"):
            np.testing.assert_array_equal(getattr(s.tenants["a"], column), getattr(p.tenants["a"], column))


def test_progress_callback_gets_every_byte(tmp_path: Path) -> None:
    dirs = [simple_run(tmp_path, f"r{i}").write() for i in range(2)]
    seen: list[int] = []
    load_runs(dirs, progress=seen.append, parallel=False)
    assert sum(seen) == sum(events_path(d).stat().st_size for d in dirs)


def test_unknown_manifest_schema_is_an_error(tmp_path: Path) -> None:
    run_dir = simple_run(tmp_path, schema_version=2).write()
    with pytest.raises(AnalysisError, match="unknown schema_version 2"):
        load_run(run_dir)


def test_unknown_event_schema_is_an_error(tmp_path: Path) -> None:
    rb = RunBuilder(tmp_path)
    rb.tenant("a").start(0, schema=7).window(100, 200)
    with pytest.raises(AnalysisError, match="unknown event schema 7"):
        load_run(rb.write())


def test_damaged_manifest_is_an_error(tmp_path: Path) -> None:
    run_dir = simple_run(tmp_path).write()
    (run_dir / "manifest.json").write_text('{"schema_version": 1, "run_id": ')
    with pytest.raises(AnalysisError, match="not valid JSON"):
        load_run(run_dir)


def test_missing_events_file_and_missing_telemetry(tmp_path: Path) -> None:
    rb = simple_run(tmp_path)
    rb.tenant("b", write_events=False)
    run = load_run(rb.write())
    assert run.telemetry is None
    assert any("tenant b: no events.jsonl" in w for w in run.warnings)
    rm = compute_run(run)
    # b never logged a window, so the window is a's alone; b is there with zero counts and,
    # having logged nothing, no throughput (null, not 0).
    assert rm.window_ns == (BASE_NS + 1000 * MS, BASE_NS + 2999 * MS)
    assert (rm.tenants["b"].requests, rm.tenants["b"].output_tokens, rm.tenants["b"].throughput) == (0, 0, None)


def test_telemetry_columns_and_truncation(tmp_path: Path) -> None:
    rb = simple_run(tmp_path)
    rb.telemetry = [
        {"t": BASE_NS + 1000 * MS, "gpu_util_pct": 50, "power_w": 100.5, "tenant_cpu_pct": {"a": 99.0}},
        {"t": BASE_NS + 2000 * MS, "gpu_util_pct": 70, "tenant_cpu_pct": {"a": 97.0}},
    ]
    run_dir = rb.write()
    with open(run_dir / "telemetry.jsonl", "ab") as f:
        f.write(b'{"t": 1, "gpu_ut')
    run = load_run(run_dir)
    tel = run.telemetry
    assert tel is not None
    assert list(tel.t_ns) == [BASE_NS + 1000 * MS, BASE_NS + 2000 * MS]
    assert list(tel.columns["gpu_util_pct"]) == [50.0, 70.0]
    assert tel.columns["power_w"][0] == 100.5 and np.isnan(tel.columns["power_w"][1])
    assert list(tel.columns["tenant_cpu_pct/a"]) == [99.0, 97.0]
    assert "mem_used_bytes" not in tel.columns  # never sampled (no GPU): not a column
    assert any("telemetry.jsonl: truncated last line" in w for w in run.warnings)


def test_request_cut_short_keeps_a_row(tmp_path: Path) -> None:
    rb = RunBuilder(tmp_path)
    a = rb.tenant("a").start(0).window(1000, None)
    a.request(1, 1000, 1000, [1010, 1020], status=None)  # no done: the tenant died
    a.ev(1030, "tok", rid=[7], n=[1])  # a token of a request whose sched/sent were lost
    log = load_run(rb.write()).tenants["a"]
    assert list(log.req_rid) == [1, 7]
    assert list(log.req_status) == ["", ""]
    assert log.req_sent_ns[1] == NO_TIME


def test_find_run_dirs_layouts(tmp_path: Path) -> None:
    sweep = tmp_path / "exp" / "pair" / "sweep-1"
    sweep.mkdir(parents=True)
    (sweep / "multirun.yaml").write_text("{}")
    jobs = [simple_run(sweep, f"job{i}").write() for i in range(3)]
    assert find_run_dirs(sweep) == jobs
    assert find_run_dirs(tmp_path) == jobs
    assert find_run_dirs(jobs[1]) == [jobs[1]]
    with pytest.raises(AnalysisError, match="is not an experiment: no manifest.json"):
        find_run_dirs(tmp_path / "exp" / "pair" / "sweep-1" / "job0" / "tenants")
    with pytest.raises(AnalysisError, match="does not exist"):
        find_run_dirs(tmp_path / "nope")
    with pytest.raises(AnalysisError, match="is not a folder"):
        find_run_dirs(sweep / "multirun.yaml")


def test_find_beside_reaches_the_output_root(tmp_path: Path) -> None:
    root = tmp_path / "experiments"
    solo = simple_run(root / "solo_a", "20261122-000000-000000").write()
    pair = simple_run(root / "pair", "20261122-000100-000000").write()
    sweep = root / "pair" / "sweep-20261122"
    sweep.mkdir(parents=True)
    (sweep / "multirun.yaml").write_text("{}")
    job = simple_run(sweep, "job0").write()
    assert solo.resolve() in find_beside(pair)
    # A sweep job's output root is one level further up; it still finds the solo run.
    beside_job = find_beside(job)
    assert solo.resolve() in beside_job and pair.resolve() in beside_job and job.resolve() not in beside_job


TOK_COLUMNS = ("tok_t_ns", "tok_rid", "tok_n", "tok_row", "req_rid", "req_sched_ns", "req_sent_ns", "req_done_ns")


def _random_events(path: Path, seed: int) -> None:
    """A tenant log with batches of 1-8 requests decoding together, some n > 1, rids with gaps."""
    rng = np.random.default_rng(seed)
    lines = [orjson.dumps({"t": BASE_NS, "ev": "run_start", "tenant": "a", "schema": 1})]
    t = BASE_NS + MS
    rid = 0
    for _ in range(200):
        batch = list(range(rid, rid + int(rng.integers(1, 9))))
        rid = batch[-1] + int(rng.integers(1, 3))  # sometimes skip an id
        for r in batch:
            lines += [orjson.dumps({"t": t, "ev": "sched", "rid": r}), orjson.dumps({"t": t, "ev": "sent", "rid": r})]
        for _ in range(int(rng.integers(1, 6))):
            t += int(rng.integers(1, 5 * MS))
            ns = [int(x) for x in rng.integers(1, 3, len(batch))]
            lines.append(orjson.dumps({"t": t, "ev": "tok", "rid": batch, "n": ns}))
        for r in batch:
            lines.append(orjson.dumps({"t": t, "ev": "done", "rid": r, "n_out": 1, "status": "ok"}))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\n".join(lines) + b"\n")


@pytest.mark.parametrize("seed", [0, 1])
def test_vectorised_tok_parse_equals_orjson(tmp_path: Path, seed: int) -> None:
    path = tmp_path / "events.jsonl"
    _random_events(path, seed)
    fast = read_events(path, "a")
    slow = read_events(path, "a", vectorised=False)
    assert fast.tok_rid.size > 1000
    for column in TOK_COLUMNS:
        np.testing.assert_array_equal(getattr(fast, column), getattr(slow, column))
    assert fast.lines_read == slow.lines_read and not fast.warnings


@pytest.mark.parametrize(
    "odd_line",
    [
        b'{"t":10000000099000001,"ev":"tok","rid":[1,2],"n":[1]}',  # unequal lists (schema violation)
        b'{"t": 10000000099000001, "ev": "tok", "rid": [1, 2], "n": [1, 1]}',  # spaces (another writer)
        b'{"t":10000000099000001,"ev":"tok","n":[1,1],"rid":[1,2]}',  # keys in another order
        b'{"t":10000000099000001,"ev":"tok","rid":[1,2],"n":[1,1],"x":1}',  # an extra field
        b'{"t":10000000099000001,"ev":"tok","rid":[],"n":[]}',  # an empty emission
        b'{"t":10000000099000001,"ev":"tok","rid":[-1],"n":[1]}',  # a negative id
    ],
)
def test_off_canonical_tok_lines_fall_back_to_orjson(tmp_path: Path, odd_line: bytes) -> None:
    path = tmp_path / "events.jsonl"
    _random_events(path, 3)
    data = path.read_bytes().split(b"\n")
    data.insert(len(data) // 2, odd_line)
    path.write_bytes(b"\n".join(data))
    fast = read_events(path, "a")
    slow = read_events(path, "a", vectorised=False)
    for column in TOK_COLUMNS:
        np.testing.assert_array_equal(getattr(fast, column), getattr(slow, column))
    assert fast.warnings == slow.warnings


@pytest.mark.parametrize("bad", [b"[1.5]", b'["1"]', b"[null]"])
def test_non_integer_tok_fields_are_skipped_not_truncated(tmp_path: Path, bad: bytes) -> None:
    rb = simple_run(tmp_path)
    run_dir = rb.write()
    path = events_path(run_dir)
    lines = path.read_bytes().split(b"\n")
    lines.insert(10, b'{"t":10000001500000001,"ev":"tok","rid":' + bad + b',"n":[1]}')
    path.write_bytes(b"\n".join(lines))
    log = read_events(path, "a")
    assert any("1 event(s) that do not follow event schema v1 skipped" in w for w in log.warnings)
    assert BASE_NS + 1500 * MS not in log.tok_t_ns  # the bad emission is gone, not rounded into rid 1
    assert log.tok_rid.size == 10  # the 10 good token entries of simple_run


def test_pickled_log_is_identical(tmp_path: Path) -> None:
    """Worker processes send TenantLogs back compacted; the arrays must come back exactly."""
    import pickle

    rb = RunBuilder(tmp_path)
    a = rb.tenant("a").start(0).window(1000, None)
    a.request(2**40, 1000, 1000, [1010, 1010.000001, 1020])  # an id beyond int32, times 1 ns apart
    a.request(1, 1000, 1000, [1010, 1030])
    log = load_run(rb.write()).tenants["a"]
    back = pickle.loads(pickle.dumps(log))
    for name, value in vars(log).items():
        if isinstance(value, np.ndarray):
            restored = getattr(back, name)
            assert restored.dtype == value.dtype, name
            np.testing.assert_array_equal(restored, value, err_msg=name)
        else:
            assert getattr(back, name) == value, name
