"""``mt-analyze`` end to end in a subprocess: outputs, layouts, baselines, and exit code 2."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import orjson
import pytest

from tests.unit.analysis.builders import RunBuilder, engine_times, simple_run

HAND = Path(__file__).resolve().parents[1] / "data" / "analysis" / "hand"
PER_RUN_PLOTS = {"ttft_cdf", "tpot_cdf", "itl_distribution", "throughput_timeline", "request_latency"}


def mt_analyze(*args: str | Path, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "multitenant.analysis.cli", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=cwd,
    )


def test_pair_with_baselines_found_beside(tmp_path: Path) -> None:
    out = tmp_path / "out"
    proc = mt_analyze(HAND / "pair", "--out", out, "--slo", "ttft=50ms,tpot=120ms,e2e=0.5s", "--trace")
    assert proc.returncode == 0, proc.stderr
    files = {p.name for p in out.iterdir()}
    assert {"summary.json", "summary.md", "requests.csv", "report.html", "trace.json"} <= files
    assert {f"{n}.png" for n in PER_RUN_PLOTS | {"telemetry", "np_throughput", "slowdown_heatmap"}} <= files
    run = orjson.loads((out / "summary.json").read_bytes())["runs"][0]
    # The solo runs beside it (tests/data/analysis/hand/) were found; the decoys were not used.
    assert run["tenants"]["alpha"]["baseline_run_dir"].endswith("hand/solo_alpha")
    assert (run["tenants"]["alpha"]["np"], run["tenants"]["beta"]["np"]) == (0.5, 0.75)
    assert (run["aggregate"]["stp"], run["tenants"]["alpha"]["slo_attainment"]) == (1.25, 0.6)
    # The terminal table went to stderr with both tenants.
    assert "alpha" in proc.stderr and "beta" in proc.stderr and "STP 1.250" in proc.stderr


def test_explicit_baseline_and_svg(tmp_path: Path) -> None:
    # Copy the pair alone, so nothing is found beside it: only --baseline can supply solo runs.
    shutil.copytree(HAND / "pair", tmp_path / "a" / "b" / "pair")
    out = tmp_path / "out"
    proc = mt_analyze(tmp_path / "a" / "b" / "pair", "--out", out, "--format", "svg")
    assert proc.returncode == 0, proc.stderr
    run = orjson.loads((out / "summary.json").read_bytes())["runs"][0]
    assert run["tenants"]["alpha"]["np"] is None
    assert len(run["missing_baselines"]) == 2
    assert "no solo baseline for tenant alpha" in (out / "summary.md").read_text()
    assert (out / "ttft_cdf.svg").read_text().lstrip().startswith("<?xml")
    assert not (out / "np_throughput.svg").exists()  # nothing to compare with

    out2 = tmp_path / "out2"
    proc = mt_analyze(tmp_path / "a" / "b" / "pair", "--baseline", HAND / "solo_beta", "--baseline", HAND / "solo_alpha", "--out", out2)
    assert proc.returncode == 0, proc.stderr
    run = orjson.loads((out2 / "summary.json").read_bytes())["runs"][0]
    assert run["aggregate"]["jain"] == pytest.approx(1.5625 / 1.625, rel=1e-12)


def test_sweep_folder_with_solo_runs(tmp_path: Path) -> None:
    root = tmp_path / "experiments"
    sweep = root / "pair" / "sweep-20261122"
    sweep.mkdir(parents=True)
    (sweep / "multirun.yaml").write_text("{}")
    for i, speed in enumerate((1.0, 2.0)):
        rb = RunBuilder(sweep, f"job{i}", name="pair")
        for name in ("a", "b"):
            t = rb.tenant(name).start(0).window(1000, 3000)
            for k in range(10):
                sent = 1000 + 150 * k
                t.request(k + 1, sent, sent, [sent + 20 * speed, sent + 60 * speed, sent + 100 * speed])
        rb.write()
    for name in ("a", "b"):
        rb = RunBuilder(root / f"solo_{name}", "20261122-000000-000000", name=f"solo_{name}")
        t = rb.tenant(name).start(0).window(1000, 3000)
        for k in range(20):
            sent = 1000 + 90 * k
            t.request(k + 1, sent, sent, [sent + 10, sent + 30, sent + 50])
        rb.write()
    out = tmp_path / "out"
    proc = mt_analyze(sweep, "--out", out, "--format", "pdf")
    assert proc.returncode == 0, proc.stderr
    data = orjson.loads((out / "summary.json").read_bytes())
    assert [r["run_dir"].rsplit("/", 1)[-1] for r in data["runs"]] == ["job0", "job1"]
    assert all(r["aggregate"]["stp"] is not None for r in data["runs"])
    for job in ("job0", "job1"):
        assert {p.stem for p in (out / job).glob("*.pdf")} >= PER_RUN_PLOTS
        assert (out / job / "ttft_cdf.pdf").read_bytes().startswith(b"%PDF")
    assert (out / "np_throughput.pdf").exists() and (out / "slowdown_heatmap.pdf").exists()
    assert "telemetry" not in {p.stem for p in (out / "job0").iterdir()}  # no telemetry.jsonl: no plot


def test_engine_tenants_split_and_usage_warnings_reach_every_output(tmp_path: Path) -> None:
    # v (vllm): rid 1 sent 1000, engine queued 1000.5, scheduled 1002, first 1010, tok 1011:
    # split 0.5 / 1.5 / 8 / 1 ms. b (openai): one request whose usage disagreed with the stream.
    rb = RunBuilder(tmp_path, "pair")
    v = rb.tenant("v", backend="vllm", vllm={"kv_cache_memory_bytes": 2**30}).start(0).window(1000, 2000)
    v.request(1, 1000, 1000, [1011, 1020], done_fields=engine_times(1000.5, 1002, 1010, 1019))
    b = rb.tenant("b", backend="openai", openai={"launch": "vllm serve {model}"}).start(0).window(1000, 2000)
    b.request(1, 1000, 1000, [1030, 1040], done_fields={"usage_tokens": 3, "warning": "usage 3 != 2 streamed"})
    out = tmp_path / "out"
    proc = mt_analyze(rb.write(), "--out", out)
    assert proc.returncode == 0, proc.stderr
    run = orjson.loads((out / "summary.json").read_bytes())["runs"][0]
    split = run["tenants"]["v"]["ttft_split"]
    assert split["n"] == 1 and split["engine_queue_ms"] == {"mean": 1.5, "p50": 1.5, "p99": 1.5}, split
    assert run["tenants"]["b"]["ttft_split"] is None
    usage = "tenant b: 1 request(s): server usage disagreed with the streamed token count"
    assert any(w.startswith(usage) for w in run["warnings"]), run["warnings"]
    assert "TTFT split v (n=1" in proc.stderr and usage in proc.stderr, proc.stderr
    assert "vllm(kv_cache_memory_bytes=1073741824" in proc.stderr, proc.stderr  # what to run alone
    md = (out / "summary.md").read_text()
    assert "| v | 1 | 0.50 / 0.50 | 1.50 / 1.50 | 8.00 / 8.00 | 1.00 / 1.00 |" in md, md
    html = (out / "report.html").read_text()
    assert "TTFT split (ms, mean / p50)" in html and "<td>8.00 / 8.00</td>" in html
    header = (out / "requests.csv").read_text().splitlines()[0].split(",")
    assert {"engine_queued_ns", "ttft_engine_queue_ms", "ttft_prefill_ms", "usage_tokens", "warning"} <= set(header)


def test_default_output_folder_is_plots_experiment_run(tmp_path: Path) -> None:
    run_dir = simple_run(tmp_path / "pair_x", "20261122-101010-000001").write()
    work = tmp_path / "cwd"
    work.mkdir()
    proc = mt_analyze(run_dir, cwd=work)
    assert proc.returncode == 0, proc.stderr
    assert (work / "plots" / "pair_x" / "20261122-101010-000001" / "report.html").is_file()


def test_failed_run_and_truncated_log_are_analysed_with_warnings(tmp_path: Path) -> None:
    run_dir = simple_run(tmp_path, status="failed", reason="tenant a was killed").write()
    with open(run_dir / "tenants" / "a" / "events.jsonl", "ab") as f:
        f.write(b'{"t":10000003050000001,"ev":"to')
    proc = mt_analyze(run_dir, "--out", tmp_path / "out")
    assert proc.returncode == 0, proc.stderr
    assert "WARNING: Run status 'failed': tenant a was killed" in proc.stderr
    assert "truncated last line" in proc.stderr
    html = (tmp_path / "out" / "report.html").read_text()
    assert 'class="banner"' in html and "truncated last line" in html


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("not_experiment", "is not an experiment: no manifest.json"),
        ("missing", "does not exist"),
        ("schema", "unknown schema_version 9"),
        ("event_schema", "unknown event schema 2"),
        ("slo", "has no unit; write it like ttft=200ms"),
    ],
)
def test_bad_input_exits_2_with_one_line(tmp_path: Path, case: str, message: str) -> None:
    args: list[str | Path] = []
    if case == "not_experiment":
        (tmp_path / "empty" / "sub").mkdir(parents=True)
        args = [tmp_path / "empty"]
    elif case == "missing":
        args = [tmp_path / "nowhere"]
    elif case == "schema":
        args = [simple_run(tmp_path, schema_version=9).write()]
    elif case == "event_schema":
        rb = RunBuilder(tmp_path)
        rb.tenant("a").start(0, schema=2).window(100, 200)
        args = [rb.write()]
    else:
        args = [HAND / "pair", "--slo", "ttft=200"]
    proc = mt_analyze(*args, "--out", tmp_path / "out")
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mt-analyze: error: ") and message in lines[0], proc.stderr
    assert not (tmp_path / "out").exists()  # nothing written on bad input
