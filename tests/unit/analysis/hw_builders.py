"""Run folders that carry the hardware fingerprint and activity: a manifest patched with a GPU,
a CPU model and the window's ``activity``, and telemetry samples with the activity counters.

Times are ms after ``builders.BASE_NS`` like every builder here. ``samples`` gives one telemetry
line per entry: (ms, sm_active_pct, dram_bw_pct, {tenant: cpu_pct}).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson

from tests.unit.analysis.builders import GPU, t_ns

CPU_MODEL = "AMD EPYC 9654 96-Core Processor"


def gpu(uuid: str = "GPU-aaaaaaaa-0000", driver: str = "560.35.03") -> dict[str, Any]:
    return {**GPU, "uuid": uuid, "driver_version": driver}


def activity(
    steal: float = 0.5, iowait: float = 0.1, cpu_s: dict[str, float] | None = None, source: str = "gpm"
) -> dict[str, Any]:
    return {
        "window_s": 2.0,
        "steal_pct": steal,
        "iowait_pct": iowait,
        "tenant_cpu_s": cpu_s or {},
        "gpu_activity_source": source,
        "sm_clock_mhz_min": 1755,
        "sm_clock_mhz_max": 1980,
        "mem_clock_mhz_min": 2619,
        "mem_clock_mhz_max": 2619,
    }


def samples(rows: list[tuple[float, float, float, dict[str, float]]]) -> list[dict[str, Any]]:
    """Telemetry lines: (ms, sm_active_pct, dram_bw_pct, {tenant: cpu_pct})."""
    return [
        {"t": t_ns(ms), "gpu_util_pct": 100, "sm_active_pct": sm, "sm_occupancy_pct": sm / 2, "dram_bw_pct": bw,
         "tensor_active_pct": sm / 4, "sm_clock_mhz": 1980, "tenant_cpu_pct": cpu}
        for ms, sm, bw, cpu in rows
    ]  # fmt: skip


def patch_manifest(run_dir: Path, **fields: Any) -> None:
    """Set top-level manifest fields; ``host_cpu_model`` sets ``host.cpu_model``; ``tenants``
    merges into each named tenant's record."""
    path = run_dir / "manifest.json"
    manifest = orjson.loads(path.read_bytes())
    if "host_cpu_model" in fields:
        manifest["host"]["cpu_model"] = fields.pop("host_cpu_model")
    for name, record in fields.pop("tenants", {}).items():
        manifest["tenants"][name].update(record)
    manifest.update(fields)
    path.write_bytes(orjson.dumps(manifest, option=orjson.OPT_INDENT_2))
