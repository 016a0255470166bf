"""multitenant.run.mps on a CPU machine: environment, parsing, and the daemon lifecycle against a
test double of nvidia-cuda-mps-control (tests/unit/fake_mps). The real binary is exercised by
tests/gpu/test_mps.py on a GPU machine."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from multitenant.config.schema import ShareConfig
from multitenant.run.mps import MpsDaemon, MpsError
from multitenant.run.mps import cli as mps_cli
from multitenant.run.mps import control as mps_control
from multitenant.run.mps import daemon as mps_daemon
from multitenant.run.mps import env as mps_env
from multitenant.run.mps import logs as mps_logs

FAKE_DIR = Path(__file__).resolve().parent / "fake_mps"

# Output of the real nvidia-cuda-mps-control (driver 580.159.04, H100), captured by
# scripts/gpu_mps_probe.sh; see docs/validation/mps-probe-h100.md.
REAL_SERVER_LIST = "705\n"
REAL_SERVER_LIST_EMPTY = ""
REAL_CLIENT_LIST = "530\n532\n534\n531\n"
REAL_CLIENT_LIST_BAD_SERVER = "Server 1 not found\n"
REAL_TERMINATE_OK = "0\n"
REAL_TERMINATE_BAD = "Invalid process 999999!\n1\n"
REAL_UNKNOWN = 'Unknown command "help"\n'
REAL_NO_DAEMON = "Cannot find MPS control daemon process\n"
REAL_FAULT_SERVER_LOG = """\
[2026-11-22 04:53:46.841 Server  1052] Status of client {PID: 1067, Context ID: 1} is ACTIVE
[2026-11-22 04:53:47.181 Server  1052] Client {PID: 947, Context: 1} encountered a fatal GPU error.
[2026-11-22 04:53:47.181 Server  1052] Server is handling a fatal GPU error.
[2026-11-22 04:53:47.181 Server  1052] Client {PID: 947, Context ID: 1} on device 0 to be torn down
[2026-11-22 04:53:47.181 Server  1052] The following client process have a sticky error set:
[2026-11-22 04:53:47.181 Server  1052] 947
[2026-11-22 04:53:47.245 Server  1052] Server failed to recevie command with status 806, assuming client {PID: 1067, Context ID: 1} exit
[2026-11-22 04:53:47.275 Server  1052] Client process 1067 disconnected
"""
REAL_ROUTINE_CONTROL_LOG = """\
[2026-11-22 04:52:55.035 Control   464] User did not send valid credentials
[2026-11-22 04:52:55.035 Control   464] NEW CLIENT 530 from user 0: Server is not ready, push client to pending list
[2026-11-22 04:52:59.674 Control   464] Server 705 has 6 active worker threads. Server will not shutdown.
[2026-11-22 04:53:53.526 Control   944] Server 1052 exited with status 0
[2026-11-22 04:53:53.526 Control   944] Exit with status 0
"""


# ---------------------------------------------------------------------------------------------
# Environment


def test_tenant_env_mps_sets_exactly_the_given_share(tmp_path: Path) -> None:
    share = ShareConfig(active_thread_pct=30, pinned_mem_limit="0=20G", priority=1)
    env = mps_env.tenant_env(share, 0, tmp_path / "pipe", tmp_path / "log")
    assert env["CUDA_MPS_PIPE_DIRECTORY"] == str(tmp_path / "pipe")
    assert env["CUDA_MPS_LOG_DIRECTORY"] == str(tmp_path / "log")
    assert env["CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"] == "30"
    assert env["CUDA_MPS_PINNED_DEVICE_MEM_LIMIT"] == "0=20G"
    assert env["CUDA_MPS_CLIENT_PRIORITY"] == "1"
    assert "CUDA_VISIBLE_DEVICES" not in env  # the daemon's GPU is the client's device 0

    bare = mps_env.tenant_env(ShareConfig(), 0, tmp_path, None)
    assert not any(k in bare for k in mps_control.CLIENT_KNOBS)
    assert "CUDA_MPS_LOG_DIRECTORY" not in bare
    assert mps_env.tenant_env(ShareConfig(priority=0), 0, tmp_path, None)["CUDA_MPS_CLIENT_PRIORITY"] == "0"


def test_tenant_env_refuses_a_pinned_limit_without_its_device(tmp_path: Path) -> None:
    # Range checks are the config's validation (tests/unit/test_config.py); the one guard kept is
    # the limit's device, without which MPS would ignore the limit silently.
    with pytest.raises(MpsError, match=";"):
        mps_env.tenant_env(ShareConfig(pinned_mem_limit="20G"), 0, tmp_path, None)


def test_tenant_env_timeslice_pins_the_gpu_and_no_daemon(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(mps_env.STATE_DIR_ENV, str(tmp_path / "st"))
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    env = mps_env.tenant_env(ShareConfig(active_thread_pct=50), 1, None, None)
    assert env["CUDA_VISIBLE_DEVICES"] == "1"
    assert "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE" not in env  # not applied without MPS
    pipe = Path(env["CUDA_MPS_PIPE_DIRECTORY"])
    assert not pipe.exists() and pipe != Path("/tmp/nvidia-mps")


def test_physical_device_follows_the_harness_visible_devices() -> None:
    assert mps_env.physical_device(1, {}) == "1"
    assert mps_env.physical_device(1, {"CUDA_VISIBLE_DEVICES": "2,3"}) == "3"
    assert mps_env.physical_device(0, {"CUDA_VISIBLE_DEVICES": "GPU-abc, GPU-def"}) == "GPU-abc"
    with pytest.raises(MpsError, match="CUDA_VISIBLE_DEVICES"):
        mps_env.physical_device(2, {"CUDA_VISIBLE_DEVICES": "2,3"})


def test_child_env_drops_inherited_mps_and_visible_devices() -> None:
    base = {
        "PATH": "/bin",
        "CUDA_VISIBLE_DEVICES": "0",
        "CUDA_MPS_PIPE_DIRECTORY": "/tmp/nvidia-mps",
        "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE": "10",
    }
    env = mps_env.child_env(base, {"CUDA_MPS_PIPE_DIRECTORY": "/p"})
    assert env == {"PATH": "/bin", "CUDA_MPS_PIPE_DIRECTORY": "/p"}


def test_default_pipe_dir_is_private_short_and_unique(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(mps_env.STATE_DIR_ENV, str(tmp_path / "st"))
    p = mps_env.default_pipe_dir(0, "2026-11-22/pair:tiny")
    assert p.parent == tmp_path / "st" and p.name == "2026-11-22_pair_tiny-gpu0"
    assert oct(os.stat(tmp_path / "st").st_mode & 0o777) == "0o700"
    long_a, long_b = mps_env.default_pipe_dir(0, "x" * 200 + "a"), mps_env.default_pipe_dir(0, "x" * 200 + "b")
    assert long_a != long_b and len(long_a.name) < 60


def test_state_root_refuses_a_symlink(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    monkeypatch.setenv(mps_env.STATE_DIR_ENV, str(tmp_path / "link"))
    with pytest.raises(MpsError, match="not a directory owned by you"):
        mps_env.state_root()


# ---------------------------------------------------------------------------------------------
# Parsing


def test_parse_pid_lines_real_formats() -> None:
    assert mps_control.parse_pid_lines(REAL_SERVER_LIST) == [705]
    assert mps_control.parse_pid_lines(REAL_SERVER_LIST_EMPTY) == []
    assert mps_control.parse_pid_lines(REAL_CLIENT_LIST) == [530, 532, 534, 531]
    assert mps_control.parse_pid_lines(REAL_CLIENT_LIST_BAD_SERVER) == []
    assert mps_control.parse_pid_lines(REAL_NO_DAEMON) == []
    assert mps_control.parse_pid_lines(REAL_UNKNOWN) == []
    # An error line with digits in it is not a PID; duplicates and blank lines are dropped.
    assert mps_control.parse_pid_lines("Invalid server pid 77\n\n 12 \n12\n") == [12]


def test_control_reply_tells_no_daemon_from_an_answer() -> None:
    assert not mps_control.ControlReply(1, REAL_NO_DAEMON, "").answered
    assert not mps_control.ControlReply(None, "", "").answered  # timed out: a quit is pending
    assert mps_control.ControlReply(0, REAL_SERVER_LIST_EMPTY, "").answered
    assert mps_control.ControlReply(0, REAL_UNKNOWN, "").answered  # the daemon answered, if not usefully


def test_read_server_log_errors_real_fault_first(tmp_path: Path) -> None:
    (tmp_path / "control.log").write_text(
        REAL_ROUTINE_CONTROL_LOG + "[2026-11-22 04:53:48.000 Control   944] Server 1052 exited with status 1\n"
    )
    (tmp_path / "server.log").write_text(REAL_FAULT_SERVER_LOG)
    errors = mps_logs.read_server_log_errors(tmp_path)
    assert errors[0].endswith("Client {PID: 947, Context: 1} encountered a fatal GPU error.")
    assert [e.split("] ", 1)[1] for e in errors[1:]] == [
        "Server is handling a fatal GPU error.",
        "Client {PID: 947, Context ID: 1} on device 0 to be torn down",
        "The following client process have a sticky error set:",
        "Server 1052 exited with status 1",
    ]
    (tmp_path / "server.log").unlink()
    (tmp_path / "control.log").write_text(REAL_ROUTINE_CONTROL_LOG)
    assert mps_logs.read_server_log_errors(tmp_path) == []
    assert mps_logs.read_server_log_errors(tmp_path / "missing") == []


def test_pinned_limit_cause_names_the_limit() -> None:
    oom = "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity"
    msg = mps_logs.pinned_limit_cause("a", ShareConfig(pinned_mem_limit="0=1G"), oom)
    assert msg is not None and "CUDA_MPS_PINNED_DEVICE_MEM_LIMIT=0=1G" in msg and "tenants.a.share" in msg
    assert mps_logs.pinned_limit_cause("a", ShareConfig(), oom) is None
    assert mps_logs.pinned_limit_cause("a", ShareConfig(pinned_mem_limit="0=1G"), "ValueError: bad prompt") is None


# ---------------------------------------------------------------------------------------------
# Lifecycle against the test double


def _fake_processes(tag: str) -> list[psutil.Process]:
    out = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            ours = any(str(FAKE_DIR) in c for c in p.info["cmdline"] or []) and p.environ().get("FAKE_MPS_TAG") == tag
            if ours and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p)
        except psutil.Error:
            continue
    return out


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[Path]:
    """The test double first on PATH, a private state dir; afterwards no fake process may live."""
    tag = uuid.uuid4().hex
    monkeypatch.setenv("PATH", f"{FAKE_DIR}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.delenv(mps_control.CONTROL_BIN_ENV, raising=False)
    monkeypatch.setenv(mps_env.STATE_DIR_ENV, str(tmp_path / "st"))
    monkeypatch.setenv("FAKE_MPS_TAG", tag)
    monkeypatch.delenv("FAKE_MPS_WEDGE", raising=False)
    yield tmp_path
    survivors = _fake_processes(tag)
    for p in survivors:
        p.kill()
    assert not survivors, f"fake MPS processes survived the test: {[p.cmdline() for p in survivors]}"


@pytest.fixture
def sleeper() -> Iterator[subprocess.Popen]:
    """A stand-in tenant process."""
    p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    yield p
    p.kill()
    p.wait()


def _attach(d: MpsDaemon, pid: int) -> int:
    reply = mps_control.control_command(d.pipe_dir, f"fake_attach {pid}", 5.0)
    assert reply.returncode == 0, reply
    return int(reply.stdout)


def _start(root: Path, name: str = "r1") -> MpsDaemon:
    return mps_daemon.start_daemon(root / "st" / f"{name}-gpu0", root / "log", 0, timeout_s=10)


def test_start_answers_records_and_stop_cleans_up(fake: Path) -> None:
    d = _start(fake)
    assert mps_control.daemon_answers(d.pipe_dir)
    assert d.control_pid is not None and psutil.pid_exists(d.control_pid)
    assert (d.pipe_dir / mps_daemon.HARNESS_RECORD).is_file()
    assert [x.pipe_dir for x in mps_daemon.harness_daemons()] == [d.pipe_dir]
    assert mps_control.server_pids(d) == []  # the server starts with the first client
    assert "Starting control daemon" in (fake / "log" / "control.log").read_text()

    res = mps_daemon.stop_daemon(d, timeout_s=5)
    assert res.clean and res.actions == ["quit"], res
    assert not psutil.pid_exists(d.control_pid) or psutil.Process(d.control_pid).status() == "zombie"
    assert not d.pipe_dir.exists()  # under the state root: removed
    assert mps_daemon.harness_daemons() == []
    again = mps_daemon.stop_daemon(d, timeout_s=5)
    assert again.clean and again.actions == ["already stopped"]


def test_daemon_env_pins_the_gpu_and_drops_client_knobs(fake: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "5,7")
    monkeypatch.setenv("CUDA_MPS_ACTIVE_THREAD_PERCENTAGE", "10")
    d = mps_daemon.start_daemon(fake / "st" / "e-gpu1", fake / "log", 1, timeout_s=10)
    try:
        env = psutil.Process(d.control_pid).environ()
        assert env["CUDA_VISIBLE_DEVICES"] == "7"
        assert env["CUDA_MPS_PIPE_DIRECTORY"] == str(d.pipe_dir)
        assert env["CUDA_MPS_LOG_DIRECTORY"] == str(fake / "log")
        assert "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE" not in env
    finally:
        assert mps_daemon.stop_daemon(d, 5).clean
    # A str is the already-mapped CUDA_VISIBLE_DEVICES entry (e.g. a UUID).
    d = mps_daemon.start_daemon(fake / "st" / "u-gpu", fake / "log", "GPU-1234", timeout_s=10)
    try:
        assert psutil.Process(d.control_pid).environ()["CUDA_VISIBLE_DEVICES"] == "GPU-1234"
    finally:
        assert mps_daemon.stop_daemon(d, 5).clean


def test_refuses_when_a_daemon_already_answers(fake: Path) -> None:
    d = _start(fake)
    try:
        with pytest.raises(MpsError, match=r"already answers .*mt-mps stop"):
            _start(fake)
    finally:
        assert mps_daemon.stop_daemon(d, 5).clean


def test_missing_binary_names_the_fix(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(mps_control.CONTROL_BIN_ENV, str(tmp_path / "nope"))
    monkeypatch.setenv(mps_env.STATE_DIR_ENV, str(tmp_path / "st"))
    with pytest.raises(MpsError, match=r"not found .*MT_MPS_CONTROL_BIN"):
        mps_daemon.start_daemon(tmp_path / "st" / "p", tmp_path / "log", 0)


def test_socket_path_limit(fake: Path) -> None:
    with pytest.raises(MpsError, match="too long for a unix socket"):
        mps_daemon.start_daemon(fake / ("x" * 120), fake / "log", 0)


def test_no_daemon_is_answered_quickly(fake: Path) -> None:
    t0 = time.monotonic()
    assert not mps_control.daemon_answers(fake / "nothing-here", timeout_s=5)
    (fake / "empty").mkdir()
    assert not mps_control.daemon_answers(fake / "empty", timeout_s=5)
    assert time.monotonic() - t0 < 2.0
    with pytest.raises(MpsError, match="no MPS control daemon answers"):
        mps_control.server_pids(MpsDaemon(fake / "empty", fake, None, False, True))


def test_verify_clients_and_descendants(fake: Path, sleeper: subprocess.Popen) -> None:
    d = _start(fake)
    parent = subprocess.Popen(
        [sys.executable, "-c", "import subprocess,sys,time; subprocess.Popen([sys.executable,'-c','import time; time.sleep(60)']); time.sleep(60)"]
    )
    outsider = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        srv = _attach(d, sleeper.pid)
        deadline = time.monotonic() + 5
        while not psutil.Process(parent.pid).children() and time.monotonic() < deadline:
            time.sleep(0.05)
        _attach(d, psutil.Process(parent.pid).children()[0].pid)
        assert mps_control.server_pids(d) == [srv] and d.server_pids_seen == [srv]
        assert mps_control.client_pids(d, srv)[0] == sleeper.pid
        ok = mps_control.verify_clients(d, {"a": sleeper.pid, "wrapped": parent.pid, "fallback": outsider.pid})
        assert ok == {"a": True, "wrapped": True, "fallback": False}
        assert "fallback run WITHOUT MPS" in mps_control.unattached_message(["fallback"], d)
        assert mps_daemon.manifest_block(d).server_pids == [srv]
    finally:  # like the orchestrator: tenants first, then the daemon
        for p in (parent, outsider):
            for c in psutil.Process(p.pid).children(recursive=True):
                c.kill()
            p.kill()
            p.wait()
        sleeper.kill()
        sleeper.wait()
        res = mps_daemon.stop_daemon(d, 5)
    assert res.clean and res.actions == ["quit"], res
    assert not psutil.pid_exists(srv) or psutil.Process(srv).status() == "zombie"


def test_busy_client_is_terminated_through_the_daemon_then_quit(
    fake: Path, sleeper: subprocess.Popen, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_MPS_TERMINATE", "signal")  # the client dies of its next CUDA error
    d = _start(fake)
    srv = _attach(d, sleeper.pid)
    res = mps_daemon.stop_daemon(d, timeout_s=4)
    assert res.clean, res
    assert res.actions == [f"terminate_client {srv} {sleeper.pid}: 0", "quit"]
    assert sleeper.wait(timeout=5) == -signal.SIGTERM


def test_idle_client_blocks_quit_so_the_daemon_is_signalled(
    fake: Path, sleeper: subprocess.Popen
) -> None:
    d = _start(fake)
    srv = _attach(d, sleeper.pid)
    res = mps_daemon.stop_daemon(d, timeout_s=4)
    assert res.clean, res
    assert res.actions[:2] == [f"terminate_client {srv} {sleeper.pid}: 0", "quit (exit None)"]
    assert sorted(res.actions[2:]) == sorted([f"SIGTERM {d.control_pid}", f"SIGTERM {srv}"])
    assert sleeper.poll() is None  # the tenant is the orchestrator's to stop, not ours
    assert mps_daemon.harness_daemons() == []


def test_hard_wedge_kills_only_the_daemon_and_its_server(
    fake: Path, sleeper: subprocess.Popen, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_MPS_WEDGE", "hard")
    d = _start(fake)
    srv = _attach(d, sleeper.pid)
    assert mps_control.server_pids(d) == [srv]
    res = mps_daemon.stop_daemon(d, timeout_s=4)
    assert res.clean, res
    assert f"SIGKILL {d.control_pid}" in res.actions and f"SIGKILL {srv}" in res.actions
    assert sleeper.poll() is None
    assert mps_daemon.harness_daemons() == []


def test_stale_socket_of_a_killed_daemon_is_replaced(fake: Path) -> None:
    d = _start(fake)
    os.kill(d.control_pid, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while psutil.pid_exists(d.control_pid) and psutil.Process(d.control_pid).status() != "zombie":
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert (d.pipe_dir / "control").exists() and not mps_control.daemon_answers(d.pipe_dir, 5)
    d2 = _start(fake)
    assert d2.control_pid != d.control_pid and mps_control.daemon_answers(d2.pipe_dir)
    assert mps_daemon.stop_daemon(d2, 5).clean


def test_external_daemon_is_never_stopped(fake: Path) -> None:
    with pytest.raises(MpsError, match="mps_external but no MPS control daemon"):
        mps_daemon.external_daemon(fake / "none")
    own = _start(fake)
    try:
        ext = mps_daemon.external_daemon(own.pipe_dir)
        assert ext.external and not ext.started_by_harness and ext.control_pid == own.control_pid
        res = mps_daemon.stop_daemon(ext, 5)
        assert res.clean and mps_control.daemon_answers(own.pipe_dir)
    finally:
        assert mps_daemon.stop_daemon(own, 5).clean


def test_cli_status_and_stop(fake: Path, sleeper: subprocess.Popen, capsys: pytest.CaptureFixture[str]) -> None:
    assert mps_cli.main(["status"]) == 0
    d1, d2 = _start(fake, "a"), _start(fake, "b")
    srv = _attach(d1, sleeper.pid)
    assert mps_cli.main(["status"]) == 1
    out = capsys.readouterr().out
    assert str(d1.pipe_dir) in out and str(d2.pipe_dir) in out and f"server {srv}: clients {sleeper.pid}" in out
    assert mps_cli.main(["stop"]) == 2
    assert mps_cli.main(["stop", str(fake / "unknown")]) == 2
    assert mps_cli.main(["bogus"]) == 2
    assert mps_cli.main(["stop", str(d2.pipe_dir)]) == 0
    assert mps_cli.main(["stop", "--all", "--timeout", "2"]) == 0  # d1 still has a client: signalled
    assert mps_cli.main(["status"]) == 0
