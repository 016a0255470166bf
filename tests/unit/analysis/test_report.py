"""summary.json shape, requests.csv rows, summary.md text, and the terminal table."""

from __future__ import annotations

import io
import math
from collections.abc import Iterator
from pathlib import Path

import orjson
import pandas as pd
import pytest
from rich.console import Console

from multitenant.analysis.baselines import apply_baselines
from multitenant.analysis.load import load_run, load_runs
from multitenant.analysis.metrics import compute_run, parse_slo
from multitenant.analysis.names import STAT_KEYS
from multitenant.analysis.report import markdown, print_terminal
from multitenant.analysis.summary import summary, write_requests_csv, write_summary_json
from tests.unit.analysis.builders import simple_run

HAND = Path(__file__).resolve().parents[2] / "data" / "analysis" / "hand"

# The shape other tools read; extra keys are allowed, these are required.
RUN_KEYS = ["run_dir", "run_id", "status", "mode", "window_ns", "tenants", "aggregate"]
TENANT_KEYS = [
    "requests", "errors", "output_tokens", "throughput_tok_s", "ttft_ms", "ttft_sched_ms", "queue_ms",
    "tpot_ms", "itl_ms", "e2e_ms", "slo_attainment", "goodput_req_s", "np", "slowdown",
]  # fmt: skip
AGGREGATE_KEYS = ["gpu_throughput_tok_s", "gpu_throughput_naive_tok_s", "stp", "antt", "fairness", "jain"]


@pytest.fixture(scope="module")
def pair_with_baselines():
    pair, solo_a, solo_b = load_runs([HAND / "pair", HAND / "solo_alpha", HAND / "solo_beta"])
    rm = compute_run(pair, parse_slo("ttft=50ms"))
    apply_baselines(rm, {"alpha": compute_run(solo_a), "beta": compute_run(solo_b)})
    return rm


def test_summary_json_shape(tmp_path: Path, pair_with_baselines) -> None:
    path = write_summary_json([pair_with_baselines], tmp_path / "summary.json")
    data = orjson.loads(path.read_bytes())
    assert data["schema"] == 1
    (run,) = data["runs"]
    assert list(run)[: len(RUN_KEYS)] == RUN_KEYS
    assert run["status"] == "ok" and run["mode"] == "mps"
    assert run["window_ns"] == [10_000_001_000_000_001, 10_000_003_000_000_001]  # exact ints in JSON
    assert list(run["aggregate"]) == AGGREGATE_KEYS
    assert run["aggregate"]["stp"] == 1.25
    for tenant in run["tenants"].values():
        assert list(tenant)[: len(TENANT_KEYS)] == TENANT_KEYS
        for key in ("ttft_ms", "ttft_sched_ms", "queue_ms", "tpot_ms", "itl_ms", "e2e_ms"):
            assert list(tenant[key]) == list(STAT_KEYS) == ["mean", "std", "p50", "p90", "p95", "p99", "p99.9"]
        assert list(tenant["slowdown"]) == ["ttft_p50", "ttft_p99", "tpot_p50", "tpot_p99"]
        assert isinstance(tenant["requests"], int) and isinstance(tenant["throughput_tok_s"], float)
    assert run["tenants"]["alpha"]["np"] == 0.5 and run["tenants"]["alpha"]["slo_attainment"] == 0.6


def test_summary_has_nulls_not_nan(tmp_path: Path) -> None:
    rb = simple_run(tmp_path)
    rb.tenant("idle").start(0).window(1000, 3000)  # never sent anything
    rm = compute_run(load_run(rb.write()))
    data = summary([rm])
    idle = data["runs"][0]["tenants"]["idle"]
    assert idle["ttft_ms"] == dict.fromkeys(STAT_KEYS)
    assert idle["np"] is None and idle["slowdown"] is None and idle["slo_attainment"] is None
    assert data["runs"][0]["aggregate"]["stp"] is None
    orjson.dumps(data)  # raises on non-serialisable content
    # orjson writes NaN as null, so the written text cannot show a NaN: look at the values.
    assert not list(nan_paths(data)), "summary values must be None, never NaN"


def nan_paths(node: object, path: str = "") -> Iterator[str]:
    """Paths of every float NaN inside nested dicts and lists."""
    if isinstance(node, float) and math.isnan(node):
        yield path
    elif isinstance(node, dict):
        for k, v in node.items():
            yield from nan_paths(v, f"{path}.{k}")
    elif isinstance(node, list | tuple):
        for i, v in enumerate(node):
            yield from nan_paths(v, f"{path}[{i}]")


def test_nan_paths_finds_nan() -> None:
    assert list(nan_paths({"a": [1.0, {"b": float("nan")}], "c": None})) == [".a[1].b"]


def test_requests_csv_has_every_request(tmp_path: Path, pair_with_baselines) -> None:
    path = write_requests_csv([pair_with_baselines], tmp_path / "requests.csv")
    frame = pd.read_csv(path)
    # alpha rids 0-6, beta rids 0-5: warm-up and out-of-window requests included.
    assert len(frame) == 13
    assert list(frame.columns[:5]) == ["run_id", "tenant", "rid", "status", "error"]
    alpha = frame[frame.tenant == "alpha"].set_index("rid")
    assert alpha.loc[2, "ttft_ms"] == 40.0 and alpha.loc[2, "tpot_ms"] == 20.0
    assert alpha.loc[2, "first_tok_ns"] == 10_000_001_100_000_001  # exact integer, no float
    assert alpha.loc[3, "status"] == "error" and alpha.loc[3, "error"].startswith("CUDA error")
    assert math.isnan(alpha.loc[3, "ttft_ms"]) and pd.isna(alpha.loc[3, "first_tok_ns"])
    assert bool(alpha.loc[0, "measured"]) is False and bool(alpha.loc[1, "in_window"]) is True
    # SLO verdicts only for judged requests: warm-up rid 0 has none, rid 4 (TTFT 100 ms) failed.
    assert pd.isna(alpha.loc[0, "slo_ok"]) and alpha.loc[4, "slo_ok"] == False  # noqa: E712
    beta = frame[frame.tenant == "beta"].set_index("rid")
    assert beta.loc[5, "status"] == "cancelled" and pd.isna(beta.loc[5, "slo_ok"])


def test_markdown_and_terminal_show_warnings_and_missing_baselines(tmp_path: Path) -> None:
    rb = simple_run(tmp_path, status="failed", reason="tenant b crashed")
    rb.tenant("b").start(0).window(1000, None).request(1, 1000, 1000, [1100])
    rm = compute_run(load_run(rb.write()))
    apply_baselines(rm, {})
    text = markdown([rm], {id(rm): "run"})
    assert "> **WARNING: Run status 'failed': tenant b crashed" in text
    assert "### Missing baselines" in text and "no solo baseline for tenant a" in text
    buf = io.StringIO()
    print_terminal([rm], {id(rm): "run"}, Console(file=buf, width=120, color_system=None))
    out = buf.getvalue()
    assert "WARNING: Run status 'failed'" in out
    assert "no solo baseline for tenant b" in out
    assert out.count("\n a ") + out.count("\n b ") == 2  # one row per tenant
