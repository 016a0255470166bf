"""Hydra's view of the schema: ``TenantConfig`` with one options block per backend.

A tenant's backend options live under ``tenants.<t>.<backend name>`` (``tenants.a.vllm.
gpu_memory_utilization=0.4``). The blocks come from the backends' declarations
(``backends.BACKENDS``: each names its options dataclass), so a new backend's options are
composed, type-checked by Hydra and converted by ``OmegaConf.to_object`` without editing this
module. The composed classes are built once per process and are importable by name from here
(``ComposedTenantConfig``, ``ComposedExperimentConfig``), so Hydra's launchers can pickle a
config that refers to them.
"""

from __future__ import annotations

import dataclasses
from functools import cache
from typing import Any

from multitenant.backends import BACKENDS
from multitenant.config.schema import ExperimentConfig, TenantConfig

SCHEMA_NAME = "experiment_schema"  # what every experiment file names first in its defaults list


@cache
def _composed() -> tuple[type[TenantConfig], type[ExperimentConfig]]:
    blocks = [
        (name, backend.options, dataclasses.field(default_factory=backend.options))
        for name, backend in BACKENDS.items()
        if backend.options is not None
    ]
    tenant = dataclasses.make_dataclass("ComposedTenantConfig", blocks, bases=(TenantConfig,))
    tenant.__module__ = __name__
    experiment = dataclasses.make_dataclass(
        "ComposedExperimentConfig",
        [("tenants", dict[str, tenant], dataclasses.field(default_factory=dict))],  # type: ignore[valid-type]
        bases=(ExperimentConfig,),
    )
    experiment.__module__ = __name__
    return tenant, experiment


def experiment_schema() -> type[ExperimentConfig]:
    """The experiment dataclass Hydra composes against (tenants with their options blocks)."""
    return _composed()[1]


def __getattr__(name: str) -> Any:
    # The composed classes by name, for unpickling in another process (submitit launchers).
    if name == "ComposedTenantConfig":
        return _composed()[0]
    if name == "ComposedExperimentConfig":
        return _composed()[1]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def register_configs() -> None:
    """Register the schema so experiment files can name it in their defaults list."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name=SCHEMA_NAME, node=experiment_schema())
