"""The tenant zygote: one pre-imported Python process per ``mt-run`` that forks tenant processes.

Importing torch and transformers costs a fresh tenant process seconds (7.6–13.1 s per job on
the H200 VM, benchmarks/RESULTS.md "What a sweep point costs"). With ``tenant_start: fork``
(``ExperimentConfig``) ``mt-run`` starts one zygote (``python -m multitenant.run.zygote``) the
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

What a forked child gets, so that it behaves like a fresh ``python -m multitenant.run.tenant``:

- its own session and process group (``os.setsid``): the orchestrator stops it with
  ``os.killpg`` and the terminal's Ctrl-C does not reach it; PR_SET_PDEATHSIG is not inherited;
- stdin ``/dev/null``, stdout and stderr on its log files (``dup2`` onto 0, 1, 2; the zygote
  runs with ``PYTHONUNBUFFERED=1``, as every tenant does, so its ``sys.stdout``/``sys.stderr``
  are the unbuffered kind a fresh tenant has), its two control pipes (inheritable, as
  ``pass_fds`` makes them), the zygote's own socket and wake-up pipe closed;
- its working directory, ``sys.path[0]`` and ``sys.argv``; its environment replaced as a whole
  (``os.environ`` cleared and refilled: ``putenv`` for the C side too) before anything of the
  tenant runs; SIGCHLD, SIGINT and SIGTERM back to a fresh interpreter's handlers;
- the imported modules' objects are frozen in the zygote (``gc.freeze``): a child's garbage
  collections skip them instead of touching, and so copying, their pages (a fresh process
  freezes them at ready, ``tenant.py``, after one collection);
- the ``random`` module reseeds itself after a fork (its ``register_at_fork`` hook); numpy's
  and torch's global generators keep the zygote's state, which is what a fresh process would
  have too (torch seeds a fixed default; the harness seeds its own generators).

Which variables are read at import rather than at first use (checked on torch 2.13 + cpu,
transformers 5.25, Python 3.11, in this code):

- ``OMP_NUM_THREADS`` / ``MKL_NUM_THREADS``: libgomp reads them when it is loaded (with
  torch), OpenBLAS (numpy's, scipy's) when it is loaded: the child calls
  ``torch.set_num_threads`` and ``openblas_set_num_threads`` with the child's value. The
  zygote itself starts without them (a child without them gets the same default as a fresh
  process: one thread per CPU);
- ``TORCHINDUCTOR_CACHE_DIR``: ``torch._inductor.runtime.cache_dir_utils.cache_dir()`` reads
  it at each call, but the hf engine's imports load ``torch._dynamo`` (transformers needs it),
  and ``torch._dynamo.package`` builds its ``DynamoCache`` from ``cache_dir()`` at import: the
  path is fixed then. So the zygote starts with the run's cache variables
  (``environment.cache_env``: ``TORCHINDUCTOR_CACHE_DIR``, ``TRITON_CACHE_DIR``,
  ``VLLM_CACHE_ROOT``, ``CUDA_CACHE_PATH``), the tenants' own values; a tenant with other
  values (a later job of the sweep with another ``cache_dir``) starts fresh.
  ``torch._inductor.config`` reads its other ``TORCHINDUCTOR_*`` flags at import: those are
  mt-run's values, which a tenant's environment never changes;
- ``TRITON_CACHE_DIR``: read when triton compiles; triton itself is not imported by the
  preload on the CPU (checked; on a GPU build its knobs read the variable on access); the
  zygote has the tenants' value anyway;
- ``CUDA_VISIBLE_DEVICES``, ``CUDA_MPS_*``, ``CUDA_CACHE_PATH``: read by the CUDA driver at
  ``cuInit``, which never happens in the zygote: before each fork it checks
  ``torch.cuda.is_initialized()`` is False and that ``libcuda`` is not even loaded (it runs
  with ``PYTORCH_NVML_BASED_CUDA_CHECK=1``, so a ``torch.cuda.is_available()`` during an import
  asks NVML, not the driver); otherwise it refuses to fork and the tenant starts fresh. The
  child forgets torch's cached device count;
- ``HF_*``, ``HUGGINGFACE_*``, ``TRANSFORMERS_*``: ``huggingface_hub.constants`` and
  transformers read them at import. The harness never sets them per tenant, so the zygote's
  values (mt-run's) are the tenant's. ``VLLM_*``: not checked here (vLLM is not installed on
  this machine): a tenant that sets one (vLLM on the CPU does) starts fresh.

What differs, seen from outside only: a forked tenant was not exec'd, so its
``/proc/<pid>/cmdline`` and ``/proc/<pid>/environ`` are the zygote's (``ps`` shows ``python -m
multitenant.run.zygote``; ``psutil.Process(pid).environ()`` the zygote's environment, without
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
import ctypes
import gc
import importlib
import json
import logging
import os
import runpy
import selectors
import signal
import socket
import subprocess
import sys
import time
import warnings
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
                [sys.executable, "-m", "multitenant.run.zygote", "--fd", str(theirs.fileno()), "--parent", str(os.getpid())],
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


@dataclass
class ChildJob:
    """What a forked child runs once it has left the zygote's loop."""

    argv: list[str]
    cwd: str
    module: str = TENANT_MODULE


def _cuda_problem() -> str | None:
    """Why forking now would copy CUDA state into a child, or None."""
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():
        return "CUDA is initialised in the tenant zygote"
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as f:
            if any("libcuda.so" in line for line in f):
                return "the CUDA driver (libcuda) is loaded in the tenant zygote"
    except OSError:
        pass
    return None


def _set_threads(env: Mapping[str, str]) -> None:
    """A fresh process's thread counts from ``OMP_NUM_THREADS``/``MKL_NUM_THREADS``, read by
    libgomp and OpenBLAS when they were loaded (in the zygote, without them)."""
    value = env.get("OMP_NUM_THREADS") or env.get("MKL_NUM_THREADS")
    if not value or not value.strip().isdigit() or int(value) < 1:
        return
    n = int(value)
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.set_num_threads(n)  # OpenMP and MKL
    if env.get("OPENBLAS_NUM_THREADS") or env.get("GOTO_NUM_THREADS"):
        return  # OpenBLAS prefers those, and they came from the zygote's environment unchanged
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as f:
            paths = {line.split()[-1] for line in f if line.count("/") and "openblas" in line.rsplit("/", 1)[-1].lower()}
    except OSError:
        return
    libs = sorted(p for p in paths if ".so" in p)
    for path in libs:
        with contextlib.suppress(OSError):
            lib = ctypes.CDLL(path)
            for sym in ("openblas_set_num_threads", "scipy_openblas_set_num_threads64_", "openblas_set_num_threads64_"):
                fn = getattr(lib, sym, None)
                if fn is not None:
                    fn(ctypes.c_int(n))
                    break


def _become_tenant(job_msg: dict[str, Any], fds: list[int], closing: Iterable[int]) -> ChildJob:
    """In the forked child: take on the tenant's session, fds, directory and environment."""
    os.setsid()
    signal.set_wakeup_fd(-1)
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    for fd in closing:
        with contextlib.suppress(OSError):
            os.close(fd)
    stdin, stdout, stderr, ctl_in, ctl_out = fds
    for src, dst in ((stdin, 0), (stdout, 1), (stderr, 2)):
        os.dup2(src, dst)
        os.close(src)
    os.set_inheritable(ctl_in, True)
    os.set_inheritable(ctl_out, True)
    cwd = job_msg["cwd"]
    os.chdir(cwd)
    env = job_msg["env"]
    os.environ.clear()
    os.environ.update(env)
    torch = sys.modules.get("torch")
    if torch is not None and hasattr(torch.cuda, "_cached_device_count"):
        torch.cuda._cached_device_count = None
    _set_threads(env)
    argv = [a.replace("{ctl_in}", str(ctl_in)).replace("{ctl_out}", str(ctl_out)) for a in job_msg["argv"]]
    return ChildJob(argv=argv, cwd=cwd, module=job_msg.get("module", TENANT_MODULE))


def _set_pdeathsig(parent: int) -> None:
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:  # it died before the line above
        os._exit(0)


def serve(sock: socket.socket) -> ChildJob | None:
    """The zygote's loop. Returns None when the client is gone (the zygote exits), or, in a
    forked child, the job it is to run."""
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_r, False)
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda signum, frame: None)
    sel = selectors.DefaultSelector()
    sel.register(sock, selectors.EVENT_READ)
    sel.register(wake_r, selectors.EVENT_READ)
    cache_dir_before = os.environ.get("TORCHINDUCTOR_CACHE_DIR")

    def send(msg: dict[str, Any]) -> None:
        with contextlib.suppress(OSError):
            sock.send(json.dumps(msg).encode())

    def reap() -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            send({"op": "exit", "pid": pid, "status": status})

    while True:
        for key, _ in sel.select():
            if key.fileobj is not sock:
                with contextlib.suppress(OSError):
                    while os.read(wake_r, 512):
                        pass
                reap()
                continue
            data, fds, _flags, _addr = socket.recv_fds(sock, MAX_MSG, N_FDS)
            if not data:
                for fd in fds:
                    os.close(fd)
                return None
            msg = json.loads(data)
            if msg["op"] == "preload":
                t = time.monotonic()
                errors = []
                for module in msg["modules"]:
                    try:
                        importlib.import_module(module)
                    except Exception as e:  # the tenant reports it, as a fresh one would
                        errors.append(f"import {module}: {type(e).__name__}: {e}")
                if os.environ.get("TORCHINDUCTOR_CACHE_DIR") != cache_dir_before:
                    errors.append("an import set TORCHINDUCTOR_CACHE_DIR in the zygote")
                # What the imports built is shared copy-on-write with every child: frozen, a
                # child's collections never walk it (which would copy those pages into each).
                gc.freeze()
                send({"op": "preloaded", "import_s": time.monotonic() - t, "error": "; ".join(errors) or None})
            elif msg["op"] == "fork":
                problem = _cuda_problem()
                if problem is None and len(fds) != N_FDS:
                    problem = f"fork needs {N_FDS} fds, got {len(fds)}"
                if problem is not None:
                    for fd in fds:
                        os.close(fd)
                    send({"op": "refused", "error": problem})
                    continue
                sys.stdout.flush()
                sys.stderr.flush()
                pid = os.fork()
                if pid == 0:
                    sel.close()
                    closing = [sock.detach(), wake_r, wake_w]
                    return _become_tenant(msg, fds, closing)
                for fd in fds:
                    os.close(fd)
                send({"op": "forked", "pid": pid})
            else:
                send({"op": "refused", "error": f"unknown request {msg.get('op')!r}"})


def run_child(job: ChildJob) -> None:
    """Run the tenant as ``python -m multitenant.run.tenant ARGS`` would (it ends in SystemExit)."""
    if sys.path and sys.path[0] != job.cwd and os.path.isdir(sys.path[0]):
        sys.path[0] = job.cwd  # ``python -m`` puts the working directory first
    sys.argv = ["-m", *job.argv]
    # ``python -m`` runs the module as __main__ only: the preloaded copy goes (its imports stay),
    # as runpy would otherwise warn on stderr, whose last line is a failed tenant's reason.
    sys.modules.pop(job.module, None)
    runpy.run_module(job.module, run_name="__main__", alter_sys=True)


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m multitenant.run.zygote", description=__doc__.split("\n")[0])
    ap.add_argument("--fd", type=int, required=True, help="the zygote's end of the socket pair")
    ap.add_argument("--parent", type=int, required=True, help="pid of mt-run: the zygote dies with it")
    args = ap.parse_args(argv)
    _set_pdeathsig(args.parent)
    # The fork is single-threaded by design; OpenBLAS's idle workers stop at fork (its atfork
    # hook). Python 3.12 would warn about them on every fork.
    warnings.filterwarnings("ignore", message=".*multi-threaded.*fork", category=DeprecationWarning)
    sock = socket.socket(fileno=args.fd)
    try:
        job = serve(sock)
    except KeyboardInterrupt:
        return 0
    if job is None:
        # Nothing to flush or save: skip the teardown of torch and transformers (about a second).
        sys.stderr.flush()
        os._exit(0)
    run_child(job)  # a forked tenant: exits through SystemExit like a fresh one
    return 0


if __name__ == "__main__":
    sys.exit(main())
