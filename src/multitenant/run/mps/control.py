"""Talking to ``nvidia-cuda-mps-control``: the binary, one command through its stdin
(``control_command``), PID lists (``parse_pid_lines``, ``server_pids``, ``client_pids``) and
client verification (``attached_pids``, ``verify_clients``, ``unattached_message``).

The binary is found on PATH, or ``$MT_MPS_CONTROL_BIN`` (a test double or a driver outside PATH).
Every call has a timeout and runs in its own process group: a wedged daemon can make the binary
block, and a timed-out call must not leave a process behind. No ``sudo``, no compute-mode change.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import psutil

from multitenant.run.mps.env import MpsError

if TYPE_CHECKING:
    from multitenant.run.mps.daemon import MpsDaemon

CONTROL_BIN_NAME = "nvidia-cuda-mps-control"
CONTROL_BIN_ENV = "MT_MPS_CONTROL_BIN"  # override, e.g. a test double or a driver outside PATH
CONTROL_SOCKET = "control"  # the daemon's unix socket inside CUDA_MPS_PIPE_DIRECTORY
# The daemon's answer when nothing listens on the pipe directory.
NO_DAEMON_TEXT = "Cannot find MPS control daemon process"
# Client-side MPS knobs; in the daemon's environment they would become the servers' defaults.
CLIENT_KNOBS = (
    "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE",
    "CUDA_MPS_PINNED_DEVICE_MEM_LIMIT",
    "CUDA_MPS_CLIENT_PRIORITY",
)


@dataclass
class ControlReply:
    returncode: int | None  # None: timed out
    stdout: str
    stderr: str

    @property
    def text(self) -> str:
        return (self.stdout + self.stderr).strip()

    @property
    def answered(self) -> bool:
        """The daemon answered (possibly with an error about the command itself)."""
        return self.returncode == 0 and NO_DAEMON_TEXT.lower() not in self.text.lower()


def control_binary() -> str | None:
    """Path of ``nvidia-cuda-mps-control``: ``$MT_MPS_CONTROL_BIN``, else PATH; None if absent."""
    override = os.environ.get(CONTROL_BIN_ENV)
    if override:
        return override if os.access(override, os.X_OK) else None
    return shutil.which(CONTROL_BIN_NAME)


def require_binary() -> str:
    """``control_binary()``, or MpsError naming how to install or point to it."""
    binary = control_binary()
    if binary is None:
        where = os.environ.get(CONTROL_BIN_ENV) or "PATH"
        raise MpsError(
            f"{CONTROL_BIN_NAME} not found on {where}; install the NVIDIA driver's compute utilities "
            f"(it ships with the driver) or set {CONTROL_BIN_ENV}=/path/to/{CONTROL_BIN_NAME}"
        )
    return binary


def control_env(pipe_dir: Path, log_dir: Path | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in CLIENT_KNOBS}
    env["CUDA_MPS_PIPE_DIRECTORY"] = str(pipe_dir)
    if log_dir is not None:
        env["CUDA_MPS_LOG_DIRECTORY"] = str(log_dir)
    return env


def run_killable(
    argv: list[str], env: Mapping[str, str], timeout_s: float, stdin_text: str | None = None
) -> ControlReply:
    """Run ``argv`` in its own process group; on timeout kill the whole group (never hangs)."""
    try:
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.PIPE if stdin_text is not None else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=dict(env),
            text=True,
            start_new_session=True,
        )
    except OSError as e:
        return ControlReply(127, "", f"cannot run {argv[0]}: {e.strerror}")
    try:
        out, err = proc.communicate(stdin_text, timeout=max(timeout_s, 0.05))
        return ControlReply(proc.returncode, out, err)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        return ControlReply(None, out or "", err or "")


def control_command(pipe_dir: Path, command: str, timeout_s: float = 5.0) -> ControlReply:
    """``echo <command> | nvidia-cuda-mps-control`` against ``pipe_dir``, bounded by ``timeout_s``.

    Returns returncode 127 when the binary is missing and returncode None on timeout.
    """
    binary = control_binary()
    if binary is None:
        return ControlReply(127, "", f"{CONTROL_BIN_NAME} not found")
    if not (Path(pipe_dir) / CONTROL_SOCKET).exists():
        # Nothing can listen here; skip the binary (it may block or be slow without a daemon).
        return ControlReply(1, "", NO_DAEMON_TEXT)
    return run_killable([binary], control_env(Path(pipe_dir)), timeout_s, command + "\n")


def daemon_answers(pipe_dir: Path, timeout_s: float = 5.0) -> bool:
    """True when a control daemon answers ``get_server_list`` on ``pipe_dir`` within ``timeout_s``."""
    return control_command(pipe_dir, "get_server_list", timeout_s).answered


_PID_LINE = re.compile(r"^\s*(\d+)\s*$")


def parse_pid_lines(text: str) -> list[int]:
    """PIDs from ``get_server_list`` / ``get_client_list`` output: one decimal PID per line.

    Anything else on a line (a message, an error) is not a PID and is skipped, so an error text
    that merely contains digits never turns into a PID.
    """
    pids: list[int] = []
    for line in text.splitlines():
        m = _PID_LINE.match(line)
        if m:
            pid = int(m.group(1))
            if pid > 0 and pid not in pids:
                pids.append(pid)
    return pids


def _query_pids(pipe_dir: Path, command: str, timeout_s: float) -> list[int]:
    reply = control_command(pipe_dir, command, timeout_s)
    if reply.returncode is None:
        raise MpsError(
            f"the MPS control daemon on {pipe_dir} did not answer '{command}' in {timeout_s:g}s; "
            f"it may be wedged: run `mt-mps stop {pipe_dir}`"
        )
    if not reply.answered:
        raise MpsError(
            f"no MPS control daemon answers on {pipe_dir} ({reply.text or 'no output'}); "
            "check that the daemon is running (mt-mps status)"
        )
    return parse_pid_lines(reply.stdout)


def server_pids(d: MpsDaemon, timeout_s: float = 5.0) -> list[int]:
    """PIDs of the daemon's MPS servers (``get_server_list``). Raises MpsError if it does not answer."""
    pids = _query_pids(d.pipe_dir, "get_server_list", timeout_s)
    for pid in pids:
        if pid not in d.server_pids_seen:
            d.server_pids_seen.append(pid)
    return pids


def client_pids(d: MpsDaemon, server_pid: int, timeout_s: float = 5.0) -> list[int]:
    """PIDs of the clients of one server (``get_client_list <server_pid>``)."""
    return _query_pids(d.pipe_dir, f"get_client_list {int(server_pid)}", timeout_s)


def all_client_pids(d: MpsDaemon, timeout_s: float = 5.0) -> dict[int, list[int]]:
    """{server pid: [client pids]} over every server of the daemon."""
    return {srv: client_pids(d, srv, timeout_s) for srv in server_pids(d, timeout_s)}


def attached_pids(d: MpsDaemon, tenant_pids: Mapping[str, int], timeout_s: float = 5.0) -> dict[str, list[int]]:
    """{tenant: the PIDs of the tenant and its descendants that are clients of this daemon's
    servers}, sorted. Descendants count because the CUDA process may be one the tenant started:
    a vLLM engine core and its workers, a launched server. Raises MpsError when the daemon does
    not answer (then nothing is verified)."""
    clients = {pid for pids in all_client_pids(d, timeout_s).values() for pid in pids}
    result: dict[str, list[int]] = {}
    for name, pid in tenant_pids.items():
        family = {pid}
        with contextlib.suppress(psutil.Error):
            family.update(c.pid for c in psutil.Process(pid).children(recursive=True))
        result[name] = sorted(family & clients)
    return result


def verify_clients(d: MpsDaemon, tenant_pids: Mapping[str, int], timeout_s: float = 5.0) -> dict[str, bool]:
    """{tenant: is it (or a process it started) a client of one of this daemon's servers?}

    A CUDA process that cannot reach the daemon silently runs without MPS; this is how that is
    caught (see ``attached_pids``).
    """
    return {name: bool(pids) for name, pids in attached_pids(d, tenant_pids, timeout_s).items()}


def unattached_message(names: Iterable[str], d: MpsDaemon) -> str:
    """The one-line failure for tenants that run without MPS (the silent fallback)."""
    listed = ", ".join(sorted(names))
    return (
        f"tenant(s) {listed} run WITHOUT MPS: not clients of the daemon on {d.pipe_dir}; check that "
        "their CUDA_MPS_PIPE_DIRECTORY matches the daemon's, that they run as the daemon's user, and "
        f"{d.log_dir}/control.log"
    )
