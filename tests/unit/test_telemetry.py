"""multitenant.run.telemetry without a GPU: the psutil side, scheduling, the file format, errors."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import orjson
import pytest

from multitenant.run import host
from multitenant.run.telemetry import TelemetrySampler

GPU_KEYS = {"gpu_util_pct", "mem_util_pct", "mem_used_bytes", "power_w", "sm_clock_mhz", "mem_clock_mhz", "temp_c"}


def _nvml_works() -> bool:
    return host.nvml_init() is not None


needs_no_gpu = pytest.mark.skipif(_nvml_works(), reason="this machine has NVML; the test is about its absence")


def _read(path: Path) -> list[dict]:
    return [orjson.loads(line) for line in path.read_bytes().splitlines()]


@needs_no_gpu
def test_gpu_info_is_none_without_nvml() -> None:
    assert host.gpu_info(0) is None
    assert host.gpu_info(None) is None


def test_sampler_cpu_only_lines_interval_and_tenant_cpu(tmp_path: Path) -> None:
    busy = subprocess.Popen([sys.executable, "-c", "import time\nt=time.time()\nwhile time.time()-t<30: pass"])
    idle = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        s = TelemetrySampler(tmp_path / "telemetry.jsonl", None, 20, lambda: {"busy": busy.pid, "idle": idle.pid})
        t0 = time.monotonic_ns()
        s.start()
        time.sleep(1.0)
        s.stop()
        t1 = time.monotonic_ns()
    finally:
        busy.kill()
        idle.kill()
        busy.wait()
        idle.wait()
    rows = _read(tmp_path / "telemetry.jsonl")
    assert len(rows) == s.samples
    ts = [r["t"] for r in rows]
    assert ts == sorted(ts) and len(set(ts)) == len(ts) and t0 <= ts[0] and ts[-1] <= t1
    # Absolute schedule: sample k is taken at (or, if the thread was late, after) t_start + k*20 ms,
    # never before; on a loaded CI machine samples may be late but are not bunched.
    gaps = [b - a for a, b in zip(ts, ts[1:], strict=False)]
    assert min(gaps) > 5_000_000
    assert 25 <= len(rows) <= 51
    for r in rows:
        assert not (GPU_KEYS & r.keys())  # no GPU: no GPU keys
        assert r["tenant_gpu_mem_bytes"] == {}
    # The first sample only primes psutil; later ones report both tenants.
    assert rows[0]["tenant_cpu_pct"] == {}
    late = [r["tenant_cpu_pct"] for r in rows[5:]]
    assert all(set(c) == {"busy", "idle"} for c in late)
    busy_mean = sum(c["busy"] for c in late) / len(late)
    idle_mean = sum(c["idle"] for c in late) / len(late)
    assert busy_mean > 40 and idle_mean < 5, (busy_mean, idle_mean)


def test_sampler_survives_tenants_that_exit_and_a_failing_source(tmp_path: Path) -> None:
    short = subprocess.Popen([sys.executable, "-c", "pass"])
    short.wait()
    calls = {"n": 0}

    def pids() -> dict[str, int]:
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("orchestrator hiccup")
        return {"gone": short.pid}

    s = TelemetrySampler(tmp_path / "t.jsonl", None, 10, pids)
    s.start()
    time.sleep(0.3)
    s.stop()
    s.stop()  # idempotent
    rows = _read(tmp_path / "t.jsonl")
    assert len(rows) >= 10 and all(r["tenant_cpu_pct"] == {} for r in rows)
    assert s.stats()["samples"] == len(rows)
    assert [e for e in s.errors if e.startswith("sample:")] == ["sample: RuntimeError: orchestrator hiccup"]


def test_gpu_fields_failing_are_recorded_once_and_dropped(tmp_path: Path) -> None:
    s = TelemetrySampler(tmp_path / "t.jsonl", None, 10, dict)
    temps = iter([40, 41])

    def temp() -> int:
        return next(temps)  # StopIteration on the third call: a source that breaks mid-run

    s._gpu_fields = {"temp_c": temp, "power_w": lambda: 1 / 0}
    rows = [s.sample() for _ in range(4)]
    assert [r.get("temp_c") for r in rows] == [40, 41, None, None]
    assert "power_w" not in rows[0]
    assert [e.split(":")[0] for e in s.errors] == ["nvml power_w", "nvml temp_c"]


def test_stop_flushes_and_thread_is_gone(tmp_path: Path) -> None:
    s = TelemetrySampler(tmp_path / "t.jsonl", None, 1000, dict)
    s.start()
    time.sleep(0.05)  # exactly one sample (slot 0); the next slot is a second away
    s.stop()
    assert len(_read(tmp_path / "t.jsonl")) == 1
    assert not any(t.name == "telemetry" for t in threading.enumerate())


def test_bad_interval_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="use 100"):
        TelemetrySampler(tmp_path / "t.jsonl", None, 0, dict)


class _FakeNvml:
    """Stands in for pynvml's process list only (the real one runs in tests/gpu/test_mps.py)."""

    def __init__(self, listing: dict[int, int]) -> None:
        self.listing = listing
        self.calls = 0

    def nvmlDeviceGetComputeRunningProcesses(self, handle: object) -> list:
        self.calls += 1
        return [type("P", (), {"pid": pid, "usedGpuMemory": mem})() for pid, mem in self.listing.items()]

    def nvmlDeviceGetMPSComputeRunningProcesses(self, handle: object) -> list:
        return []


def test_process_memory_counts_children_and_is_refreshed_once_a_second(tmp_path: Path) -> None:
    parent = subprocess.Popen(
        [sys.executable, "-c", "import subprocess,sys,time; subprocess.Popen([sys.executable,'-c','import time; time.sleep(30)']); time.sleep(30)"]
    )
    try:
        deadline = time.monotonic() + 10
        import psutil

        while not psutil.Process(parent.pid).children() and time.monotonic() < deadline:
            time.sleep(0.02)
        child = psutil.Process(parent.pid).children()[0].pid
        s = TelemetrySampler(tmp_path / "t.jsonl", None, 10, lambda: {"wrapped": parent.pid})
        fake = _FakeNvml({child: 3 << 30, 999_999_999: 1 << 30})
        s._nvml, s._handle = fake, None
        t = time.monotonic_ns()
        rows = [s.sample(t + k * 100_000_000) for k in range(12)]  # 1.2 s of 100 ms samples
    finally:
        for c in psutil.Process(parent.pid).children(recursive=True):
            c.kill()
        parent.kill()
        parent.wait()
    assert fake.calls == 2  # at t and t + 1 s
    assert all(r["tenant_gpu_mem_bytes"] == {"wrapped": 3 << 30} for r in rows)


# ---------------------------------------------------------------------------------------------
# GPU activity (GPM, or the utilization rates) against a test double of pynvml


class _Metric:
    def __init__(self) -> None:
        self.metricId = 0
        self.nvmlReturn = 0
        self.value = 0.0


class _MetricsGet:
    def __init__(self) -> None:
        self.version = self.numMetrics = 0
        self.sample1 = self.sample2 = None
        self.metrics = [_Metric() for _ in range(8)]


class _FakeGpuNvml:
    """The pynvml calls the sampler makes, for one GPU with or without GPM."""

    NVML_SUCCESS = 0
    NVML_CLOCK_SM, NVML_CLOCK_MEM, NVML_TEMPERATURE_GPU = 1, 2, 0
    NVML_GPM_METRICS_GET_VERSION = 1
    NVML_GPM_METRIC_SM_UTIL, NVML_GPM_METRIC_SM_OCCUPANCY = 2, 3
    NVML_GPM_METRIC_ANY_TENSOR_UTIL, NVML_GPM_METRIC_DRAM_BW_UTIL = 5, 10
    c_nvmlGpmMetricsGet_t = _MetricsGet

    def __init__(self, gpm: bool) -> None:
        self.gpm = gpm
        self.ticks = 0  # GPM samples taken
        self.freed = 0
        self.sm_clocks = iter([1980, 1755, 1980, 1410] + [1980] * 100)
        # per metric id: value per GPM interval (interval k is between samples k and k+1)
        self.values = {2: 80.0, 3: 41.26, 5: 12.5, 10: 55.0}

    def nvmlGpmQueryDeviceSupport(self, h: object) -> object:
        if not self.gpm:
            raise RuntimeError("NVMLError_NotSupported")
        return type("S", (), {"isSupportedDevice": 1})()

    def nvmlGpmSampleAlloc(self) -> dict:
        return {}

    def nvmlGpmSampleFree(self, sample: dict) -> None:
        self.freed += 1

    def nvmlGpmSampleGet(self, h: object, sample: dict) -> dict:
        self.ticks += 1
        sample["tick"] = self.ticks
        return sample

    def nvmlGpmMetricsGet(self, get: _MetricsGet) -> _MetricsGet:
        assert get.sample2["tick"] == get.sample1["tick"] + 1  # the previous sample is kept
        for m in get.metrics[: get.numMetrics]:
            if m.metricId == 5 and get.sample2["tick"] == 3:
                m.nvmlReturn = 3  # one metric failing in one interval: left out of that sample
                continue
            m.nvmlReturn, m.value = 0, self.values[m.metricId] + get.sample1["tick"]
        return get

    def nvmlDeviceGetUtilizationRates(self, h: object) -> object:
        return type("U", (), {"gpu": 93, "memory": 47})()

    def nvmlDeviceGetClockInfo(self, h: object, which: int) -> int:
        return next(self.sm_clocks) if which == self.NVML_CLOCK_SM else 2619

    def nvmlDeviceGetMemoryInfo(self, h: object) -> object:
        return type("M", (), {"used": 1 << 30})()

    def nvmlDeviceGetPowerUsage(self, h: object) -> int:
        return 350_000

    def nvmlDeviceGetTemperature(self, h: object, which: int) -> int:
        return 50

    def nvmlDeviceGetComputeRunningProcesses(self, h: object) -> list:
        return []

    def nvmlShutdown(self) -> None:
        pass


def _samples(s: TelemetrySampler, n: int) -> list[dict]:
    t = time.monotonic_ns()
    rows = []
    for k in range(n):
        time.sleep(0.11)  # GPM intervals under 100 ms repeat the last values
        rows.append(s.sample(t + k * 110_000_000))
    return rows


def test_gpm_activity_between_consecutive_samples(tmp_path: Path) -> None:
    fake = _FakeGpuNvml(gpm=True)
    s = TelemetrySampler(tmp_path / "t.jsonl", None, 100, dict)
    s._use_nvml(fake, "h")
    assert s.activity_source == "gpm" and s.stats()["activity_source"] == "gpm"
    rows = _samples(s, 3)
    assert rows[0]["sm_active_pct"] == 81.0 and rows[1]["sm_active_pct"] == 82.0  # interval 1, 2
    assert rows[0]["sm_occupancy_pct"] == 42.3 and rows[0]["dram_bw_pct"] == 56.0
    assert rows[0]["tensor_active_pct"] == 13.5 and "tensor_active_pct" not in rows[1]
    assert rows[0]["gpu_util_pct"] == 93  # the utilization rates are still recorded beside
    s.stop()
    assert fake.freed == 2


def test_without_gpm_activity_comes_from_the_utilization_rates(tmp_path: Path) -> None:
    s = TelemetrySampler(tmp_path / "t.jsonl", None, 100, dict)
    s._use_nvml(_FakeGpuNvml(gpm=False), "h")
    assert s.activity_source == "utilization"
    assert s.errors == [] and "RuntimeError: NVMLError_NotSupported" in (s.activity_note or "")
    rec = s.sample()
    assert (rec["sm_active_pct"], rec["dram_bw_pct"]) == (93, 47)
    assert "sm_occupancy_pct" not in rec and "tensor_active_pct" not in rec


def test_no_nvml_no_activity_source(tmp_path: Path) -> None:
    s = TelemetrySampler(tmp_path / "t.jsonl", None, 100, dict)
    rec = s.sample()
    assert s.activity_source is None and "sm_active_pct" not in rec
    assert s.window_activity().gpu_activity_source is None


def test_clock_range_resets_at_the_window(tmp_path: Path) -> None:
    s = TelemetrySampler(tmp_path / "t.jsonl", None, 100, dict)
    s._use_nvml(_FakeGpuNvml(gpm=False), "h")
    s.sample()  # 1980 before the window
    s.mark_window()
    for _ in range(3):
        s.sample()  # 1755, 1980, 1410
    act = s.window_activity()
    assert (act.sm_clock_mhz_min, act.sm_clock_mhz_max) == (1410, 1980)
    assert (act.mem_clock_mhz_min, act.mem_clock_mhz_max) == (2619, 2619)
    assert act.gpu_activity_source == "utilization"


# ---------------------------------------------------------------------------------------------
# CPU of the tenant's whole process tree

BUSY_CHILD = r"""
import subprocess, sys, time
subprocess.Popen([sys.executable, "-c", "import time\nt=time.time()\nwhile time.time()-t<30: pass"])
time.sleep(30)
"""


def test_tenant_cpu_counts_the_busy_child_of_an_idle_tenant(tmp_path: Path) -> None:
    import psutil

    parent = subprocess.Popen([sys.executable, "-c", BUSY_CHILD])
    try:
        deadline = time.monotonic() + 10
        while not psutil.Process(parent.pid).children() and time.monotonic() < deadline:
            time.sleep(0.02)
        s = TelemetrySampler(tmp_path / "t.jsonl", None, 50, lambda: {"tenant": parent.pid})
        s.start()
        s.mark_window()
        time.sleep(1.5)
        act = s.window_activity()
        s.stop()
        alone = psutil.Process(parent.pid).cpu_percent(0.3)
    finally:
        for c in psutil.Process(parent.pid).children(recursive=True):
            c.kill()
        parent.kill()
        parent.wait()
    rows = _read(tmp_path / "t.jsonl")
    late = [r["tenant_cpu_pct"]["tenant"] for r in rows[3:] if "tenant" in r["tenant_cpu_pct"]]
    mean = sum(late) / len(late)
    assert mean > 60, mean  # ~100: one core busy in the child (2 shared CI cores)
    assert alone < 10  # while the tenant process itself only sleeps
    assert act.tenant_cpu_s["tenant"] > 0.6 * 1.5 * 0.6, act  # CPU seconds over the window
    assert act.window_s is not None and act.window_s >= 1.5
    if Path("/proc/stat").exists():
        assert act.steal_pct is not None and 0 <= act.steal_pct <= 100
        assert act.iowait_pct is not None and 0 <= act.iowait_pct <= 100


def test_gpm_request_fits_pynvml_structures(monkeypatch: pytest.MonkeyPatch) -> None:
    """The request is built in pynvml's own ctypes structures (only the NVML calls are faked)."""
    pynvml = pytest.importorskip("pynvml")
    got: dict = {}

    def metrics_get(get: object) -> object:
        got["ids"] = [get.metrics[i].metricId for i in range(get.numMetrics)]  # type: ignore[attr-defined]
        got["version"] = get.version  # type: ignore[attr-defined]
        for i in range(get.numMetrics):  # type: ignore[attr-defined]
            get.metrics[i].value = 10.0 * (i + 1)  # type: ignore[attr-defined]
        get.metrics[1].nvmlReturn = pynvml.NVML_ERROR_NOT_SUPPORTED  # type: ignore[attr-defined]
        return get

    monkeypatch.setattr(pynvml, "nvmlGpmQueryDeviceSupport", lambda h: type("S", (), {"isSupportedDevice": 1})())
    monkeypatch.setattr(pynvml, "nvmlGpmSampleAlloc", pynvml.c_nvmlGpmSample_t)
    monkeypatch.setattr(pynvml, "nvmlGpmSampleGet", lambda h, sample: sample)
    monkeypatch.setattr(pynvml, "nvmlGpmSampleFree", lambda sample: None)
    monkeypatch.setattr(pynvml, "nvmlGpmMetricsGet", metrics_get)
    gpm = host.GpmActivity(pynvml, None)
    gpm._prev_ns -= 200_000_000
    assert gpm.read() == {"sm_active_pct": 10.0, "dram_bw_pct": 30.0, "tensor_active_pct": 40.0}
    assert got == {"ids": [pynvml.NVML_GPM_METRIC_SM_UTIL, pynvml.NVML_GPM_METRIC_SM_OCCUPANCY,
                           pynvml.NVML_GPM_METRIC_DRAM_BW_UTIL, pynvml.NVML_GPM_METRIC_ANY_TENSOR_UTIL],
                   "version": pynvml.NVML_GPM_METRICS_GET_VERSION}  # fmt: skip
    gpm.close()


def test_gpm_failing_mid_run_falls_back_to_the_utilization_rates(tmp_path: Path) -> None:
    fake = _FakeGpuNvml(gpm=True)
    s = TelemetrySampler(tmp_path / "t.jsonl", None, 100, dict)
    s._use_nvml(fake, "h")
    first = _samples(s, 1)[0]

    def broken(get: object) -> object:
        raise RuntimeError("NVMLError_Unknown")

    fake.nvmlGpmMetricsGet = broken  # type: ignore[method-assign]
    later = _samples(s, 2)
    assert first["sm_occupancy_pct"] == 42.3
    assert [r["sm_active_pct"] for r in later] == [93, 93] and "sm_occupancy_pct" not in later[0]
    assert s.activity_source == "utilization" and s.errors == ["nvml gpm: RuntimeError: NVMLError_Unknown"]
    assert fake.freed == 2
