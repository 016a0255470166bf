"""multitenant.run.telemetry without a GPU: the psutil side, scheduling, the file format, errors."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import orjson
import pytest

from multitenant.run import telemetry
from multitenant.run.telemetry import TelemetrySampler

GPU_KEYS = {"gpu_util_pct", "mem_util_pct", "mem_used_bytes", "power_w", "sm_clock_mhz", "mem_clock_mhz", "temp_c"}


def _nvml_works() -> bool:
    return telemetry._nvml() is not None


needs_no_gpu = pytest.mark.skipif(_nvml_works(), reason="this machine has NVML; the test is about its absence")


def _read(path: Path) -> list[dict]:
    return [orjson.loads(line) for line in path.read_bytes().splitlines()]


@needs_no_gpu
def test_gpu_info_is_none_without_nvml() -> None:
    assert telemetry.gpu_info(0) is None
    assert telemetry.gpu_info(None) is None


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
