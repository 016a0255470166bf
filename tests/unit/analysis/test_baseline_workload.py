"""Baseline matching on what changes per-token performance: the workload's
dataset lengths and arrival process; not its duration, request count, warm-up, start delay or
seeds. When nothing matches, the message names the fields that differ from the nearest solo."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from multitenant.analysis.baselines import apply_baselines, choose_baseline, nearest_solo
from multitenant.analysis.load import RunData, load_run
from multitenant.analysis.metrics import compute_run
from multitenant.schema import baseline_identity, comparable_identity
from tests.unit.analysis.builders import RunBuilder, default_workload


def pair(root: Path, **workload: Any) -> RunData:
    rb = RunBuilder(root, "pair")
    rb.tenant("x", workload=default_workload(**workload)).start(0).window(1000, 2000)
    rb.tenant("y").start(0).window(1000, 2000)
    return load_run(rb.write())


def solo(root: Path, dirname: str, **workload: Any) -> RunData:
    rb = RunBuilder(root, dirname)
    rb.tenant("a", workload=default_workload(**workload)).start(0).window(1000, 2000).request(1, 1000, 1000, [1100])
    return load_run(rb.write())


def test_a_solo_of_another_duration_request_count_warmup_or_seed_matches(tmp_path: Path) -> None:
    co = pair(tmp_path, duration_s=4.0)
    dataset = dict(default_workload()["dataset"], seed=7)
    arrival = dict(default_workload()["arrival"], seed=3)
    other = solo(
        tmp_path, "solo", duration_s=10.0, num_requests=50, warmup_requests=5, start_delay_s=1.0,
        dataset=dataset, arrival=arrival,
    )  # fmt: skip
    assert choose_baseline(co, "x", [other]) is other


def test_a_solo_with_other_lengths_or_rate_does_not_match(tmp_path: Path) -> None:
    co = pair(tmp_path)
    longer = solo(tmp_path, "longer", dataset=dict(default_workload()["dataset"], input_len=64))
    faster = solo(tmp_path, "faster", arrival=dict(default_workload()["arrival"], concurrency=4))
    assert choose_baseline(co, "x", [longer, faster]) is None


def test_a_recorded_identity_with_the_whole_workload_reduces_the_same() -> None:
    tenant = {"model": "m", "backend": "hf", "workload": default_workload(duration_s=9.0)}
    old_record = dict(baseline_identity(tenant, "gpu", {}), workload=default_workload(duration_s=3.0))
    assert comparable_identity(old_record) == baseline_identity(tenant, "gpu", {})


def test_no_match_names_the_differing_fields_of_the_nearest_solo(tmp_path: Path) -> None:
    co = pair(tmp_path, dataset=dict(default_workload()["dataset"], input_len=32))
    far = solo(tmp_path, "far", dataset=dict(default_workload()["dataset"], input_len=64, output_len=8))
    near = solo(tmp_path, "near", dataset=dict(default_workload()["dataset"], input_len=64))
    text = nearest_solo(co, "x", [far, near])
    assert text == f"nearest solo {near.run_dir}: workload.dataset.input_len 32 vs 64"

    rm = compute_run(co)
    apply_baselines(rm, {"x": None, "y": None}, {"x": text})
    assert any("workload.dataset.input_len 32 vs 64" in m for m in rm.missing_baselines), rm.missing_baselines
