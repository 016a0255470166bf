"""The orchestrator's view of its tenant processes: spawn one, read its messages, stop it.

A tenant is ``python -m multitenant.run.tenant`` in its own session (a whole process group can
be stopped, and the terminal's Ctrl-C does not reach it), with two pipes: commands to it
(``schema.WindowCmd``, ``StopCmd``) and messages from it (``WarmupMsg``, ``ReadyMsg``, ``ProgressMsg``,
``ErrorMsg``, ``FinishedMsg``), one JSON line each.

With a tenant zygote (``tenant_start: fork``, ``zygote.py``) the same process is forked from a
pre-imported one instead of started fresh; ``TenantProc.popen`` is then a
``zygote.ForkedProcess``, with the same ``pid``, ``poll()`` and ``returncode``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from multitenant.config.validate import Tenant
from multitenant.run.spec import TenantSpec
from multitenant.run.zygote import Zygote, ZygoteError, unsafe_differences
from multitenant.schema import (
    Command,
    Counts,
    ErrorMsg,
    FinishedMsg,
    Message,
    ProgressMsg,
    ReadyMsg,
    WarmupMsg,
    encode,
)

# A tenant's state as the orchestrator sees it.
LOADING, WARMING_UP, READY, RUNNING, FINISHED, FAILED = "loading", "warming up", "ready", "running", "finished", "failed"
SPAWN, FORK = "spawn", "fork"

log = logging.getLogger("multitenant")


class Process(Protocol):
    """What the orchestrator uses of a tenant's process: ``subprocess.Popen`` or
    ``zygote.ForkedProcess``."""

    @property
    def pid(self) -> int: ...

    def poll(self) -> int | None: ...


@dataclass
class TenantProc:
    """One tenant process: its validated tenant, its pipes, and what it said so far.

    ``window``: its own measured phase [t0 + start_delay_s, that + duration_s] (end None: it
    stops on a request count), once announced; ``progress_t_ns`` and ``counts``: its last
    counts and when they were taken (the live rate divides one by the other)."""

    tenant: Tenant
    dir: Path
    popen: Process
    cmd_pipe: object  # text file: orchestrator -> tenant
    msg_fd: int  # orchestrator <- tenant
    started_at: float = 0.0  # time.monotonic() of the spawn: its ready deadline counts from here
    start: str = SPAWN  # how it started: spawn | fork
    state: str = LOADING
    ready: ReadyMsg | None = None
    counts: Counts | None = None
    progress_t_ns: int | None = None
    error: str | None = None
    final_status: str | None = None
    exit_code: int | None = None
    last_msg_ns: int = 0  # time.monotonic_ns() of the last bytes it sent: hang detection
    window: tuple[int, int | None] | None = None
    buffer: bytes = field(default=b"", repr=False)

    @property
    def name(self) -> str:
        return self.tenant.name

    @property
    def stderr_path(self) -> Path:
        return self.dir / "stderr.log"

    def send(self, cmd: Command) -> None:
        try:
            self.cmd_pipe.write(encode(cmd) + "\n")  # type: ignore[attr-defined]
            self.cmd_pipe.flush()  # type: ignore[attr-defined]
        except (BrokenPipeError, ValueError, OSError):
            pass  # the tenant is gone; its exit code tells the rest

    def announce(self, t0_ns: int) -> tuple[int, int | None]:
        """Its own window from the common ``t0_ns`` (its start delay and duration); kept here."""
        wl = self.tenant.config.workload
        start = t0_ns + int(wl.start_delay_s * 1e9)
        end = start + int(wl.duration_s * 1e9) if wl.duration_s is not None else None
        self.window = (start, end)
        return self.window

    def take(self, chunk: bytes) -> list[bytes]:
        """Whole lines received so far (the rest waits in the buffer)."""
        self.last_msg_ns = time.monotonic_ns()
        self.buffer += chunk
        *lines, self.buffer = self.buffer.split(b"\n")
        return [line for line in lines if line.strip()]

    def on_message(self, msg: Message) -> None:
        """Update what the orchestrator knows from one message."""

        if isinstance(msg, WarmupMsg):
            self.state = WARMING_UP
        elif isinstance(msg, ReadyMsg):
            self.state = READY
            self.ready = msg
        elif isinstance(msg, ProgressMsg):
            self.counts, self.progress_t_ns = msg.counts, msg.t
        elif isinstance(msg, ErrorMsg):
            self.error = msg.error
            self.state = FAILED
        elif isinstance(msg, FinishedMsg):
            self.final_status = msg.status
            # The final counts are the whole measured phase's: the live rate divides them by
            # the time to its end (now, or the tenant's window end if that came first).
            end_ns = time.monotonic_ns()
            if self.window is not None and self.window[1] is not None:
                end_ns = min(end_ns, self.window[1])
            self.counts, self.progress_t_ns = msg.counts, end_ns


def spawn(spec: TenantSpec, tenant: Tenant, tdir: Path, env: dict[str, str], zygote: Zygote | None = None) -> TenantProc:
    """Start one tenant process from its spec (written to ``tdir/spec.json``): forked from
    ``zygote`` if given and the tenant's environment allows it (``zygote.unsafe_differences``),
    else a fresh interpreter."""
    if zygote is not None and (unsafe := unsafe_differences(env, zygote.env)):
        log.warning("tenant %s starts fresh: its environment differs from the zygote's in %s", tenant.name, ", ".join(unsafe))
        zygote = None
    spec_path = tdir / "spec.json"
    spec.spawned_ns = time.monotonic_ns()
    spec.write(spec_path)
    cmd_r, cmd_w = os.pipe()
    msg_r, msg_w = os.pipe()
    popen: Process | None = None
    how = SPAWN
    # The child keeps its own copies of the log fds; ours close when the block ends.
    with open(tdir / "stdout.log", "wb") as stdout, open(tdir / "stderr.log", "wb") as stderr:
        if zygote is not None:
            try:
                with open(os.devnull, "rb") as devnull:
                    popen = zygote.fork(
                        ["--spec", str(spec_path), "--ctl-in", "{ctl_in}", "--ctl-out", "{ctl_out}"],
                        env, os.getcwd(), (devnull.fileno(), stdout.fileno(), stderr.fileno(), cmd_r, msg_w),
                    )  # fmt: skip
                how = FORK
            except ZygoteError as e:
                log.warning("tenant %s starts fresh: the tenant zygote did not fork it (%s)", tenant.name, e)
        if popen is None:
            popen = subprocess.Popen(
                [sys.executable, "-m", "multitenant.run.tenant", "--spec", str(spec_path),
                 "--ctl-in", str(cmd_r), "--ctl-out", str(msg_w)],
                stdin=subprocess.DEVNULL,
                stdout=stdout,
                stderr=stderr,
                env=env,
                pass_fds=(cmd_r, msg_w),
                start_new_session=True,  # own process group: stopped as a whole, immune to the terminal's ^C
                cwd=os.getcwd(),
            )  # fmt: skip
    os.close(cmd_r)
    os.close(msg_w)
    os.set_blocking(msg_r, False)
    return TenantProc(tenant, tdir, popen, os.fdopen(cmd_w, "w"), msg_r, started_at=time.monotonic(), start=how)


def signal_group(tp: TenantProc, sig: signal.Signals) -> None:
    """Signal the tenant's whole process group: its own children (compile workers, an engine
    core, a server) must not outlive it. The group also catches children of an exited leader."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(tp.popen.pid, sig)


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def last_line(path: Path, limit: int = 65536) -> str:
    """Last non-empty line of a log file (the reason quoted for a failed tenant)."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - limit))
            lines = [ln.strip() for ln in f.read().decode("utf-8", "replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    return lines[-1] if lines else ""
