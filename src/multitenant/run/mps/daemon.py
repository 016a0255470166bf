"""The control daemon's lifecycle: ``start_daemon`` (one private daemon per GPU and run),
``external_daemon`` (mode mps_external), ``stop_daemon`` (whatever state it is in); the records
``mt-mps`` reads; the manifest's ``mps`` block. The faults MPS reports in its logs are read by
``logs``.

Bookkeeping: each daemon the harness starts gets a record ``mt-harness.json`` in its pipe
directory and a copy under ``/tmp/mt-mps-<uid>/daemons/``, which is what ``mt-mps status|stop``
read. A record names the control daemon's PID and start time, so a recycled PID is never killed:
nothing is signalled that cannot be proved to be ours (``is_mps_process``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from multitenant.run.mps.control import (
    CONTROL_BIN_NAME,
    CONTROL_SOCKET,
    all_client_pids,
    control_command,
    control_env,
    daemon_answers,
    require_binary,
    run_killable,
)
from multitenant.run.mps.env import MpsError, physical_device, state_root
from multitenant.schema import MpsRecord, MpsStop, from_dict, to_dict

CONTROL_PID_FILE = "nvidia-cuda-mps-control.pid"  # written by the daemon itself into the pipe dir
DEFAULT_PIPE_DIR = "/tmp/nvidia-mps"  # the daemon's defaults, used by mode mps_external
DEFAULT_LOG_DIR = "/var/log/nvidia-mps"
HARNESS_RECORD = "mt-harness.json"  # written by us into the pipe dir
# sockaddr_un.sun_path is 108 bytes including the terminating NUL on Linux.
SUN_PATH_MAX = 107


@dataclass
class MpsDaemon:
    """One control daemon the run uses (started by the harness, or external)."""

    pipe_dir: Path
    log_dir: Path
    control_pid: int | None
    external: bool
    started_by_harness: bool
    device_index: int | str | None = None  # as given to start_daemon
    # Every server PID the daemon ever reported to us: the kill fallback of a wedged stop
    # needs them after the daemon has stopped answering.
    server_pids_seen: list[int] = field(default_factory=list)


@dataclass
class DaemonRecord:
    """``mt-harness.json``: what the harness knows of a daemon it started."""

    pipe_dir: str
    log_dir: str | None = None
    control_pid: int | None = None
    control_create_time: float | None = None
    device_index: int | str | None = None
    harness_pid: int | None = None
    started_wall: str | None = None


# ---------------------------------------------------------------------------------------------
# Process identity (never signal a process we cannot prove is ours)


def is_mps_process(pid: int, create_time: float | None = None) -> bool:
    """``pid`` is alive, ours, and an MPS control/server process (or started at ``create_time``)."""
    try:
        p = psutil.Process(pid)
        if p.status() == psutil.STATUS_ZOMBIE:
            return False
        if p.uids().real != os.getuid():
            return False
        if create_time is not None and abs(p.create_time() - create_time) > 0.5:
            return False
        cmd = " ".join(p.cmdline()[:2]) + " " + p.name()
    except psutil.Error:
        return False
    return "nvidia-cuda-mps" in cmd


def _alive(pids: Iterable[int]) -> list[int]:
    out = []
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                out.append(pid)
        except psutil.Error:
            pass
    return out


def _create_time(pid: int | None) -> float | None:
    if pid is None:
        return None
    try:
        return psutil.Process(pid).create_time()
    except psutil.Error:
        return None


def _read_control_pid(pipe_dir: Path) -> int | None:
    try:
        text = (pipe_dir / CONTROL_PID_FILE).read_text().strip()
        return int(text) if text.isdigit() else None
    except OSError:
        return None


def _find_control_pid(pipe_dir: Path) -> int | None:
    """The daemon's PID: from its own pid file, else the ``-d`` process whose pipe dir is ours."""
    pid = _read_control_pid(pipe_dir)
    if pid is not None and is_mps_process(pid):
        return pid
    for p in psutil.process_iter(["pid", "cmdline", "uids"]):
        try:
            cmd = p.info["cmdline"] or []
            if p.info["uids"].real != os.getuid() or not any(CONTROL_BIN_NAME in c for c in cmd[:2]):
                continue
            if "-d" in cmd and p.environ().get("CUDA_MPS_PIPE_DIRECTORY") == str(pipe_dir):
                return int(p.info["pid"])
        except (psutil.Error, TypeError, AttributeError):
            continue
    return None


# ---------------------------------------------------------------------------------------------
# Records (what mt-mps status|stop read)


def _registry_dir() -> Path:
    d = state_root() / "daemons"
    d.mkdir(mode=0o700, exist_ok=True)
    return d


def _registry_file(pipe_dir: Path) -> Path:
    key = hashlib.sha1(str(Path(pipe_dir).absolute()).encode()).hexdigest()[:16]
    return _registry_dir() / f"{key}.json"


def _write_record(d: MpsDaemon, create_time: float | None) -> None:
    rec = DaemonRecord(
        pipe_dir=str(d.pipe_dir),
        log_dir=str(d.log_dir),
        control_pid=d.control_pid,
        control_create_time=create_time,
        device_index=d.device_index,
        harness_pid=os.getpid(),
        started_wall=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    )
    data = json.dumps(to_dict(rec), indent=1) + "\n"
    for path in (d.pipe_dir / HARNESS_RECORD, _registry_file(d.pipe_dir)):
        tmp = path.with_suffix(".tmp")
        tmp.write_text(data)
        os.replace(tmp, path)


def _read_record(path: Path) -> DaemonRecord | None:
    try:
        return from_dict(DaemonRecord, json.loads(path.read_text()))
    except (OSError, ValueError, TypeError):  # TypeError: not an object, or no pipe_dir
        return None


def _remove_record(pipe_dir: Path) -> None:
    for path in (Path(pipe_dir) / HARNESS_RECORD, _registry_file(pipe_dir)):
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def harness_daemons() -> list[MpsDaemon]:
    """Every daemon record the harness left under ``/tmp/mt-mps-<uid>/daemons`` (alive or not)."""
    records = (_read_record(path) for path in sorted(_registry_dir().glob("*.json")))
    return [_daemon_from_record(rec) for rec in records if rec is not None]


def recorded_daemon(pipe_dir: Path) -> MpsDaemon | None:
    """The daemon the harness recorded in ``pipe_dir`` (its ``mt-harness.json``), else None."""
    rec = _read_record(Path(pipe_dir) / HARNESS_RECORD)
    return None if rec is None else _daemon_from_record(rec)


def _daemon_from_record(rec: DaemonRecord) -> MpsDaemon:
    return MpsDaemon(
        pipe_dir=Path(rec.pipe_dir),
        log_dir=Path(rec.log_dir or rec.pipe_dir),
        control_pid=rec.control_pid,
        external=False,
        started_by_harness=True,
        device_index=rec.device_index,
    )


def record_create_time(pipe_dir: Path) -> float | None:
    """The control daemon's start time as recorded (None: no record)."""
    rec = _read_record(Path(pipe_dir) / HARNESS_RECORD) or _read_record(_registry_file(pipe_dir))
    return None if rec is None else rec.control_create_time


# ---------------------------------------------------------------------------------------------
# Lifecycle


def _check_socket_path(pipe_dir: Path) -> None:
    sock = str(Path(pipe_dir).absolute() / CONTROL_SOCKET)
    if len(sock.encode()) > SUN_PATH_MAX:
        raise MpsError(
            f"MPS pipe dir {pipe_dir} is too long for a unix socket ({len(sock)} > {SUN_PATH_MAX} bytes "
            "with /control); use a shorter mps.pipe_dir or leave it unset"
        )


def start_daemon(
    pipe_dir: Path, log_dir: Path, device_index: int | str, timeout_s: float = 20.0
) -> MpsDaemon:
    """Start ``nvidia-cuda-mps-control -d`` for one GPU with a private pipe and log directory.

    ``device_index``: an int is the harness's ``cuda:<i>`` (mapped through the harness's own
    ``CUDA_VISIBLE_DEVICES`` by ``physical_device``); a str is taken as the already-mapped
    ``CUDA_VISIBLE_DEVICES`` entry (a physical index or a ``GPU-`` UUID).

    Refuses (MpsError naming the fix) when the binary is missing, the socket path is too long,
    or a daemon already answers on ``pipe_dir``. The daemon sees only the chosen GPU
    (``CUDA_VISIBLE_DEVICES=<physical>``) and none of the harness's ``CUDA_MPS_*`` client knobs
    (they would become the servers' defaults). Waits until the daemon answers, then writes the
    harness record. The MPS server itself starts when the first tenant connects.
    """
    binary = require_binary()
    pipe_dir, log_dir = Path(pipe_dir).absolute(), Path(log_dir).absolute()
    _check_socket_path(pipe_dir)
    visible = device_index if isinstance(device_index, str) else physical_device(device_index)
    pipe_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    log_dir.mkdir(parents=True, exist_ok=True)

    if daemon_answers(pipe_dir, timeout_s=min(5.0, timeout_s)):
        pid = _find_control_pid(pipe_dir)
        raise MpsError(
            f"an MPS control daemon already answers on {pipe_dir}"
            + (f" (pid {pid})" if pid else "")
            + f"; stop it with `mt-mps stop {pipe_dir}` (or `echo quit | CUDA_MPS_PIPE_DIRECTORY={pipe_dir} "
            f"{CONTROL_BIN_NAME}`), or use mode=mps_external to run under it"
        )
    old_pid = _find_control_pid(pipe_dir)
    if old_pid is not None:
        raise MpsError(
            f"an MPS control daemon (pid {old_pid}) holds {pipe_dir} but does not answer; "
            f"stop it with `mt-mps stop {pipe_dir}`"
        )

    env = control_env(pipe_dir, log_dir)
    env["CUDA_VISIBLE_DEVICES"] = visible
    env["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"
    deadline = time.monotonic() + timeout_s
    reply = run_killable([binary, "-d"], env, timeout_s)
    if reply.returncode != 0:
        raise MpsError(
            f"{CONTROL_BIN_NAME} -d failed (exit {reply.returncode}): {reply.text or 'no output'}; "
            f"see {log_dir}/control.log"
        )
    d = MpsDaemon(pipe_dir, log_dir, None, external=False, started_by_harness=True, device_index=device_index)
    while True:
        if daemon_answers(pipe_dir, timeout_s=max(0.5, min(2.0, deadline - time.monotonic()))):
            break
        if time.monotonic() >= deadline:
            d.control_pid = _find_control_pid(pipe_dir)
            stop_daemon(d, timeout_s=5.0)
            raise MpsError(
                f"the MPS control daemon did not answer on {pipe_dir} within {timeout_s:g}s; "
                f"see {log_dir}/control.log, or raise mps.start_timeout_s"
            )
        time.sleep(0.05)
    d.control_pid = _find_control_pid(pipe_dir)
    _write_record(d, _create_time(d.control_pid))
    return d


def external_daemon(
    pipe_dir: Path | str | None, log_dir: Path | str | None = None, timeout_s: float = 5.0
) -> MpsDaemon:
    """Use a daemon someone else runs (mode mps_external); the harness never stops it.

    ``pipe_dir`` None: the daemon's default, ``$CUDA_MPS_PIPE_DIRECTORY`` or ``/tmp/nvidia-mps``;
    ``log_dir`` None: ``$CUDA_MPS_LOG_DIRECTORY`` or ``/var/log/nvidia-mps`` (read for faults only).
    Raises MpsError when no daemon answers there.
    """
    require_binary()
    if pipe_dir is None:
        pipe_dir = os.environ.get("CUDA_MPS_PIPE_DIRECTORY") or DEFAULT_PIPE_DIR
    if log_dir is None:
        log_dir = os.environ.get("CUDA_MPS_LOG_DIRECTORY") or DEFAULT_LOG_DIR
    pipe = Path(pipe_dir).absolute()
    if not daemon_answers(pipe, timeout_s):
        raise MpsError(
            f"mode mps_external but no MPS control daemon answers on {pipe}; start one "
            f"(CUDA_MPS_PIPE_DIRECTORY={pipe} {CONTROL_BIN_NAME} -d), set mps.pipe_dir, or use mode=mps"
        )
    return MpsDaemon(
        pipe_dir=pipe,
        log_dir=Path(log_dir),
        control_pid=_find_control_pid(pipe),
        external=True,
        started_by_harness=False,
    )


def _wait_gone(pids: Iterable[int], until: float) -> list[int]:
    pids = list(pids)
    while True:
        left = _alive(pids)
        if not left or time.monotonic() >= until:
            return left
        time.sleep(0.05)


def stop_daemon(d: MpsDaemon, timeout_s: float = 20.0) -> MpsStop:
    """Stop a daemon the harness started, whatever state it is in. Never raises; idempotent.

    1. While the daemon answers: ``terminate_client <server> <client>`` for every client still
       attached (a real daemon will not quit while a server has clients: ``quit`` then blocks
       and the daemon stops answering), and wait a moment for them to go.
    2. ``quit``; wait for the daemon and its servers to exit.
    3. If they do not (a client hangs on, or the server is wedged): SIGTERM, then SIGKILL, to the
       control daemon (the PID it recorded, checked against its start time) and to the servers
       it reported or spawned -- processes the harness started, nothing else. Tenant processes
       are the orchestrator's to stop, before it calls this.
    Finally the harness record is removed (and the pipe dir, when it is under the state root).
    ``timeout_s`` bounds steps 1-2; the signals add at most 7 s. An external daemon is left alone.
    """
    actions: list[str] = []
    if d.external or not d.started_by_harness:
        return MpsStop(True, ["external daemon: left running"], [])
    try:
        return _stop(d, timeout_s, actions)
    except Exception as e:  # a cleanup path must not raise into the orchestrator's finally
        actions.append(f"stop failed: {type(e).__name__}: {e}")
        return MpsStop(False, actions, _alive([p for p in [d.control_pid, *d.server_pids_seen] if p]))


def _stop(d: MpsDaemon, timeout_s: float, actions: list[str]) -> MpsStop:
    t_end = time.monotonic() + max(timeout_s, 1.0)
    step = max(1.0, timeout_s / 4)
    create_time = record_create_time(d.pipe_dir)
    if d.control_pid is None:
        d.control_pid = _find_control_pid(d.pipe_dir)
    control_pid = d.control_pid if d.control_pid and is_mps_process(d.control_pid, create_time) else None

    clients: dict[int, list[int]] = {}
    if daemon_answers(d.pipe_dir, timeout_s=min(2.0, step)):
        with contextlib.suppress(MpsError):
            clients = all_client_pids(d, timeout_s=min(2.0, step))
    servers = [p for p in d.server_pids_seen if is_mps_process(p)]
    if control_pid is not None:  # servers the daemon spawned, also when it no longer answers
        with contextlib.suppress(psutil.Error):
            servers += [c.pid for c in psutil.Process(control_pid).children() if is_mps_process(c.pid)]
    servers = sorted(set(servers))
    d.server_pids_seen = sorted(set(d.server_pids_seen) | set(servers))
    ours = [p for p in [control_pid, *servers] if p]

    if not ours and not daemon_answers(d.pipe_dir, timeout_s=1.0):
        actions.append("already stopped")
    else:
        # A real daemon handles `quit` only once its servers have no client left: until then
        # the quit call blocks and the daemon stops answering (seen on driver 580). So clients
        # are terminated *first*, while the daemon still answers. terminate_client makes the
        # client's CUDA calls fail; a busy client then exits, an idle one stays (its process
        # is not ours: the orchestrator stops tenants before it stops the daemon).
        live = {srv: _alive(pids) for srv, pids in clients.items()}
        for srv, pids in live.items():
            for cpid in pids:
                r = control_command(d.pipe_dir, f"terminate_client {srv} {cpid}", timeout_s=min(2.0, step))
                actions.append(f"terminate_client {srv} {cpid}: {r.text or r.returncode}")
        if any(live.values()):
            _wait_gone([p for pids in live.values() for p in pids], min(t_end, time.monotonic() + step))
        reply = control_command(d.pipe_dir, "quit", timeout_s=min(2.0 if any(live.values()) else step, step))
        actions.append("quit" + ("" if reply.returncode == 0 else f" (exit {reply.returncode})"))
        left = _wait_gone(ours, min(t_end, time.monotonic() + step))
        for sig in (signal.SIGTERM, signal.SIGKILL):
            if not left:
                break
            for pid in left:
                if is_mps_process(pid, create_time if pid == control_pid else None):
                    with contextlib.suppress(ProcessLookupError, PermissionError):
                        os.kill(pid, sig)
                        actions.append(f"{sig.name} {pid}")
            left = _wait_gone(left, time.monotonic() + (2.0 if sig == signal.SIGTERM else 5.0))
        if left:
            actions.append(f"still running: {left}")
            return MpsStop(False, actions, left)

    _remove_record(d.pipe_dir)
    _remove_pipe_dir(d.pipe_dir)
    return MpsStop(True, actions, [])


def _remove_pipe_dir(pipe_dir: Path) -> None:
    """Remove the pipe dir when the harness owns it (under the state root); else only our files."""
    pipe_dir = Path(pipe_dir)
    with contextlib.suppress(OSError):
        if pipe_dir.parent == state_root() and pipe_dir.name not in ("daemons", "no-mps"):
            shutil.rmtree(pipe_dir, ignore_errors=True)
        else:
            for name in (CONTROL_SOCKET, CONTROL_PID_FILE):
                p = pipe_dir / name
                if p.is_socket() or p.is_file():
                    p.unlink()


def manifest_block(d: MpsDaemon | None, stop: MpsStop | None = None) -> MpsRecord | None:
    """The manifest's ``mps`` block (INTERFACES.md); ``stop``: what ``stop_daemon`` returned."""
    if d is None:
        return None
    return MpsRecord(
        pipe_dir=str(d.pipe_dir),
        log_dir=str(d.log_dir),
        control_pid=d.control_pid,
        server_pids=list(d.server_pids_seen),
        external=d.external,
        stop=stop,
    )
