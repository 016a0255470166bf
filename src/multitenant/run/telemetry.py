"""GPU and tenant telemetry: ``gpu_info()`` for the manifest, ``TelemetrySampler`` -> telemetry.jsonl.

The sampler is a thread in the orchestrator (never in a tenant, so a tenant's timing is not
touched by it). Every ``interval_ms`` it writes one flat JSON line on the tenants' clock,
``t`` = ``time.monotonic_ns()`` (INTERFACES.md, "telemetry.jsonl")::

    {"t": ns, "gpu_util_pct", "mem_util_pct", "mem_used_bytes", "power_w", "sm_clock_mhz",
     "mem_clock_mhz", "temp_c", "tenant_cpu_pct": {name: pct}, "tenant_gpu_mem_bytes": {name: bytes}}

Units: ``gpu_util_pct``/``mem_util_pct`` are NVML's utilization rates (percent of the last
sample period in which a kernel ran / device memory was read or written); ``power_w`` is the
board's draw in watts (NVML reports mW); clocks in MHz; ``temp_c`` in degrees Celsius;
``tenant_cpu_pct`` is psutil's CPU percent of the tenant process since the previous sample
(100 = one core busy); ``tenant_gpu_mem_bytes`` is the device memory NVML attributes to the
tenant's PID (or its children; MPS clients are listed too), refreshed once a second.

Sample times are scheduled in absolute monotonic time, ``t_k = t_start + k * interval``, so the
series does not drift; a sample that comes late (the thread was not scheduled) is taken at once
and missed slots are skipped rather than bunched. GPU keys are absent when NVML is unavailable
(mode cpu); a key whose NVML call fails is recorded once in ``errors`` and dropped from later
samples, and sampling goes on with what works. Nothing here raises into the orchestrator.

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
import psutil

from multitenant.run.mps.env import MpsError, physical_device
from multitenant.schema import GpuInfo

log = logging.getLogger(__name__)

COMPUTE_MODES = {0: "Default", 1: "Exclusive_Thread", 2: "Prohibited", 3: "Exclusive_Process"}
FLUSH_INTERVAL_NS = 1_000_000_000
# Per-process GPU memory is refreshed at most this often (NVML's process query is the costliest
# call of a sample, and a tenant's memory changes slowly); samples in between repeat it.
PROC_MEM_REFRESH_NS = 1_000_000_000


def _nvml() -> Any:
    """pynvml after a successful nvmlInit, else None (no library, no driver, no GPU)."""
    try:
        import pynvml

        pynvml.nvmlInit()
        return pynvml
    except Exception:  # NVMLError_LibraryNotFound, DriverNotLoaded, ImportError, ...
        return None


def _handle(nvml: Any, device_index: int) -> tuple[Any, int] | None:
    """The NVML handle of the harness's ``cuda:<device_index>`` and its NVML index.

    CUDA and NVML agree on indices under ``CUDA_DEVICE_ORDER=PCI_BUS_ID`` (set for daemons and
    tenants by run.mps); ``CUDA_VISIBLE_DEVICES`` of the harness is followed, by index or
    by UUID. MIG instances are not supported (None).
    """
    try:
        phys = physical_device(device_index)
    except MpsError:
        return None
    try:
        if phys.isdigit():
            h = nvml.nvmlDeviceGetHandleByIndex(int(phys))
            return h, int(phys)
        if phys.startswith("GPU-"):
            h = nvml.nvmlDeviceGetHandleByUUID(phys)
            return h, int(nvml.nvmlDeviceGetIndex(h))
    except Exception:
        return None
    return None


def _try(fn: Callable[[], Any]) -> Any:
    try:
        return fn()
    except Exception:
        return None


def _text(v: Any) -> Any:
    return v.decode() if isinstance(v, bytes) else v


def gpu_info(device_index: int | None) -> GpuInfo | None:
    """The manifest's ``gpu`` block for ``cuda:<device_index>``; None without NVML. Never raises.

    ``sm_count`` comes from ``nvmlDeviceGetAttributes`` where the driver answers it (null
    otherwise: NVML has no general SM-count query; the tenants report the SMs they see).
    ``cuda_driver_version`` is the CUDA version the driver supports, e.g. "13.0".
    Compute mode, MIG mode and persistence mode are read, never changed.
    """
    if device_index is None:
        return None
    nvml = _nvml()
    if nvml is None:
        return None
    try:
        found = _handle(nvml, device_index)
        if found is None:
            return None
        h, nvml_index = found
        mem = _try(lambda: nvml.nvmlDeviceGetMemoryInfo(h))
        cuda_v = _try(nvml.nvmlSystemGetCudaDriverVersion_v2) or _try(nvml.nvmlSystemGetCudaDriverVersion)
        mig = _try(lambda: nvml.nvmlDeviceGetMigMode(h))
        pers = _try(lambda: nvml.nvmlDeviceGetPersistenceMode(h))
        cmode = _try(lambda: nvml.nvmlDeviceGetComputeMode(h))
        attrs = _try(lambda: nvml.nvmlDeviceGetAttributes(h))
        return GpuInfo(
            index=nvml_index,
            name=_text(_try(lambda: nvml.nvmlDeviceGetName(h))),
            uuid=_text(_try(lambda: nvml.nvmlDeviceGetUUID(h))),
            sm_count=getattr(attrs, "multiprocessorCount", None) or None,
            memory_total_bytes=int(mem.total) if mem is not None else None,
            driver_version=_text(_try(nvml.nvmlSystemGetDriverVersion)),
            cuda_driver_version=f"{cuda_v // 1000}.{cuda_v % 1000 // 10}" if cuda_v else None,
            compute_mode=COMPUTE_MODES.get(cmode, str(cmode)) if cmode is not None else None,
            mig_mode=None if mig is None else ("enabled" if mig[0] else "disabled"),
            persistence_mode=None if pers is None else ("enabled" if pers else "disabled"),
        )
    finally:
        with contextlib.suppress(Exception):
            nvml.nvmlShutdown()


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
        self._procs: dict[int, psutil.Process] = {}
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
            "errors": list(self.errors),
        }

    # -- sampling -----------------------------------------------------------------------------

    def _error(self, source: str, e: BaseException) -> None:
        msg = f"{source}: {type(e).__name__}: {e}"
        self.errors.append(msg)
        log.warning("telemetry: %s; continuing without it", msg)

    def _open_nvml(self) -> None:
        nvml = _nvml()
        if nvml is None:
            self.errors.append("nvml: unavailable (no NVIDIA driver/library); GPU fields omitted")
            return
        assert self.device_index is not None
        found = _handle(nvml, self.device_index)
        if found is None:
            self.errors.append(f"nvml: no handle for cuda:{self.device_index}; GPU fields omitted")
            with contextlib.suppress(Exception):
                nvml.nvmlShutdown()
            return
        self._nvml, (h, _) = nvml, found
        self._handle = h
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
        rec: dict[str, Any] = {"t": time.monotonic_ns() if t is None else t}
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
        pids = dict(self.tenant_pids())
        rec["tenant_cpu_pct"] = self._cpu_pct(pids)
        if self._nvml is not None and self._proc_mem_ok and rec["t"] - self._proc_mem_ns >= PROC_MEM_REFRESH_NS:
            self._proc_mem = self._gpu_mem(pids)
            self._proc_mem_ns = rec["t"]
        rec["tenant_gpu_mem_bytes"] = {n: b for n, b in self._proc_mem.items() if n in pids}
        return rec

    def _cpu_pct(self, pids: Mapping[str, int]) -> dict[str, float]:
        """psutil CPU% since the previous sample; a new PID is primed and reported next time."""
        out: dict[str, float] = {}
        for name, pid in pids.items():
            p = self._procs.get(pid)
            try:
                if p is None:
                    p = psutil.Process(pid)
                    p.cpu_percent(None)  # prime: the first call has no interval to measure
                    self._procs[pid] = p
                    continue
                out[name] = round(p.cpu_percent(None), 1)
            except psutil.Error:
                self._procs.pop(pid, None)  # exited: drop it
        live = set(pids.values())
        for pid in [p for p in self._procs if p not in live]:
            del self._procs[pid]
        return out

    def _gpu_mem(self, pids: Mapping[str, int]) -> dict[str, int]:
        """Device memory per tenant from NVML's process list (which lists MPS clients too)."""
        nvml, h = self._nvml, self._handle
        families: dict[str, list[int]] = {}
        for name, pid in pids.items():
            family = [pid]
            p = self._procs.get(pid)
            if p is not None:
                with contextlib.suppress(psutil.Error):
                    family += [c.pid for c in p.children(recursive=True)]
            families[name] = family
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
