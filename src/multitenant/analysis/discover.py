"""Finding runs: the run folders under a path, the runs beside a run (where its solo
baselines usually live) and the tenants of a run folder."""

from __future__ import annotations

import os
from pathlib import Path

from multitenant.analysis.columns import AnalysisError
from multitenant.config.schema import ExperimentConfig
from multitenant.schema import Manifest

MANIFEST_NAME = "manifest.json"
CONFIG_NAME = "config.resolved.yaml"
TELEMETRY_NAME = "telemetry.jsonl"
EVENTS_NAME = "events.jsonl"


def find_run_dirs(path: str | os.PathLike[str]) -> list[Path]:
    """Run folders at or below ``path`` (a folder is a run when it holds ``manifest.json``).

    A run's own sub-folders are not searched (a run never contains another run).
    """
    root = Path(path)
    if not root.exists():
        raise AnalysisError(f"{root} does not exist; pass a run folder, a sweep folder or a folder of runs")
    if not root.is_dir():
        raise AnalysisError(f"{root} is not a folder; pass the run folder that holds manifest.json")
    if (root / MANIFEST_NAME).is_file():
        return [root]
    runs: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        if MANIFEST_NAME in filenames:
            runs.append(Path(dirpath))
            dirnames.clear()  # do not descend into a run
        else:
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
    if not runs:
        raise AnalysisError(
            f"{root} is not an experiment: no {MANIFEST_NAME} in it or below; "
            "pass a run folder written by mt-run (or a folder that contains such runs)"
        )
    return sorted(runs)


def tenant_names(run_dir: Path, manifest: Manifest, config: ExperimentConfig | None) -> list[str]:
    """Config order first (it is the order ``split`` uses), then the manifest, then folders."""
    names: list[str] = []
    for source in (config.tenants if config is not None else {}, manifest.tenants):
        for name in source:
            if str(name) not in names:
                names.append(str(name))
    tenants_dir = run_dir / "tenants"
    if tenants_dir.is_dir():
        for child in sorted(tenants_dir.iterdir()):
            if child.is_dir() and child.name not in names:
                names.append(child.name)
    return names


def find_beside(run_dir: Path, max_depth: int = 3) -> list[Path]:
    """Run folders near ``run_dir`` where a solo baseline usually lives.

    mt-run writes ``<output_root>/<name>/<timestamp>`` and, for sweeps,
    ``<output_root>/<name>/sweep-<timestamp>/job<N>`` (the sweep folder holds Hydra's
    ``multirun.yaml``). The search root is that ``<output_root>``: the run's grandparent, or its
    great-grandparent for a sweep job; it is searched ``max_depth`` folders deep.
    """
    run_dir = run_dir.resolve()
    root = run_dir.parent.parent
    if (run_dir.parent / "multirun.yaml").is_file():
        root = root.parent
    found: list[Path] = []
    base_depth = len(root.parts)
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        if MANIFEST_NAME in filenames and here != run_dir:
            found.append(here)
            dirnames.clear()
            continue
        if len(here.parts) - base_depth >= max_depth:
            dirnames.clear()
        else:
            dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d != "tenants")
    return found
