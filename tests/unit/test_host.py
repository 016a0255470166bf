"""multitenant.run.host: the host fingerprint, steal/iowait from /proc/stat, process-tree CPU."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from multitenant.run import host
from multitenant.schema import HostInfo, from_dict, to_dict


def test_fingerprint_fills_what_this_host_says() -> None:
    info = host.host_fingerprint()
    assert info.hostname and info.python and info.cpu_count == os.cpu_count()
    assert info.kernel and (info.total_memory_bytes or 0) > 0
    assert (info.logical_cores or 0) >= 1 and info.load_avg_1m is not None
    if Path("/proc/cpuinfo").exists():
        assert info.virtualization is not None and info.virtualization_evidence
    assert from_dict(HostInfo, to_dict(info)) == info  # round-trips through manifest.json


def test_gvisor_is_recognised_by_its_banner(monkeypatch: pytest.MonkeyPatch) -> None:
    banner = "Linux version 4.4.0 #1 SMP Sun Jan 10 15:06:54 PST 2016"
    monkeypatch.setattr(host, "_read", lambda path: banner if path == "/proc/version" else None)
    assert host.virtualization()[0] == "gvisor"


def test_hypervisor_flag_alone_says_vm(monkeypatch: pytest.MonkeyPatch) -> None:
    files = {"/proc/cpuinfo": "model name\t: X\nflags\t\t: fpu sse hypervisor\n"}
    monkeypatch.setattr(host, "_read", files.get)
    monkeypatch.setattr(host.shutil, "which", lambda name: None)
    assert host.virtualization() == ("vm", ["cpu flag hypervisor: yes"])
    files["/proc/cpuinfo"] = "flags\t\t: fpu sse\n"
    assert host.virtualization()[0] == "none"


def test_steal_and_iowait_between_two_readings(tmp_path: Path) -> None:
    stat = tmp_path / "stat"
    stat.write_text("cpu  100 0 50 800 20 0 0 30 0 0\ncpu0 1 2 3\n")
    a = host.cpu_stat(str(stat))
    stat.write_text("cpu  150 0 70 900 40 0 0 40 0 0\n")
    b = host.cpu_stat(str(stat))
    assert a == host.CpuStat(total=1000, iowait=20, steal=30)
    assert host.steal_iowait_pct(a, b) == (5.0, 10.0)  # 10 and 20 of 200 ticks
    assert host.steal_iowait_pct(b, a) == (None, None) and host.steal_iowait_pct(None, b) == (None, None)
    assert host.cpu_stat(str(tmp_path / "missing")) is None


BUSY_CHILD = r"""
import subprocess, sys, time
subprocess.Popen([sys.executable, "-c", "import time\nt=time.time()\nwhile time.time()-t<30: pass"])
time.sleep(30)
"""


def test_tree_cpu_counts_a_busy_child_of_an_idle_parent() -> None:
    parent = subprocess.Popen([sys.executable, "-c", BUSY_CHILD])
    trees = host.ProcessTrees()
    try:
        deadline = time.monotonic() + 10
        while len(trees.members.get("t", [])) < 2 and time.monotonic() < deadline:
            trees.cpu_seconds({"t": parent.pid})
            time.sleep(0.05)
        a, t0 = trees.cpu_seconds({"t": parent.pid})["t"], time.monotonic()
        time.sleep(1.0)
        b, t1 = trees.cpu_seconds({"t": parent.pid})["t"], time.monotonic()
        alone = host._cpu_seconds(host.psutil.Process(parent.pid).cpu_times())
    finally:
        for c in host.psutil.Process(parent.pid).children(recursive=True):
            c.kill()
        parent.kill()
        parent.wait()
    pct = 100 * (b - a) / (t1 - t0)
    assert pct > 40, pct  # one core busy (shared CI cores: at least 40 %)
    assert alone < 0.5  # the parent itself only sleeps
    assert trees.cpu_seconds({"gone": parent.pid}) == {}
