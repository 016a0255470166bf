"""Where MPS lives and what a tenant's environment says about it: the harness's private state
root, pipe directories, the device mapping (``physical_device``) and a tenant's CUDA/MPS
environment (``tenant_env``, merged by ``child_env``).

Device mapping (why tenants use ``cuda:0``): the control daemon is started with
``CUDA_VISIBLE_DEVICES`` set to the one physical GPU it serves, so its server sees only that GPU
and every client sees it, remapped, as device 0. NVIDIA's MPS guide says clients must not set
``CUDA_VISIBLE_DEVICES`` themselves (a client that keeps the daemon's value would name a device
the server does not have), so ``child_env`` removes it from a tenant's environment under MPS. In
``timeslice`` the tenant gets ``CUDA_VISIBLE_DEVICES=<physical>`` and again sees its GPU as
device 0. Indices follow ``CUDA_DEVICE_ORDER=PCI_BUS_ID`` (set for the daemon and tenants), the
order NVML and nvidia-smi use, so ``cuda:<i>`` in a config, the daemon's GPU and the telemetry
GPU agree. When the harness itself runs under ``CUDA_VISIBLE_DEVICES=2,3``, ``cuda:1`` means
physical ``3``.
"""

from __future__ import annotations

import hashlib
import os
import re
import stat
from collections.abc import Mapping
from pathlib import Path

from multitenant.config.schema import ShareConfig

STATE_DIR_ENV = "MT_MPS_STATE_DIR"  # override of /tmp/mt-mps-<uid> (tests)
# Inherited variables a tenant must not see: they would redirect or re-shape its MPS attachment.
TENANT_ENV_REMOVE_PREFIXES = ("CUDA_MPS_",)
TENANT_ENV_REMOVE = ("CUDA_VISIBLE_DEVICES",)


class MpsError(RuntimeError):
    """An MPS problem, phrased as one line: what is wrong and how to fix it."""


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


def no_mps_pipe_dir() -> Path:
    """A pipe directory path nobody listens on: the harness's state root + a name never created."""
    return state_root() / "no-mps"


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
    share: ShareConfig,
    device_index: int,
    pipe_dir: Path | None,
    log_dir: Path | None,
) -> dict[str, str]:
    """The CUDA environment of one tenant (merge it with ``child_env``).

    With a ``pipe_dir`` (modes mps, mps_external): ``CUDA_MPS_PIPE_DIRECTORY``,
    ``CUDA_MPS_LOG_DIRECTORY`` (if given) and, for each share value that is set,
    ``CUDA_MPS_ACTIVE_THREAD_PERCENTAGE`` (``active_thread_pct``),
    ``CUDA_MPS_PINNED_DEVICE_MEM_LIMIT`` (``pinned_mem_limit``, already ``"<dev>=<size>"`` from
    validation; the device index is the tenant's view, i.e. 0) and ``CUDA_MPS_CLIENT_PRIORITY``
    (``priority``). The values were range-checked by the config's validation; the one check
    kept here is the pinned limit's device, whose absence MPS would ignore silently.
    ``CUDA_VISIBLE_DEVICES`` is *not* set: the daemon's GPU is the client's device 0.

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
    if share.active_thread_pct is not None:
        env["CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"] = str(int(share.active_thread_pct))
    if share.pinned_mem_limit is not None:
        if "=" not in share.pinned_mem_limit:
            raise MpsError(
                f"pinned_mem_limit {share.pinned_mem_limit!r} lacks its device; "
                "pass it through the config's validation (0=20G)"
            )
        env["CUDA_MPS_PINNED_DEVICE_MEM_LIMIT"] = share.pinned_mem_limit
    if share.priority is not None:
        env["CUDA_MPS_CLIENT_PRIORITY"] = str(int(share.priority))
    return env


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
