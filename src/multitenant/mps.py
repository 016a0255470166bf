"""CUDA MPS: control-daemon lifecycle, per-tenant environment, client verification, ``mt-mps``.

What the orchestrator calls, in this order (mode ``mps``)::

    d = start_daemon(default_pipe_dir(idx, run_id), run_dir / "mps_log", idx, timeout_s)
    try:
        env = child_env(os.environ, tenant_env(share, idx, d.pipe_dir, d.log_dir))  # per tenant
        ... spawn tenants with env; each uses device "cuda:0" (TENANT_DEVICE) ...
        ok = verify_clients(d, {name: pid})     # after every tenant sent `ready`
        # when a tenant fails: pinned_limit_cause(name, share, stderr_tail) names an exhausted
        # pinned-memory limit; read_server_log_errors(d.log_dir) shows a propagated GPU fault
    finally:
        stop_daemon(d, timeout_s)               # never raises; idempotent

Mode ``mps_external`` uses ``external_daemon(pipe_dir, log_dir)`` instead of ``start_daemon``
(``stop_daemon`` then leaves the daemon alone); ``timeslice`` uses
``tenant_env(share, idx, None, None)``, which pins the tenant *away* from any MPS daemon.

Device mapping (why ``cuda:0``): the control daemon is started with ``CUDA_VISIBLE_DEVICES`` set
to the one physical GPU it serves, so its server sees only that GPU and every client sees it,
remapped, as device 0. NVIDIA's MPS guide says clients must not set ``CUDA_VISIBLE_DEVICES``
themselves (a client that keeps the daemon's value would name a device the server does not
have), so ``child_env`` removes it from a tenant's environment under MPS. In ``timeslice`` the
tenant gets ``CUDA_VISIBLE_DEVICES=<physical>`` and again sees its GPU as device 0. Indices
follow ``CUDA_DEVICE_ORDER=PCI_BUS_ID`` (set for the daemon and tenants), the order NVML and
nvidia-smi use, so ``cuda:<i>`` in a config, the daemon's GPU and the telemetry GPU agree. When
the harness itself runs under ``CUDA_VISIBLE_DEVICES=2,3``, ``cuda:1`` means physical ``3``.

Everything here talks to ``nvidia-cuda-mps-control`` (found on PATH, or ``MT_MPS_CONTROL_BIN``)
through its stdin, with a timeout, in its own process group: a wedged daemon can make the binary
block, and a timed-out call must not leave a process behind. No ``sudo``, no compute-mode change.

Bookkeeping: each daemon the harness starts gets a record ``mt-harness.json`` in its pipe
directory and a copy under ``/tmp/mt-mps-<uid>/daemons/``, which is what ``mt-mps status|stop``
read. A record names the control daemon's PID and start time, so a recycled PID is never killed.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

CONTROL_BIN_NAME = "nvidia-cuda-mps-control"
CONTROL_BIN_ENV = "MT_MPS_CONTROL_BIN"  # override, e.g. a test double or a driver outside PATH
STATE_DIR_ENV = "MT_MPS_STATE_DIR"  # override of /tmp/mt-mps-<uid> (tests)
CONTROL_SOCKET = "control"  # the daemon's unix socket inside CUDA_MPS_PIPE_DIRECTORY
CONTROL_PID_FILE = "nvidia-cuda-mps-control.pid"  # written by the daemon itself into the pipe dir
DEFAULT_PIPE_DIR = "/tmp/nvidia-mps"  # the daemon's defaults, used by mode mps_external
DEFAULT_LOG_DIR = "/var/log/nvidia-mps"
HARNESS_RECORD = "mt-harness.json"  # written by us into the pipe dir
# The daemon's answer when nothing listens on the pipe directory.
NO_DAEMON_TEXT = "Cannot find MPS control daemon process"
# sockaddr_un.sun_path is 108 bytes including the terminating NUL on Linux.
SUN_PATH_MAX = 107
# A tenant's device under MPS and under timeslice (see the module docstring).
TENANT_DEVICE = "cuda:0"
# Inherited variables a tenant must not see: they would redirect or re-shape its MPS attachment.
TENANT_ENV_REMOVE_PREFIXES = ("CUDA_MPS_",)
TENANT_ENV_REMOVE = ("CUDA_VISIBLE_DEVICES",)
# Client-side MPS knobs; in the daemon's environment they would become the servers' defaults.
CLIENT_KNOBS = (
    "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE",
    "CUDA_MPS_PINNED_DEVICE_MEM_LIMIT",
    "CUDA_MPS_CLIENT_PRIORITY",
)


class MpsError(RuntimeError):
    """An MPS problem, phrased as one line: what is wrong and how to fix it."""


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
class StopResult:
    """What ``stop_daemon`` did. ``clean``: nothing of the daemon is left running."""

    clean: bool
    actions: list[str]
    left_pids: list[int]


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


# ---------------------------------------------------------------------------------------------
# Paths and environment


def state_root() -> Path:
    """``/tmp/mt-mps-<uid>``: the harness's private directory for pipe dirs and records.

    Created 0700; refused when it is a symlink or belongs to another user (``/tmp`` is shared,
    and a directory planted by someone else could redirect our daemons' sockets).
    """
    root = Path(os.environ.get(STATE_DIR_ENV) or f"/tmp/mt-mps-{os.getuid()}")
    try:
        root.mkdir(mode=0o700, exist_ok=True)
        st = os.lstat(root)
    except OSError as e:
        raise MpsError(f"cannot create {root} ({e.strerror}); set mps.pipe_dir to a private directory") from None
    if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid():
        raise MpsError(f"{root} is not a directory owned by you; remove it or set mps.pipe_dir elsewhere")
    return root


def default_pipe_dir(device_index: int, run_id: str) -> Path:
    """``/tmp/mt-mps-<uid>/<run_id>-gpu<idx>``, kept short for the unix-socket path limit."""
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", run_id)
    if len(safe) > 48:  # keep it unique but short: tail of the id + a hash of the whole id
        safe = safe[-36:] + "-" + hashlib.sha1(run_id.encode()).hexdigest()[:8]
    return state_root() / f"{safe}-gpu{device_index}"


def physical_device(device_index: int, environ: Mapping[str, str] | None = None) -> str:
    """The ``CUDA_VISIBLE_DEVICES`` entry that selects the harness's ``cuda:<device_index>``.

    Without ``CUDA_VISIBLE_DEVICES`` in the harness's environment this is the index itself.
    """
    env = os.environ if environ is None else environ
    visible = env.get("CUDA_VISIBLE_DEVICES")
    if visible is None or visible.strip() == "":
        return str(device_index)
    entries = [v.strip() for v in visible.split(",") if v.strip()]
    if not 0 <= device_index < len(entries):
        raise MpsError(
            f"device cuda:{device_index} is not among CUDA_VISIBLE_DEVICES={visible}; "
            f"use an index below {len(entries)} or unset CUDA_VISIBLE_DEVICES"
        )
    return entries[device_index]


def tenant_env(
    share: Mapping[str, Any],
    device_index: int,
    pipe_dir: Path | None,
    log_dir: Path | None,
) -> dict[str, str]:
    """The CUDA environment of one tenant (merge it with ``child_env``).

    With a ``pipe_dir`` (modes mps, mps_external): ``CUDA_MPS_PIPE_DIRECTORY``,
    ``CUDA_MPS_LOG_DIRECTORY`` (if given) and, for each share value that is set,
    ``CUDA_MPS_ACTIVE_THREAD_PERCENTAGE`` (``active_thread_pct``, 1..100),
    ``CUDA_MPS_PINNED_DEVICE_MEM_LIMIT`` (``pinned_mem_limit``, already ``"<dev>=<size>"`` from
    ``config.validate``; the device index is the tenant's view, i.e. 0) and
    ``CUDA_MPS_CLIENT_PRIORITY`` (``priority``, 0|1). ``CUDA_VISIBLE_DEVICES`` is *not* set: the
    daemon's GPU is the client's device 0.

    Without a ``pipe_dir`` (timeslice): ``CUDA_VISIBLE_DEVICES=<physical GPU>`` and a
    ``CUDA_MPS_PIPE_DIRECTORY`` that no daemon can listen on, so the control case cannot
    silently attach to a daemon someone runs in the default ``/tmp/nvidia-mps``.
    """
    env: dict[str, str] = {"CUDA_DEVICE_ORDER": "PCI_BUS_ID"}
    if pipe_dir is None:
        env["CUDA_VISIBLE_DEVICES"] = physical_device(device_index)
        env["CUDA_MPS_PIPE_DIRECTORY"] = str(no_mps_pipe_dir())
        return env
    env["CUDA_MPS_PIPE_DIRECTORY"] = str(pipe_dir)
    if log_dir is not None:
        env["CUDA_MPS_LOG_DIRECTORY"] = str(log_dir)
    pct = share.get("active_thread_pct")
    if pct is not None:
        if not 1 <= int(pct) <= 100:
            raise MpsError(f"active_thread_pct {pct} is outside 1..100; give the SM cap in percent")
        env["CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"] = str(int(pct))
    mem = share.get("pinned_mem_limit")
    if mem is not None:
        if "=" not in str(mem):
            raise MpsError(f"pinned_mem_limit {mem!r} lacks its device; pass it through config.validate (0=20G)")
        env["CUDA_MPS_PINNED_DEVICE_MEM_LIMIT"] = str(mem)
    prio = share.get("priority")
    if prio is not None:
        if int(prio) not in (0, 1):
            raise MpsError(f"priority {prio} is not 0 or 1; use 0 (normal) or 1 (below normal)")
        env["CUDA_MPS_CLIENT_PRIORITY"] = str(int(prio))
    return env


def no_mps_pipe_dir() -> Path:
    """A pipe directory path nobody listens on: the harness's state root + a name never created."""
    return state_root() / "no-mps"


def child_env(base: Mapping[str, str], tenant: Mapping[str, str]) -> dict[str, str]:
    """``base`` (usually ``os.environ``) without inherited ``CUDA_MPS_*``/``CUDA_VISIBLE_DEVICES``,
    then ``tenant`` on top: the complete environment to spawn a tenant with."""
    env = {
        k: v
        for k, v in base.items()
        if k not in TENANT_ENV_REMOVE and not k.startswith(TENANT_ENV_REMOVE_PREFIXES)
    }
    env.update(tenant)
    return env


# ---------------------------------------------------------------------------------------------
# Talking to the control daemon


def control_binary() -> str | None:
    """Path of ``nvidia-cuda-mps-control``: ``$MT_MPS_CONTROL_BIN``, else PATH; None if absent."""
    override = os.environ.get(CONTROL_BIN_ENV)
    if override:
        return override if os.access(override, os.X_OK) else None
    return shutil.which(CONTROL_BIN_NAME)


def _require_binary() -> str:
    binary = control_binary()
    if binary is None:
        where = os.environ.get(CONTROL_BIN_ENV) or "PATH"
        raise MpsError(
            f"{CONTROL_BIN_NAME} not found on {where}; install the NVIDIA driver's compute utilities "
            f"(it ships with the driver) or set {CONTROL_BIN_ENV}=/path/to/{CONTROL_BIN_NAME}"
        )
    return binary


def _control_env(pipe_dir: Path, log_dir: Path | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in CLIENT_KNOBS}
    env["CUDA_MPS_PIPE_DIRECTORY"] = str(pipe_dir)
    if log_dir is not None:
        env["CUDA_MPS_LOG_DIRECTORY"] = str(log_dir)
    return env


def _run_killable(
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
    return _run_killable([binary], _control_env(Path(pipe_dir)), timeout_s, command + "\n")


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


# ---------------------------------------------------------------------------------------------
# Process identity (never signal a process we cannot prove is ours)


def _is_mps_process(pid: int, create_time: float | None = None) -> bool:
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
    if pid is not None and _is_mps_process(pid):
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
    rec = {
        "pipe_dir": str(d.pipe_dir),
        "log_dir": str(d.log_dir),
        "control_pid": d.control_pid,
        "control_create_time": create_time,
        "device_index": d.device_index,
        "harness_pid": os.getpid(),
        "started_wall": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    data = json.dumps(rec, indent=1) + "\n"
    for path in (d.pipe_dir / HARNESS_RECORD, _registry_file(d.pipe_dir)):
        tmp = path.with_suffix(".tmp")
        tmp.write_text(data)
        os.replace(tmp, path)


def _read_record(path: Path) -> dict[str, Any] | None:
    try:
        rec = json.loads(path.read_text())
        return rec if isinstance(rec, dict) and "pipe_dir" in rec else None
    except (OSError, ValueError):
        return None


def _remove_record(pipe_dir: Path) -> None:
    for path in (Path(pipe_dir) / HARNESS_RECORD, _registry_file(pipe_dir)):
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def harness_daemons() -> list[MpsDaemon]:
    """Every daemon record the harness left under ``/tmp/mt-mps-<uid>/daemons`` (alive or not)."""
    out = []
    for path in sorted(_registry_dir().glob("*.json")):
        rec = _read_record(path)
        if rec is None:
            continue
        out.append(_daemon_from_record(rec))
    return out


def _daemon_from_record(rec: Mapping[str, Any]) -> MpsDaemon:
    return MpsDaemon(
        pipe_dir=Path(rec["pipe_dir"]),
        log_dir=Path(rec.get("log_dir") or rec["pipe_dir"]),
        control_pid=rec.get("control_pid"),
        external=False,
        started_by_harness=True,
        device_index=rec.get("device_index"),
    )


def _record_create_time(pipe_dir: Path) -> float | None:
    rec = _read_record(Path(pipe_dir) / HARNESS_RECORD) or _read_record(_registry_file(pipe_dir))
    return None if rec is None else rec.get("control_create_time")


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
    binary = _require_binary()
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

    env = _control_env(pipe_dir, log_dir)
    env["CUDA_VISIBLE_DEVICES"] = visible
    env["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"
    deadline = time.monotonic() + timeout_s
    reply = _run_killable([binary, "-d"], env, timeout_s)
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
    _require_binary()
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


def stop_daemon(d: MpsDaemon, timeout_s: float = 20.0) -> StopResult:
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
        return StopResult(True, ["external daemon: left running"], [])
    try:
        return _stop(d, timeout_s, actions)
    except Exception as e:  # a cleanup path must not raise into the orchestrator's finally
        actions.append(f"stop failed: {type(e).__name__}: {e}")
        return StopResult(False, actions, _alive([p for p in [d.control_pid, *d.server_pids_seen] if p]))


def _stop(d: MpsDaemon, timeout_s: float, actions: list[str]) -> StopResult:
    t_end = time.monotonic() + max(timeout_s, 1.0)
    step = max(1.0, timeout_s / 4)
    create_time = _record_create_time(d.pipe_dir)
    if d.control_pid is None:
        d.control_pid = _find_control_pid(d.pipe_dir)
    control_pid = d.control_pid if d.control_pid and _is_mps_process(d.control_pid, create_time) else None

    clients: dict[int, list[int]] = {}
    if daemon_answers(d.pipe_dir, timeout_s=min(2.0, step)):
        with contextlib.suppress(MpsError):
            clients = all_client_pids(d, timeout_s=min(2.0, step))
    servers = [p for p in d.server_pids_seen if _is_mps_process(p)]
    if control_pid is not None:  # servers the daemon spawned, also when it no longer answers
        with contextlib.suppress(psutil.Error):
            servers += [c.pid for c in psutil.Process(control_pid).children() if _is_mps_process(c.pid)]
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
                if _is_mps_process(pid, create_time if pid == control_pid else None):
                    with contextlib.suppress(ProcessLookupError, PermissionError):
                        os.kill(pid, sig)
                        actions.append(f"{sig.name} {pid}")
            left = _wait_gone(left, time.monotonic() + (2.0 if sig == signal.SIGTERM else 5.0))
        if left:
            actions.append(f"still running: {left}")
            return StopResult(False, actions, left)

    _remove_record(d.pipe_dir)
    _remove_pipe_dir(d.pipe_dir)
    return StopResult(True, actions, [])


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


def manifest_block(d: MpsDaemon | None) -> dict[str, Any] | None:
    """The manifest's ``mps`` block (INTERFACES.md)."""
    if d is None:
        return None
    return {
        "pipe_dir": str(d.pipe_dir),
        "log_dir": str(d.log_dir),
        "control_pid": d.control_pid,
        "server_pids": list(d.server_pids_seen),
        "external": d.external,
    }


# ---------------------------------------------------------------------------------------------
# Faults in the MPS logs

# Lines of control.log / server.log that report a client or server failure, as driver 580 words
# them (docs/validation/mps-probe-h100.md): "Client {PID: 947, Context: 1} encountered a fatal
# GPU error.", "Server is handling a fatal GPU error.", "... to be torn down", "... have a sticky
# error set", "Server 705 exited with status 1". Routine lines do not match: "New client ...
# connected", "Server failed to recevie command with status 806, assuming client ... exit" (a
# client that exited), "User did not send valid credentials" (a bare connect), "Server 705
# exited with status 0", "Client termination succeeded." (our own terminate_client).
_FAULT_PATTERNS = re.compile(
    r"fatal|fault|sticky error|torn down|illegal|exceed|out of memory|xid"
    r"|exited with status [1-9]|killed by signal|failed to start|server failed",
    re.IGNORECASE,
)
_BENIGN_PATTERNS = re.compile(r"assuming client .* exit|valid credentials", re.IGNORECASE)


def read_server_log_errors(log_dir: Path, limit: int = 20) -> list[str]:
    """Fault lines from ``control.log`` and every ``server.log`` under ``log_dir``, oldest first.

    Each line keeps its ``[timestamp Server|Control pid]`` prefix. The first one says that (and
    when) MPS hit a fatal error and tore its clients down; the client PID it names need not be
    the one that caused it (on the H100 MPS named the healthy client), so the cause is the
    tenant that failed first, and this line is the proof the fault was propagated. Missing
    files are not an error (the server may never have started).
    """
    log_dir = Path(log_dir)
    files = [log_dir / "control.log", log_dir / "server.log", *sorted(log_dir.glob("*/server.log"))]
    found: list[str] = []
    for path in files:
        try:
            text = path.read_text(errors="replace")
        except OSError:
            continue
        for line in text.splitlines():
            if _FAULT_PATTERNS.search(line) and not _BENIGN_PATTERNS.search(line):
                found.append(line.strip())
    found.sort(key=_log_sort_key)
    return found[:limit]


_OOM = re.compile(r"out of memory|CUDA_ERROR_OUT_OF_MEMORY|cudaErrorMemoryAllocation", re.IGNORECASE)


def pinned_limit_cause(tenant: str, share: Mapping[str, Any], stderr_tail: str) -> str | None:
    """The one-line cause for a tenant that died of CUDA out-of-memory under a pinned limit.

    Under ``CUDA_MPS_PINNED_DEVICE_MEM_LIMIT`` an allocation past the limit fails as an ordinary
    CUDA out-of-memory error (PyTorch: "CUDA out of memory ... of which 395 MiB is free"); MPS
    logs nothing. So the limit is named here, from the tenant's share and its stderr.
    """
    limit = share.get("pinned_mem_limit")
    if not limit or not _OOM.search(stderr_tail):
        return None
    return (
        f"tenant {tenant} ran out of GPU memory at its MPS pinned memory limit "
        f"CUDA_MPS_PINNED_DEVICE_MEM_LIMIT={limit}; raise tenants.{tenant}.share.pinned_mem_limit "
        "or reduce the tenant's batch / KV cache"
    )


def _log_sort_key(line: str) -> str:
    # "[2026-11-22 10:00:00.123 Server 123] ..." sorts by its timestamp; other lines keep order.
    m = re.match(r"\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d+)", line)
    return m.group(1) if m else ""


# ---------------------------------------------------------------------------------------------
# mt-mps


def daemon_status(d: MpsDaemon, timeout_s: float = 3.0) -> dict[str, Any]:
    """One row of ``mt-mps status``."""
    create_time = _record_create_time(d.pipe_dir)
    alive = bool(d.control_pid) and _is_mps_process(int(d.control_pid or 0), create_time)
    answers = daemon_answers(d.pipe_dir, timeout_s)
    row: dict[str, Any] = {
        "pipe_dir": str(d.pipe_dir),
        "log_dir": str(d.log_dir),
        "control_pid": d.control_pid,
        "alive": alive,
        "answers": answers,
        "servers": {},
    }
    if answers:
        with contextlib.suppress(MpsError):
            row["servers"] = {str(k): v for k, v in all_client_pids(d, timeout_s).items()}
    return row


def cli_main(argv: list[str] | None = None) -> int:
    """``mt-mps status [--json]`` | ``mt-mps stop PIPE_DIR... | --all``.

    Exit codes: 0 ok (status: no harness daemon is running; stop: everything stopped),
    1 something is left (status: a daemon runs; stop: a daemon survived), 2 usage.
    """
    parser = argparse.ArgumentParser(
        prog="mt-mps", description="Inspect or stop the CUDA MPS control daemons that multitenant started."
    )
    sub = parser.add_subparsers(dest="cmd")
    p_status = sub.add_parser("status", help="list daemons the harness started (exit 1 if any runs)")
    p_status.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p_stop = sub.add_parser("stop", help="stop daemons the harness started")
    p_stop.add_argument("pipe_dirs", nargs="*", type=Path, help="pipe directories (see mt-mps status)")
    p_stop.add_argument("--all", action="store_true", help="stop every daemon the harness started")
    p_stop.add_argument("--timeout", type=float, default=20.0, help="seconds per daemon (default 20)")
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:
        return 2 if e.code not in (0, None) else 0
    if args.cmd is None:
        parser.print_usage(sys.stderr)
        return 2
    try:
        if args.cmd == "status":
            return _cli_status(args.json)
        return _cli_stop(args.pipe_dirs, args.all, args.timeout)
    except MpsError as e:
        print(f"mt-mps: {e}", file=sys.stderr)
        return 2


def _cli_status(as_json: bool) -> int:
    rows = [daemon_status(d) for d in harness_daemons()]
    if as_json:
        print(json.dumps(rows, indent=1))
    elif not rows:
        print("no MPS daemon started by multitenant is recorded")
    else:
        for r in rows:
            state = "running" if r["alive"] else "dead (stale record)"
            state += ", answers" if r["answers"] else ", does not answer"
            print(f"{r['pipe_dir']}  pid {r['control_pid']}  {state}")
            for srv, clients in r["servers"].items():
                print(f"    server {srv}: clients {' '.join(map(str, clients)) or '-'}")
            print(f"    logs: {r['log_dir']}")
    return 1 if any(r["alive"] or r["answers"] for r in rows) else 0


def _cli_stop(pipe_dirs: list[Path], stop_all: bool, timeout_s: float) -> int:
    if stop_all == bool(pipe_dirs):
        print("mt-mps stop: give PIPE_DIR(s) or --all (see mt-mps status)", file=sys.stderr)
        return 2
    known = {str(d.pipe_dir): d for d in harness_daemons()}
    targets: list[MpsDaemon] = []
    if stop_all:
        targets = list(known.values())
    else:
        for p in pipe_dirs:
            key = str(p.absolute())
            rec = _read_record(p.absolute() / HARNESS_RECORD)
            if key in known:
                targets.append(known[key])
            elif rec is not None:
                targets.append(_daemon_from_record(rec))
            else:
                print(
                    f"mt-mps stop: no multitenant record for {p}; the harness stops only daemons it "
                    f"started (another daemon: echo quit | CUDA_MPS_PIPE_DIRECTORY={p} {CONTROL_BIN_NAME})",
                    file=sys.stderr,
                )
                return 2
    if not targets:
        print("nothing to stop")
        return 0
    rc = 0
    for d in targets:
        res = stop_daemon(d, timeout_s)
        print(f"{d.pipe_dir}: {'stopped' if res.clean else 'NOT stopped'} ({'; '.join(res.actions)})")
        if not res.clean:
            rc = 1
    return rc


if __name__ == "__main__":
    sys.exit(cli_main())
