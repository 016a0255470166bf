"""``mt-analyze --export br|vllm-bench`` and ``--compare FILE`` on the hand-computed pair
(tests/data/analysis/hand/pair with its solos; test_metrics_hand.py derives every number).

The Benchmark Reports are validated with the ``llmd-benchmark-report`` package's own pydantic
models (v0.2.1), not with a copy of the schema; every value must equal summary.json's.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from multitenant.analysis import cli
from multitenant.analysis.baselines import apply_baselines
from multitenant.analysis.columns import AnalysisError
from multitenant.analysis.compare import FIELDS, choose_tenant, compare_rows, read_reference
from multitenant.analysis.export import COLOCATION_KEY, benchmark_report, vllm_bench_result
from multitenant.analysis.load import load_run
from multitenant.analysis.metrics import RunMetrics, compute_run

llmd = pytest.importorskip("llmd_benchmark_report")

DATA = Path(__file__).resolve().parents[2] / "data" / "analysis"
HAND = DATA / "hand"
AIPERF = DATA / "compare" / "profile_export_aiperf.json"
TENANTS = ("alpha", "beta")
LATENCY = (("time_to_first_token", "ttft_ms"), ("time_per_output_token", "tpot_ms"),
           ("inter_token_latency", "itl_ms"), ("request_latency", "e2e_ms"))  # fmt: skip
BR_STATS = (("mean", "mean"), ("std", "stddev"), ("p50", "p50"), ("p90", "p90"), ("p95", "p95"),
            ("p99", "p99"), ("p99.9", "p99p9"))  # fmt: skip


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """mt-analyze pair --baseline solo_alpha solo_beta --export br --export vllm-bench."""
    out = tmp_path_factory.mktemp("export")
    argv = [
        str(HAND / "pair"),
        "--baseline",
        str(HAND / "solo_alpha"),
        "--baseline",
        str(HAND / "solo_beta"),
        "--out",
        str(out),
    ]
    assert cli.main([*argv, "--export", "br", "--export", "vllm-bench"]) == 0
    return out


@pytest.fixture(scope="module")
def pair() -> RunMetrics:
    rm = compute_run(load_run(HAND / "pair"))
    solos = {name: compute_run(load_run(HAND / f"solo_{name}")) for name in TENANTS}
    apply_baselines(rm, dict(solos))
    return rm


def summary_run(out: Path) -> dict[str, Any]:
    (run,) = json.loads((out / "summary.json").read_text())["runs"]
    return run


def br(out: Path, name: str) -> dict[str, Any]:
    return yaml.safe_load((out / "br" / f"pair__{name}.yaml").read_text())


@pytest.mark.parametrize("name", TENANTS)
def test_br_report_validates_with_the_package_and_equals_summary_json(exported: Path, name: str) -> None:
    data = br(exported, name)
    report = llmd.load_benchmark_report(data)  # raises on anything v0.2.1 does not allow
    assert isinstance(report, llmd.BenchmarkReportV021) and report.version == "0.2.1"
    assert llmd.import_benchmark_report(str(exported / "br" / f"pair__{name}.yaml")).dump() == report.dump()

    run = summary_run(exported)
    ts = run["tenants"][name]
    agg = data["results"]["request_performance"]["aggregate"]
    assert agg["requests"]["total"] == ts["requests"]
    assert agg["requests"]["failures"] == ts["errors"]
    assert agg["requests"]["incomplete"] == ts["cancelled"] + ts["incomplete"]
    for br_name, ours in LATENCY:
        block = agg["latency"][br_name]
        assert block["units"] == (
            "ms" if br_name in ("time_to_first_token", "request_latency") else "ms/token"
        )
        for key, theirs in BR_STATS:
            assert block[theirs] == ts[ours][key], (br_name, key)
    assert agg["throughput"]["output_token_rate"] == {"units": "tokens/s", "mean": ts["throughput_tok_s"]}
    assert agg["throughput"]["request_rate"]["mean"] == ts["completed"] / run["window_s"]

    co = data["results"]["observability"][COLOCATION_KEY]
    assert report.results.observability is not None
    assert report.results.observability.model_extra == {COLOCATION_KEY: co}
    for key in ("np", "np_definition", "solo_throughput", "slowdown", "baseline_run_dir", "baseline_trials"):
        assert co[key] == ts[key], key
    for key in ("stp", "antt", "fairness", "jain"):
        assert co[key] == run["aggregate"][key], key
    assert co["pct_of_solo"] == 100 * ts["np"]
    assert co["baseline_run_id"] == f"solo_{name}-solo_{name}"
    assert co["co_tenants"] == [n for n in TENANTS if n != name]


def test_br_values_of_the_hand_pair(exported: Path) -> None:
    alpha, beta = br(exported, "alpha"), br(exported, "beta")
    # NP alpha 5.5 / 11 = 0.5, beta 6 / 8 = 0.75; STP 1.25; ANTT 5/3; fairness 2/3.
    assert alpha["results"]["observability"][COLOCATION_KEY]["np"] == 0.5
    assert beta["results"]["observability"][COLOCATION_KEY]["pct_of_solo"] == 75.0
    assert alpha["results"]["observability"][COLOCATION_KEY]["stp"] == 1.25
    engine, share = alpha["scenario"]["stack"]
    assert engine["standardized"]["kind"] == "inference_engine"
    assert engine["standardized"]["tool"] == "hf" and engine["standardized"]["model"] == {
        "name": "synthetic:llama-tiny"
    }
    assert engine["standardized"]["accelerator"]["model"] == "NVIDIA H100 80GB HBM3"
    assert share["standardized"] == {
        "kind": "generic", "tool": "multitenant", "tool_version": "0.1.0", "mode": "mps", "active_thread_pct": 70,
        "pinned_mem_limit": None, "priority": None, "share_applied": True, "effective_sms": 92, "gpu_sm_count": 132,
        "co_tenants": ["beta"],
    }  # fmt: skip
    load = alpha["scenario"]["load"]
    assert load["metadata"]["concurrent_with"] == ["beta"] and load["metadata"]["treatment"] == "alpha"
    assert load["standardized"]["concurrency"] == 2
    assert load["standardized"]["input_seq_len"] == {"distribution": "fixed", "value": 16}
    # alpha's latency sample: rids 1, 2, 4, 5 (n_out 4, 3, 3, 1), 16 prompt tokens each.
    requests = alpha["results"]["request_performance"]["aggregate"]["requests"]
    assert (requests["total"], requests["failures"], requests["incomplete"]) == (5, 1, 0)
    assert requests["output_length"]["mean"] == 2.75 and requests["input_length"]["mean"] == 16.0


def test_the_validator_is_not_a_no_op(exported: Path) -> None:
    data = br(exported, "alpha")
    data["results"]["request_performance"]["aggregate"]["latency"]["time_to_first_token"]["units"] = (
        "tokens/s"
    )
    with pytest.raises(ValueError, match="Invalid units"):
        llmd.load_benchmark_report(data)
    data = br(exported, "alpha")
    data["results"]["request_performance"]["aggregate"]["np"] = 0.5  # not a key of v0.2.1 there
    with pytest.raises(ValueError, match="Extra inputs are not permitted"):
        llmd.load_benchmark_report(data)


def test_vllm_bench_field_names_and_values(exported: Path) -> None:
    got = json.loads((exported / "vllm-bench" / "pair__alpha.json").read_text())
    ts = summary_run(exported)["tenants"]["alpha"]
    # alpha, run window [1000, 3000] ms: 4 completed (rids 1, 2, 4, 5), 1 error (rid 3), 11 tokens.
    expected = {
        "completed": 4, "failed": 1, "num_prompts": 5, "duration": 2.0, "total_input_tokens": 64,
        "total_output_tokens": 11, "output_throughput": 5.5, "request_throughput": 2.0, "max_concurrency": 2,
        "backend": "hf", "model_id": "synthetic:llama-tiny", "date": "20261122-100000",
        "mean_ttft_ms": 50.0, "median_ttft_ms": 45.0,
    }  # fmt: skip
    assert {k: got[k] for k in expected} == expected
    for vname, ours in (("ttft", "ttft_ms"), ("tpot", "tpot_ms"), ("itl", "itl_ms"), ("e2el", "e2e_ms")):
        assert got[f"mean_{vname}_ms"] == ts[ours]["mean"]
        assert got[f"median_{vname}_ms"] == ts[ours]["p50"]
        assert got[f"std_{vname}_ms"] == ts[ours]["std"]
        for p in ("p90", "p95", "p99", "p99.9"):
            assert got[f"{p}_{vname}_ms"] == ts[ours][p]
    assert "total_token_throughput" not in got  # not computed: see docs/exports.md
    assert got["multitenant"]["tenant"] == "alpha" and got["multitenant"]["run_id"] == "pair_hand-pair"


@pytest.mark.parametrize("name", TENANTS)
def test_compare_with_our_own_export_is_zero_everywhere(exported: Path, pair: RunMetrics, name: str) -> None:
    ref = read_reference(exported / "vllm-bench" / f"pair__{name}.json")
    assert ref.kind == "vllm-bench" and ref.tenant == name
    assert choose_tenant(pair, None, ref) == name  # the file names its tenant
    rows = compare_rows(pair, name, ref)
    assert [r.field for r in rows] == [f for f in FIELDS if f in ref.fields]
    assert len(rows) == len(FIELDS)  # every field: the hand pair has all of them
    assert all(r.diff_pct == 0.0 for r in rows), [r for r in rows if r.diff_pct != 0.0]


def test_compare_cli_prints_the_table(exported: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = [str(HAND / "pair"), "--baseline", str(HAND / "solo_alpha"), "--baseline", str(HAND / "solo_beta"),
            "--out", str(exported / "again"), "--compare", str(exported / "vllm-bench" / "pair__beta.json")]  # fmt: skip
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "tenant beta of pair_hand-pair" in out
    line = next(x for x in out.splitlines() if x.startswith("mean_ttft_ms"))
    assert line.split() == ["mean_ttft_ms", "180", "180", "+0.0"]


def test_compare_aiperf_sample(pair: RunMetrics) -> None:
    ref = read_reference(AIPERF)
    assert ref.kind == "aiperf" and ref.tenant is None
    with pytest.raises(
        AnalysisError, match="the run has tenants alpha, beta; name one with --compare-tenant"
    ):
        choose_tenant(pair, None, ref)
    with pytest.raises(AnalysisError, match="--compare-tenant gamma: the run has tenants alpha, beta"):
        choose_tenant(pair, "gamma", ref)
    rows = {r.field: r for r in compare_rows(pair, choose_tenant(pair, "alpha", ref), ref)}
    # AIPerf's inter_token_latency is per request (latency - TTFT) / (tokens - 1): our TPOT.
    assert ref.fields["mean_tpot_ms"] == 40.0 and "mean_itl_ms" not in ref.fields
    assert "failed" not in ref.fields  # error_request_count null: absent, not 0
    expected = {
        "completed": (5.0, 4.0, -20.0), "duration": (2.0, 2.0, 0.0), "total_output_tokens": (11.0, 11.0, 0.0),
        "request_throughput": (2.5, 2.0, -20.0), "output_throughput": (5.0, 5.5, 10.0),
        "mean_ttft_ms": (40.0, 50.0, 25.0), "median_ttft_ms": (45.0, 45.0, 0.0), "p99_ttft_ms": (100.0, 98.5, -1.5),
        "median_tpot_ms": (30.0, 30.0, 0.0), "p99_tpot_ms": (50.0, 49.6, -0.8),
        "mean_e2el_ms": (100.0, 107.5, 7.5), "p90_e2el_ms": (150.0, 170.0, 100 * 20 / 150),
    }  # fmt: skip
    for field, (theirs, ours, diff) in expected.items():
        row = rows[field]
        assert (row.theirs, row.ours) == (theirs, pytest.approx(ours)), field
        assert row.diff_pct == pytest.approx(diff), field
    assert rows["mean_tpot_ms"].diff_pct == pytest.approx((100 / 3 - 40) / 40 * 100)


def test_reading_units_other_than_ms(tmp_path: Path) -> None:
    data = json.loads(AIPERF.read_text())
    data["time_to_first_token"] = {"unit": "s", "avg": 0.05}
    data["request_latency"] = {"unit": "furlongs", "avg": 1.0}  # unknown unit: left out, not guessed
    data["benchmark_duration"] = {"unit": "ms", "avg": 2000.0}
    path = tmp_path / "profile_export_aiperf.json"
    path.write_text(json.dumps(data))
    ref = read_reference(path)
    assert ref.fields["mean_ttft_ms"] == 50.0 and ref.fields["duration"] == 2.0
    assert not any(k.endswith("_e2el_ms") for k in ref.fields)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "cannot be read"),
        ("not json {", "not JSON"),
        ('{"hello": 1}', "neither a vllm bench serve result"),
        ("[1, 2]", "neither a vllm bench serve result"),
    ],
)
def test_unreadable_or_unknown_file_is_an_analysis_error(
    tmp_path: Path, content: str | None, message: str
) -> None:
    path = tmp_path / "result.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(AnalysisError, match=message):
        read_reference(path)


def test_cli_exits_2_with_one_line_for_an_unknown_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text('{"hello": 1}')
    argv = [str(HAND / "solo_alpha"), "--out", str(tmp_path / "out"), "--compare", str(bad)]
    assert cli.main(argv) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("mt-analyze: error")]
    assert len(err) == 1 and str(bad) in err[0]


def test_single_tenant_run_is_the_default_tenant(exported: Path) -> None:
    solo = compute_run(load_run(HAND / "solo_alpha"))
    ref = read_reference(AIPERF)
    assert choose_tenant(solo, None, ref) == "alpha"
    # A solo run has no interference figures: the export says so with nulls, and still validates.
    report = benchmark_report(solo, "alpha", "solo_alpha")
    llmd.load_benchmark_report(report)
    co = report["results"]["observability"][COLOCATION_KEY]
    assert co["np"] is None and co["stp"] is None and co["co_tenants"] == []
    assert "concurrent_with" not in report["scenario"]["load"]["metadata"]
    out = vllm_bench_result(solo, "alpha")
    assert out["completed"] > 0 and out["duration"] == solo.window_s
