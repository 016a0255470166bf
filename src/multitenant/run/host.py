"""The machine a run runs on: its fingerprint at the start (``host_fingerprint``), the CPU's
steal and iowait over a window (``cpu_stat`` twice, then ``steal_iowait_pct``), the CPU time of a
tenant's whole process tree (``ProcessTrees``), which the telemetry sampler turns into
``tenant_cpu_pct`` and the window's ``tenant_cpu_s``; and the GPU through NVML: ``gpu_info``
(the manifest's ``gpu`` block) and ``GpmActivity`` (the GPM metrics the sampler records).

Everything here is cheap (a few small /proc and /sys reads, one optional ``systemd-detect-virt``
of at most 2 s, once per run) and never raises: what cannot be read is None.
"""

from __future__ import annotations

import contextlib
import os
import platform
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

from multitenant.run.mps.env import MpsError, physical_device
from multitenant.schema import GpuInfo, HostInfo

COMPUTE_MODES = {0: "Default", 1: "Exclusive_Thread", 2: "Prohibited", 3: "Exclusive_Process"}
# NVML GPM metrics (telemetry key, pynvml constant), computed between two GPM samples.
GPM_METRICS = (
    ("sm_active_pct", "NVML_GPM_METRIC_SM_UTIL"),
    ("sm_occupancy_pct", "NVML_GPM_METRIC_SM_OCCUPANCY"),
    ("dram_bw_pct", "NVML_GPM_METRIC_DRAM_BW_UTIL"),
    ("tensor_active_pct", "NVML_GPM_METRIC_ANY_TENSOR_UTIL"),
)
# GPM samples closer than this give noisy metrics: a faster telemetry clock repeats the last values.
GPM_MIN_INTERVAL_NS = 100_000_000
# /proc/version of gVisor (runsc): a fixed, made-up Linux 4.4.0 banner.
GVISOR_VERSION_MARK = "#1 SMP Sun Jan 10 15:06:54 PST 2016"


def _read(path: str) -> str | None:
    try:
        return Path(path).read_text(errors="replace")
    except OSError:
        return None


def _cpuinfo_field(text: str | None, key: str) -> str | None:
    for line in (text or "").splitlines():
        name, _, value = line.partition(":")
        if name.strip() == key:
            return value.strip()
    return None


def virtualization() -> tuple[str | None, list[str]]:
    """(hint, evidence): ``"gvisor"``, a hypervisor name from ``systemd-detect-virt --vm``,
    ``"vm"`` (the CPU's ``hypervisor`` flag alone), ``"none"``, or None when nothing could be
    read; evidence lists what each source said."""
    evidence: list[str] = []
    version = _read("/proc/version")
    if version and GVISOR_VERSION_MARK in version:
        evidence.append("/proc/version: gVisor's fixed banner")
        return "gvisor", evidence
    name: str | None = None
    tool = shutil.which("systemd-detect-virt")
    if tool:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            out = subprocess.run([tool, "--vm"], capture_output=True, text=True, timeout=2).stdout.strip()
            if out:
                evidence.append(f"systemd-detect-virt --vm: {out}")
                name = out
    vendor = _read("/sys/class/dmi/id/sys_vendor")
    if vendor and vendor.strip():
        evidence.append(f"dmi sys_vendor: {vendor.strip()}")
    flags = _cpuinfo_field(_read("/proc/cpuinfo"), "flags")
    if flags is not None:
        has = "hypervisor" in flags.split()
        evidence.append(f"cpu flag hypervisor: {'yes' if has else 'no'}")
        if name in (None, "none") and has:
            name = "vm"
        elif name is None:
            name = "none"
    return name, evidence


def host_fingerprint() -> HostInfo:
    """The manifest's ``host`` block: name, OS, Python, CPU (model, cores, frequency), load at
    the start, virtualization hint, kernel and memory. Never raises."""
    info = HostInfo(
        hostname=socket.gethostname(),
        platform=platform.platform(),
        python=platform.python_version(),
        cpu_count=os.cpu_count(),
        kernel=platform.release(),
    )
    info.cpu_model = _cpuinfo_field(_read("/proc/cpuinfo"), "model name") or platform.processor() or None
    with contextlib.suppress(Exception):
        info.logical_cores = psutil.cpu_count(logical=True)
        info.physical_cores = psutil.cpu_count(logical=False)
    with contextlib.suppress(Exception):
        freq = psutil.cpu_freq()
        if freq is not None:
            # min/max are 0 where the kernel does not expose them (a VM): null, not 0 MHz
            info.cpu_freq_mhz = {k: round(v, 1) for k, v in freq._asdict().items() if v}
    with contextlib.suppress(OSError, AttributeError):
        info.load_avg_1m, info.load_avg_5m, info.load_avg_15m = (round(x, 2) for x in os.getloadavg())
    with contextlib.suppress(Exception):
        info.total_memory_bytes = int(psutil.virtual_memory().total)
    info.virtualization, info.virtualization_evidence = virtualization()
    return info


# ---------------------------------------------------------------------------------------------
# Steal and iowait


@dataclass(frozen=True)
class CpuStat:
    """The aggregate ``cpu`` line of /proc/stat, in clock ticks (all CPUs together)."""

    total: int  # user+nice+system+idle+iowait+irq+softirq+steal (guest is inside user)
    iowait: int
    steal: int


def cpu_stat(path: str = "/proc/stat") -> CpuStat | None:
    """The counters now; None where /proc/stat is absent or unreadable."""
    text = _read(path)
    for line in (text or "").splitlines():
        parts = line.split()
        if parts and parts[0] == "cpu":
            try:
                v = [int(x) for x in parts[1:9]] + [0] * (8 - len(parts[1:9]))
            except ValueError:
                return None
            return CpuStat(total=sum(v), iowait=v[4], steal=v[7])
    return None


def steal_iowait_pct(a: CpuStat | None, b: CpuStat | None) -> tuple[float | None, float | None]:
    """(steal %, iowait %) of all CPU time between two readings; None where not measurable."""
    if a is None or b is None or b.total <= a.total:
        return None, None
    dt = b.total - a.total
    return round(100.0 * (b.steal - a.steal) / dt, 2), round(100.0 * (b.iowait - a.iowait) / dt, 2)


# ---------------------------------------------------------------------------------------------
# CPU time of process trees


def _cpu_seconds(times: Any) -> float:
    # children_*: what the process's waited-for (reaped) descendants used, so a child that
    # exited between two readings still counts, through the parent that reaped it.
    return float(times.user + times.system + getattr(times, "children_user", 0.0) + getattr(times, "children_system", 0.0))


def _children_map() -> dict[int, list[int]]:
    """{pid: its child pids} of every process, from /proc/<pid>/stat (about 13 us a process;
    psutil.process_iter takes about 40)."""
    children: dict[int, list[int]] = {}
    try:
        names = os.listdir("/proc")
    except OSError:
        return children
    for name in names:
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                data = f.read()
            ppid = int(data[data.rfind(b")") + 2 :].split(b" ", 2)[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(name))
    return children


class ProcessTrees:
    """CPU seconds of each tenant's whole process tree: the tenant and every descendant (a vLLM
    engine core, a launched server and its workers). The trees are found anew by a /proc scan
    (``rescan=True``, which the sampler asks for once a second and whenever a tenant is new), so
    processes that start later join; in between, the known members' psutil.Process objects are
    read again (one stat read each).

    The seconds are cumulative: user+system of the live members plus what their reaped children
    used (``children_user``/``children_system``), so a child that exits between two readings
    still counts through the member that reaped it, and the difference of two readings is the
    tree's CPU time in between. A process that joins at a rescan brings the CPU it used since it
    started into that interval (a rate may spike once, at a process start; the seconds stay
    right). A descendant not reaped by a member (re-parented to init) takes its time with it
    when it exits, which can lower the sum: callers clamp differences at 0.
    Thread-safe: the sampler thread and the orchestrator may read at the same time.
    """

    def __init__(self) -> None:
        self._procs: dict[int, psutil.Process] = {}
        self._lock = threading.Lock()
        self.members: dict[str, list[int]] = {}  # the last reading's trees, by tenant
        self._roots: dict[str, int] = {}

    def _process(self, pid: int) -> psutil.Process:
        p = self._procs.get(pid)
        if p is None:
            p = psutil.Process(pid)
            self._procs[pid] = p
        return p

    def cpu_seconds(self, roots: Mapping[str, int], rescan: bool = True) -> dict[str, float]:
        """{tenant: cumulative CPU seconds of its tree} for the tenants whose root is alive."""
        with self._lock:
            rescan = rescan or any(self._roots.get(n) != pid for n, pid in roots.items())
            children = _children_map() if rescan and roots else {}
            out: dict[str, float] = {}
            members: dict[str, list[int]] = {}
            for name, root in roots.items():
                tree = self._tree(root, children) if rescan else self.members.get(name, [root])
                total, alive = 0.0, []
                for pid in tree:
                    try:
                        total += _cpu_seconds(self._process(pid).cpu_times())
                        alive.append(pid)
                    except psutil.Error:
                        self._procs.pop(pid, None)
                if root in alive:
                    out[name] = total
                    members[name] = alive
            seen = {pid for tree in members.values() for pid in tree}
            for pid in [p for p in self._procs if p not in seen]:
                del self._procs[pid]
            self.members, self._roots = members, dict(roots)
            return out

    @staticmethod
    def _tree(root: int, children: Mapping[int, list[int]]) -> list[int]:
        tree: list[int] = []
        todo = [root]
        while todo:
            pid = todo.pop()
            if pid not in tree:
                tree.append(pid)
                todo.extend(children.get(pid, ()))
        return tree


# ---------------------------------------------------------------------------------------------
# The GPU (NVML)


def nvml_init() -> Any:
    """pynvml after a successful nvmlInit, else None (no library, no driver, no GPU)."""
    try:
        import pynvml

        pynvml.nvmlInit()
        return pynvml
    except Exception:  # NVMLError_LibraryNotFound, DriverNotLoaded, ImportError, ...
        return None


def nvml_handle(nvml: Any, device_index: int) -> tuple[Any, int] | None:
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
    nvml = nvml_init()
    if nvml is None:
        return None
    try:
        found = nvml_handle(nvml, device_index)
        if found is None:
            return None
        h, nvml_index = found
        mem = _try(lambda: nvml.nvmlDeviceGetMemoryInfo(h))
        cuda_v = _try(nvml.nvmlSystemGetCudaDriverVersion_v2) or _try(nvml.nvmlSystemGetCudaDriverVersion)
        mig = _try(lambda: nvml.nvmlDeviceGetMigMode(h))
        pers = _try(lambda: nvml.nvmlDeviceGetPersistenceMode(h))
        cmode = _try(lambda: nvml.nvmlDeviceGetComputeMode(h))
        attrs = _try(lambda: nvml.nvmlDeviceGetAttributes(h))
        power_limit = _try(lambda: nvml.nvmlDeviceGetEnforcedPowerLimit(h))
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
            power_limit_w=power_limit / 1000.0 if power_limit is not None else None,
        )
    finally:
        with contextlib.suppress(Exception):
            nvml.nvmlShutdown()


class GpmActivity:
    """NVML GPM device metrics (``GPM_METRICS``) between consecutive ``read()`` calls. Raises from
    the constructor where the GPU (or driver) has no GPM; the caller falls back."""

    def __init__(self, nvml: Any, handle: Any) -> None:
        if not nvml.nvmlGpmQueryDeviceSupport(handle).isSupportedDevice:
            raise RuntimeError("GPM is not supported on this GPU (Hopper or later has it)")
        self._nvml, self._handle = nvml, handle
        self._ids = [(key, getattr(nvml, const)) for key, const in GPM_METRICS]
        self._prev = nvml.nvmlGpmSampleAlloc()
        self._cur = nvml.nvmlGpmSampleAlloc()
        nvml.nvmlGpmSampleGet(handle, self._prev)
        self._prev_ns = time.monotonic_ns()
        self._last: dict[str, float] = {}

    def read(self) -> dict[str, float]:
        """The metrics since the previous read (the last values again if that was under 100 ms)."""
        now = time.monotonic_ns()
        if now - self._prev_ns < GPM_MIN_INTERVAL_NS:
            return self._last
        nvml = self._nvml
        nvml.nvmlGpmSampleGet(self._handle, self._cur)
        get = nvml.c_nvmlGpmMetricsGet_t()
        get.version = nvml.NVML_GPM_METRICS_GET_VERSION
        get.numMetrics = len(self._ids)
        get.sample1, get.sample2 = self._prev, self._cur
        for i, (_, metric_id) in enumerate(self._ids):
            get.metrics[i].metricId = metric_id
        nvml.nvmlGpmMetricsGet(get)
        self._prev, self._cur, self._prev_ns = self._cur, self._prev, now
        ok = nvml.NVML_SUCCESS
        self._last = {
            key: round(float(get.metrics[i].value), 1)
            for i, (key, _) in enumerate(self._ids)
            if get.metrics[i].nvmlReturn == ok
        }
        return self._last

    def close(self) -> None:
        for sample in (self._prev, self._cur):
            with contextlib.suppress(Exception):
                self._nvml.nvmlGpmSampleFree(sample)
