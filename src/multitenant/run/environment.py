"""The environment a tenant process starts with: its device and MPS share, its CPU threads, what
its backend needs, and the compile caches it keeps across runs."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from multitenant.config.validate import Tenant

# The compile and graph caches a tenant fills during warm-up, each a sub-folder of cache_dir.
CACHE_VARS = {
    "TORCHINDUCTOR_CACHE_DIR": "inductor",  # Inductor's FX graph and kernel caches (hf graphs)
    "TRITON_CACHE_DIR": "triton",  # compiled Triton kernels
    "VLLM_CACHE_ROOT": "vllm",  # vLLM's torch.compile cache
    "CUDA_CACHE_PATH": "cuda",  # the driver's PTX JIT cache
}


def cache_env(env: Mapping[str, str], cache_dir: Path) -> dict[str, str]:
    """The cache variables to set for a tenant: under ``cache_dir``, except those the user's
    environment already sets (kept). Persisting them makes a sweep's later points, and later
    runs, find compiled kernels instead of compiling again (``warmup_s`` drops from minutes to
    seconds for graphs tenants)."""
    return {var: str(cache_dir / sub) for var, sub in CACHE_VARS.items() if not env.get(var)}


def tenant_env(tenant: Tenant, mode: str, cache_dir: Path, pipe_dir: Path | None, log_dir: Path | None) -> dict[str, str]:
    """The complete environment of one tenant process.

    ``cpu``: no GPU visible, and the tenant's own thread count (part of its spec, so baselines
    compare like with like). ``mps``: the daemon's GPU is the tenant's device 0 and its share is
    in ``CUDA_MPS_*`` (``pipe_dir``/``log_dir`` of the run's daemon); ``timeslice``:
    ``CUDA_VISIBLE_DEVICES=<GPU>`` and a pipe dir no daemon listens on. Then what the backend
    declares it needs (``Backend.env``; the user's own setting wins) and the caches."""
    if mode == "cpu":
        env = dict(os.environ)
        env["CUDA_VISIBLE_DEVICES"] = ""
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(tenant.config.cpu_threads)
    else:
        from multitenant.run import mps

        env = mps.child_env(os.environ, mps.tenant_env(tenant.config.share, tenant.device_index or 0, pipe_dir, log_dir))
    for key, value in tenant.backend.env(tenant.options, mode).items():
        env.setdefault(key, value)
    env["PYTHONUNBUFFERED"] = "1"
    env.update(cache_env(env, cache_dir))
    return env
