"""GPU and tenant telemetry: ``TelemetrySampler`` -> telemetry.jsonl,
and the window's activity (``mark_window`` / ``window_activity`` -> ``schema.HostActivity``).

The sampler is a thread in the orchestrator (never in a tenant, so a tenant's timing is not
touched by it). Every ``interval_ms`` it writes one flat JSON line on the tenants' clock,
``t`` = ``time.monotonic_ns()`` (INTERFACES.md, "telemetry.jsonl")::

    {"t": ns, "gpu_util_pct", "mem_util_pct", "mem_used_bytes", "power_w", "sm_clock_mhz",
     "mem_clock_mhz", "temp_c", "sm_active_pct", "sm_occupancy_pct", "dram_bw_pct",
     "tensor_active_pct", "tenant_cpu_pct": {name: pct}, "tenant_gpu_mem_bytes": {name: bytes}}

Units: ``gpu_util_pct``/``mem_util_pct`` are NVML's utilization rates (percent of the last
sample period in which a kernel ran / device memory was read or written); ``power_w`` is the
board's draw in watts (NVML reports mW); clocks in MHz; ``temp_c`` in degrees Celsius.

GPU activity, in percent, between this sample and the previous one. Where the GPU has NVML GPM
(Hopper and later; ``activity_source`` "gpm"): ``sm_active_pct`` the share of SMs busy,
``sm_occupancy_pct`` resident warps against the SMs' maximum, ``dram_bw_pct`` DRAM bandwidth
used against its peak, ``tensor_active_pct`` the share of SM time on any tensor-core operation.
Without GPM (``activity_source`` "utilization") ``sm_active_pct`` and ``dram_bw_pct`` repeat the
coarse ``gpu_util_pct`` and ``mem_util_pct`` (time a kernel ran / memory was busy, not how much
of the GPU it used) and the other two are absent; without NVML ``activity_source`` is null. The
source is the sampler's ``activity_source`` (and the window's ``gpu_activity_source``), not a
per-sample key.

``tenant_cpu_pct``: CPU of the tenant's whole process tree (the tenant and every descendant:
a vLLM engine core, a launched server and its workers) since the previous sample, from the
difference of cumulative user+system seconds (``host.ProcessTrees``), so processes that start
later join and a child that exits between samples still counts (100 = one core busy). A tenant's
first sample only primes it. ``tenant_gpu_mem_bytes`` is the device memory NVML attributes to
the tenant's tree (MPS clients are listed too), refreshed once a second.

Sample times are scheduled in absolute monotonic time, ``t_k = t_start + k * interval``, so the
series does not drift; a sample that comes late (the thread was not scheduled) is taken at once
and missed slots are skipped rather than bunched. GPU keys are absent when NVML is unavailable
(mode cpu); a key whose NVML call fails is recorded once in ``errors`` and dropped from later
samples (GPM falls back to the utilization rates), and sampling goes on with what works.
Nothing here raises into the orchestrator.

Lines are buffered and written whole, at most once a second, and fsync'd by ``stop()``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import orjson

from multitenant.run.host import GpmActivity, ProcessTrees, cpu_stat, nvml_handle, nvml_init, steal_iowait_pct
from multitenant.schema import HostActivity

log = logging.getLogger(__name__)

FLUSH_INTERVAL_NS = 1_000_000_000
# Per-process GPU memory is refreshed at most this often (NVML's process query is the costliest
# call of a sample, and a tenant's memory changes slowly); samples in between repeat it.
PROC_MEM_REFRESH_NS = 1_000_000_000
# A tenant's process tree is found anew (a /proc scan) at most this often; samples in between
# read the known members (host.ProcessTrees).
TREE_RESCAN_NS = 1_000_000_000
CLOCK_KEYS = ("sm_clock_mhz", "mem_clock_mhz")  # their range over the window is kept


class TelemetrySampler:
    """Background sampler writing ``telemetry.jsonl`` (see the module docstring).

    ``tenant_pids`` is called at every sample and returns {tenant name: pid} of the tenants that
    run now, so tenants may come and go. ``device_index`` None: CPU figures only.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        device_index: int | None,
        interval_ms: int,
        tenant_pids: Callable[[], Mapping[str, int]],
    ) -> None:
        if interval_ms < 1:
            raise ValueError(f"telemetry interval {interval_ms} ms must be >= 1; use 100")
        self.path = Path(path)
        self.device_index = device_index
        self.interval_ns = int(interval_ms) * 1_000_000
        self.tenant_pids = tenant_pids
        self.errors: list[str] = []  # one entry per failing source, in the order they failed
        self.samples = 0
        self.late_samples = 0  # taken more than one interval after their slot
        self.sample_cpu_ns = 0  # this thread's CPU time spent sampling and writing (thread_time)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._fd: int | None = None
        self._lines: list[bytes] = []
        self._last_flush_ns = 0
        self._nvml: Any = None
        self._handle: Any = None
        self._gpu_fields: dict[str, Callable[[], Any]] = {}
        self.activity_source: str | None = None  # "gpm" | "utilization" | None (no NVML)
        self.activity_note: str | None = None  # why the source is not GPM
        self._gpm: GpmActivity | None = None
        self._trees = ProcessTrees()
        self._tree_scan_ns = -TREE_RESCAN_NS
        self._cpu_prev: dict[str, tuple[int, float]] = {}  # tenant -> (t, tree CPU seconds)
        self._cpu_last: dict[str, float] = {}  # tenant -> its tree's CPU seconds when last seen
        self._lock = threading.Lock()  # the window's clock range and CPU readings
        self._clocks: dict[str, tuple[int, int]] = {}  # clock key -> (min, max) since mark_window
        self._window_t0_ns: int | None = None
        self._window_stat: Any = None
        self._window_cpu: dict[str, float] = {}
        self._proc_mem_ok = True
        self._proc_mem: dict[str, int] = {}
        self._proc_mem_ns = 0

    # -- lifecycle ----------------------------------------------------------------------------

    def start(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        if self.device_index is not None:
            self._open_nvml()
        self._thread = threading.Thread(target=self._loop, name="telemetry", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the thread, write what is buffered, fsync, close. Idempotent; never raises."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None
        if self._fd is not None:
            try:
                self._flush()
                os.fsync(self._fd)
            except OSError as e:
                self._error("write", e)
            finally:
                os.close(self._fd)
                self._fd = None
        if self._gpm is not None:
            self._gpm.close()
            self._gpm = None
        if self._nvml is not None:
            with contextlib.suppress(Exception):
                self._nvml.nvmlShutdown()
            self._nvml = None

    def __enter__(self) -> TelemetrySampler:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stats(self) -> dict[str, Any]:
        """Samples written, late samples, and the sampler's own CPU cost per sample (ns)."""
        return {
            "samples": self.samples,
            "late_samples": self.late_samples,
            "cpu_ns_per_sample": self.sample_cpu_ns // self.samples if self.samples else None,
            "activity_source": self.activity_source,
            "activity_note": self.activity_note,
            "errors": list(self.errors),
        }

    # -- sampling -----------------------------------------------------------------------------

    def _error(self, source: str, e: BaseException) -> None:
        msg = f"{source}: {type(e).__name__}: {e}"
        self.errors.append(msg)
        log.warning("telemetry: %s; continuing without it", msg)

    def _open_nvml(self) -> None:
        nvml = nvml_init()
        if nvml is None:
            self.errors.append("nvml: unavailable (no NVIDIA driver/library); GPU fields omitted")
            return
        assert self.device_index is not None
        found = nvml_handle(nvml, self.device_index)
        if found is None:
            self.errors.append(f"nvml: no handle for cuda:{self.device_index}; GPU fields omitted")
            with contextlib.suppress(Exception):
                nvml.nvmlShutdown()
            return
        self._use_nvml(nvml, found[0])

    def _use_nvml(self, nvml: Any, h: Any) -> None:
        """Sample ``h`` through ``nvml`` (pynvml after nvmlInit, or a test double)."""
        self._nvml, self._handle = nvml, h
        try:
            self._gpm = GpmActivity(nvml, h)
            self.activity_source = "gpm"
        except Exception as e:
            # Not an error: GPUs before Hopper have no GPM.
            self.activity_note = f"no GPM ({type(e).__name__}: {e}); activity from the utilization rates"
            self.activity_source = "utilization"
        self._gpu_fields = {
            "util": lambda: nvml.nvmlDeviceGetUtilizationRates(h),
            "mem_used_bytes": lambda: int(nvml.nvmlDeviceGetMemoryInfo(h).used),
            "power_w": lambda: nvml.nvmlDeviceGetPowerUsage(h) / 1000.0,
            "sm_clock_mhz": lambda: nvml.nvmlDeviceGetClockInfo(h, nvml.NVML_CLOCK_SM),
            "mem_clock_mhz": lambda: nvml.nvmlDeviceGetClockInfo(h, nvml.NVML_CLOCK_MEM),
            "temp_c": lambda: nvml.nvmlDeviceGetTemperature(h, nvml.NVML_TEMPERATURE_GPU),
        }

    def _loop(self) -> None:
        t_start = time.monotonic_ns()
        k = 0
        while True:
            slot = t_start + k * self.interval_ns
            wait_ns = slot - time.monotonic_ns()
            if wait_ns > 0 and self._stop.wait(wait_ns / 1e9):
                return
            if self._stop.is_set():
                return
            cpu0 = time.thread_time_ns()
            now = time.monotonic_ns()
            if now - slot > self.interval_ns:
                self.late_samples += 1
            try:
                self._lines.append(orjson.dumps(self.sample(now)) + b"\n")
                self.samples += 1
                if now - self._last_flush_ns >= FLUSH_INTERVAL_NS:
                    self._flush()
            except Exception as e:  # never let the thread die: record and go on
                if not any(m.startswith("sample:") for m in self.errors):
                    self._error("sample", e)
            self.sample_cpu_ns += time.thread_time_ns() - cpu0
            # Next slot strictly after now: missed slots are skipped, not bunched.
            k = max(k + 1, (time.monotonic_ns() - t_start) // self.interval_ns + 1)

    def sample(self, t: int | None = None) -> dict[str, Any]:
        """One telemetry record (also usable without the thread, e.g. by a benchmark)."""
        t = time.monotonic_ns() if t is None else t
        rec: dict[str, Any] = {"t": t}
        for name, fn in list(self._gpu_fields.items()):
            try:
                v = fn()
            except Exception as e:
                self._error(f"nvml {name}", e)
                del self._gpu_fields[name]
                continue
            if name == "util":
                rec["gpu_util_pct"] = v.gpu
                rec["mem_util_pct"] = v.memory
            else:
                rec[name] = v
        self._activity(rec)
        self._clock_range(rec)
        pids = dict(self.tenant_pids())
        rec["tenant_cpu_pct"] = self._cpu_pct(pids, t)
        if self._nvml is not None and self._proc_mem_ok and t - self._proc_mem_ns >= PROC_MEM_REFRESH_NS:
            self._proc_mem = self._gpu_mem(pids)
            self._proc_mem_ns = t
        rec["tenant_gpu_mem_bytes"] = {n: b for n, b in self._proc_mem.items() if n in pids}
        return rec

    def _activity(self, rec: dict[str, Any]) -> None:
        """GPU activity keys: GPM where it works, else the utilization rates (module docstring)."""
        if self._gpm is not None:
            try:
                rec.update(self._gpm.read())
                return
            except Exception as e:
                self._error("nvml gpm", e)
                self._gpm.close()
                self._gpm = None
                self.activity_source = "utilization"
        if self.activity_source == "utilization" and "gpu_util_pct" in rec:
            rec["sm_active_pct"] = rec["gpu_util_pct"]
            rec["dram_bw_pct"] = rec["mem_util_pct"]

    def _clock_range(self, rec: Mapping[str, Any]) -> None:
        with self._lock:
            for key in CLOCK_KEYS:
                v = rec.get(key)
                if v is not None:
                    lo, hi = self._clocks.get(key, (v, v))
                    self._clocks[key] = (min(lo, v), max(hi, v))

    def _cpu_pct(self, pids: Mapping[str, int], t: int) -> dict[str, float]:
        """CPU % of each tenant's tree since its previous sample; a new tenant is primed."""
        rescan = t - self._tree_scan_ns >= TREE_RESCAN_NS
        if rescan:
            self._tree_scan_ns = t
        seconds = self._trees.cpu_seconds(pids, rescan=rescan)
        out: dict[str, float] = {}
        for name, sec in seconds.items():
            prev = self._cpu_prev.get(name)
            if prev is not None and t > prev[0]:
                out[name] = round(max(0.0, sec - prev[1]) * 1e11 / (t - prev[0]), 1)
            self._cpu_prev[name] = (t, sec)
        for name in [n for n in self._cpu_prev if n not in seconds]:
            del self._cpu_prev[name]
        with self._lock:
            self._cpu_last.update(seconds)
        return out

    # -- the window -----------------------------------------------------------------------------

    def tenant_cpu_seconds(self) -> dict[str, float]:
        """{tenant: cumulative user+system CPU seconds of its process tree} now; a tenant that
        has exited keeps the value of its last sample. Callable from any thread."""
        try:
            now = self._trees.cpu_seconds(dict(self.tenant_pids()))
        except Exception as e:
            self._error("tenant cpu seconds", e)
            now = {}
        with self._lock:
            self._cpu_last.update(now)
            return dict(self._cpu_last)

    def clock_range(self) -> dict[str, tuple[int, int]]:
        """{"sm_clock_mhz" | "mem_clock_mhz": (min, max)} over the samples since ``mark_window``
        (since the start before it is called)."""
        with self._lock:
            return dict(self._clocks)

    def mark_window(self) -> None:
        """Call at the window's start (t0): resets the clock range and reads the CPU counters."""
        stat = cpu_stat()
        cpu = self.tenant_cpu_seconds()
        with self._lock:
            self._clocks = {}
            self._window_t0_ns = time.monotonic_ns()
            self._window_stat = stat
            self._window_cpu = cpu

    def window_activity(self) -> HostActivity:
        """Call at the window's end (t1): steal/iowait, each tenant's CPU seconds, the GPU clock
        range and the activity source since ``mark_window`` (``schema.HostActivity``). Without a
        ``mark_window`` before, the window's fields stay null (the clock range is then the run's)."""
        stat = cpu_stat()
        cpu = self.tenant_cpu_seconds()
        with self._lock:
            t0, stat0, cpu0, clocks = self._window_t0_ns, self._window_stat, self._window_cpu, dict(self._clocks)
        steal, iowait = steal_iowait_pct(stat0, stat)
        sm, mem = clocks.get("sm_clock_mhz"), clocks.get("mem_clock_mhz")
        return HostActivity(
            window_s=None if t0 is None else round((time.monotonic_ns() - t0) / 1e9, 3),
            steal_pct=steal,
            iowait_pct=iowait,
            tenant_cpu_s={n: round(max(0.0, s - cpu0[n]), 3) for n, s in cpu.items() if n in cpu0},
            gpu_activity_source=self.activity_source,
            sm_clock_mhz_min=sm[0] if sm else None,
            sm_clock_mhz_max=sm[1] if sm else None,
            mem_clock_mhz_min=mem[0] if mem else None,
            mem_clock_mhz_max=mem[1] if mem else None,
        )

    def _gpu_mem(self, pids: Mapping[str, int]) -> dict[str, int]:
        """Device memory per tenant from NVML's process list (which lists MPS clients too)."""
        nvml, h = self._nvml, self._handle
        families: dict[str, list[int]] = {}
        for name, pid in pids.items():
            families[name] = self._trees.members.get(name) or [pid]
        wanted = {pid for fam in families.values() for pid in fam}
        used: dict[int, int] = {}
        try:
            for proc in nvml.nvmlDeviceGetComputeRunningProcesses(h):
                if getattr(proc, "usedGpuMemory", None) is not None:
                    used[int(proc.pid)] = int(proc.usedGpuMemory)
        except Exception as e:
            self._error("nvml process list", e)
            self._proc_mem_ok = False
            return {}
        if wanted and not wanted & used.keys():
            # Older drivers list MPS clients only through the MPS variant.
            with contextlib.suppress(Exception):
                for proc in nvml.nvmlDeviceGetMPSComputeRunningProcesses(h):
                    if getattr(proc, "usedGpuMemory", None) is not None:
                        used[int(proc.pid)] = int(proc.usedGpuMemory)
        out: dict[str, int] = {}
        for name, family in families.items():
            found = [used[pid] for pid in family if pid in used]
            if found:
                out[name] = sum(found)
        return out

    def _flush(self) -> None:
        self._last_flush_ns = time.monotonic_ns()
        if not self._lines or self._fd is None:
            return
        data, self._lines = b"".join(self._lines), []
        view = memoryview(data)
        while view:
            n = os.write(self._fd, view)
            view = view[n:]
