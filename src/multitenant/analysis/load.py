"""Stage 1 of ``mt-analyze``: run folders -> ``RunData`` (typed manifest, config, columns).

A run folder is recognised by its ``manifest.json`` (docs/design.md, "The experiment folder";
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
from multitenant.config.schema import ExperimentConfig, TenantConfig
from multitenant.schema import MANIFEST_SCHEMA_VERSION, Manifest, TenantRecord, from_dict

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
    config: ExperimentConfig | None  # config.resolved.yaml, typed (None: the run has none)
    tenants: dict[str, TenantLog]
    telemetry: Telemetry | None
    warnings: list[str] = field(default_factory=list)
    # Each tenant's block of config.resolved.yaml as written: its backend's options block (the
    # typed TenantConfig holds the fields every backend shares), and what an older writer left
    # out, for runs whose manifest does not record the tenant's baseline identity.
    written: dict[str, dict[str, Any]] = field(default_factory=dict)

    def backend_options(self, name: str) -> dict[str, Any] | None:
        """The tenant's own backend options block as written (``tenants.<t>.vllm`` of a vllm one)."""
        block = self.written.get(name) or {}
        options = block.get(str(block.get("backend", "hf")))
        return options if isinstance(options, dict) else None

    @property
    def run_id(self) -> str:
        return str(self.manifest.run_id or self.run_dir.name)

    @property
    def name(self) -> str:
        return str(self.manifest.name or (self.config.name if self.config else "") or self.run_dir.parent.name)

    @property
    def status(self) -> str:
        return str(self.manifest.status or UNKNOWN_STATUS)

    @property
    def mode(self) -> str | None:
        mode = self.manifest.mode or (self.config.mode if self.config else None)
        return None if mode is None else str(mode)

    @property
    def gpu_name(self) -> str | None:
        gpu = self.manifest.gpu
        return None if gpu is None else gpu.name

    def tenant_config(self, name: str) -> TenantConfig | None:
        """The tenant's block of ``config.resolved.yaml`` (None without a config or tenant)."""
        return None if self.config is None else self.config.tenants.get(name)

    def tenant_manifest(self, name: str) -> TenantRecord:
        """The tenant's manifest record (an empty one when the manifest has none)."""
        return self.manifest.tenants.get(name) or TenantRecord()

    def tenant_task(self, name: str) -> str:
        """``generate`` or ``forward``: from the config, else the manifest, else the events."""
        cfg = self.tenant_config(name)
        task = (cfg.task if cfg is not None else None) or self.tenant_manifest(name).task
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


def read_config(run_dir: Path) -> tuple[ExperimentConfig, dict[str, dict[str, Any]]] | None:
    """``config.resolved.yaml`` typed (keys the schema lacks are ignored: older or newer
    writers) and each tenant's block as written; None without the file."""
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
    try:
        config = from_dict(ExperimentConfig, {str(k): v for k, v in loaded.items()})
    except (TypeError, AttributeError) as e:
        raise AnalysisError(f"{path} does not have the shape of an experiment config ({e}); it is not one written by mt-run") from None
    raw_tenants = loaded.get("tenants")
    raw_tenants = raw_tenants if isinstance(raw_tenants, dict) else {}
    return config, {str(name): block for name, block in raw_tenants.items() if isinstance(block, dict)}



def _read_events_job(args: tuple[str, str, str]) -> TenantLog:
    path, name, label = args
    return read_events(Path(path), name, label)


def read_head(run_dir: Path) -> RunData:
    """A run's manifest and config, its tenants without their events (enough to match baselines)."""
    manifest = read_manifest(run_dir)
    config = read_config(run_dir)
    typed, written = config if config is not None else (None, {})
    names = tenant_names(run_dir, manifest, typed)
    tenants = {n: TenantLog(name=n, events_path=None) for n in names}
    return RunData(run_dir, manifest, typed, tenants, None, written=written)


def load_runs(
    run_dirs: Iterable[Path],
    progress: Callable[[int], None] | None = None,
    parallel: bool | None = None,
) -> list[RunData]:
    """Read several runs. ``progress(n_bytes)`` is called after each events file.

    ``parallel``: None = decide (worker processes when there is more than one events file,
    they exceed PARALLEL_MIN_BYTES together and the machine has PARALLEL_MIN_CORES cores).
    """
    heads = [read_head(run_dir) for run_dir in run_dirs]
    jobs = [
        (str(head.run_dir / "tenants" / name / EVENTS_NAME), name, f"{head.run_dir.name}/tenants/{name}/{EVENTS_NAME}")
        for head in heads
        for name in head.tenants
        if (head.run_dir / "tenants" / name / EVENTS_NAME).is_file()
    ]
    logs = _read_all(jobs, progress, parallel)

    for run in heads:
        for name in run.tenants:
            path = run.run_dir / "tenants" / name / EVENTS_NAME
            log = logs.get(str(path))
            if log is None:
                log = TenantLog(name=name, events_path=None)
                run.warnings.append(f"tenant {name}: no {EVENTS_NAME} in {path.parent}; it logged nothing")
            run.warnings.extend(log.warnings)
            run.tenants[name] = log
        if run.config is None:
            run.warnings.append(f"no {CONFIG_NAME} in {run.run_dir}: solo baselines cannot be matched for this run")
        tpath = run.run_dir / TELEMETRY_NAME
        if tpath.is_file():
            run.telemetry = read_telemetry(tpath, f"{run.run_dir.name}/{TELEMETRY_NAME}")
            run.warnings.extend(run.telemetry.warnings)
    return heads


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

