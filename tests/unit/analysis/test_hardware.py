"""The per-run hardware block, the solo's headroom sentence and the comparability lines.

Telemetry in the window [1000, 2999] ms (it ends at the last token): samples at 1000 (the window's start: it describes the
time before, left out), 1500, 2000, 2500, 2990 and 3500 (after the window, left out).
SM active 10 | 40, 50, 30, 40 | 90 -> mean 40 %; DRAM bw 5 | 20, 20, 30, 30 | 90 -> 25 %;
tenant a's CPU 0 | 100, 90, 110, 100 | 0 -> 100 %.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from multitenant.analysis.cli import main
from multitenant.analysis.columns import TELEMETRY_SCALARS
from multitenant.analysis.hardware import STEAL_LIMIT_PCT, attach, describe, fingerprint_differences
from multitenant.analysis.load import load_run
from multitenant.analysis.metrics import compute_run
from tests.unit.analysis.builders import simple_run
from tests.unit.analysis.hw_builders import CPU_MODEL, activity, gpu, patch_manifest, samples

WINDOW_ROWS = [
    (1000, 10, 5, {"a": 0}),
    (1500, 40, 20, {"a": 100}),
    (2000, 50, 20, {"a": 90}),
    (2500, 30, 30, {"a": 110}),
    (2990, 40, 30, {"a": 100}),
    (3500, 90, 90, {"a": 0}),
]


def solo(root: Path, dirname: str, uuid: str = "GPU-aaaaaaaa-0000", steal: float = 0.5, **kw: object) -> Path:
    rb = simple_run(root, dirname, mode="mps", gpu=gpu(uuid, **kw))  # type: ignore[arg-type]
    rb.telemetry = samples(WINDOW_ROWS)
    d = rb.write()
    patch_manifest(d, activity=activity(steal=steal, cpu_s={"a": 2.0}), host_cpu_model=CPU_MODEL)
    return d


def pair(root: Path, dirname: str = "pair", uuid: str = "GPU-aaaaaaaa-0000") -> Path:
    rb = simple_run(root, dirname, mode="mps", gpu=gpu(uuid))
    b = rb.tenant("b")
    b.start(0).ready(200).window(1000, 3000).request(1, 1000, 1000, [1500, 2999]).end(3100)
    rb.telemetry = samples([(ms, 80, 60, {"a": 100, "b": 50}) for ms in (1500, 2000, 2500, 2990)])
    d = rb.write()
    patch_manifest(d, activity=activity(cpu_s={"a": 2.0, "b": 1.0}), host_cpu_model=CPU_MODEL)
    return d


def test_telemetry_columns_include_the_activity_counters(tmp_path: Path) -> None:
    for key in ("sm_active_pct", "sm_occupancy_pct", "dram_bw_pct", "tensor_active_pct"):
        assert key in TELEMETRY_SCALARS
    run = load_run(solo(tmp_path, "s"))
    assert run.telemetry is not None
    assert list(run.telemetry.columns["sm_active_pct"]) == [10, 40, 50, 30, 40, 90]
    assert list(run.telemetry.columns["tensor_active_pct"]) == [2.5, 10, 12.5, 7.5, 10, 22.5]


def test_block_means_over_the_window_and_the_headroom_sentence(tmp_path: Path) -> None:
    rm = compute_run(load_run(solo(tmp_path, "s")))
    attach(rm, {})
    hw = rm.hardware
    assert hw is not None
    assert hw.samples == 4
    assert hw.sm_active_pct == pytest.approx(40.0)
    assert hw.sm_occupancy_pct == pytest.approx(20.0)
    assert hw.dram_bw_pct == pytest.approx(25.0)
    assert hw.tensor_active_pct == pytest.approx(10.0)
    assert hw.tenant_cpu_pct == {"a": pytest.approx(100.0)}
    assert hw.tenant_cpu_s == {"a": 2.0}
    assert (hw.steal_pct, hw.iowait_pct, hw.activity_source) == (0.5, 0.1, "gpm")
    assert hw.sm_clock_mhz == [1755, 1980] and hw.mem_clock_mhz == [2619, 2619]
    assert hw.note == "solo a kept the SMs 40 % active: room for a co-tenant"
    assert describe(hw) == (
        "SM active 40 % · occupancy 20 % · DRAM bw 25 % · tensor 10 % (gpm) · CPU a 100 % (2.0 s)"
        " · steal 0.5 % · iowait 0.1 % · SM clock 1755–1980 MHz"
    )
    assert rm.comparability == []


def test_no_sentence_for_a_busy_solo_and_none_without_telemetry(tmp_path: Path) -> None:
    rb = simple_run(tmp_path, "busy", mode="mps", gpu=gpu())
    rb.telemetry = samples([(ms, 75, 20, {}) for ms in (1500, 2000)])
    rm = compute_run(load_run(rb.write()))
    attach(rm, {})
    assert rm.hardware is not None and rm.hardware.sm_active_pct == 75 and rm.hardware.note is None
    bare = compute_run(load_run(simple_run(tmp_path, "bare").write()))
    attach(bare, {})
    assert bare.hardware is None and bare.comparability == []


def test_fingerprint_differences_name_each_field(tmp_path: Path) -> None:
    a = load_run(solo(tmp_path, "a", uuid="GPU-aaaaaaaa-0000"))
    b = load_run(solo(tmp_path, "b", uuid="GPU-bbbbbbbb-1111", driver="580.159.04"))
    patch_manifest(b.run_dir, host_cpu_model="Intel Xeon Platinum 8480+")
    b = load_run(b.run_dir)
    assert fingerprint_differences(a, b) == [
        "another GPU (uuid GPU-bbbbbbbb.. vs GPU-aaaaaaaa..)",
        "another driver (580.159.04 vs 560.35.03)",
        "another CPU (Intel Xeon Platinum 8480+ vs AMD EPYC 9654 96-Core Processor)",
    ]
    assert fingerprint_differences(a, load_run(solo(tmp_path, "c"))) == []


def test_end_to_end_baseline_on_another_gpu_with_steal(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    p = pair(tmp_path / "runs")
    sa = solo(tmp_path / "solos", "solo_a", uuid="GPU-cccccccc-2222", steal=STEAL_LIMIT_PCT + 2.2)
    rb = simple_run(tmp_path / "solos", "solo_b", mode="mps", gpu=gpu())
    rb.tenants["b"] = rb.tenants.pop("a")
    rb.tenants["b"].name = "b"
    sb = rb.write()
    out = tmp_path / "out"
    assert main([str(p), "--baseline", str(sa), "--baseline", str(sb), "--out", str(out)]) == 0
    err = capsys.readouterr().err
    run = json.loads((out / "summary.json").read_text())["runs"][0]
    assert run["comparability"] == [
        "baseline solo_a ran on another GPU (uuid GPU-cccccccc.. vs GPU-aaaaaaaa..)",
        "baseline solo_a lost 7.2 % of CPU time to steal (above 5 %): a shared host, timings less comparable",
    ]
    assert run["hardware"]["sm_active_pct"] == 80 and run["hardware"]["tenant_cpu_pct"] == {"a": 100, "b": 50}
    assert run["solo_hardware"]["a"]["sm_active_pct"] == 40
    assert run["solo_hardware"]["a"]["note"] == "solo a kept the SMs 40 % active: room for a co-tenant"
    for line in run["comparability"] + ["solo a kept the SMs 40 % active: room for a co-tenant"]:
        assert line in err
        assert line in (out / "summary.md").read_text()
        assert line in (out / "report.html").read_text()
    assert "hardware: SM active 80 %" in err


def test_runs_without_a_fingerprint_say_nothing(tmp_path: Path) -> None:
    hand = Path(__file__).parents[2] / "data" / "analysis" / "hand"
    out = tmp_path / "out"
    args = [str(hand / "pair"), "--baseline", str(hand / "solo_alpha"), "--baseline", str(hand / "solo_beta")]
    assert main([*args, "--out", str(out)]) == 0
    run = json.loads((out / "summary.json").read_text())["runs"][0]
    assert run["comparability"] == []


def test_sweep_points_on_another_gpu(tmp_path: Path) -> None:
    first = pair(tmp_path / "sw", "job0")
    second = pair(tmp_path / "sw", "job1", uuid="GPU-dddddddd-3333")
    out = tmp_path / "out"
    assert main([str(first), str(second), "--out", str(out)]) == 0
    runs = json.loads((out / "summary.json").read_text())["runs"]
    assert runs[0]["comparability"] == []
    assert runs[1]["comparability"] == ["run job1 ran on another GPU (uuid GPU-dddddddd.. vs GPU-aaaaaaaa..) than job0"]
