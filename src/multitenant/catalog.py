"""The experiments under configs/: their names, their tenants and what they need to run.

Read from the YAML files alone (no Hydra composition, no import of a backend), so ``mt-run``
can list the experiments and name a wrong tenant in one line before anything is composed.
An experiment needs a GPU when its ``mode`` is not ``cpu``, and the vLLM stack when one of its
tenants is a ``vllm`` tenant or an ``openai`` tenant that launches a vLLM server.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

GROUPS = ("solo", "multitenant")
_TENANT_DEFAULT = re.compile(r"^/?tenant@tenants\.([^:\s]+)$")


@dataclass
class ExperimentInfo:
    """One experiment file: its name (``solo/tiny_llama``), tenants (name -> backend) and needs."""

    name: str
    mode: str | None
    tenants: dict[str, str | None] = field(default_factory=dict)
    needs_vllm: bool = False

    @property
    def needs_gpu(self) -> bool:
        return self.mode not in (None, "cpu")

    def needs(self) -> str:
        """``GPU``, ``vLLM``, both, or '' (runs on a CPU with the core install)."""
        return ", ".join(n for n, yes in (("GPU", self.needs_gpu), ("vLLM", self.needs_vllm)) if yes)


def _load(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return {}
    return data if isinstance(data, dict) else {}


def _launches_vllm(spec: dict[str, Any]) -> bool:
    launch = (spec.get("openai") or {}).get("launch") if isinstance(spec.get("openai"), dict) else None
    return isinstance(launch, str) and "vllm" in launch


def experiment_info(config_dir: Path, name: str) -> ExperimentInfo:
    """What ``configs/<name>.yaml`` holds (tenants from its defaults list and its ``tenants:``)."""
    data = _load(config_dir / f"{name.removesuffix('.yaml')}.yaml")
    info = ExperimentInfo(name=name, mode=data.get("mode"))
    specs: dict[str, dict[str, Any]] = {}
    for entry in data.get("defaults") or []:
        if isinstance(entry, dict):
            for key, value in entry.items():
                m = _TENANT_DEFAULT.match(str(key))
                if m and isinstance(value, str):
                    specs[m.group(1)] = _load(config_dir / "tenant" / f"{value}.yaml")
    for tenant, block in (data.get("tenants") or {}).items():
        if isinstance(block, dict):
            specs[str(tenant)] = {**specs.get(str(tenant), {}), **block}
    for tenant, spec in specs.items():
        backend = spec.get("backend", "hf")
        info.tenants[tenant] = backend
        info.needs_vllm = info.needs_vllm or backend == "vllm" or (backend == "openai" and _launches_vllm(spec))
    return info


def experiments(config_dir: Path) -> list[ExperimentInfo]:
    """Every experiment under ``configs/solo`` and ``configs/multitenant``, sorted by name."""
    names = sorted(f"{group}/{p.stem}" for group in GROUPS for p in (config_dir / group).glob("*.yaml"))
    return [experiment_info(config_dir, n) for n in names]
