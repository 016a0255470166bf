"""multitenant.run.mps and multitenant.run.telemetry against the real CUDA MPS on a GPU machine.

Skipped without a CUDA GPU and ``nvidia-cuda-mps-control``. Run by scripts/gpu_mps_probe.sh
(results in docs/validation/mps-probe-h100.md). Each client is a separate Python process that
opens a CUDA context, reports what it sees as one JSON line, then holds the context until its
stdin closes, so the checks run while it is attached.
"""

from __future__ import annotations

import importlib.util
import json
import os
import select
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

torch = pytest.importorskip("torch")

from multitenant.config.schema import ShareConfig  # noqa: E402
from multitenant.run import host, telemetry  # noqa: E402
from multitenant.run.mps import MpsDaemon, MpsError  # noqa: E402
from multitenant.run.mps import control as mps_control  # noqa: E402
from multitenant.run.mps import daemon as mps_daemon  # noqa: E402
from multitenant.run.mps import env as mps_env  # noqa: E402
from multitenant.run.mps import logs as mps_logs  # noqa: E402
from multitenant.schema import to_dict  # noqa: E402

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.skipif(mps_control.control_binary() is None, reason="needs nvidia-cuda-mps-control"),
]

CLIENT = r"""
import json, os, sys, torch
x = torch.ones(1 << 20, device="cuda")
torch.cuda.synchronize()
p = torch.cuda.get_device_properties(0)
alloc_ok = None
want = int(os.environ.get("PROBE_ALLOC_BYTES", "0"))
if want:
    try:
        y = torch.empty(want, dtype=torch.uint8, device="cuda"); y.fill_(1); torch.cuda.synchronize()
        alloc_ok = True
    except Exception as e:
        alloc_ok = f"{type(e).__name__}: {str(e).splitlines()[0]}"
print(json.dumps({"pid": os.getpid(), "sms": p.multi_processor_count, "devices": torch.cuda.device_count(),
                  "name": p.name, "alloc": alloc_ok}), flush=True)
loop_s = float(os.environ.get("PROBE_LOOP_S", "0"))
if loop_s:
    import time
    a = torch.randn(4096, 4096, device="cuda"); t = time.monotonic(); status = "ok"
    try:
        while time.monotonic() - t < loop_s:
            a = torch.tanh(a @ a); torch.cuda.synchronize()
    except Exception as e:
        status = f"{type(e).__name__}: {str(e).splitlines()[0]}"
    print(json.dumps({"loop": status}), flush=True)
sys.stdin.read()
"""

FAULT = r"""
import cupy as cp
k = cp.RawKernel(r'extern "C" __global__ void k() { *((volatile int*)0x10) = 1; }', "k")
cp.zeros(1).sum()
k((1,), (1,), ()); cp.cuda.runtime.deviceSynchronize()
"""


def _evidence(name: str, data: object) -> None:
    """Print (pytest -s) and, when MT_GPU_EVIDENCE_DIR is set, keep a JSON copy."""
    print(f"EVIDENCE {name}: {json.dumps(data, default=str)}")
    out = os.environ.get("MT_GPU_EVIDENCE_DIR")
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / f"{name}.json").write_text(json.dumps(data, indent=1, default=str))


class Client:
    def __init__(self, env: dict[str, str], extra: dict[str, str] | None = None) -> None:
        env = dict(env, **(extra or {}))
        self.proc = subprocess.Popen(
            [sys.executable, "-c", CLIENT], env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        self.info: dict = {}

    def wait_ready(self, timeout_s: float = 120.0) -> dict:
        self.info = self.next_line(timeout_s)
        return self.info

    def next_line(self, timeout_s: float) -> dict:
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout_s)
        assert ready, "client did not report within the timeout"
        line = self.proc.stdout.readline()
        assert line, f"client exited with {self.proc.wait()} before reporting"
        return json.loads(line)

    def close(self) -> int:
        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            try:
                self.proc.stdin.close()
                return self.proc.wait(timeout=30)
            except (subprocess.TimeoutExpired, BrokenPipeError):
                self.proc.kill()
        return self.proc.wait()


def _mps_processes() -> list[int]:
    """Live MPS processes (zombies excluded: on the test machine PID 1 does not reap the
    daemon's intermediate fork, and a reparented daemon that exited stays a zombie)."""
    out = []
    for p in psutil.process_iter(["name", "cmdline", "status"]):
        cmd = " ".join(p.info["cmdline"] or []) + " " + (p.info["name"] or "")
        if "nvidia-cuda-mps" in cmd and p.info["status"] != psutil.STATUS_ZOMBIE:
            out.append(p.pid)
    return out


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[MpsDaemon]:
    before = _mps_processes()
    d = mps_daemon.start_daemon(mps_env.default_pipe_dir(0, "gputest-" + uuid.uuid4().hex[:8]), tmp_path / "mps_log", 0, 30)
    yield d
    res = mps_daemon.stop_daemon(d, 30)
    _evidence(f"stop-{d.pipe_dir.name}", {"clean": res.clean, "actions": res.actions, "left": res.left_pids})
    assert res.clean, res
    assert sorted(_mps_processes()) == sorted(before), "an MPS process survived stop_daemon"
    assert not d.pipe_dir.exists()


def _env(d: MpsDaemon | None, share: dict) -> dict[str, str]:
    cfg = ShareConfig(**share)
    if d is None:
        return mps_env.child_env(os.environ, mps_env.tenant_env(cfg, 0, None, None))
    return mps_env.child_env(os.environ, mps_env.tenant_env(cfg, 0, d.pipe_dir, d.log_dir))


def test_clients_attach_and_see_their_share(daemon: MpsDaemon) -> None:
    clients = {
        "full": Client(_env(daemon, {})),
        "half": Client(_env(daemon, {"active_thread_pct": 50})),
        "quarter": Client(_env(daemon, {"active_thread_pct": 25, "priority": 1})),
    }
    try:
        info = {name: c.wait_ready() for name, c in clients.items()}
        servers = mps_control.server_pids(daemon)
        clients_of = mps_control.all_client_pids(daemon)
        attached = mps_control.verify_clients(daemon, {n: i["pid"] for n, i in info.items()})
        _evidence("share-sms", {"info": info, "servers": servers, "clients_of": clients_of, "attached": attached})
        assert len(servers) == 1
        assert attached == {"full": True, "half": True, "quarter": True}
        full = info["full"]["sms"]
        assert all(i["devices"] == 1 for i in info.values())  # the daemon's GPU only, as device 0
        # The SM count a client sees follows its percentage (rounded by the driver to whole TPCs).
        assert abs(info["half"]["sms"] - full * 0.50) <= 2, info
        assert abs(info["quarter"]["sms"] - full * 0.25) <= 2, info
    finally:
        codes = {n: c.close() for n, c in clients.items()}
    assert codes == {"full": 0, "half": 0, "quarter": 0}
    assert mps_control.server_pids(daemon) in ([], servers)  # the server may linger until quit
    assert mps_logs.read_server_log_errors(daemon.log_dir) == []  # routine lines are not faults


def test_refuses_when_a_daemon_already_answers(daemon: MpsDaemon) -> None:
    with pytest.raises(MpsError, match="already answers"):
        mps_daemon.start_daemon(daemon.pipe_dir, daemon.log_dir, 0, 10)
    assert mps_control.daemon_answers(daemon.pipe_dir)
    ext = mps_daemon.external_daemon(daemon.pipe_dir, daemon.log_dir)  # mode mps_external: never stopped
    assert ext.control_pid == daemon.control_pid
    assert mps_daemon.stop_daemon(ext, 5).clean and mps_control.daemon_answers(daemon.pipe_dir)


def test_timeslice_tenant_is_not_a_client(daemon: MpsDaemon) -> None:
    mps_client = Client(_env(daemon, {"active_thread_pct": 50}))
    plain = Client(_env(None, {"active_thread_pct": 50}))
    try:
        a, b = mps_client.wait_ready(), plain.wait_ready()
        attached = mps_control.verify_clients(daemon, {"mps": a["pid"], "timeslice": b["pid"]})
        _evidence("timeslice-vs-mps", {"mps": a, "timeslice": b, "attached": attached})
        assert attached == {"mps": True, "timeslice": False}
        assert b["sms"] > a["sms"]  # the share is not applied without MPS
        assert "WITHOUT MPS" in mps_control.unattached_message(["timeslice"], daemon)
    finally:
        mps_client.close()
        plain.close()


def test_pinned_memory_limit_is_enforced(daemon: MpsDaemon) -> None:
    limited = Client(_env(daemon, {"pinned_mem_limit": "0=1G"}), {"PROBE_ALLOC_BYTES": str(2 << 30)})
    small = Client(_env(daemon, {"pinned_mem_limit": "0=1G"}), {"PROBE_ALLOC_BYTES": str(256 << 20)})
    try:
        a, b = limited.wait_ready(), small.wait_ready()
    finally:
        limited.close()
        small.close()
    errors = mps_logs.read_server_log_errors(daemon.log_dir)
    _evidence("pinned-limit", {"over": a, "under": b, "log_errors": errors})
    assert b["alloc"] is True
    assert a["alloc"] is not True and "memory" in a["alloc"].lower()


def test_stop_with_a_client_still_attached(tmp_path: Path) -> None:
    before = _mps_processes()
    d = mps_daemon.start_daemon(mps_env.default_pipe_dir(0, "gputest-wedge-" + uuid.uuid4().hex[:6]), tmp_path / "log", 0, 30)
    c = Client(_env(d, {"active_thread_pct": 50}))
    try:
        c.wait_ready()
        assert mps_control.verify_clients(d, {"c": c.info["pid"]}) == {"c": True}
        t0 = time.monotonic()
        res = mps_daemon.stop_daemon(d, 20)
        took = time.monotonic() - t0
        client_alive = c.proc.poll() is None
    finally:
        code = c.close()
    _evidence("stop-with-client", {"clean": res.clean, "actions": res.actions, "took_s": round(took, 2),
                                   "client_alive_after_stop": client_alive, "client_exit": code,
                                   "log_errors": mps_logs.read_server_log_errors(tmp_path / "log")})
    assert res.clean, res
    assert sorted(_mps_processes()) == sorted(before)


@pytest.mark.skipif(importlib.util.find_spec("cupy") is None, reason="the fault kernel needs CuPy")
def test_client_fault_reaches_the_other_client_and_the_log(daemon: MpsDaemon) -> None:
    healthy = Client(_env(daemon, {}), {"PROBE_LOOP_S": "25"})
    try:
        h = healthy.wait_ready()
        fault = subprocess.run(
            [sys.executable, "-c", FAULT], env=_env(daemon, {}), capture_output=True, text=True, timeout=120
        )
        loop = healthy.next_line(60)
    finally:
        healthy.close()
    errors = mps_logs.read_server_log_errors(daemon.log_dir)
    _evidence("client-fault", {"healthy": h, "healthy_loop": loop, "fault_rc": fault.returncode,
                               "fault_stderr_tail": fault.stderr[-400:], "log_errors": errors})
    assert fault.returncode != 0 and "illegal" in fault.stderr.lower()
    assert loop["loop"] != "ok"  # MPS propagated the fault to the healthy client
    assert errors and "fatal GPU error" in errors[0]


def test_gpu_info_and_sampler_on_the_gpu(daemon: MpsDaemon, tmp_path: Path) -> None:
    info = host.gpu_info(0)
    assert info is not None and (info.uuid or "").startswith("GPU-") and (info.memory_total_bytes or 0) > 0
    c = Client(_env(daemon, {"active_thread_pct": 50}))
    try:
        ready = c.wait_ready()
        s = telemetry.TelemetrySampler(tmp_path / "telemetry.jsonl", 0, 50, lambda: {"c": ready["pid"]})
        s.start()
        time.sleep(1.0)
        s.stop()
    finally:
        c.close()
    rows = [json.loads(line) for line in (tmp_path / "telemetry.jsonl").read_text().splitlines()]
    _evidence("gpu-telemetry", {"gpu_info": to_dict(info), "stats": s.stats(), "first": rows[:2], "last": rows[-1]})
    assert len(rows) >= 15
    for key in ("gpu_util_pct", "mem_used_bytes", "power_w", "sm_clock_mhz", "temp_c"):
        assert key in rows[-1], (key, s.errors)
    assert "c" in rows[-1]["tenant_cpu_pct"]
