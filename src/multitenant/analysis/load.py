"""Stage 1 of ``mt-analyze``: run folders -> ``RunData`` (typed manifest, config, columns).

A run folder is recognised by its ``manifest.json`` (DESIGN.md, "Experiment folder";
``discover``). For each run this module reads the manifest (``schema.Manifest``),
``config.resolved.yaml``, every ``tenants/<name>/events.jsonl`` and ``telemetry.jsonl``
(``parse``) and keeps them as numpy columns (``columns``): nothing here computes a metric. On
machines with 4 or more cores several large events files are parsed in worker processes.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import orjson

from multitenant.analysis.columns import AnalysisError, Telemetry, TenantLog
from multitenant.analysis.discover import (
    CONFIG_NAME,
    EVENTS_NAME,
    MANIFEST_NAME,
    TELEMETRY_NAME,
    tenant_names,
)
from multitenant.analysis.parse import read_events, read_telemetry
from multitenant.schema import MANIFEST_SCHEMA_VERSION, Manifest, TenantRecord

# Several event files are parsed in worker processes when they are this big together and the
# machine has PARALLEL_MIN_CORES cores: on 2 cores the transfer back and the contention with
# the main process ate the gain (benchmarks/RESULTS.md), so there it parses serially.
PARALLEL_MIN_BYTES = 32 * 1024 * 1024
PARALLEL_MIN_CORES = 4
# RunData.status of a manifest without one.
UNKNOWN_STATUS = "unknown"


@dataclass
class RunData:
    """Everything one run folder holds, read and checked."""

    run_dir: Path
    manifest: Manifest
    config: dict[str, Any] | None
    tenants: dict[str, TenantLog]
    telemetry: Telemetry | None
    warnings: list[str] = field(default_factory=list)

    @property
    def run_id(self) -> str:
        return str(self.manifest.run_id or self.run_dir.name)

    @property
    def name(self) -> str:
        return str(self.manifest.name or (self.config or {}).get("name") or self.run_dir.parent.name)

    @property
    def status(self) -> str:
        return str(self.manifest.status or UNKNOWN_STATUS)

    @property
    def mode(self) -> str | None:
        mode = self.manifest.mode or (self.config or {}).get("mode")
        return None if mode is None else str(mode)

    @property
    def gpu_name(self) -> str | None:
        gpu = self.manifest.gpu
        return None if gpu is None else gpu.name

    def tenant_config(self, name: str) -> dict[str, Any] | None:
        """The tenant's block of ``config.resolved.yaml`` (None without a config)."""
        if self.config is None:
            return None
        tenant = (self.config.get("tenants") or {}).get(name)
        return tenant if isinstance(tenant, dict) else None

    def tenant_manifest(self, name: str) -> TenantRecord:
        """The tenant's manifest record (an empty one when the manifest has none)."""
        return self.manifest.tenants.get(name) or TenantRecord()

    def tenant_task(self, name: str) -> str:
        """``generate`` or ``forward``: from the config, else the manifest, else the events."""
        task = (self.tenant_config(name) or {}).get("task") or self.tenant_manifest(name).task
        if task:
            return str(task)
        log = self.tenants.get(name)
        if log is not None and log.iter_t_ns.size and not log.tok_t_ns.size:
            return "forward"
        return "generate"


# ---------------------------------------------------------------------------------------------
# Manifest and config


def read_manifest(run_dir: Path) -> Manifest:
    """Read and check ``manifest.json``; AnalysisError on damage or an unknown schema."""
    path = run_dir / MANIFEST_NAME
    try:
        data = orjson.loads(path.read_bytes())
    except orjson.JSONDecodeError as e:
        raise AnalysisError(f"{path} is not valid JSON ({e}); restore the file or re-run the experiment") from None
    except OSError as e:
        raise AnalysisError(f"{path} cannot be read ({e.strerror}); check the path and its permissions") from None
    if not isinstance(data, dict):
        raise AnalysisError(f"{path} does not hold a JSON object; it is not a manifest written by mt-run")
    version = data.get("schema_version")
    if version != MANIFEST_SCHEMA_VERSION:
        raise AnalysisError(
            f"{path}: unknown schema_version {version!r} (this mt-analyze reads {MANIFEST_SCHEMA_VERSION}); "
            "analyse it with the multitenant version that wrote it"
        )
    if "status" not in data:
        # Not mt-run's (it writes a status from the start): say so rather than take the default.
        data["status"] = UNKNOWN_STATUS
    try:
        return Manifest.from_json(data)
    except (TypeError, AttributeError) as e:
        raise AnalysisError(f"{path} does not have the shape of a manifest ({e}); it is not one written by mt-run") from None


def read_config(run_dir: Path) -> dict[str, Any] | None:
    """``config.resolved.yaml`` as a plain dict, or None when the run has none."""
    path = run_dir / CONFIG_NAME
    if not path.is_file():
        return None
    from omegaconf import OmegaConf  # only here: half the start-up cost of the package otherwise

    try:
        loaded = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    except Exception as e:  # omegaconf raises several yaml/omegaconf error types
        raise AnalysisError(f"{path} is not valid YAML ({e}); restore the file or re-run the experiment") from None
    if not isinstance(loaded, dict):
        raise AnalysisError(f"{path} does not hold a mapping; it is not a config written by mt-run")
    return {str(k): v for k, v in loaded.items()}



def _read_events_job(args: tuple[str, str, str]) -> TenantLog:
    path, name, label = args
    return read_events(Path(path), name, label)


def load_runs(
    run_dirs: Iterable[Path],
    progress: Callable[[int], None] | None = None,
    parallel: bool | None = None,
) -> list[RunData]:
    """Read several runs. ``progress(n_bytes)`` is called after each events file.

    ``parallel``: None = decide (worker processes when there is more than one events file,
    they exceed PARALLEL_MIN_BYTES together and the machine has PARALLEL_MIN_CORES cores).
    """
    heads: list[tuple[Path, Manifest, dict[str, Any] | None, list[str]]] = []
    jobs: list[tuple[str, str, str]] = []
    for run_dir in run_dirs:
        manifest = read_manifest(run_dir)
        config = read_config(run_dir)
        names = tenant_names(run_dir, manifest, config)
        heads.append((run_dir, manifest, config, names))
        for name in names:
            path = run_dir / "tenants" / name / EVENTS_NAME
            if path.is_file():
                jobs.append((str(path), name, f"{run_dir.name}/tenants/{name}/{EVENTS_NAME}"))
    logs = _read_all(jobs, progress, parallel)

    runs: list[RunData] = []
    for run_dir, manifest, config, names in heads:
        warnings: list[str] = []
        tenants: dict[str, TenantLog] = {}
        for name in names:
            path = run_dir / "tenants" / name / EVENTS_NAME
            log = logs.get(str(path))
            if log is None:
                log = TenantLog(name=name, events_path=None)
                warnings.append(f"tenant {name}: no {EVENTS_NAME} in {run_dir / 'tenants' / name}; it logged nothing")
            warnings.extend(log.warnings)
            tenants[name] = log
        if config is None:
            warnings.append(f"no {CONFIG_NAME} in {run_dir}: solo baselines cannot be matched for this run")
        telemetry = None
        tpath = run_dir / TELEMETRY_NAME
        if tpath.is_file():
            telemetry = read_telemetry(tpath, f"{run_dir.name}/{TELEMETRY_NAME}")
            warnings.extend(telemetry.warnings)
        runs.append(RunData(run_dir, manifest, config, tenants, telemetry, warnings))
    return runs


def load_run(run_dir: str | os.PathLike[str], parallel: bool | None = None) -> RunData:
    """Read one run folder."""
    return load_runs([Path(run_dir)], parallel=parallel)[0]


def _read_all(
    jobs: list[tuple[str, str, str]], progress: Callable[[int], None] | None, parallel: bool | None
) -> dict[str, TenantLog]:
    sizes = [os.path.getsize(j[0]) for j in jobs]
    cores = os.cpu_count() or 1
    if parallel is None:
        parallel = len(jobs) > 1 and cores >= PARALLEL_MIN_CORES and sum(sizes) >= PARALLEL_MIN_BYTES
    out: dict[str, TenantLog] = {}
    if not parallel:
        for job, size in zip(jobs, sizes, strict=True):
            out[job[0]] = _read_events_job(job)
            if progress:
                progress(size)
        return out
    # fork is cheap and needs no re-import; elsewhere (macOS) spawn is the safe choice.
    ctx = get_context("fork" if sys.platform.startswith("linux") else "spawn")
    # Largest files first so the two cores finish together.
    order = sorted(range(len(jobs)), key=lambda i: -sizes[i])
    with ProcessPoolExecutor(max_workers=min(cores, len(jobs)), mp_context=ctx) as pool:
        futures = {i: pool.submit(_read_events_job, jobs[i]) for i in order}
        for i in order:
            try:
                out[jobs[i][0]] = futures[i].result()
            except AnalysisError:
                raise
            if progress:
                progress(sizes[i])
    return out

