"""The tenant zygote's own side: serve fork requests, and turn a forked child into a tenant.

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
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import importlib
import json
import os
import runpy
import selectors
import signal
import socket
import sys
import time
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from multitenant.run.zygote import MAX_MSG, N_FDS, PR_SET_PDEATHSIG, TENANT_MODULE


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
