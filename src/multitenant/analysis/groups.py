"""Which runs form one sweep. ``mt-analyze experiments`` finds runs of many experiments; treated
as one sweep they gave a table with an axis for every override any of them set. So runs are
grouped first:

* a run in a sweep folder (its parent holds Hydra's ``multirun.yaml``) belongs to that folder's
  group, unless the folder (or the run itself) was named as a PATH;
* a run named as a PATH, a run of a sweep folder named as a PATH, and a run outside any sweep
  folder belong to the group of its experiment (manifest ``name``): sweep folders of one
  experiment named together (copies from several cluster nodes) and a list of runs of one
  experiment stay one sweep, as before.

A group of several runs (or a job of a multirun) gets a sweep (``sweep.is_sweep``); runs of
different groups never share a sweep table.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from multitenant.analysis.metrics import RunMetrics


def sweep_folder(run_dir: Path) -> Path | None:
    """The run's sweep folder (its parent, when that holds multirun.yaml), else None."""
    parent = run_dir.resolve().parent
    return parent if (parent / "multirun.yaml").is_file() else None


def group_runs(rms: Sequence[RunMetrics], paths: Sequence[Path]) -> list[list[RunMetrics]]:
    """``rms`` in groups (module docstring), in order of first appearance."""
    named = {Path(p).resolve() for p in paths}
    groups: dict[tuple[str, str], list[RunMetrics]] = {}
    for rm in rms:
        run_dir = rm.run.run_dir.resolve()
        folder = sweep_folder(run_dir)
        if folder is not None and folder not in named and run_dir not in named:
            key = ("folder", str(folder))
        else:
            key = ("experiment", rm.run.name)
        groups.setdefault(key, []).append(rm)
    return list(groups.values())


def common_folder(rms: Sequence[RunMetrics]) -> Path:
    """The deepest folder holding every run of ``rms``."""
    return Path(os.path.commonpath([str(rm.run.run_dir.resolve().parent) for rm in rms]))


def group_name(group: Sequence[RunMetrics], root: Path) -> str:
    """A folder name for a group's sweep outputs: its common folder below ``root`` ('/' -> '__'),
    else its experiment's name."""
    rel = common_folder(group).relative_to(root) if common_folder(group).is_relative_to(root) else Path()
    return "__".join(rel.parts) or group[0].run.name or "sweep"
