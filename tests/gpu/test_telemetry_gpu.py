"""run.telemetry and run.host against a real GPU: the GPM activity metrics on Hopper and later,
the utilization fallback before it, the power limit. Skipped without a CUDA GPU and NVML."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from multitenant.run import host  # noqa: E402
from multitenant.run.telemetry import TelemetrySampler  # noqa: E402
from multitenant.schema import to_dict  # noqa: E402

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.skipif(host.nvml_init() is None, reason="needs NVML"),
]
GPM_KEYS = ("sm_active_pct", "sm_occupancy_pct", "dram_bw_pct", "tensor_active_pct")


def test_activity_metrics_while_the_gpu_works(tmp_path: Path) -> None:
    info = host.gpu_info(0)
    assert info is not None and (info.power_limit_w or 0) > 0, info
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    s = TelemetrySampler(tmp_path / "telemetry.jsonl", 0, 100, dict)
    s.start()
    s.mark_window()
    t_end = time.monotonic() + 2.0
    while time.monotonic() < t_end:
        for _ in range(20):
            a = (a @ a).clamp_(-1, 1)
        torch.cuda.synchronize()
    act = s.window_activity()
    s.stop()
    rows = [json.loads(x) for x in (tmp_path / "telemetry.jsonl").read_text().splitlines()]
    print("EVIDENCE gpu-activity", json.dumps({"gpu": to_dict(info), "window": to_dict(act), "rows": rows[-3:],
                                                 "errors": s.errors}))
    busy = rows[len(rows) // 2 :]
    hopper = torch.cuda.get_device_capability(0)[0] >= 9
    if hopper:
        assert s.activity_source == "gpm", s.errors
        for key in GPM_KEYS:
            assert all(key in r for r in busy), (key, s.errors)
        assert max(r["sm_active_pct"] for r in busy) > 20
        assert max(r["tensor_active_pct"] for r in busy) > 5  # bf16 matmul runs on tensor cores
    else:
        assert s.activity_source in ("gpm", "utilization")
        assert all("sm_active_pct" in r for r in busy)
    assert act.gpu_activity_source == s.activity_source
    assert act.sm_clock_mhz_min is not None and act.sm_clock_mhz_min <= (act.sm_clock_mhz_max or 0)
