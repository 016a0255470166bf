"""Where a sweep's wall time went: the measured share of each sweep folder.

Per sweep folder (a run's parent folder):
  share = Σ window lengths of its ok runs / (last run's ended_ns - first run's started_ns)
on the host's CLOCK_MONOTONIC; a folder whose runs ran on several hosts uses
``started_wall``/``ended_wall`` instead. Several folders (from several nodes) are reported one
by one, and pooled as Σ windows / Σ folder wall times. Per tenant: mean ``load_s`` and
``warmup_s`` of the manifests.
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from multitenant.analysis.metrics import RunMetrics
from multitenant.analysis.names import NS_PER_S

# One run of the sweep and whether it counts in the means (its status is ok).
CostRun = tuple[RunMetrics, bool]


@dataclass
class FolderCost:
    """Where one sweep folder's wall time went (module docstring, "Wall-time share")."""

    folder: Path
    runs: int
    hosts: list[str]
    clock: str  # "monotonic" (one host) or "wall" (several hosts), "" when no times
    window_s: float
    wall_s: float | None
    share: float | None
    load_s: dict[str, float]
    warmup_s: dict[str, float]


@dataclass
class Cost:
    folders: list[FolderCost]
    window_s: float
    wall_s: float | None  # Σ folder wall times
    share: float | None  # pooled: Σ windows / Σ folder wall times
    load_s: dict[str, float]  # mean over every run
    warmup_s: dict[str, float]



def _wall_ns(text: object) -> int | None:
    """An ISO 8601 wall time (manifest ``started_wall``) as ns since the epoch."""
    if not isinstance(text, str) or not text:
        return None
    try:
        moment = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=dt.timezone.utc)
    return int(round(moment.timestamp() * 1e6)) * 1000


def _mean_per_tenant(runs: Sequence[CostRun], key: str) -> dict[str, float]:
    values: dict[str, list[float]] = {}
    for rm, _ in runs:
        for name, record in rm.run.manifest.tenants.items():
            value = getattr(record, key)
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                values.setdefault(str(name), []).append(float(value))
    return {name: float(np.mean(v)) for name, v in values.items()}


def folder_cost(folder: Path, runs: Sequence[CostRun]) -> FolderCost:
    """Σ windows of the ok runs / (last ended - first started) of one folder's runs."""
    hosts = sorted({str(rm.run.manifest.host.hostname or "?") for rm, _ in runs})
    window_s = sum(rm.window_s or 0.0 for rm, counts in runs if counts)
    clock = "monotonic" if len(hosts) == 1 else "wall"
    starts: list[int] = []
    ends: list[int] = []
    for rm, _ in runs:
        m = rm.run.manifest
        start: int | None
        end: int | None
        if clock == "monotonic":
            start, end = m.started_ns, m.ended_ns
        else:
            start, end = _wall_ns(m.started_wall), _wall_ns(m.ended_wall)
        if isinstance(start, int):
            starts.append(start)
            # A run killed before it recorded its end still ran from its start.
            ends.append(end if isinstance(end, int) else start)
    wall_s = (max(ends) - min(starts)) / NS_PER_S if starts else None
    share = window_s / wall_s if wall_s else None
    return FolderCost(
        folder=folder,
        runs=len(runs),
        hosts=hosts,
        clock=clock if starts else "",
        window_s=window_s,
        wall_s=wall_s,
        share=share,
        load_s=_mean_per_tenant(runs, "load_s"),
        warmup_s=_mean_per_tenant(runs, "warmup_s"),
    )


def sweep_cost(runs: Sequence[CostRun]) -> Cost:
    """Wall-time share per sweep folder (a run's parent) and pooled over the folders."""
    by_folder: dict[Path, list[CostRun]] = {}
    for run in runs:
        by_folder.setdefault(run[0].run.run_dir.resolve().parent, []).append(run)
    folders = [folder_cost(f, rs) for f, rs in sorted(by_folder.items())]
    window_s = sum(f.window_s for f in folders)
    walls = [f.wall_s for f in folders if f.wall_s]
    wall_s = sum(walls) if walls and len(walls) == len(folders) else None
    return Cost(
        folders=folders,
        window_s=window_s,
        wall_s=wall_s,
        share=window_s / wall_s if wall_s else None,
        load_s=_mean_per_tenant(runs, "load_s"),
        warmup_s=_mean_per_tenant(runs, "warmup_s"),
    )
