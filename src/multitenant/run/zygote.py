"""The tenant zygote: one pre-imported Python process per ``mt-run`` that forks tenant processes.

Importing torch and transformers costs a fresh tenant process seconds (7.6–13.1 s per job on
the H200 VM, benchmarks/RESULTS.md "What a sweep point costs"). With ``tenant_start: fork``
(``ExperimentConfig``) ``mt-run`` starts one zygote (``python -m multitenant.run.zygote_server``) the
first time a job starts its tenants; before each job's tenants start, the zygote imports what
they need (``preload``: each tenant's engine module and ``multitenant.run.tenant``; vLLM only
when a tenant's backend is vLLM) and then forks one child per tenant. Each child runs
``multitenant.run.tenant`` as ``__main__`` (``runpy``, as ``python -m`` does) and exits through
the interpreter's normal shutdown (atexit handlers, non-daemon threads joined, streams flushed).

Protocol: one ``SOCK_SEQPACKET`` socket pair, one JSON object per message; the fds travel as
``SCM_RIGHTS`` (``socket.send_fds``). Client -> zygote: ``preload {modules}`` and
``fork {argv, env, cwd}`` with five fds (stdin, stdout, stderr, command pipe, message pipe).
Zygote -> client: ``preloaded``, ``forked {pid}`` or ``refused {error}``, and, whenever a child
ends, ``exit {pid, status}`` (the raw wait status: the client's ``ForkedProcess.returncode`` is
``subprocess.Popen``'s, negative for a signal).

What a forked child gets, and which variables are read at import: ``zygote_server``.

What differs, seen from outside only: a forked tenant was not exec'd, so its
``/proc/<pid>/cmdline`` and ``/proc/<pid>/environ`` are the zygote's (``ps`` shows ``python -m
multitenant.run.zygote_server``; ``psutil.Process(pid).environ()`` the zygote's environment, without
the tenant's MPS share). The process itself, the CUDA driver in it included, reads its own
(``getenv`` sees the environment set after the fork). Its parent is the zygote, not ``mt-run``.

The rule that keeps this exact: a tenant whose environment differs from the zygote's in any
variable outside ``FORK_SAFE_VARS`` (read at first use, or set in the child as above) is not
forked but started fresh (``tenants.spawn`` falls back to ``subprocess.Popen``), and the
manifest says so per tenant (``TenantRecord.start``).

Lifetime: the zygote is a child of ``mt-run`` in its own session; it exits when its socket
reaches end-of-file (``mt-run`` closed it at exit, or died), and at once when ``mt-run`` dies
(``PR_SET_PDEATHSIG``: SIGKILL, so a preload in progress does not hold it). It imports only
between jobs (a job's tenants are forked after the previous job's tenants were stopped), and
its children are reaped by it and reported.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

log = logging.getLogger("multitenant")

MAX_MSG = 1 << 20
N_FDS = 5  # stdin, stdout, stderr, command pipe (tenant reads), message pipe (tenant writes)
PR_SET_PDEATHSIG = 1
TENANT_MODULE = "multitenant.run.tenant"
# The variables a tenant may have other than the zygote's and still be forked (module
# docstring says who reads them, and when).
FORK_SAFE_VARS = frozenset({
    "CUDA_VISIBLE_DEVICES", "CUDA_CACHE_PATH", "CUDA_DEVICE_ORDER",
    "OMP_NUM_THREADS", "MKL_NUM_THREADS",
    "PYTORCH_NVML_BASED_CUDA_CHECK", "PYTHONUNBUFFERED",
})  # fmt: skip
FORK_SAFE_PREFIXES = ("CUDA_MPS_",)
# Set in the zygote only (not in its children): see the module docstring.
THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")


def unsafe_differences(env: Mapping[str, str], zygote_env: Mapping[str, str]) -> list[str]:
    """The variables in which ``env`` differs from the zygote's and that a forked child could
    not take on (read at import): a tenant with any of them starts fresh."""
    keys = set(env) | set(zygote_env)
    return sorted(
        k for k in keys
        if env.get(k) != zygote_env.get(k) and k not in FORK_SAFE_VARS and not k.startswith(FORK_SAFE_PREFIXES)
    )  # fmt: skip


# -- client side (mt-run) ----------------------------------------------------------------------


class ZygoteError(RuntimeError):
    """The zygote refused to fork, or is gone."""


@dataclass
class ForkedProcess:
    """A tenant forked by the zygote, as the orchestrator sees a ``subprocess.Popen``: ``pid``,
    ``poll()``, ``returncode`` (negative: killed by that signal), ``wait()``."""

    pid: int
    zygote: Zygote
    returncode: int | None = None
    args: list[str] | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            self.zygote.pump()
            self.returncode = self.zygote.exit_code(self.pid)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            if deadline is not None and time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(self.args or [], timeout or 0.0)
            self.zygote.pump(0.05)
        assert self.returncode is not None
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, sig)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


class Zygote:
    """The client's end: starts the zygote process, asks it to preload and to fork."""

    def __init__(self, env: Mapping[str, str] | None = None, cwd: str | None = None) -> None:
        base = dict(os.environ if env is None else env)
        for var in THREAD_VARS:  # a child sets its own (module docstring)
            base.pop(var, None)
        base["PYTHONUNBUFFERED"] = "1"
        base.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")
        self.env = base
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self._sock = ours  # not inheritable: no other child of mt-run holds the zygote up
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "multitenant.run.zygote_server", "--fd", str(theirs.fileno()), "--parent", str(os.getpid())],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,  # stderr stays mt-run's: a zygote that breaks says why there
                env=base,
                cwd=cwd or os.getcwd(),
                pass_fds=(theirs.fileno(),),
                start_new_session=True,  # the terminal's Ctrl-C is mt-run's to handle
            )
        finally:
            theirs.close()
        self._exits: dict[int, int] = {}
        self._replies: list[dict[str, Any]] = []
        self._gone = False
        self.preloaded: set[str] = set()

    @property
    def alive(self) -> bool:
        return not self._gone and self.proc.poll() is None

    def _handle(self, data: bytes) -> None:
        if not data:
            self._gone = True
            return
        msg = json.loads(data)
        if msg["op"] == "exit":
            self._exits[msg["pid"]] = os.waitstatus_to_exitcode(msg["status"])
        else:
            self._replies.append(msg)

    def pump(self, timeout_s: float = 0.0) -> None:
        """Take what the zygote sent (children's exits, replies); wait up to ``timeout_s`` for
        the first message."""
        first = True
        while not self._gone:
            if first and timeout_s > 0:
                self._sock.settimeout(timeout_s)
            else:
                self._sock.setblocking(False)
            first = False
            try:
                data = self._sock.recv(MAX_MSG)
            except (BlockingIOError, TimeoutError):
                break
            except OSError:
                self._gone = True
                break
            self._handle(data)

    def _reply(self, timeout_s: float) -> dict[str, Any]:
        """The answer to the request just sent. A zygote that does not answer (or a wait cut
        short: SIGTERM, Ctrl-C) would answer later, out of turn: it is ended."""
        deadline = time.monotonic() + timeout_s
        try:
            while not self._replies:
                if self._gone or time.monotonic() > deadline:
                    raise ZygoteError("the tenant zygote is gone" if self._gone else "the tenant zygote did not answer")
                self.pump(min(0.5, max(deadline - time.monotonic(), 0.01)))
        except BaseException:
            self.close(timeout_s=0.0)
            raise
        return self._replies.pop(0)

    def _send(self, msg: dict[str, Any], fds: Iterable[int] = ()) -> None:
        self._sock.setblocking(True)
        try:
            socket.send_fds(self._sock, [json.dumps(msg).encode()], list(fds))
        except OSError as e:
            self._gone = True
            raise ZygoteError(f"the tenant zygote is gone ({e})") from None

    def exit_code(self, pid: int) -> int | None:
        code = self._exits.pop(pid, None)
        if code is None and self._gone and not _pid_alive(pid):
            return 1  # the zygote died before it could report this child's exit: unknown, not ok
        return code

    def preload(self, modules: Iterable[str], timeout_s: float = 600.0) -> float:
        """Import ``modules`` in the zygote (those not imported yet); returns the seconds it took.
        An import that fails there is reported by the tenant itself, as in a fresh process."""
        todo = sorted(set(modules) - self.preloaded)
        if not todo:
            return 0.0
        self._send({"op": "preload", "modules": todo})
        reply = self._reply(timeout_s)
        self.preloaded.update(todo)
        if reply.get("error"):
            log.warning("tenant zygote: %s (the tenants import it themselves)", reply["error"])
        return float(reply.get("import_s", 0.0))

    def fork(
        self, argv: list[str], env: Mapping[str, str], cwd: str, fds: tuple[int, int, int, int, int],
        module: str = TENANT_MODULE,
    ) -> ForkedProcess:
        """Fork one tenant: ``argv`` are its arguments after ``python -m <module>`` (fd numbers
        in them are the child's: ``{ctl_in}`` and ``{ctl_out}`` are filled in)."""
        self._send({"op": "fork", "argv": argv, "env": dict(env), "cwd": cwd, "module": module}, fds)
        reply = self._reply(60.0)
        if reply["op"] != "forked":
            raise ZygoteError(reply.get("error", "refused"))
        return ForkedProcess(pid=int(reply["pid"]), zygote=self, args=argv)

    def close(self, timeout_s: float = 5.0) -> None:
        """End the zygote (end-of-file on its socket), and kill it if it does not go."""
        with contextlib.suppress(OSError):
            self._sock.close()
        self._gone = True
        try:
            self.proc.wait(timeout_s if timeout_s > 0 else 0.001)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


_shared: Zygote | None = None


def shared(extra_env: Mapping[str, str] | None = None) -> Zygote:
    """This process's zygote, started on first use (with ``os.environ`` and ``extra_env``: the
    run's cache variables) and ended at exit."""
    global _shared
    if _shared is None or not _shared.alive:
        _shared = Zygote({**os.environ, **(extra_env or {})})
        atexit.register(_shared.close)
    return _shared


def close_shared() -> None:
    global _shared
    if _shared is not None:
        _shared.close()
        _shared = None


# -- zygote side -----------------------------------------------------------------------------
