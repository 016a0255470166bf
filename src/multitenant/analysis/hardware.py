"""What the hardware did over a run's window, and whether two runs are comparable.

The block (``schema.HardwareSummary``), from ``telemetry.jsonl`` and the manifest's ``activity``:

- GPU activity: the mean of ``sm_active_pct``, ``sm_occupancy_pct``, ``dram_bw_pct`` and
  ``tensor_active_pct`` over the samples with ``t0 < t <= t1`` (a sample describes the time since
  the previous one), in percent, with their source (manifest ``activity.gpu_activity_source``:
  "gpm" = NVML GPM counters, "utilization" = NVML's coarse utilization rates, null = unknown);
- per tenant: the mean of ``tenant_cpu_pct/<name>`` over the same samples (% of one core, the
  tenant's whole process tree) and its CPU seconds over the window (``activity.tenant_cpu_s``);
- host: steal and iowait, percent of all CPU time over the window; the GPU's SM and memory
  clock range [min, max] MHz (manifest, else the samples).

The same block for each tenant's solo baseline, with a sentence when the solo left the SMs idle
much of the time (mean SM activity below ``HEADROOM_SM_ACTIVE_PCT``): room for a co-tenant.

Comparability (``fingerprint_differences``): two runs are compared on GPU UUID, CPU model and
driver version, each only where both runs recorded it (runs without a fingerprint say
nothing), and a run whose host steal exceeds ``STEAL_LIMIT_PCT`` is named. Each difference is one
line in ``RunMetrics.comparability`` (summary.json ``comparability``) and on the terminal.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from multitenant.schema import HardwareSummary

if TYPE_CHECKING:
    from multitenant.analysis.load import RunData
    from multitenant.analysis.metrics import RunMetrics

# Above this steal % (of all CPU time, over the window) the hypervisor took enough CPU from the
# host that a run's timings depend on its neighbours; 5 % is where CPU-side latency (a serving
# engine's scheduler, the tokenizer) starts to show in TTFT on the machines we used, not a law.
STEAL_LIMIT_PCT = 5.0
# A solo whose mean SM activity is below this % left the SMs idle a good part of the time.
HEADROOM_SM_ACTIVE_PCT = 60.0
ACTIVITY_KEYS = ("sm_active_pct", "sm_occupancy_pct", "dram_bw_pct", "tensor_active_pct")
SOURCE_GPM = "gpm"
SOURCE_UTILIZATION = "utilization"
CPU_COLUMN = "tenant_cpu_pct/"


def _mean(values: np.ndarray) -> float | None:
    finite = values[np.isfinite(values)]
    return float(finite.mean()) if finite.size else None


def _range(values: np.ndarray) -> list[int] | None:
    finite = values[np.isfinite(values)]
    return [int(finite.min()), int(finite.max())] if finite.size else None


def in_window(rm: RunMetrics) -> np.ndarray | None:
    """Which telemetry samples describe the window (``t0 < t <= t1``); all without a window."""
    tel = rm.run.telemetry
    if tel is None:
        return None
    if rm.window_ns is None:
        return np.ones(tel.t_ns.size, dtype=bool)
    return (tel.t_ns > rm.window_ns[0]) & (tel.t_ns <= rm.window_ns[1])


def window_mean(rm: RunMetrics, key: str) -> float | None:
    """The mean of one telemetry column over the window's samples (None: no such column)."""
    inside = in_window(rm)
    tel = rm.run.telemetry
    if tel is None or inside is None or key not in tel.columns:
        return None
    return _mean(tel.columns[key][inside])


def hardware_summary(rm: RunMetrics) -> HardwareSummary | None:
    """The run's block (module docstring); None when the run recorded neither telemetry nor activity."""
    run = rm.run
    tel = run.telemetry
    activity = run.manifest.activity
    if tel is None and activity is None:
        return None
    hw = HardwareSummary(window_s=rm.window_s)
    if activity is not None:
        hw.activity_source = activity.gpu_activity_source
        hw.tenant_cpu_s = dict(activity.tenant_cpu_s)
        hw.steal_pct, hw.iowait_pct = activity.steal_pct, activity.iowait_pct
        if activity.sm_clock_mhz_min is not None and activity.sm_clock_mhz_max is not None:
            hw.sm_clock_mhz = [activity.sm_clock_mhz_min, activity.sm_clock_mhz_max]
        if activity.mem_clock_mhz_min is not None and activity.mem_clock_mhz_max is not None:
            hw.mem_clock_mhz = [activity.mem_clock_mhz_min, activity.mem_clock_mhz_max]
    inside = in_window(rm)
    if tel is not None and inside is not None and tel.t_ns.size:
        hw.samples = int(inside.sum())
        for key in ACTIVITY_KEYS:
            if key in tel.columns:
                setattr(hw, key, _mean(tel.columns[key][inside]))
        for column, values in tel.columns.items():
            if column.startswith(CPU_COLUMN):
                hw.tenant_cpu_pct[column[len(CPU_COLUMN) :]] = _mean(values[inside])
        if hw.sm_clock_mhz is None and "sm_clock_mhz" in tel.columns:
            hw.sm_clock_mhz = _range(tel.columns["sm_clock_mhz"][inside])
        if hw.mem_clock_mhz is None and "mem_clock_mhz" in tel.columns:
            hw.mem_clock_mhz = _range(tel.columns["mem_clock_mhz"][inside])
    return hw


def headroom_note(hw: HardwareSummary, who: str) -> str | None:
    """'<who> kept the SMs 45 % active: room for a co-tenant' when the mean SM activity is
    below HEADROOM_SM_ACTIVE_PCT; with NVML's utilization rate (no GPM) it says what that is."""
    if hw.sm_active_pct is None or hw.sm_active_pct >= HEADROOM_SM_ACTIVE_PCT:
        return None
    pct = f"{hw.sm_active_pct:.0f} %"
    if hw.activity_source == SOURCE_UTILIZATION:
        return f"{who} ran kernels only {pct} of the time (NVML utilization rate): room for a co-tenant"
    return f"{who} kept the SMs {pct} active: room for a co-tenant"


def _short(uuid: str) -> str:
    return uuid if len(uuid) <= 12 else uuid[:12] + ".."


def fingerprint_differences(mine: RunData, theirs: RunData) -> list[str]:
    """How ``theirs`` differs from ``mine``: 'another GPU (uuid GPU-ab.. vs GPU-cd..)', 'another
    CPU (...)', 'another driver (...)'; a field either run lacks is not compared."""
    out: list[str] = []
    g1, g2 = mine.manifest.gpu, theirs.manifest.gpu
    if g1 is not None and g2 is not None:
        if g1.uuid and g2.uuid and g1.uuid != g2.uuid:
            out.append(f"another GPU (uuid {_short(g2.uuid)} vs {_short(g1.uuid)})")
        if g1.driver_version and g2.driver_version and g1.driver_version != g2.driver_version:
            out.append(f"another driver ({g2.driver_version} vs {g1.driver_version})")
    c1, c2 = mine.manifest.host.cpu_model, theirs.manifest.host.cpu_model
    if c1 and c2 and c1 != c2:
        out.append(f"another CPU ({c2} vs {c1})")
    return out


def steal_line(run: RunData, who: str) -> str | None:
    """'<who> lost 7.2 % of CPU time to steal (above 5 %)', or None."""
    steal = run.manifest.activity.steal_pct if run.manifest.activity is not None else None
    if steal is None or not math.isfinite(steal) or steal <= STEAL_LIMIT_PCT:
        return None
    return f"{who} lost {steal:.1f} % of CPU time to steal (above {STEAL_LIMIT_PCT:g} %): a shared host, timings less comparable"


def attach(rm: RunMetrics, solos: dict[str, RunMetrics | list[RunMetrics] | None]) -> None:
    """Fill ``rm.hardware``, ``rm.solo_hardware`` (each tenant's first baseline trial) and
    ``rm.comparability`` (this run's steal, and each baseline that ran elsewhere)."""
    rm.hardware = hardware_summary(rm)
    if rm.hardware is not None and len(rm.tenants) == 1:
        rm.hardware.note = headroom_note(rm.hardware, f"solo {next(iter(rm.tenants))}")
    lines: list[str] = []
    if (line := steal_line(rm.run, f"run {rm.run.run_dir.name}")) is not None:
        lines.append(line)
    seen: set[str] = set()
    for name, pool in solos.items():
        trials = pool if isinstance(pool, list) else [pool] if pool is not None else []
        if trials and (hw := hardware_summary(trials[0])) is not None:
            hw.note = headroom_note(hw, f"solo {name}")
            rm.solo_hardware[name] = hw
        for solo in trials:
            label = solo.run.run_dir.name
            if label in seen:
                continue
            seen.add(label)
            lines += [f"baseline {label} ran on {d}" for d in fingerprint_differences(rm.run, solo.run)]
            if (line := steal_line(solo.run, f"baseline {label}")) is not None:
                lines.append(line)
    rm.comparability = lines


def compare_points(rms: Sequence[RunMetrics]) -> None:
    """Several runs (a sweep): each run that differs from the first one's fingerprint gets a line
    naming the difference ('run job3 ran on another GPU (...) than job0')."""
    if len(rms) < 2:
        return
    first = rms[0].run
    for rm in rms[1:]:
        for d in fingerprint_differences(first, rm.run):
            rm.comparability.append(f"run {rm.run.run_dir.name} ran on {d} than {first.run_dir.name}")


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{value:.0f} %"


def describe(hw: HardwareSummary) -> str:
    """The block on one line: 'SM active 45 % · occupancy 20 % · DRAM bw 30 % (gpm) · CPU a 98 %
    (12.1 s) · steal 0.2 % · iowait 0.0 % · SM clock 1755–1980 MHz'."""
    parts = [f"SM active {_pct(hw.sm_active_pct)}"]
    if hw.sm_occupancy_pct is not None:
        parts.append(f"occupancy {_pct(hw.sm_occupancy_pct)}")
    parts.append(f"DRAM bw {_pct(hw.dram_bw_pct)}")
    if hw.tensor_active_pct is not None:
        parts.append(f"tensor {_pct(hw.tensor_active_pct)}")
    parts[-1] += f" ({hw.activity_source or 'source unknown'})"
    names = sorted(set(hw.tenant_cpu_pct) | set(hw.tenant_cpu_s))
    cpu = []
    for name in names:
        seconds = hw.tenant_cpu_s.get(name)
        cpu.append(f"{name} {_pct(hw.tenant_cpu_pct.get(name))}" + ("" if seconds is None else f" ({seconds:.1f} s)"))
    if cpu:
        parts.append("CPU " + ", ".join(cpu))
    if hw.steal_pct is not None:
        parts.append(f"steal {hw.steal_pct:.1f} %")
    if hw.iowait_pct is not None:
        parts.append(f"iowait {hw.iowait_pct:.1f} %")
    if hw.sm_clock_mhz is not None:
        lo, hi = hw.sm_clock_mhz
        parts.append(f"SM clock {lo}–{hi} MHz" if lo != hi else f"SM clock {lo} MHz")
    return " · ".join(parts)


def report_lines(rm: RunMetrics) -> list[str]:
    """The block as the reports list it: this run, each solo baseline, the notes, the
    comparability lines. Empty for a run without telemetry, activity or differences."""
    out = []
    if rm.hardware is not None:
        out.append(f"hardware: {describe(rm.hardware)}")
        if rm.hardware.note:
            out.append(rm.hardware.note)
    for name, hw in rm.solo_hardware.items():
        out.append(f"solo {name}: {describe(hw)}")
        if hw.note:
            out.append(hw.note)
    return out + rm.comparability
